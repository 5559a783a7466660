"""Quantized experts under the MoE block (moe.LoRAExperts(quantize=...)): outputs and LoRA
gradients against float64 transformers experts modules running the dequantized weights plus the
LoRA delta (torch.func.functional_call), on tiny Qwen3-MoE and gpt-oss models."""

import copy

import pytest
import torch
from test_moe_blocks import TARGETS, tiny_moe

from lora_kernels import moe
from lora_kernels.quant import QuantizedExperts

QUANTS = [("nf4", {}), ("int8", {}), ("fp8", {}), ("fp8", {"block_size": 128})]


def _ref(dense, qmods, layer, hidden, idx, wts):
    """float64: the transformers experts forward over deq(W_e) + s B_e A_e (layout-aware)."""
    params = {}
    for p, q in qmods.items():
        w = q.double()                                              # (E, out, in)
        if p in layer.lora_A:
            A64 = layer.lora_A[p].detach().double().requires_grad_()
            B64 = layer.lora_B[p].detach().double().requires_grad_()
            params[p + "_A"], params[p + "_B"] = A64, B64
            w = w + layer.scaling[p] * torch.einsum("eor,eri->eoi", B64, A64)
        params[p] = w.transpose(1, 2) if getattr(dense, "is_transposed", False) else w
    y = torch.func.functional_call(dense, {p: params[p] for p in qmods},
                                   (hidden.double(), idx, wts.double()))
    return y, params


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("qi", range(len(QUANTS)))
def test_quantized_block_matches_float64(arch, qi):
    fmt, kw = QUANTS[qi]
    model = tiny_moe(arch)
    dense = next(m for m in model.modules() if moe.is_experts(m))
    ref_mod = copy.deepcopy(dense)
    torch.manual_seed(1)
    layer = moe.LoRAExperts(dense, TARGETS, r=3, alpha=5.0, quantize=fmt, **kw)
    with torch.no_grad():
        for B in layer.lora_B.values():
            B.normal_(0, 0.3)
    qmods = {p: getattr(layer.base_layer, p) for p in TARGETS}
    assert all(isinstance(q, QuantizedExperts) and q.fmt == fmt for q in qmods.values())
    assert not any(isinstance(t, torch.nn.Parameter) and t.requires_grad
                   for t in layer.base_layer.parameters() if t.dim() == 3)
    T, E, k = 11, layer.num_experts, 2
    hidden = torch.randn(T, 16, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    wts = torch.rand(T, k, dtype=torch.float64)
    y = layer(hidden, idx, wts)
    y64, p64 = _ref(ref_mod, qmods, layer, hidden, idx, wts)
    torch.testing.assert_close(y, y64, rtol=1e-9, atol=1e-10)
    # the quantization is real: the dense (unquantized) experts give another output
    assert (ref_mod(hidden, idx, wts) - y64).abs().max() > 1e-4
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy)
    for p in TARGETS:
        assert layer.lora_A[p].grad.abs().sum() > 0
        torch.testing.assert_close(layer.lora_A[p].grad, p64[p + "_A"].grad, rtol=1e-9,
                                   atol=1e-10)
        torch.testing.assert_close(layer.lora_B[p].grad, p64[p + "_B"].grad, rtol=1e-9,
                                   atol=1e-10)
    # merged(): deq(W) + s B A dense, the same outputs as the LoRA block
    merged = layer.merged()
    torch.testing.assert_close(merged(hidden, idx, wts), y64, rtol=1e-9, atol=1e-10)


def test_quantized_block_float32_and_prequantized():
    """float32 model, experts passed already quantized (FP8 128x128 blocks) in (E, out, in)."""
    model = tiny_moe("gpt_oss", dtype=torch.float32)
    dense = next(m for m in model.modules() if moe.is_experts(m))
    ref_mod = copy.deepcopy(dense).double()
    qmods = {p: QuantizedExperts.from_float(getattr(dense, p).detach().transpose(1, 2), "fp8",
                                            block_size=128) for p in TARGETS}
    layer = moe.LoRAExperts(dense, ["down_proj"], r=2, quantize=qmods)
    with torch.no_grad():
        layer.lora_B["down_proj"].normal_(0, 0.3)
    T, E = 7, layer.num_experts
    hidden = torch.randn(T, 16)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(T)])
    wts = torch.rand(T, 2)
    y = layer(hidden, idx, wts)
    assert y.dtype == torch.float32
    y64, p64 = _ref(ref_mod, qmods, layer, hidden, idx, wts)
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-5)
    y.sum().backward()
    y64.sum().backward()
    torch.testing.assert_close(layer.lora_A["down_proj"].grad.double(), p64["down_proj_A"].grad,
                               rtol=1e-4, atol=1e-5)


def test_quantized_block_bad_input():
    """A quantized format of another layout / unknown format / non-torch backend: ValueError,
    and the base experts module is left as it was."""
    model = tiny_moe("gpt_oss")
    dense = next(m for m in model.modules() if moe.is_experts(m))
    before = {n: t.clone() for n, t in dense.named_parameters()}
    # gpt-oss stores (E, in, out); quantizing it as is gives the wrong layout
    wrong = {p: QuantizedExperts.from_float(getattr(dense, p).detach(), "nf4") for p in TARGETS}
    with pytest.raises(ValueError, match=r"quantize\['gate_up_proj'\].*\(E, out, in\)"):
        moe.LoRAExperts(dense, TARGETS, quantize=wrong)
    with pytest.raises(ValueError, match="quantize must be"):
        moe.LoRAExperts(dense, TARGETS, quantize="int4")
    with pytest.raises(ValueError, match="quantize names"):
        moe.LoRAExperts(dense, TARGETS, quantize={"up_proj": wrong["down_proj"]})
    with pytest.raises(ValueError, match="backend='torch'"):
        moe.LoRAExperts(dense, TARGETS, quantize="nf4", backend="triton")
    after = dict(dense.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
