"""Embedding LoRA: ``y = W[ids] + scaling * A[:, ids]^T B^T`` -- PEFT's ``lora.Embedding``.

Layers: kernels.embedding (Triton) -> launchers -> ``lora_kernels::lora_embedding_fwd`` /
``lora_embedding_bwd`` (``ops._register.define_op``) -> :func:`lora_embedding` (functional) ->
``layers.LoRAEmbedding``; served: ``lora_kernels::multi_lora_embedding`` (inference only) ->
:func:`multi_lora_embedding` -> ``serving_embedding.ServingEmbedding``.

Shapes (PEFT's layout): ids (T,) int in [0, V), weight (V, dim) (``nn.Embedding.weight``),
lora_A (r, V) (``lora_embedding_A``), lora_B (dim, r) (``lora_embedding_B``). PEFT computes
``F.embedding(ids, A^T) @ B^T * scaling``; the same as a LoRA linear on one-hot rows, so the
LoRA-equivalent factors are ``(lora_A, lora_B, scaling)`` with ``in = V``, ``out = dim``.

Forward:  S = A[:, ids]^T (T, r) gathered;  y = W[ids] + s S B^T.
Backward (dy (T, dim)); ``padding_idx`` tokens give no gradient to A and W (``F.embedding``):
  G  = s dy B                      (T, r) fp32
  dA = index_add over ids of G^T   (r, V): work and writes only at the columns the batch touches
                                   (plus one zero fill of the (r, V) result)
  dB = s dy^T S                    (dim, r)
  dW = index_add over ids of dy    (V, dim), only when the base weight requires grad
No (T, V) one-hot and no (V, dim) delta is ever formed. Bytes (bf16, V=128k, dim=4096, r=16,
T=8192): the base gather reads and writes T*dim*2 = 64 MiB each; the low-rank term adds B
(128 KiB) and T*r*2 = 256 KiB of A columns: < 1% over the plain lookup. Backward: dy read twice
(G and dB: 128 MiB) against the plain lookup's one read (64 MiB, when W trains), and dA is r*V*4 =
8 MiB of fill: the plain embedding gradient with a trained W writes V*dim*2 = 1 GiB of dW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validate as V
from .._backend import resolve_backend
from . import _triton as TR
from ._register import define_op, pick


# ----------------------------------------------------------------------------- torch reference
def _torch_fwd(ids, weight, A, B, scaling):
    s = A.t()[ids]                                                     # (T, r)
    return F.embedding(ids, weight).addmm_(s, B.t(), alpha=scaling)


def _torch_bwd(dy, ids, A, B, scaling, padding_idx, need_dA, need_dB):
    dA = dB = None
    if need_dA:
        g = (dy @ B).mul_(scaling)                                     # s * G (T, r)
        if padding_idx >= 0:
            g = g.masked_fill((ids == padding_idx)[:, None], 0)
        dA = torch.zeros_like(A).index_add_(1, ids, g.t().to(A.dtype))
    if need_dB:
        dB = dy.t() @ (A.t()[ids] * scaling).to(dy.dtype)
    return dA, dB


def _torch_multi(ids, slots, weight, A3, Bt3, scalings):
    """Served: token t adds slot ``slots[t]``'s ``s_k A_k[:, id]^T B_k^T`` (-1: none); one small
    GEMM per distinct slot over its tokens (host loop: the CPU path)."""
    y = F.embedding(ids, weight)
    for k in torch.unique(slots).tolist():
        if k < 0:
            continue
        rows = (slots == k).nonzero().squeeze(1)
        s = A3[k][:, ids[rows]].t()                                    # (n, R)
        y.index_add_(0, rows, (s @ Bt3[k]) * scalings[k].to(y.dtype))
    return y


# ----------------------------------------------------------------------------- Triton launchers
def _blocks(n: int) -> int:
    return max(16, min(64 if TR.triton_interpret() else 128, TR.next_pow2(n)))


def _triton_fwd_any(ids, slots, weight, A, B, scales, scaling, R):
    """Launch ``embedding_lora_fwd_kernel``: A/B are 3-D pool tensors with ``slots`` (B as the
    (K, N, R) view of lora_Bt) or 2-D layer factors (A (R, V), B (N, R)) without."""
    from ..kernels.embedding import embedding_lora_fwd_kernel

    T = ids.shape[0]
    N = weight.shape[1]
    y = TR.empty((T, N), weight.dtype, weight.device)
    if T == 0 or N == 0:
        return y
    pool = slots is not None
    bt = 16 if pool or TR.triton_interpret() else 64
    bn = 64 if pool else _blocks(N)
    br = max(16, min(32, TR.next_pow2(max(R, 1))))
    sa = A.stride() if pool else (0,) + A.stride()
    sb = B.stride() if pool else (0,) + B.stride()
    grid = (TR.cdiv(T, bt), TR.cdiv(N, bn))
    embedding_lora_fwd_kernel[grid](
        ids, slots if pool else ids, weight, A, B, scales if pool else y, y, T, N, R,
        weight.stride(0), weight.stride(1), *sa, *sb, y.stride(0), y.stride(1), float(scaling),
        HAS_SLOTS=pool, BLOCK_T=bt, BLOCK_N=bn, BLOCK_R=br)
    return y


def _triton_fwd(ids, weight, A, B, scaling):
    return _triton_fwd_any(ids, None, weight, A, B, None, scaling, A.shape[0])


def _triton_bwd(dy, ids, A, B, scaling, padding_idx, need_dA, need_dB):
    from ..kernels.embedding import embedding_lora_db_kernel, embedding_lora_dyb_kernel

    T, N = dy.shape
    R = A.shape[0]
    dA = dB = None
    br = max(16, min(32, TR.next_pow2(R)))
    if need_dA:
        g = TR.empty((T, R), torch.float32, dy.device)
        if T:
            bt = 16 if TR.triton_interpret() else 64
            embedding_lora_dyb_kernel[(TR.cdiv(T, bt), TR.cdiv(R, br))](
                dy, B, g, T, N, R, dy.stride(0), dy.stride(1), B.stride(0), B.stride(1),
                g.stride(0), g.stride(1), float(scaling), BLOCK_T=bt, BLOCK_N=_blocks(N),
                BLOCK_R=br)
        if padding_idx >= 0:
            g = g.masked_fill((ids == padding_idx)[:, None], 0)
        dA = torch.zeros(A.shape, dtype=torch.float32, device=A.device).index_add_(
            1, ids, g.t()).to(A.dtype)
    if need_dB:
        bn = _blocks(N)
        bt = 16 if TR.triton_interpret() else 64
        splits = 1 if TR.triton_interpret() else max(1, min(TR.cdiv(T, 1024), 64))
        per = TR.cdiv(TR.cdiv(max(T, 1), splits), bt) * bt
        splits = TR.cdiv(max(T, 1), per)
        part = TR.empty((splits, N, R), torch.float32, dy.device)
        embedding_lora_db_kernel[(TR.cdiv(N, bn), TR.cdiv(R, br), splits)](
            dy, ids, A, part, T, N, R, per, dy.stride(0), dy.stride(1), A.stride(0),
            A.stride(1), part.stride(0), part.stride(1), part.stride(2), float(scaling),
            BLOCK_N=bn, BLOCK_R=br, BLOCK_T=bt)
        dB = (part.sum(0) if splits > 1 else part[0]).to(B.dtype)
    return dA, dB


_IMPL = {"torch": (_torch_fwd, _torch_bwd), "triton": (_triton_fwd, _triton_bwd)}


def _impl(backend: str):
    return pick(_IMPL, backend, "lora_embedding")


# ----------------------------------------------------------------------------- registered ops
def _fwd(ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
         scaling: float, padding_idx: int, backend: str) -> torch.Tensor:
    """ids (T,) -> y (T, dim)."""
    _in_range("ids", ids, 0, weight.shape[0], "the embedding's num_embeddings")
    return _impl(backend)[0](ids, weight, lora_A, lora_B, scaling)


def _fwd_fake(ids, weight, lora_A, lora_B, scaling, padding_idx, backend):
    return weight.new_empty((ids.shape[0], weight.shape[1]))


def _bwd(dy: torch.Tensor, ids: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
         scaling: float, padding_idx: int, backend: str, need_dA: bool,
         need_dB: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dA (r, V), dB (dim, r)); None (the op: empty) where unneeded."""
    return _impl(backend)[1](dy, ids, lora_A, lora_B, scaling, padding_idx, need_dA, need_dB)


def _bwd_fake(dy, ids, lora_A, lora_B, scaling, padding_idx, backend, need_dA, need_dB):
    return (lora_A.new_empty(lora_A.shape) if need_dA else None,
            lora_B.new_empty(lora_B.shape) if need_dB else None)


def _setup_context(ctx, inputs, output):
    ids, weight, A, B, scaling, padding_idx, backend = inputs
    ctx.save_for_backward(ids, A, B)
    ctx.scaling, ctx.padding_idx, ctx.backend = scaling, padding_idx, backend
    ctx.weight_shape = tuple(weight.shape)


def _grads(ctx, bwd, dy):
    """dA, dB from the op's backward; dW (a trained base table) by index_add of dy over ids."""
    ids, A, B = ctx.saved_tensors
    _, nw, na, nb = ctx.needs_input_grad[:4]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dA, dB = bwd(dy, ids, A, B, ctx.scaling, ctx.padding_idx, ctx.backend, na, nb)
    dW = None
    if nw:
        g = dy if ctx.padding_idx < 0 else dy.masked_fill((ids == ctx.padding_idx)[:, None], 0)
        dW = dy.new_zeros(ctx.weight_shape).index_add_(0, ids, g)
    return None, dW, (dA if na else None), (dB if nb else None), None, None, None


LORA_EMBEDDING_OP = define_op(
    "lora_kernels::lora_embedding_fwd", _fwd, fake=_fwd_fake,
    bwd_name="lora_kernels::lora_embedding_bwd", bwd=_bwd, bwd_fake=_bwd_fake,
    setup_context=_setup_context, grads=_grads, function_name="LoRAEmbeddingFunction")


def _multi_fwd(ids: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
               lora_Bt: torch.Tensor, scalings: torch.Tensor, rank_bound: int,
               backend: str) -> torch.Tensor:
    """Served lookup: ids, slots (T,) -> y (T, dim)."""
    _in_range("ids", ids, 0, weight.shape[0], "the embedding's num_embeddings")
    _in_range("slot_ids", slots, -1, lora_A.shape[0], "-1 or a pool slot")
    if backend == "torch":
        return _torch_multi(ids, slots, weight, lora_A, lora_Bt, scalings)
    return _triton_fwd_any(ids, slots, weight, lora_A, lora_Bt.transpose(1, 2), scalings, 1.0,
                           rank_bound)


def _multi_fake(ids, slots, weight, lora_A, lora_Bt, scalings, rank_bound, backend):
    return weight.new_empty((ids.shape[0], weight.shape[1]))


MULTI_LORA_EMBEDDING_OP = define_op("lora_kernels::multi_lora_embedding", _multi_fwd,
                                    fake=_multi_fake)


# ----------------------------------------------------------------------------- public API
def _check_ids(name: str, ids, device) -> torch.Tensor:
    """Type and device of token ids; returns them flat int64 (values: :func:`_in_range`, in the
    op)."""
    V.tensor(name, ids)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64/int32 tensor of token ids, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{name} must be on {device} (the weight's device), got {ids.device}")
    return ids.reshape(-1).to(torch.int64)


def _in_range(name: str, flat: torch.Tensor, lo_ok: int, hi: int, what: str) -> None:
    """Values of ``flat`` in ``[lo_ok, hi)``, else ``ValueError`` naming the range found. Called
    by the ops' implementations (real tensors, also under torch.compile, where the op is opaque)
    before any kernel reads memory; one host sync."""
    if flat.numel():
        lo, hi_seen = int(flat.min()), int(flat.max())
        if lo < lo_ok or hi_seen >= hi:
            raise ValueError(f"{name} must lie in [{lo_ok}, {hi}) ({what}), got values in "
                             f"[{lo}, {hi_seen}]")


def _padding(padding_idx, num_embeddings: int) -> int:
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not (
            -num_embeddings <= padding_idx < num_embeddings):
        raise ValueError(f"padding_idx must be None or an int in [-{num_embeddings}, "
                         f"{num_embeddings}), got {padding_idx!r}")
    return padding_idx % num_embeddings


def lora_embedding(ids, weight, lora_A, lora_B, scaling=1.0, *, padding_idx=None, backend=None):
    """Fused embedding LoRA (PEFT's ``lora.Embedding``): ``y = W[ids] + scaling * A[:, ids]^T
    B^T``.

    Args:
        ids: ``(...)`` int64/int32 token ids in ``[0, V)`` (checked before any kernel runs).
        weight: ``(V, dim)`` base table (``nn.Embedding.weight``; frozen unless it requires
            grad: its gradient is an index_add of ``dy`` over ``ids``).
        lora_A: ``(r, V)`` (PEFT's ``lora_embedding_A``); lora_B: ``(dim, r)``
            (``lora_embedding_B``); same dtype and device as ``weight``.
        scaling: float (PEFT: ``alpha / r``).
        padding_idx: as ``nn.Embedding``'s: tokens equal to it give no gradient to ``lora_A``
            and ``weight`` (the forward is unchanged).
        backend: ``None | "torch" | "triton"`` (no CUDA kernel).
    Returns:
        ``(..., dim)`` in weight's dtype; gradients to ``lora_A``, ``lora_B`` (and ``weight``)
        when they require them. ``lora_A``'s gradient is dense (r, V) with work only at the
        columns ``ids`` touch.
    """
    V.float_tensor("weight", weight, ndim=2)
    num, dim = weight.shape
    V.float_tensor("lora_A", lora_A, ndim=2)
    V.float_tensor("lora_B", lora_B, ndim=2)
    r = lora_A.shape[0]
    V.shape("lora_A", lora_A, (r, num), f"(r, num_embeddings={num})")
    V.shape("lora_B", lora_B, (dim, r), f"(embedding_dim={dim}, r={r})")
    V.same_dtype("weight", weight, lora_A=lora_A, lora_B=lora_B)
    V.same_device("weight", weight, lora_A=lora_A, lora_B=lora_B)
    scaling = V.scalar("scaling", scaling)
    pad = _padding(padding_idx, num)
    flat = _check_ids("ids", ids, weight.device)
    be = resolve_backend(backend, weight.device, "lora_embedding")
    if be != "torch" and weight.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"weight must be float32/float16/bfloat16 for backend={be!r}, got "
                        f"{weight.dtype}")
    y = LORA_EMBEDDING_OP(flat, weight, lora_A, lora_B, scaling, pad, be)
    return y.reshape(*ids.shape, dim)


def multi_lora_embedding(ids, weight, pool, slot_ids, *, backend=None):
    """Served embedding lookup, each token with its own adapter (inference; no autograd).

    ``ids`` (...) token ids in ``[0, V)``, ``slot_ids`` (same shape) int slots of ``pool`` (an
    :class:`~lora_kernels.AdapterPool` of ``in_features = V``, ``out_features = dim``, or its
    ``view()``; -1 = base only): ``y[t] = W[ids[t]] + s_k A_k[:, ids[t]]^T B_k^T``,
    ``k = slot_ids[t]``: the gather of slot k's rank-r column, never a dense delta. Returns
    ``(..., dim)``."""
    from ..pool import PoolView

    V.float_tensor("weight", weight, ndim=2)
    num, dim = weight.shape
    view = pool if isinstance(pool, PoolView) else pool.view()
    if view.lora_A.shape[2] != num or view.lora_Bt.shape[2] != dim:
        raise ValueError(f"pool holds {view.lora_A.shape[2]} -> {view.lora_Bt.shape[2]} factors; "
                         f"the embedding is ({num}, {dim}) (in_features must be num_embeddings, "
                         "out_features embedding_dim)")
    if view.lora_A.dtype != weight.dtype:
        raise TypeError(f"pool dtype {view.lora_A.dtype} must equal weight's {weight.dtype}")
    flat = _check_ids("ids", ids, weight.device)
    V.tensor("slot_ids", slot_ids)
    if tuple(slot_ids.shape) != tuple(ids.shape) or slot_ids.dtype not in (torch.int64,
                                                                            torch.int32):
        raise ValueError(f"slot_ids must be an int tensor shaped like ids {tuple(ids.shape)}, "
                         f"got {slot_ids.dtype} {tuple(slot_ids.shape)}")
    slots = slot_ids.reshape(-1).to(device=weight.device, dtype=torch.int64)
    be = resolve_backend(backend, weight.device, "multi_lora_embedding")
    if view.rank_bound == 0:
        _in_range("ids", flat, 0, num, "the embedding's num_embeddings")
        return F.embedding(flat, weight).reshape(*ids.shape, dim)
    y = MULTI_LORA_EMBEDDING_OP(flat, slots, weight, view.lora_A, view.lora_Bt, view.scalings,
                                view.rank_bound, be)
    return y.reshape(*ids.shape, dim)
