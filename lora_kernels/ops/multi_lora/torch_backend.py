"""The ``"torch"`` backend of multi-adapter LoRA (plain PyTorch; the CPU path and the reference
for the kernels). Three strategies, each computing ``y[t] += s_i (x[t] P_i^T) Q_i`` with
``(P, Q) = (lora_A, lora_Bt)`` (forward) or ``(lora_Bt, lora_A)`` (backward dx):

* runs (CPU, prefill path, ids in few runs -- :class:`~.plan.BatchPlan` records them once per
  forward): per run of equal ids, two GEMMs on row slices of x and y at the adapter's real rank,
  in place (``addmm_``); the shrinks of all runs are one GEMM when the batch's adapters are
  narrow together. No gather, no scatter: a served mixed batch is batch-first, so each sequence
  is one run whatever the order of its adapters.
* dense (CPU decode and fragmented batches, small pools: MAXA*MAXR <= 256 rank rows): two GEMMs
  over every slot's factors at once, per-token slot weights (one gather from a per-pool table)
  keeping each token's own slot (no factor gather; four ATen calls in all).
* gather (decode, fragmented batches, GPU tensors): per token, its adapter's factors gathered
  into ``(T, rb, in|out)`` and two batched GEMMs in fp32 (chunked over tokens). No host sync, so
  a CUDA graph can capture it.

None scatters with ``index_add_``: on CPU its kernel stalls when its worker threads compete
for cores (measured on the 2-core CI box with the other core busy: 2.8 ms for 128 rows of 512
with 2 threads vs 21 us with 1; ``index_select`` and GEMMs on slices are unaffected). The
gradient segments read the plan's sorted order with ``index_select`` (a gather) instead.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from ...pool import PoolView
from .plan import BatchPlan

_CHUNK_ELEMS = 1 << 22
# CPU: pools of at most this many rank rows (max_adapters * max_rank) may use dense_add_
DENSE_MAX_SLOT_ROWS = 256
# CPU prefill: dense_add_ instead of runs_add_ when the dense GEMMs' extra FLOPs (every slot's
# rank rows instead of each run's own) cost less than the runs' per-run fixed cost. Measured on
# the 2-core CI box (fp32): the two dense GEMMs of a (256, 512) x with 32 rank rows take ~106 us
# hot for 16.8 MFLOP (~6 ps per FLOP); a run's slices and two small GEMMs cost ~30 us over their
# FLOPs. Four 64-token rank-8 runs over 512x512: runs 0.40 ms, dense 0.29 ms (both cache-cold,
# interleaved with the base GEMM), segment loop 0.38 ms.
DENSE_SEC_PER_FLOP = 6e-12
RUN_FIXED_SEC = 30e-6


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _factors(view: PoolView, swap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (view.lora_Bt, view.lora_A) if swap else (view.lora_A, view.lora_Bt)


def add_(y, x, view: PoolView, plan: BatchPlan, *, swap: bool = False) -> None:
    """In place ``y[t] += s_i (x[t] P_i^T) Q_i`` (``swap``: P = lora_Bt, Q = lora_A)."""
    cpu = x.device.type == "cpu"
    rows = view.lora_A.shape[0] * view.lora_A.shape[1]            # every slot's rank rows
    runs = plan.runs() if cpu and plan.resolved_path() != "decode" else None
    if runs is not None and not _dense_beats_runs(x.shape[0], x.shape[1] + y.shape[1], rows,
                                                  view.rank_bound, len(runs)):
        runs_add_(y, x, view, runs, swap=swap)
    elif cpu and rows <= DENSE_MAX_SLOT_ROWS:
        dense_add_(y, x, view, plan, swap=swap)
    else:
        gather_add_(y, x, view, plan, swap=swap)


def _dense_beats_runs(T: int, k_plus_n: int, rows: int, rank: int, n_runs: int) -> bool:
    """The CPU cost model of a prefill batch (constants above): the dense strategy's extra
    FLOPs ``2 T (K + N) (rows - rank)`` against ``n_runs`` runs' fixed costs."""
    return (rows <= DENSE_MAX_SLOT_ROWS
            and 2.0 * T * k_plus_n * (rows - rank) * DENSE_SEC_PER_FLOP <= n_runs * RUN_FIXED_SEC)


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


# id(scalings) -> (weakref, scalings._version, ranks._version, acc dtype, tables): the per-slot
# weight tables of :func:`_token_weights`, rebuilt when the pool's scalings or ranks change
_TABLES: dict[int, tuple] = {}


def _slot_tables(view: PoolView, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W (MAXA + 1, MAXA, 1) acc, adapted (MAXA + 1, 1) bool)``: row ``a`` of ``W`` is
    ``s_a e_a`` (0 for an empty slot), the last row (index -1, base-only tokens) is zero;
    ``adapted[a]`` = slot ``a`` holds an adapter. Built once per pool state (CPU)."""
    sc, ranks = view.scalings, view.ranks
    hit = _TABLES.get(id(sc))
    if (hit is not None and hit[0]() is sc and hit[1] == sc._version
            and hit[2] == ranks._version and hit[3] == acc):
        return hit[4]
    maxa = sc.shape[0]
    ok = torch.cat([ranks > 0, ranks.new_zeros(1, dtype=torch.bool)])
    W = torch.zeros(maxa + 1, maxa, dtype=acc, device=sc.device)
    W[:maxa].diagonal().copy_(torch.where(ok[:maxa], sc.to(acc), 0.0))
    tables = (W.unsqueeze(2), ok.unsqueeze(1))
    key = id(sc)
    _TABLES[key] = (weakref.ref(sc, lambda _: _TABLES.pop(key, None)), sc._version,
                    ranks._version, acc, tables)
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


# runs_add_: one shrink GEMM for all runs when the batch's adapters together have at most this
# many rank rows. Measured on the 2-core CI box (fp32, K = 512): x (T, K) @ (K, w) costs about
# the same for w = 8..32 (~26 us at T = 64, ~65 us at T = 256 for w = 32) and grows linearly
# beyond, so four rank-8 runs of 64 rows cost 4 x 26 us apart and 65 us together.
RUNS_SHARED_SHRINK_ROWS = 32


def runs_add_(y, x, view: PoolView, runs, *, swap: bool = False) -> None:
    """The runs strategy (module doc); ``runs`` = ``[[key, start, end], ...]``. Per run of
    ``e - s`` tokens with adapter ``a`` of rank ``r``: ``y[s:e] += s_a (x[s:e] P_a^T) Q_a``
    (two GEMMs on row slices, in place); when the batch's adapters have at most
    ``RUNS_SHARED_SHRINK_ROWS`` rank rows together, the shrinks of all runs are one GEMM
    ``S = x P_used^T`` (T, sum of ranks) and each run reads its columns of S."""
    P, Q = _factors(view, swap)
    ranks, scs = view.ranks.tolist(), view.scalings.tolist()
    runs = [(a, s, e) for a, s, e in runs if a < len(ranks) and ranks[a]]   # skip base / empty
    if not runs:
        return
    acc = _acc(y.dtype)
    xa = x if x.dtype == acc else x.to(acc)
    used = list(dict.fromkeys(a for a, _, _ in runs))       # the batch's adapters, first seen
    col = dict(zip(used, itertools.accumulate((ranks[a] for a in used), initial=0)))
    if len(runs) > 1 and sum(ranks[a] for a in used) <= RUNS_SHARED_SHRINK_ROWS:
        Pu = torch.cat([P[a, :ranks[a]] for a in used])                      # (width, K)
        S = torch.mm(xa, (Pu if Pu.dtype == acc else Pu.to(acc)).t())        # (T, width)

        def shrink(a, s, e):
            return S[s:e, col[a]:col[a] + ranks[a]]
    else:
        def shrink(a, s, e):
            Pa = P[a, :ranks[a]]
            return torch.mm(xa[s:e], (Pa if Pa.dtype == acc else Pa.to(acc)).t())
    for a, s, e in runs:
        Qa = Q[a, :ranks[a]]
        Qa = Qa if Qa.dtype == acc else Qa.to(acc)
        if y.dtype == acc:
            y[s:e].addmm_(shrink(a, s, e), Qa, alpha=scs[a])
        else:
            y[s:e] = torch.addmm(y[s:e].to(acc), shrink(a, s, e), Qa, alpha=scs[a]).to(y.dtype)


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
