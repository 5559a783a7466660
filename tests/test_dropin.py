"""Drop-in for existing models (issue 13): transformers' Conv1D (GPT-2) wherever nn.Linear is,
inject_adapter (trainable layers from a loaded adapter) and merge_and_unload, against PEFT on tiny
randomly initialised transformers models (no downloads)."""

import copy
import json

import pytest
import torch
from torch import nn

import lora_kernels as lk

from conftest import DEVICE
from helpers import rel_err, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _ids(batch=3, length=7):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(2)).to(
        DEVICE)


def _conv(in_f, out_f, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    c = Conv1D(out_f, in_f).to(DEVICE, dtype)
    with torch.no_grad():
        c.weight.normal_(0, in_f ** -0.5)
        c.bias.normal_(0, 0.1)
    return c


def _as_linear_copy(conv):
    lin = nn.Linear(conv.weight.shape[0], conv.weight.shape[1]).to(DEVICE, conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    return lin


# ----------------------------------------------------------------------------- Conv1D layers
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_layer_from_conv1d_uses_transposed_view(backend, dtype):
    if backend == "triton" and not lk.triton_available():
        pytest.skip("triton backend unavailable on this device (CPU without TRITON_INTERPRET=1)")
    in_f, out_f, r, T = 37, 23, 3, 5
    conv = _conv(in_f, out_f, dtype)
    layer = lk.LoRALinear.from_linear(conv, r, alpha=6.0, backend=backend)
    assert layer.fan_in_fan_out
    # the frozen base is the (out, in) transposed view of a contiguous (in, out) copy: no
    # per-call transpose, no copy of the caller's weight
    assert layer.weight.shape == (out_f, in_f) and layer.weight.stride() == (1, out_f)
    assert layer.weight.data_ptr() != conv.weight.data_ptr()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, T, in_f, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    y = layer(x)
    dy = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    # float64 reference on the Conv1D's own (in, out) weight
    x64 = x.detach().double().requires_grad_()
    A64 = layer.lora_A.detach().double().requires_grad_()
    B64 = layer.lora_B.detach().double().requires_grad_()
    ref = x64 @ conv.weight.double() + conv.bias.double() + 2.0 * (x64 @ A64.t()) @ B64.t()
    rx, rA, rB = torch.autograd.grad(ref, (x64, A64, B64), dy.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for n, a, b in (("y", y, ref), ("dx", gx, rx), ("dA", gA, rA), ("dB", gB, rB)):
        assert rel_err(a, b) < tol, (n, rel_err(a, b))


@pytest.mark.parametrize("method,kw", [
    ("nora", dict(outer_rank=4, inner_rank=2)), ("curlora", dict(rank=3)),
    ("deep_lora", dict(rank=3)), ("glora", dict(rank=2)), ("lora", dict(r=3, alpha=2.0)),
])
def test_every_method_from_conv1d_equals_from_linear(method, kw):
    conv = _conv(29, 17)
    lin = _as_linear_copy(conv)
    cls = lk.METHODS[method]
    torch.manual_seed(5)
    a = cls.from_linear(conv, **kw)
    torch.manual_seed(5)
    b = cls.from_linear(lin, **kw)
    b.load_state_dict(a.state_dict())
    assert a.fan_in_fan_out and not b.fan_in_fan_out
    x = torch.randn(4, 29, device=DEVICE)
    assert rel_err(a(x), b(x)) < 1e-6
    assert rel_err(a.delta_weight(), b.delta_weight()) < 1e-6 or method == "glora"
    m = lk.merge_and_unload(nn.Sequential(a))[0]
    assert isinstance(m, Conv1D) and m.weight.shape == (29, 17)
    assert rel_err(m(x), b(x)) < 1e-5


def test_from_linear_refuses_other_modules():
    with pytest.raises(TypeError, match="nn.Linear or transformers' Conv1D"):
        lk.LoRALinear.from_linear(nn.Conv1d(3, 4, 1), r=2)


# ----------------------------------------------------------------------------- GPT-2 with PEFT
def _peft_gpt2(base, path, **cfg):
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False,
        **cfg))
    pm.save_pretrained(path)
    return pm.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_gpt2_adapter_from_peft_loads_injects_and_merges(tmp_path, use_rslora):
    base = tiny_gpt2()
    pm = _peft_gpt2(base, tmp_path, r=4, lora_alpha=64, use_rslora=use_rslora,
                    rank_pattern={"transformer.h.1.attn.c_attn": 2},
                    alpha_pattern={"transformer.h.0.mlp.c_proj": 5})
    ids = _ids()
    with torch.no_grad():
        want = pm(ids).logits
    ad = lk.load_peft_adapter(tmp_path)
    assert len(ad) == 6 and ad["transformer.h.1.attn.c_attn"][0].shape == (2, 32)
    assert ad["transformer.h.0.attn.c_attn"][1].shape == (96, 4)  # lora_B (out, r), PEFT layout
    m = lk.inject_adapter(copy.deepcopy(base), ad)
    assert isinstance(m.transformer.h[0].attn.c_attn, lk.LoRALinear)
    assert m.transformer.h[0].attn.c_attn.lora_A.requires_grad
    with torch.no_grad():
        got = m(ids).logits
    assert rel_err(got, want) < 1e-5
    # whole-model merge against PEFT's merge_and_unload
    merged = lk.merge_and_unload(m)
    peft_merged = pm.merge_and_unload()
    for name in ad:
        mod, ours = peft_merged.get_submodule(name), merged.get_submodule(name)
        assert type(ours) is Conv1D and not ours.weight.requires_grad
        assert ours.weight.shape == mod.weight.shape and ours.weight.is_contiguous()
        assert rel_err(ours.weight, mod.weight) < 1e-6, name
        assert torch.equal(ours.bias, mod.bias)
    with torch.no_grad():
        assert rel_err(merged(ids).logits, peft_merged(ids).logits) < 1e-5
    assert not any(isinstance(x, lk.AdapterLinear) for x in merged.modules())


def test_gpt2_inject_save_loads_in_peft(tmp_path):
    base = tiny_gpt2()
    m = lk.inject(copy.deepcopy(base), "lora", ["c_attn"], r=4, alpha=64)
    for layer in m.modules():
        if isinstance(layer, lk.LoRALinear):
            with torch.no_grad():
                layer.lora_B.normal_(0, 0.02)
    lk.save_peft_adapter(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 64
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        assert rel_err(pm(ids).logits, m(ids).logits) < 1e-5
    # round trip through our loader
    ad = lk.load_peft_adapter(tmp_path)
    m2 = lk.inject_adapter(copy.deepcopy(base), ad)
    with torch.no_grad():
        assert rel_err(m2(ids).logits, m(ids).logits) < 1e-6


# ----------------------------------------------------------------------------- inject_adapter
def test_inject_adapter_llama_mixed_ranks_matches_peft(tmp_path):
    base = tiny_llama()
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, use_rslora=True,
        init_lora_weights=False, rank_pattern={"model.layers.1.self_attn.q_proj": 2})).eval()
    pm.save_pretrained(tmp_path)
    ad = lk.load_peft_adapter(tmp_path)
    m = lk.inject_adapter(copy.deepcopy(base), ad, trainable=False)
    q1 = m.model.layers[1].self_attn.q_proj
    assert q1.r == 2 and q1.scaling == pytest.approx(8 / 2 ** 0.5) and not q1.lora_A.requires_grad
    ids = _ids()
    with torch.no_grad():
        assert rel_err(m(ids).logits, pm(ids).logits) < 1e-5
    merged = lk.merge_and_unload(m)
    pmm = pm.merge_and_unload()
    for name in ad:
        assert type(merged.get_submodule(name)) is nn.Linear
        assert rel_err(merged.get_submodule(name).weight, pmm.get_submodule(name).weight) < 1e-6
    with torch.no_grad():
        assert rel_err(merged(ids).logits, pmm(ids).logits) < 1e-5


def test_inject_adapter_trains():
    base = tiny_llama().train()
    base.requires_grad_(False)
    ad = {"model.layers.0.self_attn.q_proj": (torch.randn(3, 32), torch.zeros(32, 3), 2.0)}
    m = lk.inject_adapter(base, ad)
    layer = m.model.layers[0].self_attn.q_proj
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        "model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B"]
    loss = m(_ids(), labels=_ids()).loss
    loss.backward()
    assert layer.lora_B.grad.abs().sum() > 0


def test_inject_adapter_and_merge_refusals_change_nothing():
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    good = (torch.randn(2, 32), torch.randn(32, 2), 1.0)
    with pytest.raises(ValueError, match="does not have"):
        lk.inject_adapter(base, {"model.layers.0.self_attn.q_proj": good, "nope": good})
    with pytest.raises(ValueError, match="maps 32 -> 32 features but"):
        lk.inject_adapter(base, {"model.layers.0.self_attn.q_proj": good,
                                 "model.layers.0.self_attn.k_proj": good})
    with pytest.raises(TypeError, match="not an nn.Linear"):
        lk.inject_adapter(base, {"model.layers.0.self_attn": good})
    with pytest.raises(TypeError, match="lora_A"):
        lk.inject_adapter(base, {"model.layers.0.self_attn.q_proj": (1, 2, 3)})
    with pytest.raises(ValueError, match="empty"):
        lk.inject_adapter(base, {})
    with pytest.raises(ValueError, match="no adapter layer"):
        lk.merge_and_unload(base)
    assert not any(isinstance(x, lk.AdapterLinear) for x in base.modules())
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_base_from_conv1d_equals_from_linear(quantize):
    conv = _conv(64, 48)
    lin = _as_linear_copy(conv)
    a = lk.LoRALinear.from_linear(conv, r=2, alpha=4.0, quantize=quantize)
    b = lk.LoRALinear.from_linear(lin, r=2, alpha=4.0, quantize=quantize)
    b.load_state_dict(a.state_dict())
    assert a.fan_in_fan_out and not b.fan_in_fan_out
    x = torch.randn(3, 64, device=DEVICE)
    assert rel_err(a(x), b(x)) < 1e-6
    assert isinstance(lk.merge_and_unload(nn.Sequential(a))[0], Conv1D)
