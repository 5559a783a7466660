"""The CPU torch path keeps row padding out of torch's GEMM (issue 10, Intel AMX CPUs).

Decision: guard. On AMX, torch's bf16 GEMM reads the padding after each row of a row-strided
operand and multiplies it by zero, so NaN/inf in memory the caller never passed (other columns of
a larger buffer) makes ``lora_linear`` / ``glora_linear`` return NaN. A copy of x costs O(1/out)
of the base GEMM, so the public entry points hand such an x to the GEMMs compact
(``lora_kernels._cpu_gemm.compact_rows_for_cpu_gemm``). This machine may not have AMX, so the
behaviour is simulated: tests/cuda/amx_sim.py replaces ``F.linear`` / ``torch.mm`` with versions
that read the padding exactly as described; the unguarded internal path shows the simulation bites.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from amx_sim import padding_reading_linear, padding_reading_mm

import lora_kernels as lk
from lora_kernels._cpu_gemm import compact_rows_for_cpu_gemm
from lora_kernels.ops import lowrank
from lora_kernels.reference.lora import lora_linear as ref_lora_linear

from helpers import assert_close, spy_cpu_strategies


def _padded(t: torch.Tensor, pad: int = 8) -> torch.Tensor:
    """``t`` (rows, K) as a view into a NaN-filled (rows, K + pad) buffer."""
    buf = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype)
    v = buf[:, : t.shape[1]]
    v.copy_(t)
    return v


def _simulate_amx(monkeypatch):
    monkeypatch.setattr(F, "linear", padding_reading_linear(F.linear))
    monkeypatch.setattr(torch, "mm", padding_reading_mm(torch.mm))


def test_compact_rows_helper():
    x = torch.randn(5, 7).bfloat16()
    assert compact_rows_for_cpu_gemm(x) is x                      # compact: no copy
    xp = _padded(x)
    c = compact_rows_for_cpu_gemm(xp)
    assert c.is_contiguous() and torch.equal(c, x)
    x32 = _padded(torch.randn(5, 7))
    assert compact_rows_for_cpu_gemm(x32) is x32                  # fp32: left alone
    one = _padded(x[:1])
    assert compact_rows_for_cpu_gemm(one) is one                  # one row: no padding read


def test_lora_linear_torch_path_ignores_row_padding(monkeypatch):
    T, in_f, out_f, r = 13, 97, 75, 4
    x0 = torch.randn(T, in_f).bfloat16()
    w = (torch.randn(out_f, in_f) * in_f ** -0.5).bfloat16()
    b = torch.randn(out_f).bfloat16()
    A = (torch.randn(r, in_f) * in_f ** -0.5).bfloat16().requires_grad_()
    B = torch.randn(out_f, r).bfloat16().requires_grad_()
    _simulate_amx(monkeypatch)

    # the simulation bites: the unguarded implementation on the padded x returns NaN
    y_raw, _ = lowrank.torch_fwd(_padded(x0), w, b, A.detach(), B.detach(), 0.5, 0.0, None)
    assert torch.isnan(y_raw).all()

    x = _padded(x0).requires_grad_()
    y = lk.lora_linear(x, w, b, A, B, 0.5, backend="torch")
    dy = torch.randn(T, out_f).bfloat16()
    y.backward(dy)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x0, A, B))
    y64 = ref_lora_linear(x64, w.double(), b.double(), A64, B64, 0.5)
    y64.backward(dy.double())
    assert_close(y, y64, torch.bfloat16, "y")
    assert_close(x.grad, x64.grad, torch.bfloat16, "dx")
    assert_close(A.grad, A64.grad, torch.bfloat16, "dA")
    assert_close(B.grad, B64.grad, torch.bfloat16, "dB")


def test_glora_linear_torch_path_ignores_row_padding(monkeypatch):
    T, in_f, out_f = 9, 40, 24
    x0 = torch.randn(T, in_f).bfloat16()
    w = (torch.randn(out_f, in_f) * in_f ** -0.5).bfloat16()
    _simulate_amx(monkeypatch)
    assert torch.isnan(F.linear(_padded(x0), w)).all()
    y = lk.glora_linear(_padded(x0), w, None, backend="torch")
    assert_close(y, x0.double() @ w.double().t(), torch.bfloat16, "y")


def test_multi_lora_torch_path_ignores_row_padding(monkeypatch, one_thread):
    """multi_lora_linear / multi_lora_add_ on a row-padded bf16 x under the AMX simulation, for
    the CPU strategies (dense: a decode batch; runs: a batch-first prefill; sorted: a fragmented
    batch over many slots), forward and dx/dA/dBt, against float64."""
    from lora_kernels.reference import serving as ref_serving

    in_f, out_f = 40, 24
    w = (torch.randn(out_f, in_f) * in_f ** -0.5).bfloat16()
    _simulate_amx(monkeypatch)
    seen = spy_cpu_strategies(monkeypatch)
    for maxa, maxr, T, order in ((4, 8, 5, "random"), (4, 8, 6000, "sorted"),
                                 (40, 16, 90, "random")):
        pool = lk.AdapterPool(in_f, out_f, maxa, maxr, dtype=torch.bfloat16)
        for j in range(maxa):
            r = j % maxr + 1
            pool.add(f"a{j}", torch.randn(r, in_f) * in_f ** -0.5, torch.randn(out_f, r), 0.7)
        ids = torch.randint(0, maxa, (T,), generator=torch.Generator().manual_seed(T))
        if order == "sorted":
            ids = ids.sort().values
        x0 = torch.randn(T, in_f).bfloat16()
        ads = {pool.slot(n): tuple(t.double() if torch.is_tensor(t) else t
                                   for t in pool.get(n)) for n in pool.names()}
        x64 = x0.double().requires_grad_()
        want = ref_serving.multi_lora_linear(x64, w.double(), None, ads, ids)
        dy = torch.randn(T, out_f).bfloat16()
        dx64, = torch.autograd.grad(want, x64, dy.double())
        pool.requires_grad_()
        x = _padded(x0).requires_grad_()
        y = lk.multi_lora_linear(x, w, None, pool, ids)
        assert_close(y, want, torch.bfloat16, f"y T={T}")
        y.backward(dy)
        assert_close(x.grad, dx64, torch.bfloat16, f"dx T={T}")
        assert torch.isfinite(pool.lora_A.grad).all() and torch.isfinite(pool.lora_Bt.grad).all()
        pool.requires_grad_(False)
        want = want.detach()
        with torch.no_grad():
            yy = torch.zeros(T, out_f, dtype=torch.bfloat16)
            lk.multi_lora_add_(yy, _padded(x0), pool, ids)
        assert_close(yy, want - x0.double() @ w.double().t(), torch.bfloat16, f"add_ T={T}")
    assert set(seen) == {"dense_add_", "runs_add_", "sorted_add_"}
