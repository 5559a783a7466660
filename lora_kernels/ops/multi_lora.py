"""Multi-adapter LoRA: ``y[t] = x[t] W^T + b + s_i x[t] A_i^T B_i^T`` with ``i = adapter_ids[t]``.

Layers (same pattern as ``ops.lora``):
  kernels.multi_lora (Triton: bgmv/sgmv/seg_tn)  ->  launchers below  ->  torch.library ops
  ``lora_kernels::multi_lora_fwd`` / ``multi_lora_bwd`` (autograd) and ``multi_lora_add_``
  (in place, inference)  ->  :func:`multi_lora_linear`, :func:`multi_lora_add_`  ->
  ``serving.MultiAdapterModel``.

The adapters live in an :class:`lora_kernels.AdapterPool` (``lora_A (MAXA, MAXR, in)``,
``lora_Bt (MAXA, MAXR, out)``, ``ranks`` int32, ``scalings`` fp32, all on the pool's device).

Paths (``path=None`` picks one from host-known sizes, see :func:`choose_path`):
  * ``"decode"``: one program per (token, column slice) gathers its adapter (``bgmv_kernel``);
    no metadata at all, fixed grid ``(T, SPLIT_N)``: CUDA-graph capturable.
  * ``"prefill"``: tokens grouped by adapter ON DEVICE (:func:`segments`: stable argsort,
    scatter-add counts, cumsum, searchsorted; no ``.item()``, no host sync) into a tile table of
    fixed length, then a segmented GEMM (``sgmv_kernel``). Also capturable (fixed sizes).
  Both add into the base output ``x W^T + b`` computed by ``torch.nn.functional.linear``
  (cuBLAS on a GPU) in place; the rank-r intermediate stays on chip.
  * ``"prefill_fused"`` (opt-in, Triton only; the others treat it as "prefill"): the base GEMM
    itself runs in Triton over adapter-sorted row tiles with ``+ s S B^T`` in its epilogue
    (``sgmv_gemm_kernel``), so y is written once instead of read-modify-written (at 4 adapters x
    1024 tokens, 4096x4096 bf16: 64 MiB less traffic, ~20 us of a ~180 us base GEMM). Whether it
    beats cuBLAS + sgmv depends on Triton's GEMM vs cuBLAS: the benchmark times both.

Backward (``multi_lora_bwd``; dy (T, out)):
  G[t] = Bt_i dy[t]     U[t] = A_i x[t]            (T, RB) fp32 (sgmv_kernel, STORE_S)
  dx   = dy W + s_i G[t] A_i                        (sgmv_kernel with P = Bt, Q = A)
  dA_i = s_i sum_{t: ids[t]=i} G[t]^T x[t]          (seg_tn_kernel, deterministic)
  dBt_i= s_i sum_{t: ids[t]=i} U[t]^T dy[t]
  dW = dy^T x, db = sum_t dy                        (only when weight/bias require grad)
  Pool factor gradients are dense ``(MAXA, MAXR, in|out)`` tensors (zero for unused slots and
  rows >= rank), accumulated into ``pool.lora_A.grad`` / ``pool.lora_Bt.grad`` when the pool was
  made trainable with ``pool.requires_grad_()``. ``scalings`` and ``ranks`` get no gradient.

Backends: ``"torch"`` (gather-BMM in fp32, chunked over tokens; the reference/CPU path);
``"triton"``; ``"cuda"`` (forward through ``ops.multi_lora_cuda.add_lora_`` with the same
``path``; its backward runs the Triton kernels when triton is installed, else the torch path).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _validate as V
from .._backend import resolve_backend, triton_available
from . import _triton as TR
from .lora import _needs_grad

PATHS = ("decode", "prefill", "prefill_fused")
# decode when the batch has at most this many tokens per adapter on average (or T <= 16)
DECODE_TOKENS_PER_ADAPTER = 4


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose_path(num_tokens: int, num_adapters: int) -> str:
    """``"decode"`` when tokens per adapter are few (gathering each token's adapter is then the
    memory-optimal schedule), else ``"prefill"`` (segments amortise each adapter's bytes over a
    tile of tokens). Uses host-known sizes only: no device read."""
    if num_tokens <= 16 or num_tokens <= DECODE_TOKENS_PER_ADAPTER * max(1, num_adapters):
        return "decode"
    return "prefill"


# ----------------------------------------------------------------------------- device metadata
def segments(ids: torch.Tensor, max_adapters: int, block_m: int, include_base: bool = False):
    """Group tokens by adapter, on device, without a host sync.

    Returns ``(perm, tile_adapter, tile_start, tile_end, seg_start, seg_count)``:
      perm (T,) int64: token indices sorted by adapter (stable; -1/invalid ids last);
      tile_* (G,) with G = cdiv(T, block_m) + min(n_seg, T) (n_seg = max_adapters, + 1 with
      ``include_base``; a bound on the tiles needed, known from shapes only, so the grid is
      fixed): tile g covers sorted rows [tile_start[g], tile_end[g]) of adapter tile_adapter[g].
      tile_adapter -1 marks a tile no adapter applies to: unused (and then empty, start == end,
      when ``include_base``) or, with ``include_base``, a tile of base-only rows (-1/invalid ids),
      which the fused prefill GEMM still computes;
      seg_start, seg_count (max_adapters,) int64: each adapter's sorted segment.
    """
    T = ids.shape[0]
    dev = ids.device
    ids64 = ids.long()
    key = torch.where((ids64 >= 0) & (ids64 < max_adapters), ids64,
                      torch.full_like(ids64, max_adapters))
    perm = torch.argsort(key, stable=True)
    counts = torch.zeros(max_adapters + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))       # not bincount: that syncs on CUDA
    n_seg = max_adapters + 1 if include_base else max_adapters
    seg_count = counts[:n_seg]
    seg_end = torch.cumsum(seg_count, 0)
    seg_start = seg_end - seg_count
    tiles = (seg_count + block_m - 1) // block_m
    tile_cum = torch.cumsum(tiles, 0)
    G = cdiv(T, block_m) + min(n_seg, T)
    g = torch.arange(G, device=dev, dtype=torch.int64)
    a = torch.searchsorted(tile_cum, g, right=True)
    used = a < n_seg
    ac = a.clamp(max=n_seg - 1)
    local = g - (tile_cum - tiles)[ac]
    tile_start = seg_start[ac] + local * block_m
    tile_end = torch.minimum(tile_start + block_m, seg_end[ac])
    if include_base:
        tile_end = torch.where(used, tile_end, tile_start)
    tile_adapter = torch.where(used & (ac < max_adapters), ac,
                               torch.full_like(ac, -1)).to(torch.int32)
    return (perm, tile_adapter, tile_start, tile_end, seg_start[:max_adapters],
            seg_count[:max_adapters])


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


def _tiles(kind: str, rb: int = 16) -> dict:
    """Tile sizes. Interpreter: small (numpy work per program). GPU (not tuned on a GPU yet; all
    compile for sm_80/sm_90 with Triton's compiler): decode keeps its (RB, BLOCK) fp32 register
    tile at <= 4096 elements (32 per thread at 4 warps), prefill/tn use 64-128 wide dot tiles."""
    interp = TR.triton_interpret()
    if kind == "decode":
        if interp:
            return dict(BLOCK_K=64, BLOCK_N=64)
        blk = max(32, min(256, 4096 // rb))
        return dict(BLOCK_K=blk, BLOCK_N=blk, num_warps=4)
    if kind == "prefill":
        return (dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32) if interp
                else dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=128, num_warps=4, num_stages=3))
    if kind == "fused":
        return (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32) if interp
                else dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3))
    return dict(BLOCK_T=32, BLOCK_N=32) if interp else dict(BLOCK_T=64, BLOCK_N=128, num_warps=4)


# ----------------------------------------------------------------------------- Triton launchers
def _bgmv_(y, x, P, Q, ranks, scales, ids, rank_bound):
    from ..kernels.multi_lora import bgmv_kernel

    T, K = x.shape
    N = y.shape[1]
    rb = _rb(rank_bound, dot=False)
    cfg = _tiles("decode", rb)
    split = _split_n(T, N, cfg["BLOCK_N"], x.device)
    per = cdiv(cdiv(N, split), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    split = cdiv(N, per)
    bgmv_kernel[(T, split)](
        x, y, P, Q, ranks, scales, ids, K, N, P.shape[0], per,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        P.stride(0), P.stride(1), P.stride(2), Q.stride(0), Q.stride(1), Q.stride(2),
        RB=rb, **cfg,
    )


def _sgmv(y, x, P, Q, ranks, scales, meta, rank_bound, *, store_s=False):
    """``y[rows] += s (x P^T) Q`` over the tile table ``meta``; with ``store_s`` return the fp32
    ``x P_i^T`` (T, RB) instead (rows of tokens with id -1 are left unwritten)."""
    from ..kernels.multi_lora import sgmv_kernel

    perm, tile_adapter, tile_start, tile_end = meta[:4]
    T, K = x.shape
    cfg = _tiles("prefill")
    rb = _rb(rank_bound, dot=True)
    G = tile_adapter.shape[0]
    if store_s:
        N, split, per = 0, 1, 0
        s = TR.empty((T, rb), torch.float32, x.device)
        y = s  # unused pointer
    else:
        N = y.shape[1]
        split = _split_n(G, N, cfg["BLOCK_N"], x.device)
        per = cdiv(cdiv(N, split), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
        split = cdiv(N, per)
        s = y  # unused pointer
    sgmv_kernel[(G, split)](
        x, y, s, P, Q, ranks, scales, perm, tile_adapter, tile_start, tile_end,
        K, N, P.shape[0], per,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), s.stride(0), s.stride(1),
        P.stride(0), P.stride(1), P.stride(2), Q.stride(0), Q.stride(1), Q.stride(2),
        STORE_S=store_s, RB=rb, PRECISION=TR.dot_precision(x.dtype),
        UPCAST=TR.upcast(x.dtype, P.dtype), **cfg,
    )
    return s if store_s else None


def _seg_tn(lhs, rhs, ranks, scales, meta, max_rank, rank_bound, out_dtype):
    """Per-adapter ``O[a] = s_a lhs_a^T rhs_a`` (MAXA, MAXR, N), zero outside real ranks."""
    from ..kernels.multi_lora import seg_tn_kernel

    perm, seg_start, seg_count = meta[0], meta[4], meta[5]
    maxa = ranks.shape[0]
    N = rhs.shape[1]
    cfg = _tiles("tn")
    out = torch.zeros((maxa, max_rank, N), dtype=out_dtype, device=rhs.device)
    seg_tn_kernel[(maxa, cdiv(N, cfg["BLOCK_N"]))](
        lhs, rhs, out, ranks, scales, perm, seg_start, seg_count, N, max_rank,
        lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        RB=lhs.shape[1], PRECISION=TR.dot_precision(rhs.dtype), **cfg,
    )
    return out


def _triton_prefill_fused(x, weight, bias, A, Bt, ranks, scalings, ids, rank_bound):
    """``path="prefill_fused"``: S = x A_i^T (T, RB) fp32 by ``sgmv_kernel`` (STORE_S), then one
    Triton GEMM over adapter-sorted row tiles with bias and ``+ s_i S B_i^T`` in its epilogue
    (``sgmv_gemm_kernel``): y is written once. Opt-in until a GPU measures it against cuBLAS +
    ``sgmv_kernel`` (the default prefill)."""
    from ..kernels.multi_lora import sgmv_gemm_kernel

    T, K = x.shape
    N = weight.shape[0]
    maxa = A.shape[0]
    s = _sgmv(None, x, A, Bt, ranks, scalings,
              segments(ids, maxa, _tiles("prefill")["BLOCK_M"]), rank_bound, store_s=True)
    cfg = _tiles("fused")
    perm, tile_adapter, tile_start, tile_end = segments(ids, maxa, cfg["BLOCK_M"],
                                                        include_base=True)[:4]
    y = TR.empty((T, N), x.dtype, x.device)
    sgmv_gemm_kernel[(tile_adapter.shape[0], cdiv(N, cfg["BLOCK_N"]))](
        x, weight, bias if bias is not None else y, y, s, Bt, ranks, scalings, perm,
        tile_adapter, tile_start, tile_end, K, N, maxa,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        s.stride(0), s.stride(1), Bt.stride(0), Bt.stride(1), Bt.stride(2),
        HAS_BIAS=bias is not None, RB=s.shape[1], PRECISION=TR.dot_precision(x.dtype),
        UPCAST=TR.upcast(x.dtype, weight.dtype), **cfg,
    )
    return y


def _triton_add_(y, x, A, Bt, ranks, scalings, ids, rank_bound, path):
    if path == "decode":
        _bgmv_(y, x, A, Bt, ranks, scalings, ids, rank_bound)
    else:
        meta = segments(ids, A.shape[0], _tiles("prefill")["BLOCK_M"])
        _sgmv(y, x, A, Bt, ranks, scalings, meta, rank_bound)


def _triton_bwd(dy, x, weight, A, Bt, ranks, scalings, ids, rank_bound, need_dx, need_dA,
                need_dBt):
    meta = segments(ids, A.shape[0], _tiles("prefill")["BLOCK_M"])
    dx = dA = dBt = None
    if need_dx:
        dx = (dy @ weight).to(x.dtype) if weight is not None else torch.zeros_like(
            x, memory_format=torch.contiguous_format)
        _sgmv(dx, dy, Bt, A, ranks, scalings, meta, rank_bound)
    if need_dA:
        g = _sgmv(None, dy, Bt, A, ranks, scalings, meta, rank_bound, store_s=True)
        dA = _seg_tn(g, x, ranks, scalings, meta, A.shape[1], rank_bound, A.dtype)
    if need_dBt:
        u = _sgmv(None, x, A, Bt, ranks, scalings, meta, rank_bound, store_s=True)
        dBt = _seg_tn(u, dy, ranks, scalings, meta, A.shape[1], rank_bound, Bt.dtype)
    return dx, dA, dBt


# ----------------------------------------------------------------------------- torch path
_CHUNK_ELEMS = 1 << 22


def _gather(ids, ranks, scalings, maxa):
    ids64 = ids.long()
    ok = (ids64 >= 0) & (ids64 < maxa)
    a = torch.where(ok, ids64, torch.zeros_like(ids64))
    ok = ok & (ranks[a] > 0)
    sc = torch.where(ok, scalings[a].float(), torch.zeros((), device=ids.device))
    return a, ok, sc


def _cpu_segments(ids, ranks, scalings):
    """CPU only (a host read costs nothing there): ``[(adapter, rows, rank, scaling)]`` for each
    adapter present with a nonzero rank; rows are a ``slice`` when the ids are already grouped
    (sorted: prefill batches usually are; views, no gather copy), else int64 indices."""
    ids64 = ids.long()
    grouped = ids64.shape[0] < 2 or bool((ids64[1:] >= ids64[:-1]).all())
    order = None if grouped else torch.argsort(ids64, stable=True)
    sorted_ids = ids64 if grouped else ids64[order]
    uniq, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    ranks_h, sc_h = ranks.tolist(), scalings.tolist()
    out, start = [], 0
    for a, c in zip(uniq.tolist(), counts.tolist()):
        rows = slice(start, start + c) if grouped else order[start:start + c]
        start += c
        if 0 <= a < len(ranks_h) and ranks_h[a] > 0:
            out.append((a, rows, ranks_h[a], sc_h[a]))
    return out


def _cpu_add_(y, x, P, Q, ranks, scalings, ids):
    """CPU path: ``y[rows_a] += s_a (x[rows_a] P_a^T) Q_a`` per adapter present, at its real rank
    (two small GEMMs per adapter instead of a (T, r, in) gather; measured 2-3x faster than the
    gather-BMM on the 2-core CI box for prefill-size batches)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    for a, rows, r, sc in _cpu_segments(ids, ranks, scalings):
        v = x[rows].to(acc) @ P[a, :r].to(acc).t()
        d = (v * sc) @ Q[a, :r].to(acc)
        if isinstance(rows, slice) and y.dtype == acc:
            y[rows] += d
        elif y.dtype == acc:
            y.index_add_(0, rows, d)
        else:
            y[rows] = (y[rows].to(acc) + d).to(y.dtype)


def _cpu_grads(dy, x, A, Bt, ranks, scalings, ids, need_dA, need_dBt):
    """CPU path of the factor gradients, per adapter present:
    ``dA_a = s_a (dy_a Bt_a^T)^T x_a``, ``dBt_a = s_a (x_a A_a^T)^T dy_a``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dA = torch.zeros_like(A) if need_dA else None
    dBt = torch.zeros_like(Bt) if need_dBt else None
    for a, rows, r, sc in _cpu_segments(ids, ranks, scalings):
        xa, dya = x[rows].to(acc), dy[rows].to(acc)
        if need_dA:
            dA[a, :r] = ((dya @ Bt[a, :r].to(acc).t()).t() @ xa * sc).to(A.dtype)
        if need_dBt:
            dBt[a, :r] = ((xa @ A[a, :r].to(acc).t()).t() @ dya * sc).to(Bt.dtype)
    return dA, dBt


def _cpu_segmented(x, ranks, path=None) -> bool:
    """CPU and prefill-shaped: per-adapter GEMMs beat the gather-BMM (measured with
    ``python -m lora_kernels.bench --quick``: 4 adapters x 64 tokens 2-3x faster; 16 tokens of 16
    distinct adapters 3x slower, so decode-shaped batches keep the gather)."""
    if x.device.type != "cpu":
        return False
    if path is None:
        path = choose_path(x.shape[0], int((ranks > 0).sum()))
    return path in ("prefill", "prefill_fused")


def _torch_add_(y, x, A, Bt, ranks, scalings, ids, rank_bound, path=None):
    """The torch backend: the gather-BMM, except prefill-shaped batches on CPU, which run
    per-adapter GEMMs (:func:`_cpu_add_`; a host read of the ranks is free there)."""
    if _cpu_segmented(x, ranks, path):
        _cpu_add_(y, x, A, Bt, ranks, scalings, ids)
    else:
        _gather_add_(y, x, A, Bt, ranks, scalings, ids, rank_bound)


def _gather_add_(y, x, A, Bt, ranks, scalings, ids, rank_bound):
    """Gather-BMM in fp32 (chunked over tokens): the GPU torch path and baseline (no host sync,
    so a CUDA graph can capture it)."""
    T, K = x.shape
    N = y.shape[1]
    rb = max(1, min(rank_bound, A.shape[1]))
    a, ok, sc = _gather(ids, ranks, scalings, A.shape[0])
    ch = max(1, _CHUNK_ELEMS // (rb * max(K, N)))
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    for c0 in range(0, T, ch):
        sl = slice(c0, c0 + ch)
        v = torch.bmm(A[a[sl], :rb].to(acc), x[sl].to(acc).unsqueeze(2)).squeeze(2)
        v = v * sc[sl, None].to(acc)
        d = torch.bmm(v.unsqueeze(1), Bt[a[sl], :rb].to(acc)).squeeze(1)
        ys = y[sl]
        y[sl] = torch.where(ok[sl, None], (ys.to(acc) + d).to(y.dtype), ys)


def _torch_bwd(dy, x, weight, A, Bt, ranks, scalings, ids, rank_bound, need_dx, need_dA,
               need_dBt, *, gather=None):
    """Backward of the torch backend; ``gather`` (default: all but prefill-shaped CPU batches,
    see :func:`_cpu_segmented`) picks the gather-BMM over per-adapter GEMMs."""
    gather = not _cpu_segmented(x, ranks) if gather is None else gather
    T, K = x.shape
    N = dy.shape[1]
    maxa, maxr = A.shape[:2]
    rb = max(1, min(rank_bound, maxr))
    dx = dA = dBt = None
    if need_dx:
        dx = (dy @ weight).to(x.dtype) if weight is not None else torch.zeros_like(
            x, memory_format=torch.contiguous_format)
        if gather:
            _gather_add_(dx, dy, Bt, A, ranks, scalings, ids, rank_bound)
        else:
            _cpu_add_(dx, dy, Bt, A, ranks, scalings, ids)
    if (need_dA or need_dBt) and not gather:
        dA, dBt = _cpu_grads(dy, x, A, Bt, ranks, scalings, ids, need_dA, need_dBt)
    elif need_dA or need_dBt:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        a, ok, sc = _gather(ids, ranks, scalings, maxa)
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
        rmask = (torch.arange(rb, device=x.device)[None, :] < ranks[:, None])[:, :, None]
        if need_dA:
            dA = torch.zeros_like(A)
            dA[:, :rb] = torch.where(rmask, gA, 0.0).to(A.dtype)
        if need_dBt:
            dBt = torch.zeros_like(Bt)
            dBt[:, :rb] = torch.where(rmask, gB, 0.0).to(Bt.dtype)
    return dx, dA, dBt


# ----------------------------------------------------------------------------- dispatch
def _cuda_add_(y, x, A, Bt, ranks, scalings, ids, rank_bound, path):
    from . import multi_lora_cuda

    # ids were validated by the caller (AdapterPool.check_ids): no second check / sync
    mode = "prefill" if path == "prefill_fused" else path  # the CUDA backend has no fused GEMM
    multi_lora_cuda.add_lora_(y, x, A, Bt, ranks, scalings, ids, mode=mode, check_ids=False)


def _add_impl(backend: str):
    if backend == "torch":
        return _torch_add_
    if backend == "triton":
        return _triton_add_
    if backend == "cuda":
        return _cuda_add_
    raise ValueError(f"unknown backend {backend!r}")


def _bwd_impl(backend: str):
    if backend == "triton" or (backend == "cuda" and triton_available()):
        return _triton_bwd
    return _torch_bwd


def _fwd(x, weight, bias, A, Bt, ranks, scalings, ids, rank_bound, backend, path):
    if (path == "prefill_fused" and backend == "triton" and weight is not None
            and rank_bound > 0 and x.shape[0] > 0):
        return _triton_prefill_fused(x, weight, bias, A, Bt, ranks, scalings, ids, rank_bound)
    if weight is not None:
        y = F.linear(x, weight, bias)
    else:
        y = torch.zeros((x.shape[0], Bt.shape[2]), dtype=x.dtype, device=x.device)
    if rank_bound > 0 and x.shape[0] > 0:
        _add_impl(backend)(y, x, A, Bt, ranks, scalings, ids, rank_bound, path)
    return y


def _bwd(dy, x, weight, A, Bt, ranks, scalings, ids, rank_bound, backend, need_dx, need_dA,
         need_dBt):
    if rank_bound <= 0 or x.shape[0] == 0:
        dx = ((dy @ weight).to(x.dtype) if weight is not None else torch.zeros_like(x)) \
            if need_dx else None
        return (dx, torch.zeros_like(A) if need_dA else None,
                torch.zeros_like(Bt) if need_dBt else None)
    return _bwd_impl(backend)(dy, x, weight, A, Bt, ranks, scalings, ids, rank_bound, need_dx,
                              need_dA, need_dBt)


# ----------------------------------------------------------------------------- registered ops
@torch.library.custom_op("lora_kernels::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   lora_A: torch.Tensor, lora_Bt: torch.Tensor, ranks: torch.Tensor,
                   scalings: torch.Tensor, adapter_ids: torch.Tensor, rank_bound: int,
                   backend: str, path: str) -> torch.Tensor:
    """x (T, in) -> y (T, out) = base (or 0 when weight is None) + per-token adapter delta."""
    return _fwd(x, weight, bias, lora_A, lora_Bt, ranks, scalings, adapter_ids, rank_bound,
                backend, path)


@multi_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_Bt, ranks, scalings, adapter_ids, rank_bound, backend, path):
    return x.new_empty((x.shape[0], lora_Bt.shape[2]))


@torch.library.custom_op("lora_kernels::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                   lora_A: torch.Tensor, lora_Bt: torch.Tensor, ranks: torch.Tensor,
                   scalings: torch.Tensor, adapter_ids: torch.Tensor, rank_bound: int,
                   backend: str, need_dx: bool, need_dA: bool,
                   need_dBt: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (T, in), dA (MAXA, MAXR, in), dBt (MAXA, MAXR, out)); unneeded ones empty."""
    dx, dA, dBt = _bwd(dy, x, weight, lora_A, lora_Bt, ranks, scalings, adapter_ids, rank_bound,
                       backend, need_dx, need_dA, need_dBt)
    return (dx if dx is not None else x.new_empty(0), dA if dA is not None else x.new_empty(0),
            dBt if dBt is not None else x.new_empty(0))


@multi_lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_Bt, ranks, scalings, adapter_ids, rank_bound, backend,
      need_dx, need_dA, need_dBt):
    return (x.new_empty(x.shape if need_dx else (0,)),
            lora_A.new_empty(lora_A.shape if need_dA else (0,)),
            lora_Bt.new_empty(lora_Bt.shape if need_dBt else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, Bt, ranks, scalings, ids, rank_bound, backend, path = inputs
    ctx.save_for_backward(x, weight, A, Bt, ranks, scalings, ids)
    ctx.rank_bound, ctx.backend = rank_bound, backend
    ctx.has_bias = bias is not None


def _grads(ctx, dy, bwd):
    x, weight, A, Bt, ranks, scalings, ids = ctx.saved_tensors
    nx, nw, nb, na, nB = ctx.needs_input_grad[:5]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx, dA, dBt = (None, None, None)
    if nx or na or nB:
        dx, dA, dBt = bwd(dy, x, weight, A, Bt, ranks, scalings, ids, ctx.rank_bound,
                          ctx.backend, nx, na, nB)
    dW = dy.t() @ x if nw else None
    db = dy.sum(0) if (nb and ctx.has_bias) else None
    return (dx if nx else None, dW, db, dA if na else None, dBt if nB else None,
            None, None, None, None, None, None)


def _backward(ctx, dy):
    return _grads(ctx, dy, torch.ops.lora_kernels.multi_lora_bwd)


multi_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


class MultiLoRAFunction(torch.autograd.Function):
    """Eager fast path of ``lora_kernels::multi_lora_fwd`` (same implementations and backward,
    without the custom-op dispatcher; see ``ops.lora.LoRAFunction``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, Bt, ranks, scalings, ids, rank_bound, backend, path):
        y = _fwd(x, weight, bias, A, Bt, ranks, scalings, ids, rank_bound, backend, path)
        _setup_context(ctx, (x, weight, bias, A, Bt, ranks, scalings, ids, rank_bound, backend,
                             path), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _bwd)


@torch.library.custom_op("lora_kernels::multi_lora_add_", mutates_args=("y",))
def multi_lora_add_op(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor,
                      lora_Bt: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor,
                      adapter_ids: torch.Tensor, rank_bound: int, backend: str,
                      path: str) -> None:
    """In place: ``y[t] += s_i x[t] A_i^T B_i^T`` (inference; no autograd)."""
    if rank_bound > 0 and x.shape[0] > 0:
        _add_impl(backend)(y, x, lora_A, lora_Bt, ranks, scalings, adapter_ids, rank_bound, path)


@multi_lora_add_op.register_fake
def _(y, x, lora_A, lora_Bt, ranks, scalings, adapter_ids, rank_bound, backend, path):
    return None


def apply(x2, weight, bias, pool, ids, backend: str, path: str) -> torch.Tensor:
    """Run the op on already-validated arguments (x2 (T, in), ids on the pool's device, a resolved
    backend and path): the registered op under torch.compile, the eager Function otherwise."""
    args = (x2, weight, bias, pool.lora_A, pool.lora_Bt, pool.ranks, pool.scalings, ids,
            pool.max_active_rank, backend, path)
    if torch.compiler.is_compiling():
        return torch.ops.lora_kernels.multi_lora_fwd(*args)
    if _needs_grad(x2, weight, bias, pool.lora_A, pool.lora_Bt):
        return MultiLoRAFunction.apply(*args)
    return _fwd(*args)  # inference (serving): no autograd node


# ----------------------------------------------------------------------------- public API
def _check_common(x, pool, adapter_ids, backend, path):
    from ..serving import AdapterPool

    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be a lora_kernels.AdapterPool, got {type(pool).__name__}")
    V.float_tensor("x", x, min_ndim=1)
    in_f = pool.in_features
    if x.shape[-1] != in_f:
        raise ValueError(f"x must have last dim in_features={in_f} (the pool's), got shape "
                         f"{tuple(x.shape)}")
    if x.dtype != pool.dtype:
        raise TypeError(f"x must have the pool's dtype {pool.dtype}, got {x.dtype}")
    if x.device != pool.device:
        raise ValueError(f"x must be on the pool's device {pool.device}, got {x.device}")
    T = x.numel() // in_f if in_f > 0 else 0
    ids = pool.check_ids(adapter_ids, T)
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be None or one of {PATHS}, got {path!r}")
    be = resolve_backend(backend, x.device, "multi_lora_linear")
    if be != "torch" and x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16 for backend={be!r}, got {x.dtype}")
    if path is None:
        path = choose_path(T, len(pool))
    return x.reshape(T, in_f), ids, be, path


def multi_lora_linear(x, weight, bias, pool, adapter_ids, *, backend=None, path=None):
    """Many adapters in one batch: ``y[t] = x[t] W^T + b + s_i x[t] A_i^T B_i^T``,
    ``i = adapter_ids[t]``.

    Args:
        x: ``(..., in)`` in the pool's dtype and device; any strides. ``T`` = number of rows.
        weight: ``(out, in)`` base weight (or a ``lora_kernels.quant`` quantized one), or
            ``None`` to return the adapter delta alone
            (``y[t] = s_i x[t] A_i^T B_i^T``, autograd-aware; ``bias`` must then be None).
        bias: ``(out,)`` or ``None``.
        pool: the :class:`lora_kernels.AdapterPool` holding the adapters.
        adapter_ids: ``(T,)`` int32/int64 (or a list of ints), any order; ``-1`` = base only.
            Checked before any kernel runs: an id outside ``[-1, max_adapters)`` or naming a
            freed slot raises ``ValueError``. CPU ids are checked against the pool's host-side
            mirror of occupied slots (no device sync) and then copied to the device; ids already
            on the GPU cost one fused device check (one sync), skipped while a CUDA graph is being
            captured (the kernels then treat an invalid id as -1: still no out-of-bounds read).
        backend: ``None | "torch" | "triton" | "cuda"``.
        path: ``None`` (automatic, :func:`choose_path`) | ``"decode"`` | ``"prefill"`` |
            ``"prefill_fused"`` (the Triton and CUDA kernels; see the module doc; the torch path
            ignores it).
    Returns:
        ``(..., out)`` in x's dtype. Gradients flow to ``x``, ``weight``/``bias`` when they
        require grad, and to ``pool.lora_A`` / ``pool.lora_Bt`` (dense, per slot) when the pool was
        made trainable with ``pool.requires_grad_()``.
    """
    if weight is not None and not isinstance(weight, torch.Tensor):
        # a quantized base (lora_kernels.quant): its GEMM dequantises in the kernel (ops.qlora),
        # the adapters' delta is this op's delta-only form
        from .qlora import quant_linear

        delta = multi_lora_linear(x, None, None, pool, adapter_ids, backend=backend, path=path)
        be = resolve_backend(backend, x.device, "multi_lora_linear")
        return quant_linear(x, weight, bias, backend=be) + delta
    x2, ids, be, path = _check_common(x, pool, adapter_ids, backend, path)
    out_f = pool.out_features
    if weight is not None:
        V.linear_args(x, weight, bias)
        V.shape("weight", weight, (out_f, pool.in_features),
                "(out_features, in_features) of the pool")
    elif bias is not None:
        raise ValueError("bias must be None when weight is None (the delta-only form)")
    y = apply(x2, weight, bias, pool, ids, be, path)
    return y.reshape(*x.shape[:-1], out_f)


def multi_lora_add_(y, x, pool, adapter_ids, *, backend=None, path=None):
    """In place ``y[t] += s_i x[t] A_i^T B_i^T`` for users who bring their own base GEMM.

    ``y (..., out)`` (same leading dims as ``x``, the pool's dtype and device, any strides) is
    modified and returned. Inference only: raises ``ValueError`` when autograd would need to see
    the update (grad mode on and ``x``, ``y`` or the pool requiring grad); use
    ``multi_lora_linear(x, None, None, pool, ids)`` (the delta, autograd-aware) for training.
    Ids are validated as in :func:`multi_lora_linear`.
    """
    x2, ids, be, path = _check_common(x, pool, adapter_ids, backend, path)
    V.float_tensor("y", y, min_ndim=1)
    expect = (*x.shape[:-1], pool.out_features)
    V.shape("y", y, expect, "x's leading dims, out_features")
    if y.dtype != pool.dtype:
        raise TypeError(f"y must have the pool's dtype {pool.dtype}, got {y.dtype}")
    if y.device != pool.device:
        raise ValueError(f"y must be on the pool's device {pool.device}, got {y.device}")
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad
                                    or pool.lora_A.requires_grad or pool.lora_Bt.requires_grad):
        raise ValueError("multi_lora_add_ is inference-only (y is updated in place without "
                         "autograd): use multi_lora_linear(x, None, None, pool, adapter_ids) "
                         "for the differentiable delta, or run under torch.no_grad()")
    if y.dim() == 2:
        y2 = y
    else:
        try:
            y2 = y.view(x2.shape[0], pool.out_features)
        except RuntimeError as e:
            raise ValueError(f"y must be viewable as (T, out_features) to be updated in place "
                             f"(got strides {y.stride()}): {e}") from None
    if x2.numel() and x2.untyped_storage().data_ptr() == y2.untyped_storage().data_ptr():
        # y in x's memory (in place with in == out): the kernels split a token's output columns
        # over programs that each re-read the whole row x[t], so read from a copy
        x2 = x2.clone(memory_format=torch.contiguous_format)
    torch.ops.lora_kernels.multi_lora_add_(y2, x2, pool.lora_A, pool.lora_Bt, pool.ranks,
                                           pool.scalings, ids, pool.max_active_rank, be, path)
    return y
