"""CURLoRA on the shared fused LoRA op, plus its inverted-probability index sampler.

``dW = C @ U @ R`` with ``C = W0[:, col_idx] (out, r)``, ``R = W0[row_idx, :] (r, in)`` taken from
the frozen base ``W0`` (the op's ``weight``) and ``U (r, r)`` the only trainable tensor.

Per call, C and R are gathered from W0 by index (``index_select``: r (in + out) elements, never
kept between calls, never stored as module state) and collapse to LoRA-equivalent factors

    P = U @ R      (r, in)    cost 2 r^2 in flops
    Q = C          (out, r)

(P in fp32 for half inputs, then cast); ``y = x W0^T + b + s (x P^T) Q^T`` runs in the fused kernels
of :func:`lora_kernels.lora_linear`. Its backward returns ``dP (r, in)`` (``dQ`` is skipped: C is
frozen) and autograd maps it back: ``dU = dP R^T`` (O(r^2 in)).
"""

from __future__ import annotations

import torch

from .. import _validate as V
from .._backend import resolve_backend
from .lora import lora_linear

INDEX_DTYPES = (torch.int64, torch.int32)


def _check_idx(name: str, idx, r: int, bound: int, what: str, device, values: bool) -> None:
    V.tensor(name, idx, ndim=1)
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int64/int32 tensor, got {idx.dtype}")
    V.shape(name, idx, (r,), "(r,) with r = U.shape[0]")
    if idx.device != device:
        raise ValueError(f"{name} must be on {device} (like x), got {idx.device}")
    if values and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= bound:
            raise ValueError(f"{name} values must lie in [0, {bound}) ({what}), "
                             f"got min {lo}, max {hi}")


def _check(x, weight, bias, col_idx, row_idx, U) -> int:
    in_f, out_f = V.linear_args(x, weight, bias)
    V.float_tensor("U", U, ndim=2)
    r = U.shape[0]
    V.rank("U.shape[0] (rank r)", r, max_rank=min(in_f, out_f),
           what="min(in_features, out_features)")
    V.shape("U", U, (r, r), "(r, r)")
    V.same_dtype("x", x, U=U)
    V.same_device("x", x, U=U)
    check_indices(col_idx, row_idx, r, in_f, out_f, x.device)
    return r


def check_indices(col_idx, row_idx, r: int, in_f: int, out_f: int, device,
                  values: bool = True) -> None:
    """``col_idx``/``row_idx``: (r,) int64/int32 on ``device``; with ``values`` (one host sync)
    in ``[0, in_f)`` / ``[0, out_f)``."""
    _check_idx("col_idx", col_idx, r, in_f, "columns of weight: in_features", device, values)
    _check_idx("row_idx", row_idx, r, out_f, "rows of weight: out_features", device, values)


def cur_factors(weight, col_idx, row_idx, U) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-equivalent ``(P = U @ W0[row_idx] (r, in), Q = W0[:, col_idx] (out, r))``."""
    dt = U.dtype
    ct = torch.promote_types(dt, torch.float32)
    R = weight.index_select(0, row_idx)
    C = weight.index_select(1, col_idx)
    P = (U.to(ct) @ R.to(ct)).to(dt)
    return P, C


def cur_linear(x, weight, bias, col_idx, row_idx, U, scaling=1.0, *, backend=None):
    """CURLoRA linear: ``y = x W0^T + b + scaling * x (C U R)^T``, ``C = W0[:, col_idx]``,
    ``R = W0[row_idx, :]``.

    Args:
        x: ``(..., in)``, any strides.
        weight: ``(out, in)`` frozen base ``W0``; bias: ``(out,)`` or ``None``.
        col_idx: ``(r,)`` int64/int32 in ``[0, in)``; row_idx: ``(r,)`` int64/int32 in
            ``[0, out)`` (bounds-checked before any kernel: one host sync; skipped while
            torch.compile traces, where the check cannot run on the host).
        U: ``(r, r)``, ``1 <= r <= min(in, out)``, in x's dtype.
        scaling: float multiplier of the adapter branch.
        backend: ``None | "torch" | "triton" | "cuda"``, passed to the fused LoRA op.
    Returns:
        ``(..., out)`` in x's dtype; gradients to U (and to x / weight / bias if they require).
    """
    _check(x, weight, bias, col_idx, row_idx, U)
    scaling = V.scalar("scaling", scaling)
    be = resolve_backend(backend, x.device, "cur_linear")
    P, Q = cur_factors(weight, col_idx, row_idx, U)
    return lora_linear(x, weight, bias, P, Q, scaling, backend=be)


def inverted_probabilities(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """CURLoRA's sampling distribution (float64, on CPU) over columns (``dim=1``) or rows
    (``dim=0``) of ``weight (out, in)``: ``p_j = ||W_j||^2 / ||W||_F^2``, then ``1/p_j``
    renormalised, so low-norm columns/rows are the likely ones. Zero-norm ones get the largest
    finite weight (their norm is clamped to the smallest positive float64)."""
    V.float_tensor("weight", weight, ndim=2)
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (rows) or 1 (columns), got {dim}")
    w = weight.detach().to(torch.float64)
    sq = (w * w).sum(dim=1 - dim).cpu()
    total = sq.sum()
    if not torch.isfinite(total) or total <= 0:
        raise ValueError("weight must be finite and not all zero to sample CURLoRA indices")
    p = (sq / total).clamp_min(torch.finfo(torch.float64).tiny)
    inv = 1.0 / p
    return inv / inv.sum()


def sample_cur_indices(weight: torch.Tensor, rank: int, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``(col_idx (rank,), row_idx (rank,))`` int64 on weight's device, with replacement,
    from :func:`inverted_probabilities`. ``generator`` is a CPU generator (sampling runs on CPU)."""
    V.float_tensor("weight", weight, ndim=2)
    out_f, in_f = weight.shape
    V.rank("rank", rank, max_rank=min(in_f, out_f), what="min(in_features, out_features)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    cols = torch.multinomial(inverted_probabilities(weight, 1), rank, replacement=True,
                             generator=generator)
    rows = torch.multinomial(inverted_probabilities(weight, 0), rank, replacement=True,
                             generator=generator)
    return cols.to(weight.device), rows.to(weight.device)
