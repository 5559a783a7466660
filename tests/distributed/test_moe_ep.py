"""Expert parallelism for MoE-LoRA (lora_kernels.expert_parallel) on gloo, 2 and 4 processes:
outputs and gradients equal the single-process op on all ranks' rows with all experts (computed
in each process from the same seed); bad ids raise on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_kernels as lk
from lora_kernels.expert_parallel import ExpertParallel, ep_moe_lora_linear

from dist_harness import pytest_entry, scenario

TOL = 1e-5


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _data(world, M=11, i=7, o=6, r=3, E=5, seed=1):
    """Every rank's rows (world * M) and all experts, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    n = world * M
    X = torch.randn(n, i, generator=g)
    ids = torch.randint(0, E, (n,), generator=g)
    ids[torch.randperm(n, generator=g)[: n // 5]] = -1
    ids[M:2 * M] = -1  # rank 1 sends nothing (it still receives rows)
    W = torch.randn(E, o, i, generator=g) * 0.3
    b = torch.randn(E, o, generator=g)
    A = torch.randn(E, r, i, generator=g) * 0.5
    B = torch.randn(E, o, r, generator=g) * 0.5
    dY = torch.randn(n, o, generator=g)
    return X, ids, W, b, A, B, dY


@scenario(2, 4)
def ep_linear_matches_single_process(ctx):
    X, ids, W, b, A, B, dY = _data(ctx.world)
    M, E = X.shape[0] // ctx.world, W.shape[0]
    # single-process reference on all rows (float32, same op)
    ref = [t.clone().requires_grad_() for t in (X, A, B)]
    y_ref = lk.moe_lora_linear(ref[0], W, b, ref[1], ref[2], ids, 0.7)
    y_ref.backward(dY)
    ep = ExpertParallel(ctx.pg, E)
    lo = slice(ctx.rank * M, (ctx.rank + 1) * M)
    x = X[lo].clone().requires_grad_()
    a = ep.shard(A).clone().requires_grad_()
    bb = ep.shard(B).clone().requires_grad_()
    y = ep_moe_lora_linear(ep, x, ep.shard(W), ep.shard(b), a, bb, ids[lo], 0.7)
    y.backward(dY[lo])
    assert _rel(y, y_ref[lo]) < TOL
    assert bool((y[ids[lo] < 0] == 0).all())
    assert _rel(x.grad, ref[0].grad[lo]) < TOL
    assert _rel(a.grad, ep.shard(ref[1].grad)) < TOL
    assert _rel(bb.grad, ep.shard(ref[2].grad)) < TOL
    with torch.no_grad():  # serving: no autograd, same output
        y2 = ep_moe_lora_linear(ep, X[lo], ep.shard(W), ep.shard(b), ep.shard(A), ep.shard(B),
                                ids[lo], 0.7)
    assert _rel(y2, y_ref[lo].detach()) < TOL


@scenario(2, 4)
def ep_block_one_dispatch(ctx):
    """A MoE block's pattern: dispatch once, gate_up -> GLU -> down on the received rows with one
    ExpertPlan, combine once; equal to the single-process block (outputs, dx, every adapter)."""
    X, ids, W1, _, A1, B1, _ = _data(ctx.world, o=8, seed=2)
    E, i = W1.shape[0], X.shape[1]
    g = torch.Generator().manual_seed(3)
    W2, A2 = torch.randn(E, i, 4, generator=g), torch.randn(E, 2, 4, generator=g)
    B2 = torch.randn(E, i, 2, generator=g)
    dY = torch.randn(X.shape[0], i, generator=g)

    def block(x, plan_or_ids, w1, a1, b1, w2, a2, b2):
        h = lk.moe_lora_linear(x, w1, None, a1, b1, plan_or_ids, 0.5)
        gate, up = h.chunk(2, dim=-1)
        return lk.moe_lora_linear(F.silu(gate) * up, w2, None, a2, b2, plan_or_ids, 0.5)

    ref = [t.clone().requires_grad_() for t in (X, A1, B1, A2, B2)]
    y_ref = block(ref[0], lk.expert_plan(ids, E), W1, ref[1], ref[2], W2, ref[3], ref[4])
    y_ref.backward(dY)
    ep = ExpertParallel(ctx.pg, E)
    M = X.shape[0] // ctx.world
    lo = slice(ctx.rank * M, (ctx.rank + 1) * M)
    x = X[lo].clone().requires_grad_()
    mine = [ep.shard(t).clone().requires_grad_() for t in (A1, B1, A2, B2)]
    d = ep.dispatch(x, ids[lo])
    plan = lk.expert_plan(d.expert_ids, ep.num_local)
    y = ep.combine(block(d.x, plan, ep.shard(W1), mine[0], mine[1], ep.shard(W2), mine[2],
                         mine[3]), d)
    y.backward(dY[lo])
    assert _rel(y, y_ref[lo]) < TOL
    assert _rel(x.grad, ref[0].grad[lo]) < TOL
    for t, r in zip(mine, ref[1:]):
        assert _rel(t.grad, ep.shard(r.grad)) < TOL


@scenario(2, 4)
def ep_serving_adapters_per_row(ctx):
    """Serving under EP: each row picks an adapter (or none, -1) and an expert; the adapter id
    travels with the row (``aux``) and each rank applies its experts' factors of every adapter
    (``lora_ids = adapter * num_local + local expert``); equal to the single-process op."""
    X, ids, W, b, _, _, _ = _data(ctx.world, seed=5)
    E, n_ad, r = W.shape[0], 3, 2
    g = torch.Generator().manual_seed(6)
    A = torch.randn(n_ad, E, r, X.shape[1], generator=g)     # (adapter, expert, r, in)
    B = torch.randn(n_ad, E, W.shape[1], r, generator=g)
    ad = torch.randint(-1, n_ad, (X.shape[0],), generator=g)
    lids = torch.where(ad >= 0, ad * E + ids.clamp_min(0), -1)
    y_ref = lk.moe_lora_linear(X, W, b, A.reshape(n_ad * E, r, -1),
                               B.reshape(n_ad * E, -1, r), ids, 1.0, lora_ids=lids)
    ep = ExpertParallel(ctx.pg, E)
    M = X.shape[0] // ctx.world
    lo = slice(ctx.rank * M, (ctx.rank + 1) * M)
    with torch.no_grad():
        d = ep.dispatch(X[lo], ids[lo], aux=ad[lo])
        nl = ep.num_local
        local_lids = torch.where(d.aux >= 0, d.aux * nl + d.expert_ids, -1)
        A_l = A[:, ep.start:ep.stop].reshape(n_ad * nl, r, -1)
        B_l = B[:, ep.start:ep.stop].reshape(n_ad * nl, -1, r)
        y = ep.combine(lk.moe_lora_linear(d.x, ep.shard(W), ep.shard(b), A_l, B_l, d.expert_ids,
                                          1.0, lora_ids=local_lids), d)
    assert _rel(y, y_ref[lo]) < TOL


@scenario(2)
def ep_quantized_experts(ctx):
    X, ids, W, b, A, B, dY = _data(ctx.world, i=64, seed=4)
    q = lk.quant.QuantizedExperts.from_float(W, "nf4")
    ref = [t.clone().requires_grad_() for t in (X, A, B)]
    y_ref = lk.moe_lora_linear(ref[0], q, b, ref[1], ref[2], ids, 0.7)
    y_ref.backward(dY)
    ep = ExpertParallel(ctx.pg, W.shape[0])
    M = X.shape[0] // ctx.world
    lo = slice(ctx.rank * M, (ctx.rank + 1) * M)
    x = X[lo].clone().requires_grad_()
    a = ep.shard(A).clone().requires_grad_()
    y = ep_moe_lora_linear(ep, x, ep.shard(q), ep.shard(b), a, ep.shard(B), ids[lo], 0.7)
    y.backward(dY[lo])
    assert _rel(y, y_ref[lo]) < TOL
    assert _rel(x.grad, ref[0].grad[lo]) < TOL
    assert _rel(a.grad, ep.shard(ref[1].grad)) < TOL


@scenario(2, 4)
def ep_bad_ids_raise_everywhere(ctx):
    """An out-of-range id on one rank: every rank raises ValueError before any exchange (no
    hang), and the group still works afterwards."""
    X, ids, W, b, A, B, _ = _data(ctx.world)
    E = W.shape[0]
    ep = ExpertParallel(ctx.pg, E)
    M = X.shape[0] // ctx.world
    lo = slice(ctx.rank * M, (ctx.rank + 1) * M)
    mine = ids[lo].clone()
    if ctx.rank == ctx.world - 1:
        mine[3] = E
    with pytest.raises(ValueError, match=f"rank {ctx.world - 1}"):
        ep_moe_lora_linear(ep, X[lo], ep.shard(W), None, ep.shard(A), ep.shard(B), mine)
    y = ep_moe_lora_linear(ep, X[lo], ep.shard(W), None, ep.shard(A), ep.shard(B), ids[lo])
    assert y.shape == (M, W.shape[1])
    with pytest.raises(ValueError, match="must be >= the group size"):
        ExpertParallel(ctx.pg, ctx.world - 1)


test_world2, test_world4, world2, world4 = pytest_entry(__name__, "ep")
