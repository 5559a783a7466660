"""The ``"torch"`` backend of multi-adapter LoRA (plain PyTorch; the CPU path and the reference
for the kernels). Two strategies, both computing ``y[t] += s_i (x[t] P_i^T) Q_i`` with
``(P, Q) = (lora_A, lora_Bt)`` (forward) or ``(lora_Bt, lora_A)`` (backward dx):

* runs (CPU, prefill path, ids in few runs -- :class:`~.plan.BatchPlan` records them once per
  forward): per run of equal ids, two GEMMs on row slices of x and y at the adapter's real rank,
  in place (``addmm_``). No gather, no scatter, no copy: a served mixed batch is batch-first, so
  each sequence is one run whatever the order of its adapters.
* gather (decode, fragmented batches, GPU tensors): per token, its adapter's factors gathered
  into ``(T, rb, in|out)`` and two batched GEMMs in fp32 (chunked over tokens). No host sync, so
  a CUDA graph can capture it.

Neither scatters with ``index_add_``: on CPU its kernel stalls when its worker threads compete
for cores (measured on the 2-core CI box with the other core busy: 2.8 ms for 128 rows of 512
with 2 threads vs 21 us with 1; ``index_select`` and GEMMs on slices are unaffected). The
gradient segments read the plan's sorted order with ``index_select`` (a gather) instead.
"""

from __future__ import annotations

import torch

from ...pool import PoolView
from .plan import BatchPlan

_CHUNK_ELEMS = 1 << 22


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _factors(view: PoolView, swap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (view.lora_Bt, view.lora_A) if swap else (view.lora_A, view.lora_Bt)


def add_(y, x, view: PoolView, plan: BatchPlan, *, swap: bool = False) -> None:
    """In place ``y[t] += s_i (x[t] P_i^T) Q_i`` (``swap``: P = lora_Bt, Q = lora_A)."""
    runs = None
    if x.device.type == "cpu" and plan.resolved_path() != "decode":
        runs = plan.runs()
    if runs is not None:
        runs_add_(y, x, view, runs, swap=swap)
    else:
        gather_add_(y, x, view, plan, swap=swap)


def runs_add_(y, x, view: PoolView, runs, *, swap: bool = False) -> None:
    """The runs strategy (module doc); ``runs`` = ``[[key, start, end], ...]``."""
    P, Q = _factors(view, swap)
    ranks, scs = view.ranks.tolist(), view.scalings.tolist()
    acc = _acc(y.dtype)
    for a, s, e in runs:
        if a >= len(ranks) or ranks[a] == 0:
            continue                                  # base-only tokens / an empty slot
        r, sc = ranks[a], scs[a]
        if y.dtype == acc:
            y[s:e].addmm_(x[s:e].to(acc) @ P[a, :r].to(acc).t(), Q[a, :r].to(acc), alpha=sc)
        else:
            d = (x[s:e].to(acc) @ P[a, :r].to(acc).t()) @ Q[a, :r].to(acc)
            y[s:e] = (y[s:e].to(acc) + sc * d).to(y.dtype)


def _all_adapted(view: PoolView, plan: BatchPlan) -> bool:
    """CPU only (host reads are free there): every token names a slot with a nonzero rank."""
    counts = plan.counts()
    ranks = view.ranks.tolist()
    return counts[-1] == 0 and all(c == 0 or r > 0 for c, r in zip(counts, ranks))


def gather_add_(y, x, view: PoolView, plan: BatchPlan, *, swap: bool = False) -> None:
    """The gather strategy (module doc). Tokens with id -1, an out-of-range id or an empty slot
    get an exact zero update: their x rows are masked (NaN there cannot leak) and scale 0."""
    P, Q = _factors(view, swap)
    T = x.shape[0]
    maxa = P.shape[0]
    rb = max(1, min(view.rank_bound, P.shape[1]))
    ids = plan.ids.long()
    if x.device.type == "cpu" and _all_adapted(view, plan):
        a, sc, xs = ids, view.scalings.index_select(0, ids), x
    else:
        ok = (ids >= 0) & (ids < maxa)
        a = torch.where(ok, ids, torch.zeros_like(ids))
        ok = ok & (view.ranks.index_select(0, a) > 0)
        sc = torch.where(ok, view.scalings.index_select(0, a), 0.0)
        xs = torch.where(ok[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    acc = _acc(y.dtype)
    Pr, Qr = P[:, :rb], Q[:, :rb]
    ch = max(1, _CHUNK_ELEMS // (rb * max(x.shape[1], y.shape[1])))
    for c0 in range(0, T, ch):
        sl = slice(c0, c0 + ch)
        asl = a[sl]
        v = torch.bmm(Pr.index_select(0, asl).to(acc), xs[sl].to(acc).unsqueeze(2))  # (t, rb, 1)
        v = (v * sc[sl, None, None].to(acc)).transpose(1, 2)                         # (t, 1, rb)
        q = Qr.index_select(0, asl).to(acc)                                          # (t, rb, N)
        if y.dtype == acc:
            y[sl].unsqueeze(1).baddbmm_(v, q)
        else:
            y[sl] = (y[sl].to(acc) + torch.bmm(v, q).squeeze(1)).to(y.dtype)


def segment_grads(dy, x, view: PoolView, plan: BatchPlan, need_dA: bool, need_dBt: bool):
    """CPU factor gradients per adapter segment of the plan's sorted order (gathers only):
    ``dA_a = s_a (dy_a Bt_a^T)^T x_a``, ``dBt_a = s_a (x_a A_a^T)^T dy_a``."""
    A, Bt = view.lora_A, view.lora_Bt
    acc = _acc(x.dtype)
    dA = torch.zeros_like(A) if need_dA else None
    dBt = torch.zeros_like(Bt) if need_dBt else None
    so = plan.seg_off.tolist()
    ranks, scs = view.ranks.tolist(), view.scalings.tolist()
    for a, r in enumerate(ranks):
        if r == 0 or so[a + 1] == so[a]:
            continue
        rows = plan.perm[so[a]:so[a + 1]]
        xa, dya = x.index_select(0, rows).to(acc), dy.index_select(0, rows).to(acc)
        if need_dA:
            dA[a, :r] = ((dya @ Bt[a, :r].to(acc).t()).t() @ xa * scs[a]).to(A.dtype)
        if need_dBt:
            dBt[a, :r] = ((xa @ A[a, :r].to(acc).t()).t() @ dya * scs[a]).to(Bt.dtype)
    return dA, dBt


def gather_grads(dy, x, view: PoolView, plan: BatchPlan, need_dA: bool, need_dBt: bool):
    """Factor gradients by the gather (GPU: no host sync; ``index_add_`` is fine there)."""
    A, Bt = view.lora_A, view.lora_Bt
    T, K = x.shape
    N = dy.shape[1]
    maxa, maxr = A.shape[:2]
    rb = max(1, min(view.rank_bound, maxr))
    acc = _acc(x.dtype)
    ids = plan.ids.long()
    ok = (ids >= 0) & (ids < maxa)
    a = torch.where(ok, ids, torch.zeros_like(ids))
    ok = ok & (view.ranks[a] > 0)
    sc = torch.where(ok, view.scalings[a].float(), torch.zeros((), device=x.device))
    gA = torch.zeros((maxa, rb, K), dtype=acc, device=x.device)
    gB = torch.zeros((maxa, rb, N), dtype=acc, device=x.device)
    ch = max(1, _CHUNK_ELEMS // (rb * max(K, N)))
    for c0 in range(0, T, ch):
        sl = slice(c0, c0 + ch)
        xs, dys, asl = x[sl].to(acc), dy[sl].to(acc), a[sl]
        w = sc[sl, None].to(acc)
        keep = ok[sl, None, None]
        if need_dA:
            g = torch.bmm(Bt[asl, :rb].to(acc), dys.unsqueeze(2)).squeeze(2) * w
            gA.index_add_(0, asl, torch.where(keep, g[:, :, None] * xs[:, None, :], 0.0))
        if need_dBt:
            u = torch.bmm(A[asl, :rb].to(acc), xs.unsqueeze(2)).squeeze(2) * w
            gB.index_add_(0, asl, torch.where(keep, u[:, :, None] * dys[:, None, :], 0.0))
    # rows >= rank get no gradient (the pool keeps them zero)
    rmask = (torch.arange(rb, device=x.device)[None, :] < view.ranks[:, None])[:, :, None]
    dA = dBt = None
    if need_dA:
        dA = torch.zeros_like(A)
        dA[:, :rb] = torch.where(rmask, gA, 0.0).to(A.dtype)
    if need_dBt:
        dBt = torch.zeros_like(Bt)
        dBt[:, :rb] = torch.where(rmask, gB, 0.0).to(Bt.dtype)
    return dA, dBt


def bwd(dy, x, weight, view: PoolView, plan: BatchPlan, need, *, gather: bool | None = None):
    """``(dx, dA, dBt)`` for ``need = (need_dx, need_dA, need_dBt)``. ``gather`` (default: off
    on CPU) forces the gather strategy for every term (the GPU torch path, tested on CPU)."""
    need_dx, need_dA, need_dBt = need
    gather = x.device.type != "cpu" if gather is None else gather
    dx = dA = dBt = None
    if need_dx:
        dx = (dy @ weight).to(x.dtype) if weight is not None else torch.zeros_like(
            x, memory_format=torch.contiguous_format)
        if gather:
            gather_add_(dx, dy, view, plan, swap=True)
        else:
            add_(dx, dy, view, plan, swap=True)
    if need_dA or need_dBt:
        grads = gather_grads if gather else segment_grads
        dA, dBt = grads(dy, x, view, plan, need_dA, need_dBt)
    return dx, dA, dBt
