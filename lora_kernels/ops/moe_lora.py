"""The MoE-LoRA op: LoRA on a mixture-of-experts layer's expert GEMM.

``y[m] = x[m] W_e^T + b_e + s * x[m] A_e^T B_e^T``  with ``e = expert_ids[m]`` (row m skipped,
``y[m] = 0``, when ``e == -1``).

Shapes: x (M, in); weight W (E, out, in) (transformers' ``(E, in, out)`` layout is passed as the
view ``weight.transpose(1, 2)``: read through its strides, never copied); bias b (E, out) or None;
lora_A A (E, r, in); lora_B B (E, out, r); expert_ids (M,) int32/int64 in ``[-1, E)``.

The plan (:class:`ExpertPlan`, built once per routing by :func:`expert_plan`, shareable by every
expert GEMM that sees the same rows, e.g. gate_up and down of one MoE block):

    key[m]  = expert_ids[m]  (E for a skipped row)
    order   = stable argsort(key)        (M,)   row indices, expert-major, skipped rows last
    offsets = exclusive cumsum of counts (E+1,) expert e: order[offsets[e]:offsets[e+1]];
                                                offsets[E] = n, the number of routed rows

Forward on the sorted rows (xs = x[order[:n]], one gather), per expert e (segment rows X_e):

    S_e = X_e A_e^T                     (T_e, r)   saved fp32 (sorted order, (M, r), rows >= n zero)
    Y_e = X_e W_e^T + b_e + s S_e B_e^T (T_e, out)   -> y[order[:n]] (one scatter); skipped rows 0

Backward (dY_e = dy[order[a:b]]):

    G_e  = s dY_e B_e                   (T_e, r)
    dX_e = dY_e W_e + G_e A_e           (T_e, in)  -> dx[order[:n]]; skipped rows 0
    dA_e = G_e^T X_e                    (r, in)
    dB_e = s dY_e^T S_e                 (out, r)
    dW_e = dY_e^T X_e, db_e = sum dY_e  (only when weight / bias require grad)
    experts without rows: zero gradients.

Factor sets apart from the experts (``lora_ids``, torch backend): ``lora_A (L, r, in)``,
``lora_B (L, out, r)`` and a second plan over ``lora_ids`` (rows with expert id -1 forced to -1);
the base runs per expert segment as above without the low-rank term, which then runs per factor
segment l (``y[rows_l] += s (X_l A_l^T) B_l^T``, scatter-add; backward ``dX += G_l A_l`` likewise,
``dA_l``, ``dB_l`` per segment). S is then in the factor plan's sorted order.

Backends:
* ``"torch"``: the float64-testable reference and the CPU path: one sort (the plan), one gather of
  the routed rows, per-expert GEMMs on contiguous segments (``torch.mm(..., out=)`` into one
  sorted buffer, the low-rank term by ``addmm_`` on the same rows), one scatter back. Quantized
  experts (:class:`~lora_kernels.quant.QuantizedExperts`) run here: each routed expert is
  dequantised in x's dtype (forward, and again for dx in the backward).
* ``"triton"`` (``kernels.moe``): a tile table cut from the plan on device; ``S = x A_e^T``
  (fp32) by a shrink kernel, then the grouped base GEMM reading ``x`` at token rows through the
  sort order with ``+ s S B_e^T + b_e`` in its epilogue, writing y at token rows (no gathered
  copies). Backward: G = dy B_e (shrink), dx by the same grouped GEMM on W^T / A^T views,
  dA / dB by a per-expert segmented reduction (deterministic). dW / db (a trained base) use the
  torch path. Interpreter-tested and compiled for sm_80 / sm_90; not run on a GPU, so
  ``backend=None`` never picks it (``_backend.VERIFIED_ON_GPU``).
The expert ids are bounds-checked when the plan is built (``lora_kernels::moe_plan``), before any
GEMM reads a weight.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _validate as V
from .._backend import resolve_backend
from .._cpu_gemm import compact_rows_for_cpu_gemm
from ..quant.experts import QuantizedExperts
from . import _triton as TR
from ._register import define_op, pick

OP_NAME = "moe_lora_linear"


# ----------------------------------------------------------------------------- the plan
class ExpertPlan(NamedTuple):
    """Rows grouped by expert, built once per routing by :func:`expert_plan` (ids checked there).

    ``expert_ids`` (M,) the ids it was built from; ``order`` (M,) int64 row indices sorted by
    expert (stable; skipped ``-1`` rows last); ``offsets`` (E+1,) int64: expert e's rows are
    ``order[offsets[e]:offsets[e+1]]``, ``offsets[E]`` is the number of routed rows;
    ``num_experts`` E. Pass it as ``expert_ids`` to :func:`moe_lora_linear` (and to every other
    expert GEMM over the same rows) to sort once.
    """

    expert_ids: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    num_experts: int

    @property
    def num_rows(self) -> int:
        return self.expert_ids.shape[0]


def check_expert_ids(name: str, ids: torch.Tensor, num_experts: int) -> None:
    """Raise ``ValueError`` naming the first id outside ``[-1, num_experts)`` (one host read)."""
    if ids.numel() == 0:
        return
    bad = (ids < -1) | (ids >= num_experts)
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{t}] = {int(ids[t])} is out of range: expert ids must be -1 "
                         f"(row skipped) or an expert in [0, {num_experts})")


def _plan_op(expert_ids: torch.Tensor, num_experts: int,
             name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order (M,), offsets (E+1,))`` int64 of ``expert_ids`` (:class:`ExpertPlan`), checked
    first (a bad id raises ValueError naming ``name``; inside the op, so a compiled caller keeps
    one graph)."""
    check_expert_ids(name, expert_ids, num_experts)
    key = torch.where(expert_ids < 0, num_experts, expert_ids).long()
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=expert_ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


def _plan_fake(expert_ids, num_experts, name):
    M = expert_ids.shape[0]
    return (expert_ids.new_empty(M, dtype=torch.int64),
            expert_ids.new_empty(num_experts + 1, dtype=torch.int64))


PLAN_OP = define_op("lora_kernels::moe_plan", _plan_op, fake=_plan_fake)


def expert_plan(expert_ids, num_experts: int, *, name: str = "expert_ids") -> ExpertPlan:
    """Check ``expert_ids`` ((M,) int32/int64 tensor or list of ints; each ``-1`` or in
    ``[0, num_experts)``) and group its rows by expert: an :class:`ExpertPlan`.

    Raises ``TypeError``/``ValueError`` naming the argument (``name``; the first bad id and its
    row)."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if isinstance(expert_ids, (list, tuple)):
        expert_ids = V.adapter_ids("expert_ids", expert_ids, len(expert_ids))
    if not isinstance(expert_ids, torch.Tensor):
        raise TypeError(f"expert_ids must be an int32/int64 tensor, got "
                        f"{type(expert_ids).__name__}")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_ids must have dtype int32 or int64, got {expert_ids.dtype}")
    if expert_ids.dim() != 1:
        raise ValueError(f"expert_ids must be 1-D (M,), got shape {tuple(expert_ids.shape)}")
    order, offsets = PLAN_OP(expert_ids, num_experts, name)
    return ExpertPlan(expert_ids, order, offsets, num_experts)


# ----------------------------------------------------------------------------- torch path
def _expert_w(weight, e: int, dtype) -> torch.Tensor:
    """Expert e's ``(out, in)`` weight: a view of a dense ``(E, out, in)`` tensor, or a
    :class:`~lora_kernels.quant.QuantizedExperts` expert dequantised in ``dtype``."""
    return weight[e] if isinstance(weight, torch.Tensor) else weight.dequantize_expert(e, dtype)


def _segments(offsets: torch.Tensor) -> list[int]:
    return offsets.tolist()  # E+1 ints: one host read per call


def _scatter_rows(src: torch.Tensor, order: torch.Tensor, n: int, num_rows: int) -> torch.Tensor:
    """``out (num_rows, .)`` with ``out[order[p]] = src[p]`` for the n routed positions and the
    other rows ``order[n:]`` zero (only those are filled: no pass over the whole output)."""
    out = TR.empty((num_rows, src.shape[1]), src.dtype, src.device).index_copy_(0, order[:n], src)
    if n < num_rows:
        out.index_fill_(0, order[n:], 0)
    return out


class Routing(NamedTuple):
    """The row grouping an op call runs on: the expert plan's ``order`` / ``offsets`` and, when
    the low-rank factors are indexed by their own ids (``lora_ids``), that plan's
    ``lora_order`` / ``lora_offsets`` (else None: factors indexed by expert)."""

    order: torch.Tensor
    offsets: torch.Tensor
    lora_order: torch.Tensor | None = None
    lora_offsets: torch.Tensor | None = None


def _torch_fwd(x, weight, bias, A, B, rt: Routing, scaling):
    """``(y, S)``; ``weight``: dense (E, out, in) or QuantizedExperts (each routed expert
    dequantised once). S (M, r) fp32 in the factors' sorted row order (rows not in a segment 0)."""
    M, E, out_f, r = x.shape[0], weight.shape[0], weight.shape[1], A.shape[1]
    fused = rt.lora_order is None          # factors indexed by expert: one loop
    off = _segments(rt.offsets)
    n = off[E]
    rows = rt.order[:n]
    xs = x.index_select(0, rows)                                       # (n, in) expert-sorted
    ys = TR.empty((n, out_f), x.dtype, x.device)
    # fp32 (float64 for float64 x: the reference stays exact); rows >= n: 0 below
    S = TR.empty((M, r), torch.promote_types(x.dtype, torch.float32), x.device)
    for e in range(E):
        a, b = off[e], off[e + 1]
        if a == b:
            continue
        xe, ye = xs[a:b], ys[a:b]
        we = _expert_w(weight, e, x.dtype)
        if bias is not None:
            torch.addmm(bias[e], xe, we.t(), out=ye)
        else:
            torch.mm(xe, we.t(), out=ye)
        if fused:
            se = xe @ A[e].t()                                         # (T_e, r)
            ye.addmm_(se, B[e].t(), alpha=scaling)
            S[a:b] = se
    y = _scatter_rows(ys, rt.order, n, M)
    if fused:
        S[n:].zero_()
    else:                                  # + s (x A_l^T) B_l^T per factor segment l
        loff = _segments(rt.lora_offsets)
        lrows = rt.lora_order[:loff[-1]]
        xl = x.index_select(0, lrows)
        yl = torch.zeros((xl.shape[0], out_f), dtype=x.dtype, device=x.device)
        for lo in range(len(loff) - 1):
            a, b = loff[lo], loff[lo + 1]
            if a < b:
                se = xl[a:b] @ A[lo].t()
                yl[a:b].addmm_(se, B[lo].t(), alpha=scaling)
                S[a:b] = se
        S[loff[-1]:].zero_()
        y.index_add_(0, lrows, yl)
    return y, S


class Saved(NamedTuple):
    """What the backward reads: ``x`` (M, in), ``weight`` (E, out, in), ``A`` (L, r, in),
    ``B`` (L, out, r) (L = E unless ``lora_ids``), ``S`` (M, r) fp32 (the factors' sorted row
    order), the :class:`Routing`, ``scaling``."""

    x: torch.Tensor
    weight: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    S: torch.Tensor
    rt: Routing
    scaling: float


class Needs(NamedTuple):
    """Which gradients the backward computes."""

    dx: bool
    dW: bool
    db: bool
    dA: bool
    dB: bool


def _lowrank_bwd(dys, xs, S, A, B, segs, scaling, *, need: Needs, out: dict) -> None:
    """Per factor segment l (rows ``segs[l]:segs[l+1]`` of the sorted ``dys``, ``xs``, ``S``):
    ``G = s dY_l B_l``, ``dX_l += G A_l`` (into ``out["dxs"]``), ``dA_l = G^T X_l``,
    ``dB_l = s dY_l^T S_l``."""
    for lo in range(len(segs) - 1):
        a, b = segs[lo], segs[lo + 1]
        if a == b:                          # a factor set without rows: zero gradients
            for k in ("dA", "dB"):
                if out[k] is not None:
                    out[k][lo].zero_()
            continue
        dye = dys[a:b]
        if need.dx or need.dA:
            gs = (dye @ B[lo]).mul_(scaling)                            # s G_l (T_l, r)
        if need.dx:
            out["dxs"][a:b].addmm_(gs, A[lo])
        if need.dA:
            torch.mm(gs.t(), xs[a:b], out=out["dA"][lo])
        if need.dB:
            torch.mm(dye.t(), (S[a:b] * scaling).to(dye.dtype), out=out["dB"][lo])


def _torch_bwd(dy, saved: Saved, need: Needs):
    x, weight, A, B, S, rt, scaling = saved
    E = weight.shape[0]
    fused = rt.lora_order is None
    off = _segments(rt.offsets)
    n = off[E]
    rows = rt.order[:n]
    dys = dy.index_select(0, rows)                                     # (n, out)
    xs = x.index_select(0, rows) if (need.dW or (fused and need.dA)) else None
    # every expert / factor set is written in the loops below (zeros where it has no rows)
    z = lambda shape, dt: TR.empty(shape, dt, x.device)  # noqa: E731  (NaN-poisoned in tests)
    out = {"dxs": TR.empty((n, x.shape[1]), x.dtype, x.device) if need.dx else None,
           "dA": z(A.shape, A.dtype) if need.dA else None,
           "dB": z(B.shape, B.dtype) if need.dB else None}
    dW = z(weight.shape, x.dtype) if need.dW else None
    db = z(weight.shape[:2], x.dtype) if need.db else None
    for e in range(E):                    # the base: dX_e = dY_e W_e, dW_e, db_e
        a, b = off[e], off[e + 1]
        if a == b:
            for t in (dW, db):
                if t is not None:
                    t[e].zero_()
            continue
        dye = dys[a:b]
        if need.dx:
            torch.mm(dye, _expert_w(weight, e, dy.dtype), out=out["dxs"][a:b])
        if need.dW:
            torch.mm(dye.t(), xs[a:b], out=dW[e])
        if need.db:
            torch.sum(dye, 0, out=db[e])
    if fused:
        _lowrank_bwd(dys, xs, S, A, B, off, scaling, need=need, out=out)
    dx = None
    if need.dx:
        dx = _scatter_rows(out["dxs"], rt.order, n, x.shape[0])
    if not fused:
        loff = _segments(rt.lora_offsets)
        lrows = rt.lora_order[:loff[-1]]
        lout = {**out, "dxs": (torch.zeros((len(lrows), x.shape[1]), dtype=x.dtype,
                                           device=x.device) if need.dx else None)}
        _lowrank_bwd(dy.index_select(0, lrows), x.index_select(0, lrows) if need.dA else None,
                     S, A, B, loff, scaling, need=need, out=lout)
        if need.dx:
            dx.index_add_(0, lrows, lout["dxs"])
    return dx, dW, db, out["dA"], out["dB"]


# ----------------------------------------------------------------------------- Triton path
def tile_table(offsets: torch.Tensor, num_rows: int, block_m: int):
    """``(TILE_EXPERT int32, TILE_START int64, TILE_END int64)`` of length
    ``G = cdiv(M, block_m) + min(E + 1, M)``: every expert's segment of sorted positions (and the
    skipped rows' segment ``[offsets[E], M)``, expert id E) cut into tiles of ``block_m`` rows;
    unused tiles have expert -1. Built on device from the plan's ``offsets (E+1,)`` (no host
    read); see ``kernels.moe``."""
    E = offsets.shape[0] - 1
    ends = torch.cat([offsets[1:], offsets.new_full((1,), num_rows)])      # (E+1,)
    ntiles = (ends - offsets + block_m - 1) // block_m
    cum = torch.cumsum(ntiles, 0)
    G = TR.cdiv(num_rows, block_m) + min(E + 1, num_rows)
    g = torch.arange(G, device=offsets.device)
    seg = torch.searchsorted(cum, g, right=True)                          # (G,) in [0, E+1]
    valid = seg <= E
    segc = seg.clamp(max=E)
    start = offsets[segc] + (g - (cum[segc] - ntiles[segc])) * block_m
    end = torch.minimum(start + block_m, ends[segc])
    zero = torch.zeros_like(start)
    return (torch.where(valid, segc, -1).to(torch.int32), torch.where(valid, start, zero),
            torch.where(valid, end, zero))


def _tiles(kind: str) -> dict:
    """Kernel tiles: small fixed ones under the interpreter, ``kernels.moe.GPU_TILES`` else."""
    if TR.triton_interpret():
        return {"shrink": dict(BLOCK_M=16, BLOCK_K=32), "gemm": dict(BLOCK_M=16, BLOCK_N=16,
                                                                      BLOCK_K=32),
                "seg_tn": dict(BLOCK_T=16, BLOCK_N=16)}[kind]
    from ..kernels.moe import GPU_TILES

    return GPU_TILES[kind]


def _block_r(R: int) -> int:
    return max(16, TR.next_pow2(R))


class _Rows(NamedTuple):
    """A tile table and the plan it came from (the launchers' row grouping)."""

    order: torch.Tensor
    offsets: torch.Tensor
    table: tuple


def _shrink(x, P, strides_p, rows: _Rows, R: int) -> torch.Tensor:
    """``S[p] = x[order[p]] @ P_e^T`` (M, R) fp32, sorted-position order; rows not routed 0.
    ``P`` any (E, ., .) tensor read through ``strides_p = (expert, r, k)``."""
    from ..kernels.moe import moe_shrink_kernel

    M, K = x.shape
    S = torch.zeros((M, R), dtype=torch.float32, device=x.device)
    texp, ts, te = rows.table
    cfg = _tiles("shrink")
    moe_shrink_kernel[(texp.shape[0],)](
        x, P, S, rows.order, texp, ts, te, K, R, rows.offsets.shape[0] - 1,
        x.stride(0), x.stride(1), *strides_p, S.stride(0), S.stride(1),
        BLOCK_R=_block_r(R), PRECISION=TR.dot_precision(x.dtype),
        UPCAST=TR.upcast(x.dtype, P.dtype), **cfg)
    return S


def _gemm(x, w, strides_w, out_n: int, rows: _Rows, *, S, bm, strides_bm, scale, bias=None):
    """``Y[order[p]] = x[order[p]] @ W_e^T + scale * S[p] @ BM_e^T (+ bias_e)``, skipped rows 0;
    ``w`` read through ``strides_w = (expert, n, k)``, ``bm`` through ``(expert, n, r)``."""
    from ..kernels.moe import moe_gemm_kernel

    M, K = x.shape
    y = TR.empty((M, out_n), x.dtype, x.device)
    texp, ts, te = rows.table
    cfg = _tiles("gemm")
    if bias is not None and bias.stride(1) != 1:
        bias = bias.contiguous()
    R = S.shape[1]
    grid = (texp.shape[0], TR.cdiv(out_n, cfg["BLOCK_N"]))
    moe_gemm_kernel[grid](
        x, w, bias if bias is not None else y, y, S, bm, rows.order, texp, ts, te,
        K, out_n, R, rows.offsets.shape[0] - 1,
        x.stride(0), x.stride(1), *strides_w, bias.stride(0) if bias is not None else 0,
        y.stride(0), y.stride(1), S.stride(0), S.stride(1), *strides_bm, float(scale),
        HAS_BIAS=bias is not None, HAS_LOWRANK=True, BLOCK_R=min(64, _block_r(R)),
        PRECISION=TR.dot_precision(x.dtype), UPCAST=TR.upcast(x.dtype, w.dtype), **cfg)
    return y


def _seg_tn(L, Rm, out, strides_o, rows: _Rows, *, scale):
    """``out[e] (r, n) = scale * sum_{p in segment e} L[p]^T Rm[order[p]]`` through
    ``strides_o = (expert, r, n)``; experts without rows get zeros."""
    from ..kernels.moe import moe_seg_tn_kernel

    E, R, N = out.shape[0], L.shape[1], Rm.shape[1]
    cfg = _tiles("seg_tn")
    moe_seg_tn_kernel[(E, TR.cdiv(N, cfg["BLOCK_N"]))](
        L, Rm, out, rows.order, rows.offsets, N, R,
        L.stride(0), L.stride(1), Rm.stride(0), Rm.stride(1), *strides_o, float(scale),
        BLOCK_R=_block_r(R), PRECISION=TR.dot_precision(Rm.dtype), **cfg)
    return out


def _rows(order, offsets, M: int, kind: str) -> _Rows:
    return _Rows(order, offsets, tile_table(offsets, M, _tiles(kind)["BLOCK_M"]))


def triton_fwd(x, weight, bias, A, B, rt: Routing, scaling):
    if rt.lora_order is not None:
        raise ValueError("backend='triton' indexes the factors by expert; lora_ids runs on "
                         "backend='torch'")
    order, offsets = rt.order, rt.offsets
    M, out_f, R = x.shape[0], weight.shape[1], A.shape[1]
    if M == 0:
        return x.new_empty((0, out_f)), torch.zeros((0, R), dtype=torch.float32,
                                                    device=x.device)
    S = _shrink(x, A, A.stride(), _rows(order, offsets, M, "shrink"), R)       # x A_e^T
    y = _gemm(x, weight, weight.stride(), out_f, _rows(order, offsets, M, "gemm"), S=S, bm=B,
              strides_bm=B.stride(), scale=scaling, bias=bias)
    return y, S


def triton_bwd(dy, saved: Saved, need: Needs):
    x, weight, A, B, S, rt, scaling = saved
    order, offsets = rt.order, rt.offsets
    M = x.shape[0]
    dx = dA = dB = None
    dW, db = None, None
    if need.dW or need.db:    # the base's gradients (rare: a frozen base is the LoRA case)
        _, dW, db, _, _ = _torch_bwd(dy, saved, Needs(False, need.dW, need.db, False, False))
    if M == 0:
        z = lambda t: torch.zeros(t.shape, dtype=t.dtype, device=t.device)  # noqa: E731
        return (x.new_empty(x.shape) if need.dx else None, dW, db,
                z(A) if need.dA else None, z(B) if need.dB else None)
    R = A.shape[1]
    if need.dx or need.dA:      # G = dY B_e (M, r) fp32; B_e^T read as P through its strides
        G = _shrink(dy, B, (B.stride(0), B.stride(2), B.stride(1)),
                    _rows(order, offsets, M, "shrink"), R)
    if need.dx:                 # dX = dY W_e + s G A_e: W^T and A^T as strided views
        dx = _gemm(dy, weight, (weight.stride(0), weight.stride(2), weight.stride(1)),
                   x.shape[1], _rows(order, offsets, M, "gemm"), S=G, bm=A,
                   strides_bm=(A.stride(0), A.stride(2), A.stride(1)), scale=scaling)
    if need.dA:                 # dA_e = s G_e^T X_e
        dA = TR.empty(A.shape, A.dtype, A.device)
        _seg_tn(G, x, dA, dA.stride(), _Rows(order, offsets, ()), scale=scaling)
    if need.dB:                 # dB_e^T = s S_e^T dY_e, stored through dB's transposed strides
        dB = TR.empty(B.shape, B.dtype, B.device)
        _seg_tn(S, dy, dB, (dB.stride(0), dB.stride(2), dB.stride(1)),
                _Rows(order, offsets, ()), scale=scaling)
    return dx, dW, db, dA, dB


BACKENDS = {"torch": (_torch_fwd, _torch_bwd), "triton": (triton_fwd, triton_bwd)}


def _impl(backend: str):
    return pick(BACKENDS, backend, OP_NAME)


# ----------------------------------------------------------------------------- registered ops
def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         lora_A: torch.Tensor, lora_B: torch.Tensor, order: torch.Tensor,
         offsets: torch.Tensor, lora_order: torch.Tensor | None,
         lora_offsets: torch.Tensor | None, scaling: float,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, in) -> (y (M, out), S (M, r) fp32 in the factors' sorted row order)."""
    rt = Routing(order, offsets, lora_order, lora_offsets)
    return _impl(backend)[0](x, weight, bias, lora_A, lora_B, rt, scaling)


def _fwd_fake(x, weight, bias, lora_A, lora_B, order, offsets, lora_order, lora_offsets,
              scaling, backend):
    return (x.new_empty((x.shape[0], weight.shape[1])),
            x.new_empty((x.shape[0], lora_A.shape[1]),
                        dtype=torch.promote_types(x.dtype, torch.float32)))


def _bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
         lora_B: torch.Tensor, s: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
         lora_order: torch.Tensor | None, lora_offsets: torch.Tensor | None,
         scaling: float, backend: str, need_dx: bool, need_dW: bool, need_db: bool,
         need_dA: bool, need_dB: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    """(dx (M, in), dW (E, out, in), db (E, out), dA (L, r, in), dB (L, out, r)); None (the op:
    empty) where not needed."""
    rt = Routing(order, offsets, lora_order, lora_offsets)
    return _impl(backend)[1](dy, Saved(x, weight, lora_A, lora_B, s, rt, scaling),
                             Needs(need_dx, need_dW, need_db, need_dA, need_dB))


def _bwd_fake(dy, x, weight, lora_A, lora_B, s, order, offsets, lora_order, lora_offsets,
              scaling, backend, need_dx, need_dW, need_db, need_dA, need_dB):
    return (x.new_empty(x.shape) if need_dx else None,
            weight.new_empty(weight.shape) if need_dW else None,
            weight.new_empty(weight.shape[:2]) if need_db else None,
            lora_A.new_empty(lora_A.shape) if need_dA else None,
            lora_B.new_empty(lora_B.shape) if need_dB else None)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, order, offsets, lorder, loffsets, scaling, backend = inputs
    ctx.save_for_backward(x, weight, A, B, output[1], order, offsets, lorder, loffsets)
    ctx.scaling, ctx.backend, ctx.has_bias = scaling, backend, bias is not None


def _grads(ctx, bwd, dy, _ds=None):
    x, weight, A, B, s, order, offsets, lorder, loffsets = ctx.saved_tensors
    nx, nw, nb, na, nB = ctx.needs_input_grad[:5]
    nb = nb and ctx.has_bias
    if dy is None:  # y unused by the loss (the eager Function does not materialise zeros)
        return (None,) * 11
    dx, dW, db, dA, dB = bwd(dy, x, weight, A, B, s, order, offsets, lorder, loffsets,
                             ctx.scaling, ctx.backend, nx, nw, nb, na, nB)
    return (dx if nx else None, dW if nw else None, db if nb else None, dA if na else None,
            dB if nB else None) + (None,) * 6


MOE_LORA_OP = define_op("lora_kernels::moe_lora_fwd", _fwd, fake=_fwd_fake,
                        bwd_name="lora_kernels::moe_lora_bwd", bwd=_bwd, bwd_fake=_bwd_fake,
                        setup_context=_setup_context, grads=_grads, nondiff_outputs=(1,),
                        function_name="MoELoRAFunction")


# quantized experts: the stacked buffers travel as a list plus ints (QuantizedExperts.tensors /
# meta / from_tensors), so torch.compile sees one op per direction; the weight gets no gradient.
def _qfwd(x: torch.Tensor, qtensors: list[torch.Tensor], qmeta: list[int], fmt: str,
          bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
          order: torch.Tensor, offsets: torch.Tensor, lora_order: torch.Tensor | None,
          lora_offsets: torch.Tensor | None, scaling: float,
          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, in) -> (y (M, out), S (M, r) fp32); the experts dequantised in x's dtype."""
    qw = QuantizedExperts.from_tensors(fmt, qtensors, qmeta, x.dtype)
    rt = Routing(order, offsets, lora_order, lora_offsets)
    return _impl(backend)[0](x, qw, bias, lora_A, lora_B, rt, scaling)


def _qfwd_fake(x, qtensors, qmeta, fmt, bias, lora_A, lora_B, order, offsets, lora_order,
               lora_offsets, scaling, backend):
    return (x.new_empty((x.shape[0], qmeta[1])),
            x.new_empty((x.shape[0], lora_A.shape[1]),
                        dtype=torch.promote_types(x.dtype, torch.float32)))


def _qbwd(dy: torch.Tensor, x: torch.Tensor, qtensors: list[torch.Tensor], qmeta: list[int],
          fmt: str, lora_A: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor,
          order: torch.Tensor, offsets: torch.Tensor, lora_order: torch.Tensor | None,
          lora_offsets: torch.Tensor | None, scaling: float, backend: str,
          need_dx: bool, need_db: bool, need_dA: bool,
          need_dB: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, in), db (E, out), dA, dB); None (the op: empty) where not needed."""
    qw = QuantizedExperts.from_tensors(fmt, qtensors, qmeta, x.dtype)
    rt = Routing(order, offsets, lora_order, lora_offsets)
    dx, _, db, dA, dB = _impl(backend)[1](
        dy, Saved(x, qw, lora_A, lora_B, s, rt, scaling),
        Needs(need_dx, False, need_db, need_dA, need_dB))
    return dx, db, dA, dB


def _qbwd_fake(dy, x, qtensors, qmeta, fmt, lora_A, lora_B, s, order, offsets, lora_order,
               lora_offsets, scaling, backend, need_dx, need_db, need_dA, need_dB):
    return (x.new_empty(x.shape) if need_dx else None,
            x.new_empty(qmeta[:2]) if need_db else None,
            lora_A.new_empty(lora_A.shape) if need_dA else None,
            lora_B.new_empty(lora_B.shape) if need_dB else None)


def _qsetup_context(ctx, inputs, output):
    x, qts, qmeta, fmt, bias, A, B, order, offsets, lorder, loffsets, scaling, backend = inputs
    ctx.save_for_backward(x, A, B, output[1], order, offsets, lorder, loffsets, *qts)
    ctx.qmeta, ctx.fmt, ctx.scaling, ctx.backend = qmeta, fmt, scaling, backend
    ctx.has_bias = bias is not None


def _qgrads(ctx, bwd, dy, _ds=None):
    x, A, B, s, order, offsets, lorder, loffsets, *qts = ctx.saved_tensors
    nx, _, _, _, nb, na, nB = ctx.needs_input_grad[:7]
    nb = nb and ctx.has_bias
    # the registered op's autograd wants the list input's structure back (one None per tensor)
    dq = None if bwd is _qbwd else [None] * len(qts)
    if dy is None:
        return (None, dq) + (None,) * 11
    dx, db, dA, dB = bwd(dy, x, qts, ctx.qmeta, ctx.fmt, A, B, s, order, offsets, lorder,
                         loffsets, ctx.scaling, ctx.backend, nx, nb, na, nB)
    return (dx if nx else None, dq, None, None, db if nb else None, dA if na else None,
            dB if nB else None) + (None,) * 6


MOE_QLORA_OP = define_op("lora_kernels::moe_qlora_fwd", _qfwd, fake=_qfwd_fake,
                         bwd_name="lora_kernels::moe_qlora_bwd", bwd=_qbwd, bwd_fake=_qbwd_fake,
                         setup_context=_qsetup_context, grads=_qgrads, nondiff_outputs=(1,),
                         function_name="MoEQLoRAFunction")


# ----------------------------------------------------------------------------- public API
def _check_args(x, weight, bias, lora_A, lora_B, per_expert: bool = True) -> None:
    V.float_tensor("x", x, ndim=2)
    if isinstance(weight, QuantizedExperts):
        if weight.device != x.device:
            raise ValueError(f"weight (quantized experts) must be on {x.device} (like x), got "
                             f"{weight.device}")
    else:
        V.float_tensor("weight", weight, ndim=3)
    E, out_f, in_f = weight.shape
    if E < 1:
        raise ValueError(f"weight must hold at least one expert (E, out, in), got "
                         f"{tuple(weight.shape)}")
    if x.shape[1] != in_f:
        raise ValueError(f"x must have last dim in_features={in_f} (weight is (E, out, in) = "
                         f"{tuple(weight.shape)}; pass an (E, in, out) weight as "
                         f"weight.transpose(1, 2)), got x of shape {tuple(x.shape)}")
    V.float_tensor("lora_A", lora_A, ndim=3)
    V.float_tensor("lora_B", lora_B, ndim=3)
    r = lora_A.shape[1]
    if r < 1:
        raise ValueError(f"lora_A must have rank >= 1 (E, r, in), got {tuple(lora_A.shape)}")
    L = E if per_expert else lora_A.shape[0]
    what = "E" if per_expert else "L"
    V.shape("lora_A", lora_A, (L, r, in_f), f"({what}, r, in_features)")
    V.shape("lora_B", lora_B, (L, out_f, r), f"({what}, out_features, r) with r={r} from lora_A")
    if bias is not None:
        V.float_tensor("bias", bias, ndim=2)
        V.shape("bias", bias, (E, out_f), "(E, out_features)")
    w = weight if isinstance(weight, torch.Tensor) else None
    V.same_dtype("x", x, weight=w, bias=bias, lora_A=lora_A, lora_B=lora_B)
    V.same_device("x", x, weight=w, bias=bias, lora_A=lora_A, lora_B=lora_B)


def _lora_plan(lora_ids, plan: ExpertPlan, num_factors: int) -> ExpertPlan:
    """The factors' plan of ``lora_ids`` (rows whose expert id is -1 get no factor term)."""
    if isinstance(lora_ids, ExpertPlan):
        lp = lora_ids
        if lp.num_experts != num_factors:
            raise ValueError(f"lora_ids is an ExpertPlan over {lp.num_experts} factor sets, but "
                             f"lora_A has L={num_factors}")
        if lp.num_rows != plan.num_rows or (not torch.compiler.is_compiling() and bool(
                ((plan.expert_ids < 0) & (lp.expert_ids >= 0)).any())):
            raise ValueError("lora_ids (an ExpertPlan) must have one id per row and -1 on every "
                             "row whose expert id is -1")
        return lp
    if isinstance(lora_ids, (list, tuple)):
        lora_ids = V.adapter_ids("lora_ids", lora_ids, len(lora_ids))
    if not isinstance(lora_ids, torch.Tensor) or lora_ids.dtype not in (torch.int32,
                                                                          torch.int64):
        raise TypeError(f"lora_ids must be an int32/int64 tensor, an ExpertPlan or None, got "
                        f"{getattr(lora_ids, 'dtype', type(lora_ids).__name__)}")
    if tuple(lora_ids.shape) != (plan.num_rows,):
        raise ValueError(f"lora_ids must have shape ({plan.num_rows},) (one id per row of x), "
                         f"got {tuple(lora_ids.shape)}")
    eff = torch.where(plan.expert_ids.to(lora_ids.device) < 0, -1, lora_ids)
    if not torch.compiler.is_compiling():   # name the row of the caller's ids (the plan op
        check_expert_ids("lora_ids", lora_ids, num_factors)   # checks eff under compile)
    return expert_plan(eff, num_factors, name="lora_ids")


def moe_lora_linear(x, weight, bias, lora_A, lora_B, expert_ids, scaling=1.0, *, lora_ids=None,
                    backend=None):
    """MoE-LoRA expert GEMM: ``y[m] = x[m] W_e^T + b_e + scaling * x[m] A_e^T B_e^T``,
    ``e = expert_ids[m]``.

    Args:
        x: ``(M, in)`` rows (one per routed token-expert pair); any strides.
        weight: ``(E, out, in)`` expert weights; transformers' ``(E, in, out)`` parameters are
            passed as the view ``weight.transpose(1, 2)`` (never copied). Frozen unless it
            requires grad. Or a frozen :class:`lora_kernels.quant.QuantizedExperts` (NF4, int8,
            FP8 per channel or per 128x128 block; each routed expert dequantised in x's dtype).
        bias: ``(E, out)`` or None.
        lora_A: ``(E, r, in)``; lora_B: ``(E, out, r)`` (per-expert PEFT layout).
        expert_ids: ``(M,)`` int32/int64, each ``-1`` (row skipped: output row 0, no gradient)
            or an expert in ``[0, E)``; or an :class:`ExpertPlan` from
            ``expert_plan(expert_ids, E)``, to sort the rows once for several expert GEMMs.
        scaling: float multiplier of the low-rank branch (PEFT: ``alpha / r``).
        lora_ids: None (the factors are per expert: ``lora_A[expert_ids[m]]``), or ``(M,)``
            int ids (or an ExpertPlan over L) choosing row m's factor set among
            ``lora_A (L, r, in)``, ``lora_B (L, out, r)``; ``-1``: no low-rank term (base
            only). Serving many adapters on one MoE layer: ``L = adapters * E`` with
            ``lora_ids = adapter * E + expert`` (-1 for base-only rows); a per-adapter scaling
            is folded into its ``lora_B`` rows (``scaling=1``). Rows with expert id ``-1`` stay
            0. Runs on ``backend="torch"``.
        backend: ``None | "torch" | "triton"`` (see ``lora_kernels._backend``; ``None`` picks
            ``"torch"`` until the Triton kernels are verified on a GPU).
    Returns:
        ``(M, out)`` in x's dtype; gradients flow to x, lora_A, lora_B, and weight / bias when
        they require grad (experts that receive no row get zero gradients).
    Raises:
        TypeError / ValueError naming the argument; expert ids are bounds-checked before any
        expert weight is read.
    """
    _check_args(x, weight, bias, lora_A, lora_B, per_expert=lora_ids is None)
    E = weight.shape[0]
    if isinstance(expert_ids, ExpertPlan):
        plan = expert_ids
        if plan.num_experts != E:
            raise ValueError(f"expert_ids is an ExpertPlan for {plan.num_experts} experts, but "
                             f"weight has E={E}")
    else:
        plan = expert_plan(expert_ids, E)
    if plan.num_rows != x.shape[0]:
        raise ValueError(f"expert_ids must have shape ({x.shape[0]},) (one id per row of x), "
                         f"got ({plan.num_rows},)")
    V.same_device("x", x, expert_ids=plan.order)
    scaling = V.scalar("scaling", scaling)
    be = resolve_backend(backend, x.device, OP_NAME)
    _impl(be)  # raises for a backend without a MoE implementation
    lorder = loff = None
    if lora_ids is not None:
        if be != "torch":
            raise ValueError(f"lora_ids runs on backend='torch' only (the Triton MoE kernels "
                             f"index the factors by expert), got backend={be!r}")
        lp = _lora_plan(lora_ids, plan, lora_A.shape[0])
        lorder, loff = lp.order, lp.offsets
    if be == "triton" and x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16 for backend='triton', got {x.dtype}")
    x2 = compact_rows_for_cpu_gemm(x)
    if isinstance(weight, QuantizedExperts):
        if be != "torch":
            raise ValueError(f"quantized experts run on backend='torch' only (the Triton MoE "
                             f"kernels take dense experts), got backend={be!r}")
        y, _ = MOE_QLORA_OP(x2, weight.tensors(), weight.meta(), weight.fmt, bias, lora_A,
                            lora_B, plan.order, plan.offsets, lorder, loff, scaling, be)
        return y
    y, _ = MOE_LORA_OP(x2, weight, bias, lora_A, lora_B, plan.order, plan.offsets, lorder, loff,
                       scaling, be)
    return y
