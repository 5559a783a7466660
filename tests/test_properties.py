"""Property-based checks (hypothesis) of the public ops against their float64 references:
random shapes (primes, 1, T = 0), strides, dtypes, ranks, ids with -1 and repeats, non-finite
entries in ONE adapter only (row isolation: every other row still matches float64), every
backend available here (Triton through TRITON_INTERPRET=1, fewer examples). Derandomized and
bounded (``max_examples``) so CI stays deterministic and about a minute."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels.reference import lora as rl
from lora_kernels.reference import serving as rs

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SIZES = st.sampled_from([1, 2, 3, 5, 7, 13, 16])
TOKENS = st.sampled_from([0, 1, 2, 3, 5, 7, 11, 17, 31])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
CFG = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
           database=None)


def _interp() -> bool:
    from lora_kernels._backend import triton_available, triton_interpret

    return triton_available() and triton_interpret()


def _strided(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """``t`` itself, or the same values as every other column of a wider buffer."""
    if not strided or t.dim() < 2:
        return t
    buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
    buf[..., ::2] = t
    return buf[..., ::2]


def _close(out, ref, dtype, what):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    den = max(ref.norm().item(), 1e-12)
    err = (out - ref).norm().item() / den
    assert err <= TOL[dtype] * 10 or (out - ref).abs().max().item() <= TOL[dtype], \
        f"{what}: rel err {err:.2e} ({dtype})"


@st.composite
def multi_case(draw):
    in_f, out_f = draw(SIZES), draw(SIZES)
    maxa, maxr = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    T = draw(TOKENS)
    dtype = draw(DTYPES)
    # 0: slot left empty; one slot at least is loaded
    ranks = [draw(st.integers(0 if a else 1, maxr)) for a in range(maxa)]
    loaded = [a for a in range(maxa) if ranks[a]]
    choices = [-1] + loaded
    ids = [draw(st.sampled_from(choices)) for _ in range(T)]
    bad = draw(st.sampled_from([None] + loaded)) if loaded else None
    bad_val = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    bad_where = draw(st.sampled_from(["A", "B"]))
    strided = draw(st.booleans())
    with_base = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return (in_f, out_f, maxa, maxr, T, dtype, ranks, ids, bad, bad_val, bad_where, strided,
            with_base, seed)


def _run_multi(case, backend):
    (in_f, out_f, maxa, maxr, T, dtype, ranks, ids, bad, bad_val, bad_where, strided,
     with_base, seed) = case
    g = torch.Generator().manual_seed(seed)
    pool = lk.AdapterPool(in_f, out_f, maxa, maxr, dtype=dtype)
    ads = {}
    for a, r in enumerate(ranks):
        if not r:
            continue
        A = torch.randn(r, in_f, generator=g, dtype=torch.float64) / in_f ** 0.5
        B = torch.randn(out_f, r, generator=g, dtype=torch.float64) / r ** 0.5
        if a == bad:
            (A if bad_where == "A" else B)[0, 0] = bad_val
        s = 0.25 + a
        pool.add(f"a{a}", A, B, s, slot=a)
        # the reference uses what the pool stores (factors rounded to its dtype)
        ads[a] = (A.to(dtype).double(), B.to(dtype).double(), s)
    x = torch.randn(T, in_f, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f ** 0.5).to(dtype)
    b = torch.randn(out_f, generator=g, dtype=torch.float64).to(dtype)
    ids_t = torch.tensor(ids, dtype=torch.int64)
    args = (_strided(w, strided), b) if with_base else (None, None)
    y = lk.multi_lora_linear(_strided(x, strided), *args, pool, ids_t, backend=backend)
    ref = rs.multi_lora_linear(x.double(), w.double() if with_base else None,
                               b.double() if with_base else None, ads, ids_t)
    assert y.shape == (T, out_f) and y.dtype == dtype
    keep = ids_t != (bad if bad is not None else -2)
    if keep.any():
        _close(y[keep], ref[keep], dtype, f"multi_lora_linear[{backend}] rows of other tenants")
    # the in-place form on the same rows (y must start from the base output)
    if not with_base:
        y2 = torch.zeros(T, out_f, dtype=dtype)
        with torch.no_grad():
            lk.multi_lora_add_(y2, x, pool, ids_t, backend=backend)
        if keep.any():
            _close(y2[keep], ref[keep], dtype, f"multi_lora_add_[{backend}]")


@settings(max_examples=300, **CFG)
@given(multi_case())
def test_multi_lora_property_torch(case):
    _run_multi(case, "torch")


@settings(max_examples=60, **CFG)
@given(multi_case())
def test_multi_lora_property_triton(case):
    if not _interp():
        pytest.skip("Triton runs here through TRITON_INTERPRET=1 only")
    if case[5] == torch.float64:
        case = (*case[:5], torch.float32, *case[6:])      # Triton kernels: fp32/fp16/bf16
    _run_multi(case, "triton")


@st.composite
def lora_case(draw):
    return (draw(TOKENS), draw(SIZES), draw(SIZES), draw(st.integers(1, 6)), draw(DTYPES),
            draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from([0.0, 0.5, 2.0])),
            draw(st.integers(0, 2 ** 16)))


def _run_lora(case, backend):
    T, K, N, r, dtype, strided, bias, scaling, seed = case
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x, w, A, B = mk(T, K), mk(N, K), mk(r, K), mk(N, r)
    b = mk(N) if bias else None
    xs = _strided(x, strided).requires_grad_()
    As, Bs = A.clone().requires_grad_(), B.clone().requires_grad_()
    y = lk.lora_linear(xs, _strided(w, strided), b, As, Bs, scaling, backend=backend)
    x64, A64, B64 = (t.double().requires_grad_() for t in (x, A, B))
    ref = rl.lora_linear(x64, w.double(), b.double() if bias else None, A64, B64, scaling)
    assert y.shape == (T, N) and y.dtype == dtype
    _close(y, ref, dtype, f"lora_linear[{backend}]")
    if T:
        dy = torch.randn(T, N, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(y, (xs, As, Bs), dy.to(dtype))
        want = torch.autograd.grad(ref, (x64, A64, B64), dy)
        for nm, gg, ww in zip(("dx", "dA", "dB"), got, want):
            _close(gg, ww, dtype, f"lora_linear[{backend}] {nm}")


@settings(max_examples=200, **CFG)
@given(lora_case())
def test_lora_linear_property_torch(case):
    _run_lora(case, "torch")


@settings(max_examples=50, **CFG)
@given(lora_case())
def test_lora_linear_property_triton(case):
    if not _interp():
        pytest.skip("Triton runs here through TRITON_INTERPRET=1 only")
    if case[4] == torch.float64:
        case = (*case[:4], torch.float32, *case[5:])
    _run_lora(case, "triton")
