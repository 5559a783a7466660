"""CUDA backend of multi-adapter serving: ``y[t] += s_i * x[t] A_i^T B_i^T``, ``i = ids[t]``.

Pool layout (fixed; built by ``AdapterPool``): ``lora_A (M, R, in)``, ``lora_Bt (M, R, out)``
(B transposed; rows >= an adapter's rank are zero), ``ranks`` int32 ``(M,)``, ``scalings`` float32
``(M,)``; ``adapter_ids`` int32/int64 ``(T,)`` with ``-1`` = base model only.

Two paths (:func:`add_lora_` picks one by token count unless ``mode`` says):

* ``"decode"``: one kernel (``_C.multi_lora_decode``); per token, shrink then expand with the
  rank-r intermediate in shared memory. Nothing to prepare, CUDA-graph capturable.
* ``"prefill"``: tokens sorted by adapter on the device (``torch.sort`` + ``searchsorted``: no host
  sync, capturable), then a segmented shrink and a segmented expand (``_C.multi_lora_prefill``)
  that read each adapter once per 64 / 32 tokens instead of once per token.
"""

from __future__ import annotations

import torch

from .. import _cuda
from ._triton import empty
from .lora_cuda import (
    as_rows,
    check_cuda_tensor,
    device_index,
    dtype_code,
    leading_dim,
    stream_of,
)

# Token count up to which the decode kernel is used when mode=None. Not tuned on a GPU yet.
DECODE_MAX_TOKENS = 64
MODES = ("decode", "prefill")


def _check_pool(y, x, lora_A, lora_Bt, ranks, scalings, adapter_ids):
    check_cuda_tensor("x", x, ndim=2)
    dev = x.device
    code = dtype_code("x", x)
    T, in_f = x.shape
    check_cuda_tensor("y", y, dev, ndim=2, dtype=x.dtype)
    if y.shape[0] != T:
        raise ValueError(f"y must have {T} rows (like x), got shape {tuple(y.shape)}")
    out_f = y.shape[1]
    if leading_dim(y) is None:
        raise ValueError("y must have unit stride in its last dim and non-overlapping rows "
                         f"(it is updated in place), got strides {y.stride()}")
    check_cuda_tensor("lora_A", lora_A, dev, ndim=3, dtype=x.dtype)
    M, R = lora_A.shape[0], lora_A.shape[1]
    if M < 1 or R < 1 or lora_A.shape[2] != in_f:
        raise ValueError(f"lora_A must have shape (max_adapters, max_rank, {in_f}), "
                         f"got {tuple(lora_A.shape)}")
    check_cuda_tensor("lora_Bt", lora_Bt, dev, ndim=3, dtype=x.dtype)
    if tuple(lora_Bt.shape) != (M, R, out_f):
        raise ValueError(f"lora_Bt must have shape ({M}, {R}, {out_f}) "
                         f"(max_adapters, max_rank, out), got {tuple(lora_Bt.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_Bt", lora_Bt)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the adapter pool layout)")
    check_cuda_tensor("ranks", ranks, dev, ndim=1, dtype=torch.int32)
    check_cuda_tensor("scalings", scalings, dev, ndim=1, dtype=torch.float32)
    if ranks.shape[0] != M or scalings.shape[0] != M:
        raise ValueError(f"ranks and scalings must have shape ({M},), got "
                         f"{tuple(ranks.shape)} and {tuple(scalings.shape)}")
    check_cuda_tensor("adapter_ids", adapter_ids, dev, ndim=1)
    if adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
    if adapter_ids.shape[0] != T:
        raise ValueError(f"adapter_ids must have shape ({T},), got {tuple(adapter_ids.shape)}")
    return dev, code, T, in_f, out_f, M, R


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two non-empty tensors are views of one storage (no sync, capturable)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def check_ids_in_range(adapter_ids: torch.Tensor, max_adapters: int) -> None:
    """Host-side bounds check (one device sync): every id is -1 or in [0, max_adapters)."""
    if adapter_ids.numel() == 0:
        return
    bad = (adapter_ids < -1) | (adapter_ids >= max_adapters)
    if bool(bad.any()):
        first = adapter_ids[bad][0].item()
        raise ValueError(f"adapter_ids must be -1 or in [0, {max_adapters}), found {first}")


def add_lora_(y, x, lora_A, lora_Bt, ranks, scalings, adapter_ids, *, mode=None,
              check_ids=True):
    """In place ``y[t] += scalings[i] * (x[t] A_i[:r_i]^T) Bt_i[:r_i]`` with ``i = adapter_ids[t]``.

    Args:
        y: ``(T, out)`` updated in place (unit stride along ``out``).
        x: ``(T, in)``, same dtype (fp32/fp16/bf16) and device; any strides; may be ``y`` itself.
        lora_A, lora_Bt, ranks, scalings: the pool (module doc). ``r_i = min(ranks[i], max_rank)``.
        adapter_ids: ``(T,)`` int32/int64; ``-1`` leaves ``y[t]`` unchanged.
        mode: ``None`` (decode for ``T <= DECODE_MAX_TOKENS``, else prefill), ``"decode"`` or
            ``"prefill"``.
        check_ids: bounds-check the ids on the host first (one sync; skipped automatically while a
            CUDA graph is being captured). The kernels never read out of bounds either way: an
            out-of-range id is treated like ``-1``.
    Returns:
        ``y``.
    """
    dev, code, T, in_f, out_f, M, R = _check_pool(y, x, lora_A, lora_Bt, ranks, scalings,
                                                  adapter_ids)
    if mode is None:
        mode = "decode" if T <= DECODE_MAX_TOKENS else "prefill"
    if mode not in MODES:
        raise ValueError(f"mode must be None or one of {MODES}, got {mode!r}")
    if check_ids and not _capturing(dev):
        check_ids_in_range(adapter_ids, M)
    if T == 0 or out_f == 0:
        return y
    C = _cuda.module()
    if mode == "decode" and _shares_memory(x, y):
        # The decode kernel splits a token's output columns over several concurrent blocks, each
        # re-reading the whole row x[t] for its shrink: with y in x's memory (in place, in == out),
        # one block's writes to y[t] would reach another's reads of x[t]. Read from a copy.
        # (prefill is safe: its shrink kernel has read all of x before the expand writes y.)
        x = x.clone(memory_format=torch.contiguous_format)
    xr, ldx = as_rows(x)
    ids = adapter_ids if adapter_ids.is_contiguous() else adapter_ids.contiguous()
    ldy = leading_dim(y)
    st = stream_of(dev)
    if mode == "decode":
        C.multi_lora_decode(xr.data_ptr(), ldx, y.data_ptr(), ldy, lora_A.data_ptr(),
                            lora_Bt.data_ptr(), ranks.data_ptr(), scalings.data_ptr(),
                            ids.data_ptr(), ids.dtype == torch.int64, T, in_f, out_f, R, M, code,
                            device_index(dev), st)
        return y
    perm, seg_off = segments(ids, M)
    ws = empty((T, R), torch.float32, dev)
    C.multi_lora_prefill(xr.data_ptr(), ldx, y.data_ptr(), ldy, lora_A.data_ptr(),
                         lora_Bt.data_ptr(), ranks.data_ptr(), scalings.data_ptr(),
                         perm.data_ptr(), seg_off.data_ptr(), ws.data_ptr(), T, in_f, out_f, R, M,
                         code, device_index(dev), st)
    return y


def segments(adapter_ids: torch.Tensor, max_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-side grouping (no host sync): ``perm`` (T,) int64 = token indices sorted by adapter
    (stable; ids -1 / out of range last) and ``seg_off`` (max_adapters + 1,) int64 = start of each
    adapter's run in ``perm`` (``seg_off[max_adapters]`` = number of adapted tokens)."""
    ids = adapter_ids.to(torch.int64)
    key = ids.masked_fill((ids < 0) | (ids >= max_adapters), max_adapters)
    sorted_key, perm = torch.sort(key, stable=True)
    bounds = torch.arange(max_adapters + 1, device=ids.device, dtype=torch.int64)
    seg_off = torch.searchsorted(sorted_key, bounds)
    return perm.contiguous(), seg_off.contiguous()
