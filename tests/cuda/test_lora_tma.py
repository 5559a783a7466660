"""The TMA-descriptor candidate (kernels.lora_tma, ops.lora_tma) in the interpreter vs float64.

The interpreter runs host tensor descriptors (out-of-range tile parts read as zero) and the
persistent tile loop; it says nothing about TMA on a GPU (bench/gpu_session.sh runs that).
Outputs start NaN-filled (conftest: LORA_KERNELS_POISON=1), so an unwritten tile shows.
"""

from __future__ import annotations

import os

import pytest
import torch

from lora_kernels.ops import lora_tma, lowrank
from lora_kernels.ops.lowrank import Needs, Saved
from lora_kernels.reference.lora import lora_linear as ref_lora_linear

from conftest import DEVICE, DTYPES
from helpers import assert_close

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels on CPU need TRITON_INTERPRET=1",
)

ALL = Needs(True, True, True)
# (T, in, out, r): odd T (1, 3, 37), rank 1, tiles with tails in M and N, in/out multiples of 8
SHAPES = [(1, 16, 8, 1), (3, 24, 40, 7), (37, 48, 40, 5)]


def _rows(t, kind):
    """'contig'; 'rowpad' (row stride +8: the descriptor reads it in place); 'offset' (one
    element in: unaligned rows, the launcher copies)."""
    if kind == "contig":
        return t
    start = {"rowpad": 0, "offset": 1}[kind]
    buf = torch.full((t.shape[0], t.shape[1] + 8 + start), float("nan"), dtype=t.dtype,
                     device=t.device)
    v = buf[:, start:start + t.shape[1]]
    v.copy_(t)
    return v


# every dtype on contiguous rows; the strided layouts on bf16 (interpreter time bounded)
CASES = ([(dt, sh, "contig") for dt in DTYPES for sh in SHAPES[1:]]
         + [(torch.bfloat16, SHAPES[0], "offset"), (torch.bfloat16, SHAPES[2], "rowpad"),
            (torch.float32, SHAPES[1], "offset")])


@pytest.mark.parametrize("dtype,shape,kind", CASES)
def test_tma_candidate_vs_float64(dtype, shape, kind):
    T, i, o, r = shape
    dev = DEVICE
    x = _rows(torch.randn(T, i, dtype=dtype, device=dev), kind)
    w = (torch.randn(o, i, device=dev) * i ** -0.5).to(dtype)
    b = torch.randn(o, dtype=dtype, device=dev)
    A = (torch.randn(r, i, device=dev) * i ** -0.5).to(dtype)
    B = torch.randn(o, r, dtype=dtype, device=dev)
    dy = _rows(torch.randn(T, o, dtype=dtype, device=dev), kind)
    y, s = lora_tma.fwd(x, w, b, A, B, 0.7, 0.0, None)
    dx, dA, dB = lora_tma.bwd(dy, Saved(x, w, A, B, s, 0.7, 0.0, None), ALL)
    x64, A64, B64 = (t.detach().cpu().double().requires_grad_() for t in (x, A, B))
    y64 = ref_lora_linear(x64, w.cpu().double(), b.cpu().double(), A64, B64, 0.7)
    y64.backward(dy.cpu().double())
    assert_close(y, y64, dtype, "y")
    assert_close(dx, x64.grad, dtype, "dx")
    assert_close(dA, A64.grad, dtype, "dA")
    assert_close(dB, B64.grad, dtype, "dB")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_candidate_dropout_matches_triton_backend(dtype):
    """Same seed, same mask counters (t*K + k in the shrink, t*N + n in the dX epilogue): the
    candidate computes what backend='triton' computes (itself tested against float64)."""
    T, i, o, r, p = 21, 32, 24, 4, 0.3
    dev = DEVICE
    x = torch.randn(T, i, dtype=dtype, device=dev)
    w = (torch.randn(o, i, device=dev) * i ** -0.5).to(dtype)
    A = (torch.randn(r, i, device=dev) * i ** -0.5).to(dtype)
    B = torch.randn(o, r, dtype=dtype, device=dev)
    dy = torch.randn(T, o, dtype=dtype, device=dev)
    seed = torch.tensor([1234], dtype=torch.int64, device=dev)
    y, s = lora_tma.fwd(x, w, None, A, B, 0.5, p, seed)
    yt, st = lowrank.triton_fwd(x, w, None, A, B, 0.5, p, seed)
    g = lora_tma.bwd(dy, Saved(x, w, A, B, s, 0.5, p, seed), ALL)
    gt = lowrank.triton_bwd(dy, Saved(x, w, A, B, st, 0.5, p, seed), ALL)
    assert torch.equal(s, st)
    assert_close(y, yt.double(), dtype, "y")
    for name, a, b_ in zip(("dx", "dA", "dB"), g, gt):
        assert_close(a, b_.double(), dtype, name)


def test_tma_candidate_refuses_unaddressable_widths():
    x = torch.randn(4, 12, dtype=torch.bfloat16, device=DEVICE)  # 24 bytes per row
    w = torch.randn(8, 12, dtype=torch.bfloat16, device=DEVICE)
    A, B = torch.randn(2, 12, dtype=torch.bfloat16), torch.randn(8, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="in_features"):
        lora_tma.fwd(x, w, None, A.to(DEVICE), B.to(DEVICE), 1.0, 0.0, None)
