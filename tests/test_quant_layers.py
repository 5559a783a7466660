"""Adapter layers and models on quantized bases: from_linear(quantize=...), bitsandbytes Linear4bit
taken as it is, inject on a bnb-4bit tiny Llama, PEFT interop, and a QLoRA fine-tune matching PEFT +
bitsandbytes step for step."""

import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.quant import FP8Weight, Int8Weight, NF4Weight

from conftest import DEVICE
from helpers import assert_close, randn

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="bitsandbytes interop runs on CPU")

METHOD_KW = {"lora": dict(r=3, alpha=6.0), "nora": dict(outer_rank=6, inner_rank=2),
             "curlora": dict(rank=3), "deep_lora": dict(rank=3), "dora": dict(r=3),
             "glora": dict(rank=2)}


def _trainables(layer):
    return {n: p for n, p in layer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", sorted(set(METHOD_KW) & set(lk.METHODS)))
@pytest.mark.parametrize("fmt", ["nf4", "int8", "fp8"])
def test_every_layer_on_a_quantized_base(method, fmt):
    """A layer on quantize=fmt equals the same layer on the dense deq(W), forward and the
    trainable tensors' gradients; the base is stored quantized (no dense copy kept)."""
    torch.manual_seed(3)
    lin = nn.Linear(64, 40)
    cls = lk.METHODS[method]
    lq = cls.from_linear(lin, quantize=fmt, **METHOD_KW[method])
    assert lq.quantized and not any(p.dim() == 2 and p.shape == (40, 64)
                                    for p in lq.parameters())
    dense = nn.Linear(64, 40)
    with torch.no_grad():
        dense.weight.copy_(lq.weight.dequantize())
        dense.bias.copy_(lin.bias)
    torch.manual_seed(3)
    ld = cls.from_linear(dense, **METHOD_KW[method])
    with torch.no_grad():   # same adapter state (random inits / sampled indices)
        for n, t in ld.state_dict().items():
            if n in lq.state_dict() and not n.startswith("weight"):
                t.copy_(lq.state_dict()[n])
        for p in _trainables(lq).values():
            p.add_(0.05 * torch.randn_like(p))
        for n, p in _trainables(ld).items():
            p.copy_(_trainables(lq)[n])
    x = randn(5, 64)
    yq, yd = lq(x), ld(x)
    assert_close(yq, yd.double(), torch.float32, f"{method} y")
    gq = torch.autograd.grad(yq.square().sum(), list(_trainables(lq).values()))
    gd = torch.autograd.grad(yd.square().sum(), list(_trainables(ld).values()))
    for a, b, n in zip(gq, gd, _trainables(lq)):
        assert_close(a, b.double(), torch.float32, f"{method} grad {n}")
    # merging dequantises and adds; the result is dense (not re-quantised)
    m = lq.merged()
    assert isinstance(m.weight, nn.Parameter) and m.weight.dtype == torch.float32
    assert_close(m(x), yq.detach().double(), torch.float32, "merged")


def test_quantized_layer_state_dict_and_bad_args():
    lin = nn.Linear(64, 24)
    a = lk.LoRALinear.from_linear(lin, r=2, quantize="nf4")
    b = lk.LoRALinear.from_linear(nn.Linear(64, 24), r=2, quantize="nf4")
    b.load_state_dict(a.state_dict())
    x = randn(3, 64)
    assert torch.equal(a(x), b(x))
    assert isinstance(a.weight, NF4Weight) and a.weight.nested
    assert isinstance(lk.LoRALinear.from_linear(lin, r=2, quantize="int8").weight, Int8Weight)
    assert isinstance(lk.LoRALinear.from_linear(lin, r=2, quantize="fp8").weight, FP8Weight)
    with pytest.raises(ValueError, match="quantize must be one of"):
        lk.LoRALinear.from_linear(lin, r=2, quantize="nf3")


# ----------------------------------------------------------------------------- bitsandbytes models
def _bnb():
    return pytest.importorskip("bitsandbytes")


def bnb_tiny_llama(seed=1):
    _bnb()
    from lora_kernels.examples.qlora import bnb_tiny_llama as build

    return build(seed)


TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_inject_takes_linear4bit_as_it_is():
    bnb = _bnb()
    model = bnb_tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    ptr = q.weight.data_ptr()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    lk.inject(model, "lora", target_modules=TARGETS, r=4, alpha=8.0)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, lk.LoRALinear) and isinstance(layer.weight, NF4Weight)
    assert layer.weight.packed.data_ptr() == ptr          # bnb's codes, not a copy
    assert isinstance(model.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)
    with torch.no_grad():                                  # B = 0: the base model, exactly
        got = model(ids).logits
    assert_close(got, ref.double(), torch.float32, "logits")


def _peft_and_ours(seed=1, r=4, alpha=8.0):
    import peft

    torch.manual_seed(seed)
    base = bnb_tiny_llama(seed)
    ours = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                          init_lora_weights=True)
    pm = peft.get_peft_model(base, cfg)
    lk.inject(ours, "lora", target_modules=TARGETS, r=r, alpha=alpha)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the same initial factors, B nonzero so every gradient is exercised
        for name, mod in pm.named_modules():
            if type(mod).__name__ == "Linear4bit" and hasattr(mod, "lora_A"):
                mine = ours.get_submodule(name.removeprefix("base_model.model."))
                mod.lora_B["default"].weight.copy_(
                    torch.randn(mod.lora_B["default"].weight.shape, generator=g) * 0.02)
                mine.lora_A.copy_(mod.lora_A["default"].weight)
                mine.lora_B.copy_(mod.lora_B["default"].weight)
    return pm, ours


def test_qlora_finetune_matches_peft_bitsandbytes_step_for_step():
    """Five AdamW steps of a QLoRA fine-tune through inject on the bnb-4bit model: losses and
    final factors equal PEFT + bitsandbytes' (same initial factors, fp32)."""
    from lora_kernels.examples.qlora import train

    pm, ours = _peft_and_ours()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(5))
    lp = train(pm, ids, steps=5)
    lo = train(ours, ids, steps=5)
    assert len(lp) == len(lo) == 5 and lp[-1] < lp[0]
    for a, b in zip(lo, lp):
        assert abs(a - b) <= 1e-5 * abs(b), (lo, lp)
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p
              for n, p in pm.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert len(mine) == len(theirs) == 2 * 2 * len(TARGETS)
    for n, p in mine.items():
        key = n.replace("lora_A", "lora_A.weight").replace("lora_B", "lora_B.weight")
        assert_close(p, theirs[key].double(), torch.float32, n, factor=10)


def test_peft_linear4bit_adapter_loads_and_saves_unchanged(tmp_path):
    import peft

    pm, ours = _peft_and_ours(seed=2)
    pm.save_pretrained(tmp_path / "peft")
    loaded = lk.load_peft_adapter(tmp_path / "peft")
    assert len(loaded) == 2 * len(TARGETS)
    for name, (A, B, s) in loaded.items():
        mine = ours.get_submodule(name)
        assert torch.equal(A, mine.lora_A) and torch.equal(B, mine.lora_B)
        assert s == mine.scaling
    lk.save_peft_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(bnb_tiny_llama(2), tmp_path / "ours")
    # train mode: in eval bnb repacks the weight for its bf16 CPU inference kernel (~1e-3 off)
    back.train()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert_close(ours(ids).logits, back(ids).logits.double(), torch.float32, "logits")
