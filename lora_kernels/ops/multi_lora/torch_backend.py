"""The ``"torch"`` backend of multi-adapter LoRA (plain PyTorch; the CPU path and the reference
for the kernels). Four strategies, each computing ``y[t] += s_i (x[t] P_i^T) Q_i`` with
``(P, Q) = (lora_A, lora_Bt)`` (forward) or ``(lora_Bt, lora_A)`` (backward dx); on CPU
:func:`add_` picks the cheapest of the first three by a measured cost model:

* runs (CPU, ids in few runs -- :class:`~.plan.BatchPlan` records them once per forward): per run
  of equal ids, two GEMMs on row slices of x and y at the adapter's real rank, in place
  (``addmm_``). No gather, no scatter: a served mixed batch is batch-first, so each sequence is one
  run whatever the order of its adapters.
* dense (CPU, small pools: MAXA*MAXR <= 256 rank rows, short batches): two GEMMs over every
  slot's factors at once, per-token slot weights (one gather from a per-pool table) keeping each
  token's own slot (no factor gather; four ATen calls in all).
* sorted (CPU, fragmented batches: unsorted prefill, decode over many slots): x gathered once
  into the plan's adapter order, two GEMMs per adapter segment, the delta gathered back.
* gather (GPU tensors): per token, its adapter's factors gathered into ``(T, rb, in|out)`` and
  two batched GEMMs in fp32 (chunked over tokens). No host sync, so a CUDA graph can capture it.

None scatters with ``index_add_``: on CPU its kernel stalls when its worker threads compete
for cores (measured on the 2-core CI box with the other core busy: 2.8 ms for 128 rows of 512
with 2 threads vs 21 us with 1; ``index_select`` and GEMMs on slices are unaffected). The
gradient segments read the plan's sorted order with ``index_select`` (a gather) instead.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..._cache import version
from ...pool import PoolView
from .plan import BatchPlan

_CHUNK_ELEMS = 1 << 22
# CPU: pools of at most this many rank rows (max_adapters * max_rank) may use dense_add_
DENSE_MAX_SLOT_ROWS = 256
# CPU prefill: dense_add_ instead of runs_add_ when the dense GEMMs' extra FLOPs (every slot's
# rank rows instead of each run's own) cost less than the runs' per-run fixed cost. Measured on
# the 2-core CI box (fp32): dense GEMMs run at ~12 ps per FLOP and core (a (256, 512) x with 32
# rank rows: 16.8 MFLOP, 0.20 ms on 1 thread, ~0.11 ms on 2); a run's or a segment's slices and
# two small GEMMs cost 15-30 us over their FLOPs. Four 64-token rank-8 runs over 512x512 with 2
# threads: runs 0.40 ms, dense 0.29 ms (cache-cold, interleaved with the base GEMM).
DENSE_SEC_PER_CORE_FLOP = 12e-12      # divided by torch.get_num_threads() (6 ps with 2)
RUN_FIXED_SEC = 30e-6
# CPU fragmented batches: sorted_add_'s gathers (x into adapter order, the delta back), per byte
SEC_PER_BYTE = 1e-10


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _factors(view: PoolView, swap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (view.lora_Bt, view.lora_A) if swap else (view.lora_A, view.lora_Bt)


def add_(y, x, view: PoolView, plan: BatchPlan, *, swap: bool = False) -> None:
    """In place ``y[t] += s_i (x[t] P_i^T) Q_i`` (``swap``: P = lora_Bt, Q = lora_A). GPU
    tensors: the gather (no host sync). CPU: the cheapest of runs / dense / sorted by the cost
    model below (host reads of the plan are free there)."""
    if x.device.type != "cpu":
        gather_add_(y, x, view, plan, swap=swap)
        return
    T, kn = x.shape[0], x.shape[1] + y.shape[1]
    rows = view.lora_A.shape[0] * view.lora_A.shape[1]            # every slot's rank rows
    dense = (2.0 * T * kn * (rows - view.rank_bound) * DENSE_SEC_PER_CORE_FLOP
             / torch.get_num_threads()
             if rows <= DENSE_MAX_SLOT_ROWS and factors_finite(view)
             else float("inf"))                                   # its extra FLOPs' cost
    runs = plan.runs() if plan.resolved_path() != "decode" else None
    if runs is not None:                                          # few runs, in token order
        if dense <= len(runs) * RUN_FIXED_SEC:
            dense_add_(y, x, view, plan, swap=swap)
        else:
            runs_add_(y, x, view, runs, swap=swap)
        return
    segments = sum(1 for c in plan.counts()[:-1] if c)
    moved = T * (x.shape[1] + 2 * y.shape[1]) * _acc(y.dtype).itemsize   # gathers in, out
    if dense <= segments * RUN_FIXED_SEC + moved * SEC_PER_BYTE:
        dense_add_(y, x, view, plan, swap=swap)
    else:
        sorted_add_(y, x, view, plan, swap=swap)


def dense_add_(y, x, view: PoolView, plan: BatchPlan, *, swap: bool = False) -> None:
    """The dense strategy (CPU, small pools): ``S = x P_all^T`` over every slot's rank rows at
    once (one GEMM, (T, MAXA*MAXR)), scaled in place by each token's weights ``w[t, a] = s_a``
    for its own slot and 0 elsewhere (:func:`_token_weights`), then ``y += S Q_all`` (one GEMM).
    No gather of the factors: for a pool of MAXA*MAXR <= DENSE_MAX_SLOT_ROWS rank rows the two
    GEMMs cost less than gathering (T, r, in|out) copies, and the whole update is four ATen calls
    (each costs ~5 us on the 2-core CI box, as much as one of these GEMMs). Base-only /
    empty-slot tokens get an exact zero update: their x rows are zeroed first (only when the
    batch has such tokens), so NaN in them cannot leak through the zero weights."""
    P, Q = _factors(view, swap)
    maxa, maxr = P.shape[:2]
    T = x.shape[0]
    acc = _acc(y.dtype)
    w, adapted = _token_weights(view, plan, acc)           # (T, MAXA, 1), (T, 1) bool or None
    xs = x if adapted is None else torch.where(adapted, x, 0.0)
    Pf, Qf = P.reshape(maxa * maxr, -1), Q.reshape(maxa * maxr, -1)
    if P.dtype != acc:
        xs, Pf, Qf = xs.to(acc), Pf.to(acc), Qf.to(acc)
    S = torch.mm(xs, Pf.t())
    S.view(T, maxa, maxr).mul_(w)
    if y.dtype == acc:
        y.addmm_(S, Qf)
    else:
        y.copy_(torch.addmm(y.to(acc), S, Qf).to(y.dtype))


# id(lora_A) -> (weakref to lora_A, weakref to lora_Bt, their _versions, finite): whether every
# factor of the pool is finite, recomputed after any in-place write to either tensor
_FINITE: dict[int, tuple] = {}


def factors_finite(view: PoolView) -> bool:
    """Whether every entry of ``lora_A`` and ``lora_Bt`` is finite: the condition for
    :func:`dense_add_` (its GEMMs run over every slot's factors, and a slot weight of 0 does not
    cancel NaN/inf: 0 * NaN = NaN, so one adapter's non-finite factors would reach every row).
    One pass over the pool per change of its factors (``pool.add`` / ``remove``, an optimizer
    step: each bumps the tensors' version counters), one dict lookup otherwise. Inference
    tensors have no version counter: False (the per-run / per-segment strategies, which read
    only each row's own adapter, are used)."""
    A, Bt = view.lora_A, view.lora_Bt
    versions = (version(A), version(Bt))
    if None in versions:
        return False
    hit = _FINITE.get(id(A))
    if hit is not None and hit[0]() is A and hit[1]() is Bt and hit[2] == versions:
        return hit[3]
    with torch.no_grad():
        ok = bool(torch.isfinite(A).all()) and bool(torch.isfinite(Bt).all())
    key = id(A)
    _FINITE[key] = (weakref.ref(A, lambda _: _FINITE.pop(key, None)), weakref.ref(Bt), versions,
                    ok)
    return ok


# id(scalings) -> (weakref, scalings._version, ranks._version, acc dtype, tables): the per-slot
# weight tables of :func:`_token_weights`, rebuilt when the pool's scalings or ranks change
_TABLES: dict[int, tuple] = {}


def _slot_tables(view: PoolView, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W (MAXA + 1, MAXA, 1) acc, adapted (MAXA + 1, 1) bool)``: row ``a`` of ``W`` is
    ``s_a e_a`` (0 for an empty slot), the last row (index -1, base-only tokens) is zero;
    ``adapted[a]`` = slot ``a`` holds an adapter. Built once per pool state (CPU)."""
    sc, ranks = view.scalings, view.ranks
    versions = (version(sc), version(ranks))
    hit = _TABLES.get(id(sc))
    if hit is not None and hit[0]() is sc and hit[1:3] == versions and hit[3] == acc:
        return hit[4]
    maxa = sc.shape[0]
    ok = torch.cat([ranks > 0, ranks.new_zeros(1, dtype=torch.bool)])
    W = torch.zeros(maxa + 1, maxa, dtype=acc, device=sc.device)
    W[:maxa].diagonal().copy_(torch.where(ok[:maxa], sc.to(acc), 0.0))
    tables = (W.unsqueeze(2), ok.unsqueeze(1))
    if None not in versions:            # inference tensors: rebuilt per call
        key = id(sc)
        _TABLES[key] = (weakref.ref(sc, lambda _: _TABLES.pop(key, None)), *versions, acc,
                        tables)
    return tables


def _token_weights(view: PoolView, plan: BatchPlan, acc: torch.dtype):
    """``(w (T, MAXA, 1), adapted (T, 1) bool or None)``: each token's row of the slot tables.
    ``adapted`` is None when every token names a loaded slot (:func:`_all_adapted`: then every
    id is in ``[0, MAXA)``); otherwise ids are clamped to ``[-1, MAXA]``, so -1 and any id out
    of range (only a raw op call can pass one) pick the zero row: no update, as in every
    backend."""
    W, ok = _slot_tables(view, acc)
    ids = plan.ids if plan.ids.dtype == torch.int64 else plan.ids.long()
    if _all_adapted(view, plan):
        return W.index_select(0, ids), None
    key = ids.clamp(-1, W.shape[0] - 1)                   # -1 indexes the last (zero) row
    return W[key], ok[key]


def runs_add_(y, x, view: PoolView, runs, *, swap: bool = False) -> None:
    """The runs strategy (module doc); ``runs`` = ``[[key, start, end], ...]``: per run of
    tokens ``[s, e)`` with adapter ``a`` of rank ``r``, ``y[s:e] += s_a (x[s:e] P_a^T) Q_a``
    (two GEMMs on row slices, in place)."""
    P, Q = _factors(view, swap)
    ranks, scs = view.ranks.tolist(), view.scalings.tolist()
    acc = _acc(y.dtype)
    for a, s, e in runs:
        if a >= len(ranks) or ranks[a] == 0:
            continue                                  # base-only tokens / an empty slot
        Pa, Qa, xa = P[a, :ranks[a]], Q[a, :ranks[a]], x[s:e]
        if Pa.dtype != acc:
            Pa, Qa, xa = Pa.to(acc), Qa.to(acc), xa.to(acc)
        if y.dtype == acc:
            y[s:e].addmm_(torch.mm(xa, Pa.t()), Qa, alpha=scs[a])
        else:
            y[s:e] = torch.addmm(y[s:e].to(acc), torch.mm(xa, Pa.t()), Qa,
                                 alpha=scs[a]).to(y.dtype)


def sorted_add_(y, x, view: PoolView, plan: BatchPlan, *, swap: bool = False) -> None:
    """The sorted strategy (CPU, fragmented batches, e.g. an unsorted prefill or a decode over
    many slots): the adapted tokens gathered once into the plan's adapter-sorted order
    (``perm``), per adapter segment two GEMMs at its real rank into a sorted delta, and the delta
    gathered back into token order and added (``y += D[inv]``: gathers only, no scatter). Costs
    two row gathers against the gather strategy's (T, r, in|out) factor copies."""
    P, Q = _factors(view, swap)
    so = plan.seg_off.tolist()
    n_ad = so[-2]                         # tokens naming a slot (base-only / invalid sort last)
    if n_ad == 0:
        return
    T, N = y.shape
    ranks, scs = view.ranks.tolist(), view.scalings.tolist()
    acc = _acc(y.dtype)
    perm = plan.perm.numpy()
    xs = x.index_select(0, plan.perm[:n_ad])                                 # (n_ad, K)
    if xs.dtype != acc:
        xs = xs.to(acc)
    d = torch.empty((n_ad + 1, N), dtype=acc)             # sorted delta; row n_ad stays zero
    d[n_ad].zero_()
    for a, r in enumerate(ranks):
        s, e = so[a], so[a + 1]
        if e == s:
            continue
        if r == 0:                                        # an empty slot named (raw op call)
            d[s:e].zero_()
            continue
        Pa, Qa = P[a, :r], Q[a, :r]
        if Pa.dtype != acc:
            Pa, Qa = Pa.to(acc), Qa.to(acc)
        torch.addmm(d[s:e], torch.mm(xs[s:e], Pa.t()), Qa, beta=0, alpha=scs[a], out=d[s:e])
    inv = np.full(T, n_ad, dtype=np.int64)                # token -> its sorted row, or the zero
    inv[perm[:n_ad]] = np.arange(n_ad)
    back = d.index_select(0, torch.from_numpy(inv))                          # (T, N)
    if y.dtype == acc:
        y.add_(back)
    else:
        y.copy_((y.to(acc) + back).to(y.dtype))


def _all_adapted(view: PoolView, plan: BatchPlan) -> bool:
    """CPU only (host reads are free there): every token names a slot with a nonzero rank."""
    so, ranks = plan.seg_off.tolist(), view.ranks.tolist()   # (list compares: ~1 us in all)
    return so[-1] == so[-2] and (0 not in ranks
                                 or all(r or so[a + 1] == so[a] for a, r in enumerate(ranks)))


def gather_add_(y, x, view: PoolView, plan: BatchPlan, *, swap: bool = False) -> None:
    """The gather strategy (module doc). Tokens with id -1, an out-of-range id or an empty slot
    get an exact zero update: their x rows are masked (NaN there cannot leak) and scale 0."""
    P, Q = _factors(view, swap)
    T = x.shape[0]
    maxa = P.shape[0]
    rb = max(1, min(view.rank_bound, P.shape[1]))
    ids = plan.ids.long()
    keep = None
    if x.device.type == "cpu" and _all_adapted(view, plan):
        a, sc, xs = ids, view.scalings.index_select(0, ids), x
    else:
        ok = (ids >= 0) & (ids < maxa)
        a = torch.where(ok, ids, torch.zeros_like(ids))
        ok = ok & (view.ranks.index_select(0, a) > 0)
        sc = torch.where(ok, view.scalings.index_select(0, a), 0.0)
        xs = torch.where(ok[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        keep = ok
    acc = _acc(y.dtype)
    Pr, Qr = P[:, :rb], Q[:, :rb]
    ch = max(1, _CHUNK_ELEMS // (rb * max(x.shape[1], y.shape[1])))
    for c0 in range(0, T, ch):
        sl = slice(c0, c0 + ch)
        asl = a[sl]
        v = torch.bmm(Pr.index_select(0, asl).to(acc), xs[sl].to(acc).unsqueeze(2))  # (t, rb, 1)
        v = (v * sc[sl, None, None].to(acc)).transpose(1, 2)                         # (t, 1, rb)
        q = Qr.index_select(0, asl).to(acc)                                          # (t, rb, N)
        if keep is None:
            if y.dtype == acc:
                y[sl].unsqueeze(1).baddbmm_(v, q)
            else:
                y[sl] = (y[sl].to(acc) + torch.bmm(v, q).squeeze(1)).to(y.dtype)
        else:
            # tokens without an adapter read slot 0's factors with x and scale 0: a non-finite
            # entry there gives 0 * inf = NaN, so their delta is selected away (not scaled)
            d = torch.where(keep[sl, None], torch.bmm(v, q).squeeze(1), 0.0)
            y[sl] = (y[sl].to(acc) + d).to(y.dtype) if y.dtype != acc else y[sl] + d


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
