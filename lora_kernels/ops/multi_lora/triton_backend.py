"""The ``"triton"`` backend of multi-adapter LoRA: launchers of ``kernels.multi_lora`` (validate
nothing: the api checked; allocate; launch). Tile sizes come from :mod:`.tiles`, token grouping
from the :class:`~.plan.BatchPlan` (built once per forward, never here).

Paths: ``"decode"`` -> ``bgmv_kernel`` (one program per token and column slice, no metadata);
``"prefill"`` -> ``sgmv_kernel`` over the plan's tile table; ``"prefill_fused"`` -> S = x A^T by
``sgmv_kernel`` (STORE_S), then ``sgmv_gemm_kernel``: the base GEMM over adapter-sorted row tiles
with ``+ s S B^T`` in its epilogue (y written once). Backward (dy (T, out)):
  G[t] = Bt_i dy[t], U[t] = A_i x[t]  (T, RB) fp32 (sgmv_kernel, STORE_S)
  dx = dy W + s_i G[t] A_i            (sgmv_kernel with P = Bt, Q = A)
  dA_i = s_i sum_{t in seg i} G[t]^T x[t],  dBt_i = s_i sum_{t in seg i} U[t]^T dy[t]
                                      (seg_tn_kernel over the plan's segments, deterministic)
"""

from __future__ import annotations

import functools

import torch

from ...pool import PoolView
from .. import _triton as TR
from .._triton import cdiv
from .plan import BatchPlan
from .tiles import tiles


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_n(programs: int, N: int, block_n: int, device: torch.device) -> int:
    """Column slices per token/tile so the grid has ~4 waves of programs on the GPU (the
    interpreter uses 2 slices whenever possible, to exercise the split)."""
    n_blocks = max(1, cdiv(N, block_n))
    if TR.triton_interpret() or device.type != "cuda":
        return min(2, n_blocks)
    target = 4 * _num_sms(device.index if device.index is not None else 0)
    return max(1, min(n_blocks, cdiv(target, max(1, programs))))


def _rb(rank_bound: int, *, dot: bool) -> int:
    rb = TR.next_pow2(max(1, rank_bound))
    return max(16 if dot else 2, rb)


def _per_split(programs: int, N: int, block_n: int, device) -> tuple[int, int]:
    """(column slices, columns per slice: a multiple of ``block_n``)."""
    split = _split_n(programs, N, block_n, device)
    per = cdiv(cdiv(N, split), block_n) * block_n
    return cdiv(N, per), per


def bgmv_(y, x, P, Q, view: PoolView, ids) -> None:
    """Decode: ``y[t] += s_i (x[t] P_i^T) Q_i`` by ``bgmv_kernel``."""
    from ...kernels.multi_lora import bgmv_kernel

    T, K = x.shape
    N = y.shape[1]
    rb = _rb(view.rank_bound, dot=False)
    cfg = tiles("decode", rb)
    split, per = _per_split(T, N, cfg["BLOCK_N"], x.device)
    bgmv_kernel[(T, split)](
        # the kernel reads IDS + t (unit stride): an expanded / strided ids tensor goes contiguous
        x, y, P, Q, view.ranks, view.scalings, ids.contiguous(), K, N, P.shape[0], per,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        P.stride(0), P.stride(1), P.stride(2), Q.stride(0), Q.stride(1), Q.stride(2),
        RB=rb, **cfg,
    )


def sgmv(y, x, P, Q, view: PoolView, plan: BatchPlan, *, store_s: bool = False):
    """``y[rows] += s (x P^T) Q`` over the plan's tile table; with ``store_s`` return the fp32
    ``x P_i^T`` (T, RB) instead (rows of tokens with id -1 are left unwritten)."""
    from ...kernels.multi_lora import sgmv_kernel

    T, K = x.shape
    cfg = tiles("prefill")
    rb = _rb(view.rank_bound, dot=True)
    tt = plan.tiles
    G = tt.shape[1]
    if store_s:
        N, split, per = 0, 1, 0
        s = TR.empty((T, rb), torch.float32, x.device)
        y = s  # unused pointer
    else:
        N = y.shape[1]
        split, per = _per_split(G, N, cfg["BLOCK_N"], x.device)
        s = y  # unused pointer
    sgmv_kernel[(G, split)](
        x, y, s, P, Q, view.ranks, view.scalings, plan.perm, tt[0], tt[1], tt[2],
        K, N, P.shape[0], per,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), s.stride(0), s.stride(1),
        P.stride(0), P.stride(1), P.stride(2), Q.stride(0), Q.stride(1), Q.stride(2),
        STORE_S=store_s, RB=rb, PRECISION=TR.dot_precision(x.dtype),
        UPCAST=TR.upcast(x.dtype, P.dtype), **cfg,
    )
    return s if store_s else None


def seg_tn(lhs, rhs, view: PoolView, plan: BatchPlan, out_dtype):
    """Per-adapter ``O[a] = s_a lhs_a^T rhs_a`` (MAXA, MAXR, N), zero outside real ranks."""
    from ...kernels.multi_lora import seg_tn_kernel

    maxa, max_rank = view.lora_A.shape[:2]
    N = rhs.shape[1]
    cfg = tiles("tn")
    out = torch.zeros((maxa, max_rank, N), dtype=out_dtype, device=rhs.device)
    seg_tn_kernel[(maxa, cdiv(N, cfg["BLOCK_N"]))](
        lhs, rhs, out, view.ranks, view.scalings, plan.perm, plan.seg_off, N, max_rank,
        lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        RB=lhs.shape[1], PRECISION=TR.dot_precision(rhs.dtype), **cfg,
    )
    return out


def prefill_fused(x, weight, bias, view: PoolView, plan: BatchPlan):
    """``path="prefill_fused"`` (module doc): returns y (T, out). Opt-in until a GPU measures it
    against cuBLAS + ``sgmv_kernel`` (the default prefill)."""
    from ...kernels.multi_lora import sgmv_gemm_kernel

    A, Bt = view.lora_A, view.lora_Bt
    T, K = x.shape
    N = weight.shape[0]
    s = sgmv(None, x, A, Bt, view, plan, store_s=True)
    cfg = tiles("fused")
    ft = plan.fused_tiles
    y = TR.empty((T, N), x.dtype, x.device)
    sgmv_gemm_kernel[(ft.shape[1], cdiv(N, cfg["BLOCK_N"]))](
        x, weight, bias.contiguous() if bias is not None else y, y, s, Bt, view.ranks,
        view.scalings,
        plan.perm, ft[0], ft[1], ft[2], K, N, A.shape[0],
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        s.stride(0), s.stride(1), Bt.stride(0), Bt.stride(1), Bt.stride(2),
        HAS_BIAS=bias is not None, RB=s.shape[1], PRECISION=TR.dot_precision(x.dtype),
        UPCAST=TR.upcast(x.dtype, weight.dtype), **cfg,
    )
    return y


def add_(y, x, view: PoolView, plan: BatchPlan) -> None:
    if plan.resolved_path() == "decode":
        bgmv_(y, x, view.lora_A, view.lora_Bt, view, plan.ids)
    else:
        sgmv(y, x, view.lora_A, view.lora_Bt, view, plan)


def bwd(dy, x, weight, view: PoolView, plan: BatchPlan, need):
    """``(dx, dA, dBt)`` for ``need = (need_dx, need_dA, need_dBt)`` (module doc)."""
    need_dx, need_dA, need_dBt = need
    A, Bt = view.lora_A, view.lora_Bt
    dx = dA = dBt = None
    if need_dx:
        dx = (dy @ weight).to(x.dtype) if weight is not None else torch.zeros_like(
            x, memory_format=torch.contiguous_format)
        sgmv(dx, dy, Bt, A, view, plan)
    if need_dA:
        g = sgmv(None, dy, Bt, A, view, plan, store_s=True)
        dA = seg_tn(g, x, view, plan, A.dtype)
    if need_dBt:
        u = sgmv(None, x, A, Bt, view, plan, store_s=True)
        dBt = seg_tn(u, dy, view, plan, Bt.dtype)
    return dx, dA, dBt
