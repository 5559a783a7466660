"""moe_lora_linear (MoE-LoRA expert GEMM) against a float64 per-row reference: forward and every
gradient, odd shapes, rank 1, M = 0/1/odd, E = 1/prime, -1 rows, both weight layouts,
non-contiguous inputs, every dtype; the expert plan; bad input; opcheck; fullgraph compile."""

import pytest
import torch
from torch.library import opcheck

import lora_kernels as lk
from lora_kernels.ops import moe_lora as ML

from conftest import DEVICE, DTYPES
from helpers import assert_close, noncontig, randn, to64

# (M, in, out, r, E)
CASES = [(0, 5, 7, 3, 3), (1, 9, 4, 1, 1), (13, 11, 7, 1, 5), (29, 17, 13, 4, 7),
         (31, 6, 19, 2, 2)]


def reference(x, w, b, A, B, ids, s):
    """float64 per-row definition: y[m] = x W_e^T + b_e + s x A_e^T B_e^T, 0 where ids = -1."""
    e = ids.clamp_min(0).long()
    keep = (ids >= 0).to(x.dtype)[:, None]
    y = torch.einsum("mi,moi->mo", x, w[e]) + s * torch.einsum(
        "mr,mor->mo", torch.einsum("mi,mri->mr", x, A[e]), B[e])
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ci", range(len(CASES)))
def test_matches_float64(dtype, ci):
    case = CASES[ci]
    layout = "in_out" if ci % 2 else "out_in"
    bias, train_base, nc = ci != 1, ci % 2 == 0, ci >= 2
    x, wp, b, A, B = _inputs(case, dtype, layout=layout, bias=bias, train_base=train_base)
    ids = _ids(case[0], case[4])
    s = 0.7
    xin = noncontig(x) if nc else x
    y = lk.moe_lora_linear(xin, _weight(wp, layout), b, noncontig(A) if nc else A, B, ids, s)
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


def test_opcheck():
    M, i, o, r, E = 9, 6, 5, 2, 3
    ids = torch.tensor([0, 2, -1, 2, 1, 0, -1, 0, 2], device=DEVICE)
    opcheck(torch.ops.lora_kernels.moe_plan.default, (ids, E))
    order, offsets = ML.PLAN_OP(ids, E)
    x, w, b = randn(M, i), randn(E, o, i), randn(E, o)
    A, B = randn(E, r, i, requires_grad=True), randn(E, o, r, requires_grad=True)
    opcheck(torch.ops.lora_kernels.moe_lora_fwd.default,
            (x, w, b, A, B, order, offsets, 0.5, "torch"))
    dy, S = randn(M, o), randn(M, r)
    for needs in [(True, True, True, True, True), (False, False, False, True, False),
                  (True, False, False, False, True)]:
        opcheck(torch.ops.lora_kernels.moe_lora_bwd.default,
                (dy, x, w, A.detach(), B.detach(), S, order, offsets, 0.5, "torch", *needs))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    M, i, o, r, E = 10, 6, 5, 2, 3
    x, wt = randn(M, i), randn(E, i, o)
    A, B = randn(E, r, i, requires_grad=True), randn(E, o, r, requires_grad=True)
    ids = torch.tensor([0, 2, -1, 2, 1, 0, -1, 0, 2, 1], device=DEVICE)

    def f(x, wt, A, B, ids):
        plan = lk.expert_plan(ids, E)
        h = lk.moe_lora_linear(x, wt.transpose(1, 2), None, A, B, plan, 0.5)
        return h

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


def test_triton_backend_not_yet_refused_cleanly():
    """A backend without a MoE implementation is a clear ValueError, not a wrong result."""
    M, i, o, r, E = 4, 3, 2, 1, 2
    with pytest.raises(ValueError, match="cuda"):
        lk.moe_lora_linear(randn(M, i), randn(E, o, i), None, randn(E, r, i), randn(E, o, r),
                           torch.tensor([1, 0, -1, 1]), backend="cuda")
