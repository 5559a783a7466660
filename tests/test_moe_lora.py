"""moe_lora_linear (MoE-LoRA expert GEMM) against a float64 per-row reference: forward and every
gradient, odd shapes, rank 1, M = 0/1/odd, E = 1/prime, -1 rows, both weight layouts,
non-contiguous inputs, every dtype; the expert plan; bad input; opcheck; fullgraph compile."""

import pytest
import torch
from torch.library import opcheck

import lora_kernels as lk
from lora_kernels.ops import moe_lora as ML

from conftest import DEVICE, DTYPES, backends
from helpers import assert_close, noncontig, randn, to64

# (M, in, out, r, E)
CASES = [(0, 5, 7, 3, 3), (1, 9, 4, 1, 1), (13, 11, 7, 1, 5), (29, 17, 13, 4, 7),
         (31, 6, 19, 2, 2)]


def reference(x, w, b, A, B, ids, s, lids=None):
    """float64 per-row definition: y[m] = x W_e^T + b_e + s x A_l^T B_l^T with e = ids[m] and
    l = lids[m] (default e; no low-rank term where l = -1), 0 where ids = -1."""
    lids = ids if lids is None else lids
    e, lo = ids.clamp_min(0).long(), lids.clamp_min(0).long()
    keep = (ids >= 0).to(x.dtype)[:, None]
    lr = torch.einsum("mr,mor->mo", torch.einsum("mi,mri->mr", x, A[lo]), B[lo])
    y = torch.einsum("mi,moi->mo", x, w[e]) + s * lr * (lids >= 0).to(x.dtype)[:, None]
    if b is not None:
        y = y + b[e]
    return y * keep


def _ids(M, E, skip=True):
    ids = torch.randint(0, E, (M,), device=DEVICE)
    if skip and M > 2:
        ids[torch.randperm(M, device=DEVICE)[: M // 4]] = -1
    return ids


def _inputs(case, dtype, *, layout, bias, train_base):
    M, i, o, r, E = case
    x = randn(M, i, dtype=dtype, requires_grad=True)
    if layout == "in_out":  # transformers' (E, in, out) parameter, passed as a view
        w_param = randn(E, i, o, dtype=dtype, scale=0.3, requires_grad=train_base)
    else:
        w_param = randn(E, o, i, dtype=dtype, scale=0.3, requires_grad=train_base)
    b = randn(E, o, dtype=dtype, requires_grad=train_base) if bias else None
    A = randn(E, r, i, dtype=dtype, scale=0.5, requires_grad=True)
    B = randn(E, o, r, dtype=dtype, scale=0.5, requires_grad=True)
    return x, w_param, b, A, B


def _weight(w_param, layout):
    return w_param.transpose(1, 2) if layout == "in_out" else w_param


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ci", range(len(CASES)))
def test_matches_float64(dtype, ci, backend):
    case = CASES[ci]
    layout = "in_out" if ci % 2 else "out_in"
    bias, train_base, nc = ci != 1, ci % 2 == 0, ci >= 2
    x, wp, b, A, B = _inputs(case, dtype, layout=layout, bias=bias, train_base=train_base)
    ids = _ids(case[0], case[4])
    s = 0.7
    xin = noncontig(x) if nc else x
    y = lk.moe_lora_linear(xin, _weight(wp, layout), b, noncontig(A) if nc else A, B, ids, s,
                           backend=backend)
    assert y.shape == (case[0], case[2]) and y.dtype == dtype
    x64, wp64, b64, A64, B64 = to64([x, wp, b, A, B])
    y64 = reference(x64, _weight(wp64, layout), b64, A64, B64, ids, s)
    assert_close(y, y64, dtype, "y")
    assert bool((y[ids < 0] == 0).all()), "skipped rows must be exactly 0"
    dy = randn(*y.shape, dtype=dtype)
    y.backward(dy)
    y64.backward(dy.double())
    pairs = [("dx", x, x64), ("dA", A, A64), ("dB", B, B64)]
    if train_base:
        pairs += [("dW", wp, wp64)] + ([("db", b, b64)] if bias else [])
    else:
        assert wp.grad is None
    for name, t, t64 in pairs:
        assert t.grad is not None and t.grad.shape == t.shape, name
        assert_close(t.grad, t64.grad, dtype, name)
    if case[0]:
        assert bool((x.grad[ids < 0] == 0).all())


def test_gradcheck_float64():
    M, i, o, r, E = 11, 5, 4, 2, 3
    args = [randn(M, i, dtype=torch.float64, requires_grad=True),
            randn(E, o, i, dtype=torch.float64, requires_grad=True),
            randn(E, o, dtype=torch.float64, requires_grad=True),
            randn(E, r, i, dtype=torch.float64, requires_grad=True),
            randn(E, o, r, dtype=torch.float64, requires_grad=True)]
    ids = torch.tensor([0, 2, -1, 2, 1, 0, -1, 0, 0, 2, 1], device=DEVICE)
    assert torch.autograd.gradcheck(lambda *a: lk.moe_lora_linear(*a, ids, 0.7), args)


def test_plan_shared_and_layout_not_copied():
    """One ExpertPlan reused by two GEMMs equals passing the ids; the plan's order/offsets are
    the documented grouping; an (E, in, out) weight is read through its view (no copy: the
    GEMMs see the parameter's storage)."""
    M, i, o, r, E = 23, 8, 6, 3, 5
    ids = _ids(M, E)
    plan = lk.expert_plan(ids, E)
    assert isinstance(plan, lk.ExpertPlan) and plan.num_experts == E and plan.num_rows == M
    off = plan.offsets.tolist()
    assert off[0] == 0 and off[E] == int((ids >= 0).sum())
    for e in range(E):
        rows = plan.order[off[e]:off[e + 1]]
        assert bool((ids[rows] == e).all()) and bool((rows.diff() > 0).all())
    assert bool((ids[plan.order[off[E]:]] == -1).all())
    x = randn(M, i)
    wt = randn(E, i, o)
    A, B = randn(E, r, i), randn(E, o, r)
    y1 = lk.moe_lora_linear(x, wt.transpose(1, 2), None, A, B, plan, 0.5)
    y2 = lk.moe_lora_linear(x, wt.transpose(1, 2), None, A, B, ids, 0.5)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default,
                        torch.ops.aten._to_copy.default):
                if any(isinstance(a, torch.Tensor) and a.numel() == wt.numel() for a in args):
                    seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        lk.moe_lora_linear(x, wt.transpose(1, 2), None, A, B, plan, 0.5)
    assert not seen, f"the (E, in, out) weight was copied: {seen}"


def test_bad_input_raises_before_reading():
    M, i, o, r, E = 5, 4, 3, 2, 3
    x, w, b, A, B = randn(M, i), randn(E, o, i), randn(E, o), randn(E, r, i), randn(E, o, r)
    ok = torch.zeros(M, dtype=torch.int64)
    f = lk.moe_lora_linear
    for bad, msg in [(torch.tensor([0, 1, 3, 0, 0]), r"expert_ids\[2\] = 3"),
                     (torch.tensor([0, -2, 0, 0, 0]), r"expert_ids\[1\] = -2")]:
        with pytest.raises(ValueError, match=msg):
            f(x, w, b, A, B, bad, 1.0)
    with pytest.raises(TypeError, match="expert_ids"):
        f(x, w, b, A, B, ok.float(), 1.0)
    with pytest.raises(ValueError, match="expert_ids"):
        f(x, w, b, A, B, ok[:4], 1.0)
    with pytest.raises(ValueError, match="ExpertPlan for 2 experts"):
        f(x, w, b, A, B, lk.expert_plan(ok, 2), 1.0)
    with pytest.raises(ValueError, match="x must have last dim"):
        f(randn(M, i + 1), w, b, A, B, ok)
    with pytest.raises(ValueError, match="lora_A"):
        f(x, w, b, randn(E + 1, r, i), B, ok)
    with pytest.raises(ValueError, match="lora_B"):
        f(x, w, b, A, randn(E, o, r + 1), ok)
    with pytest.raises(ValueError, match="bias"):
        f(x, w, randn(o), A, B, ok)
    with pytest.raises(ValueError, match="weight must be 3-D"):
        f(x, w[0], b, A, B, ok)
    with pytest.raises(TypeError, match="lora_B must have dtype"):
        f(x, w, b, A, B.half(), ok)
    with pytest.raises(TypeError, match="scaling"):
        f(x, w, b, A, B, ok, "1")
    with pytest.raises(ValueError, match="num_experts"):
        lk.expert_plan(ok, 0)


@pytest.mark.parametrize("backend", backends())
def test_opcheck(backend):
    M, i, o, r, E = 9, 6, 5, 2, 3
    ids = torch.tensor([0, 2, -1, 2, 1, 0, -1, 0, 2], device=DEVICE)
    opcheck(torch.ops.lora_kernels.moe_plan.default, (ids, E, "expert_ids"))
    order, offsets = ML.PLAN_OP(ids, E, "expert_ids")
    x, w, b = randn(M, i), randn(E, o, i), randn(E, o)
    A, B = randn(E, r, i, requires_grad=True), randn(E, o, r, requires_grad=True)
    opcheck(torch.ops.lora_kernels.moe_lora_fwd.default,
            (x, w, b, A, B, order, offsets, None, None, 0.5, backend))
    dy, S = randn(M, o), randn(M, r)
    for needs in [(True, True, True, True, True), (False, False, False, True, False),
                  (True, False, False, False, True)]:
        opcheck(torch.ops.lora_kernels.moe_lora_bwd.default,
                (dy, x, w, A.detach(), B.detach(), S, order, offsets, None, None, 0.5, backend,
                 *needs))


@pytest.mark.parametrize("backend", backends())
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    M, i, o, r, E = 10, 6, 5, 2, 3
    x, wt = randn(M, i), randn(E, i, o)
    A, B = randn(E, r, i, requires_grad=True), randn(E, o, r, requires_grad=True)
    ids = torch.tensor([0, 2, -1, 2, 1, 0, -1, 0, 2, 1], device=DEVICE)

    def f(x, wt, A, B, ids):
        plan = lk.expert_plan(ids, E)
        return lk.moe_lora_linear(x, wt.transpose(1, 2), None, A, B, plan, 0.5, backend=backend)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = cf(x, wt, A, B, ids)
    y.square().sum().backward()
    gA, gB = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    y0 = f(x, wt, A, B, ids)
    y0.square().sum().backward()
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(gA, A.grad)
    torch.testing.assert_close(gB, B.grad)
    with pytest.raises(ValueError, match="expert_ids"):
        cf(x, wt, A, B, torch.full((M,), E, device=DEVICE))


def test_inference_no_autograd_node():
    M, i, o, r, E = 4, 3, 2, 1, 2
    with torch.no_grad():
        y = lk.moe_lora_linear(randn(M, i), randn(E, o, i), None,
                               randn(E, r, i, requires_grad=True), randn(E, o, r),
                               torch.tensor([1, 0, -1, 1]))
    assert y.grad_fn is None


def test_backends_refused_cleanly():
    """A backend without a MoE implementation (cuda), quantized experts on Triton: a clear
    ValueError; backend=None never picks the Triton kernels (not verified on a GPU)."""
    from lora_kernels._backend import resolve_backend

    M, i, o, r, E = 4, 64, 2, 1, 2
    args = (randn(M, i), randn(E, o, i), None, randn(E, r, i), randn(E, o, r),
            torch.tensor([1, 0, -1, 1], device=DEVICE))
    with pytest.raises(ValueError, match="cuda"):
        lk.moe_lora_linear(*args, backend="cuda")
    if "triton" in backends():
        with pytest.raises(ValueError, match="quantized experts run on backend='torch'"):
            lk.moe_lora_linear(args[0], _qexperts(randn(E, o, i), 1), *args[2:],
                               backend="triton")
    assert resolve_backend(None, torch.device("cuda"), ML.OP_NAME) in ("torch", "cuda")


# ----------------------------------------------------------------------------- quantized experts
QFMTS = [("nf4", {}), ("int8", {}), ("fp8", {}), ("fp8", {"block_size": 128})]


def _qexperts(w, fi):
    from lora_kernels.quant import QuantizedExperts

    fmt, kw = QFMTS[fi]
    return QuantizedExperts.from_float(w, fmt, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fi", range(len(QFMTS)))
def test_quantized_experts_match_float64(dtype, fi):
    """x deq(W_e)^T + b_e + s x A_e^T B_e^T against float64 with the dequantised experts (in 130:
    FP8 128x128 blocks with a partial edge block; out 9 odd)."""
    M, i, o, r, E = 19, 130, 9, 3, 5
    q = _qexperts(randn(E, o, i, scale=0.3), fi).to(dtype)
    x = randn(M, i, dtype=dtype, requires_grad=True)
    b = randn(E, o, dtype=dtype, requires_grad=True)
    A = randn(E, r, i, dtype=dtype, scale=0.3, requires_grad=True)
    B = randn(E, o, r, dtype=dtype, scale=0.5, requires_grad=True)
    ids = _ids(M, E)
    y = lk.moe_lora_linear(noncontig(x), q, b, A, B, ids, 0.6)
    x64, b64, A64, B64 = to64([x, b, A, B])
    y64 = reference(x64, q.double(), b64, A64, B64, ids, 0.6)
    assert_close(y, y64, dtype, "y")
    dy = randn(M, o, dtype=dtype)
    y.backward(dy)
    y64.backward(dy.double())
    for name, t, t64 in [("dx", x, x64), ("db", b, b64), ("dA", A, A64), ("dB", B, B64)]:
        assert_close(t.grad, t64.grad, dtype, name)
    assert not list(q.parameters())


def test_quantized_experts_are_the_2d_formats():
    """Each expert is quantised exactly as its 2-D format quantises w[e]; NF4 experts with
    out*in a multiple of the blocksize are bitsandbytes' quantize_4bit of the (E, out, in)
    tensor, bit for bit; FP8 block scales are per expert (E, ceil(out/128), ceil(in/128))."""
    from lora_kernels import quant

    E, o, i = 3, 8, 136
    w = randn(E, o, i)
    for fi, (fmt, kw) in enumerate(QFMTS):
        q = _qexperts(w, fi)
        assert q.shape == (E, o, i)
        for e in range(E):
            ref = quant.FORMATS[fmt].from_float(w[e], **kw).dequantize()
            torch.testing.assert_close(q.dequantize_expert(e), ref, rtol=0, atol=0)
    assert _qexperts(w, 3).scale.shape == (E, 1, 2)
    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False,
                                       quant_type="nf4")
    q = _qexperts(w, 0)
    assert torch.equal(packed.reshape(-1), q.packed.reshape(-1))
    assert torch.equal(state.absmax, q.absmax.reshape(-1))
    with pytest.raises(ValueError, match="not be nested"):
        quant.QuantizedExperts.from_experts(
            [quant.NF4Weight.from_float(w[e], compress_statistics=True) for e in range(E)])
    with pytest.raises(ValueError, match="experts\\[1\\]"):
        quant.QuantizedExperts.from_experts([quant.Int8Weight.from_float(w[0]),
                                             quant.Int8Weight.from_float(w[1, :4])])


def test_quantized_opcheck_and_compile():
    M, i, o, r, E = 7, 64, 5, 2, 3
    q = _qexperts(randn(E, o, i), 0)
    ids = torch.tensor([0, 2, -1, 2, 1, 0, 1], device=DEVICE)
    order, offsets = ML.PLAN_OP(ids, E, "expert_ids")
    x, b = randn(M, i), randn(E, o)
    A, B = randn(E, r, i, requires_grad=True), randn(E, o, r, requires_grad=True)
    ts, meta = q.tensors(), q.meta()
    opcheck(torch.ops.lora_kernels.moe_qlora_fwd.default,
            (x, ts, meta, "nf4", b, A, B, order, offsets, None, None, 0.5, "torch"))
    dy, S = randn(M, o), randn(M, r)
    for needs in [(True, True, True, True), (False, False, True, False)]:
        opcheck(torch.ops.lora_kernels.moe_qlora_bwd.default,
                (dy, x, ts, meta, "nf4", A.detach(), B.detach(), S, order, offsets, None, None,
                 0.5, "torch", *needs))
    torch._dynamo.reset()
    f = lambda x, A, B, ids: lk.moe_lora_linear(x, q, b, A, B, ids, 0.5)  # noqa: E731
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, A, B, ids)
    y.square().sum().backward()
    gA = A.grad.clone()
    A.grad = None
    y0 = f(x, A, B, ids)
    y0.square().sum().backward()
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(gA, A.grad)


def aot_calls():
    """Triton MoE launches for the ahead-of-time compile check (tests/cuda/test_triton_aot.py):
    forward and every backward kernel, bf16 (the target dtype) and fp32, a transposed weight."""
    for dtype in (torch.bfloat16, torch.float32):
        M, i, o, r, E = 21, 24, 20, 4, 3
        x = torch.randn(M, i, dtype=dtype, requires_grad=True)
        wt = torch.randn(E, i, o, dtype=dtype)
        b = torch.randn(E, o, dtype=dtype)
        A = torch.randn(E, r, i, dtype=dtype, requires_grad=True)
        B = torch.randn(E, o, r, dtype=dtype, requires_grad=True)
        ids = torch.tensor([0, 2, -1, 1] * 5 + [2])
        lk.moe_lora_linear(x, wt.transpose(1, 2), b, A, B, ids, 0.5,
                           backend="triton").sum().backward()


def test_tile_table_partitions_rows():
    """The device-built tile table covers every sorted position exactly once, each tile inside one
    segment (skipped rows: expert E) with at most BLOCK_M rows, within its fixed length."""
    g = torch.Generator().manual_seed(0)
    for M, E, bm in [(1, 1, 16), (16, 1, 16), (17, 3, 16), (40, 7, 4), (33, 40, 8), (5, 2, 1)]:
        ids = torch.randint(-1, E, (M,), generator=g)
        plan = lk.expert_plan(ids, E)
        texp, ts, te = ML.tile_table(plan.offsets, M, bm)
        assert texp.shape[0] == -(-M // bm) + min(E + 1, M)
        cover = torch.zeros(M, dtype=torch.int64)
        off = plan.offsets.tolist() + [M]
        for e, a, b in zip(texp.tolist(), ts.tolist(), te.tolist()):
            if e < 0:
                assert a == b == 0
                continue
            assert 0 < b - a <= bm and off[e] <= a and b <= off[e + 1], (e, a, b)
            cover[a:b] += 1
        assert bool((cover == 1).all())


# ----------------------------------------------------------------------------- lora_ids
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantized", [False, True])
def test_lora_ids_match_float64(dtype, quantized):
    """Factors chosen per row by their own ids (serving: adapter * E + expert, -1 = base only),
    rows with expert -1 still 0; forward and every gradient against float64."""
    M, i, o, r, E, n_ad = 31, 64, 9, 3, 5, 3
    L = n_ad * E
    x = randn(M, i, dtype=dtype, requires_grad=True)
    w = randn(E, o, i, dtype=dtype, scale=0.3, requires_grad=not quantized)
    b = randn(E, o, dtype=dtype, requires_grad=True)
    A = randn(L, r, i, dtype=dtype, scale=0.3, requires_grad=True)
    B = randn(L, o, r, dtype=dtype, scale=0.5, requires_grad=True)
    ids = _ids(M, E)
    ad = torch.randint(-1, n_ad, (M,), device=DEVICE)
    lids = torch.where(ad >= 0, ad * E + ids.clamp_min(0), -1)
    lids[ids < 0] = 2  # a factor id on a skipped row: the row stays 0
    base = _qexperts(w.detach(), 1).to(dtype) if quantized else w
    y = lk.moe_lora_linear(noncontig(x), base, b, A, B, ids, 0.8, lora_ids=lids)
    x64, w64, b64, A64, B64 = to64([x, w, b, A, B])
    if quantized:
        w64 = base.double()
    y64 = reference(x64, w64, b64, A64, B64, ids, 0.8, torch.where(ids < 0, -1, lids))
    assert_close(y, y64, dtype, "y")
    assert bool((y[ids < 0] == 0).all())
    dy = randn(M, o, dtype=dtype)
    y.backward(dy)
    y64.backward(dy.double())
    pairs = [("dx", x, x64), ("db", b, b64), ("dA", A, A64), ("dB", B, B64)]
    pairs += [] if quantized else [("dW", w, w64)]
    for name, t, t64 in pairs:
        assert_close(t.grad, t64.grad, dtype, name)


def test_lora_ids_equal_to_expert_ids_is_the_default():
    M, i, o, r, E = 17, 8, 6, 2, 4
    x, w, A, B = randn(M, i), randn(E, o, i), randn(E, r, i), randn(E, o, r)
    ids = _ids(M, E)
    plan = lk.expert_plan(ids, E)
    y0 = lk.moe_lora_linear(x, w, None, A, B, plan, 0.5)
    for lids in (ids, plan):
        torch.testing.assert_close(lk.moe_lora_linear(x, w, None, A, B, plan, 0.5,
                                                      lora_ids=lids), y0)
    with pytest.raises(ValueError, match=r"lora_ids\[\d+\] = 4"):
        lk.moe_lora_linear(x, w, None, A, B, ids, lora_ids=torch.full((M,), 4, device=DEVICE))
    with pytest.raises(ValueError, match="lora_ids"):
        lk.moe_lora_linear(x, w, None, A, B, ids, lora_ids=ids[:3])
    with pytest.raises(ValueError, match=r"lora_B must have shape \(7, 6, 2\)"):
        lk.moe_lora_linear(x, w, None, randn(7, r, i), B, ids, lora_ids=ids)
    if "triton" in backends():
        with pytest.raises(ValueError, match="lora_ids runs on backend='torch'"):
            lk.moe_lora_linear(x, w, None, A, B, ids, lora_ids=ids, backend="triton")


def test_lora_ids_opcheck():
    M, i, o, r, E, L = 9, 6, 5, 2, 3, 4
    ids = torch.tensor([0, 2, -1, 2, 1, 0, -1, 0, 2], device=DEVICE)
    order, offsets = ML.PLAN_OP(ids, E, "expert_ids")
    lorder, loffsets = ML.PLAN_OP(torch.tensor([3, 0, -1, -1, 1, 3, -1, 2, 2], device=DEVICE), L,
                                  "lora_ids")
    x, w, b = randn(M, i), randn(E, o, i), randn(E, o)
    A, B = randn(L, r, i), randn(L, o, r)
    opcheck(torch.ops.lora_kernels.moe_lora_fwd.default,
            (x, w, b, A, B, order, offsets, lorder, loffsets, 0.5, "torch"))
    opcheck(torch.ops.lora_kernels.moe_lora_bwd.default,
            (randn(M, o), x, w, A, B, randn(M, r), order, offsets, lorder, loffsets, 0.5,
             "torch", True, True, True, True, True))


def test_static_moe_profile_is_current():
    """The committed static profile of the MoE kernels (bench/results/static-moe-sm90.json,
    ``python -m lora_kernels.bench.static_moe``) has one row per launch the launchers make at the
    GPU point now (recorded in a subprocess with TRITON_INTERPRET=0; nothing compiled here), and
    its grouped GEMM rows use tensor cores without spills."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    code = ("import json; from lora_kernels.bench import static as S, static_moe as M; "
            "print(json.dumps(S.row_keys(M.moe_launches())))")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = json.loads(proc.stdout.strip().splitlines()[-1])
    doc = json.loads((root / "bench/results/static-moe-sm90.json").read_text())
    assert [[r["kernel"], r["launch"], r["config"]] for r in doc["rows"]] == want
    from lora_kernels.bench.static_moe import check_rows

    assert not check_rows(doc["rows"])
    assert {r["kernel"] for r in doc["rows"]} == {"moe_shrink_kernel", "moe_gemm_kernel",
                                                  "moe_seg_tn_kernel"}


def test_lora_ids_compile_fullgraph():
    """lora_ids under torch.compile(fullgraph=True): one graph, equal to eager; a bad factor id
    still raises ValueError naming lora_ids (checked inside the plan op)."""
    torch._dynamo.reset()
    M, i, o, r, E, L = 10, 6, 5, 2, 3, 6
    x, w = randn(M, i), randn(E, o, i)
    A, B = randn(L, r, i, requires_grad=True), randn(L, o, r, requires_grad=True)
    ids = torch.tensor([0, 2, -1, 2, 1, 0, -1, 0, 2, 1], device=DEVICE)
    lids = torch.tensor([3, 5, 1, -1, 4, 0, -1, 3, 2, 4], device=DEVICE)
    f = lambda x, A, B, ids, lids: lk.moe_lora_linear(x, w, None, A, B, ids, 0.5,  # noqa: E731
                                                      lora_ids=lids)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = cf(x, A, B, ids, lids)
    y.square().sum().backward()
    gA = A.grad.clone()
    A.grad = None
    y0 = f(x, A, B, ids, lids)
    y0.square().sum().backward()
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(gA, A.grad)
    with pytest.raises(ValueError, match="lora_ids"):
        cf(x, A, B, ids, torch.full((M,), L, device=DEVICE))
