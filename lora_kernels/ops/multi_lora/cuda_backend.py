"""The ``"cuda"`` backend of multi-adapter LoRA (``lora_kernels._C``):
``y[t] += s_i * x[t] A_i^T B_i^T``, ``i = ids[t]``.

Pool layout (fixed; built by ``AdapterPool``): ``lora_A (M, R, in)``, ``lora_Bt (M, R, out)``
(B transposed; rows >= an adapter's rank are zero), ``ranks`` int32 ``(M,)``, ``scalings`` float32
``(M,)``; ``adapter_ids`` int32/int64 ``(T,)`` with ``-1`` = base model only.

Two paths (the plan's, :func:`~.plan.choose_path`):

* ``"decode"``: one kernel (``_C.multi_lora_decode``); per token, shrink then expand with the
  rank-r intermediate in shared memory. Nothing to prepare, CUDA-graph capturable.
* ``"prefill"``: the plan's adapter-sorted order (``perm``, ``seg_off[:M + 1]``: sort +
  searchsorted, no host sync, capturable) feeds a segmented shrink and a segmented expand
  (``_C.multi_lora_prefill``) that read each adapter once per 64 / 32 tokens instead of once per
  token. ``"prefill_fused"`` runs as ``"prefill"`` (no fused GEMM in this backend).
"""

from __future__ import annotations

import torch

from ... import _cuda
from ... import _validate as V
from ...pool import PoolView
from .._triton import empty
from ..lora_cuda import as_rows, check_cuda_tensor, device_index, dtype_code, leading_dim, stream_of
from . import plan as P

MODES = ("decode", "prefill")


def _check_pool(y, x, lora_A, lora_Bt, ranks, scalings, adapter_ids):
    check_cuda_tensor("x", x, ndim=2)
    dev = x.device
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
    V.adapter_ids("adapter_ids", adapter_ids, T)
    return dev, M


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def add_(y, x, view: PoolView, plan: P.BatchPlan) -> None:
    """In place ``y[t] += scalings[i] * (x[t] A_i[:r_i]^T) Bt_i[:r_i]`` on validated arguments."""
    T, in_f = x.shape
    out_f = y.shape[1]
    if T == 0 or out_f == 0:
        return
    A, Bt = view.lora_A, view.lora_Bt
    M, R = A.shape[:2]
    C = _cuda.module()
    dev = x.device
    code = dtype_code("x", x)
    mode = "decode" if plan.resolved_path() == "decode" else "prefill"
    if mode == "decode":
        # decode splits a token's columns over blocks that re-read x[t] (the aliasing rule);
        # prefill is safe: its shrink kernel has read all of x before the expand writes y
        x = P.separate_input(x, y)
    xr, ldx = as_rows(x)
    ldy = leading_dim(y)
    st = stream_of(dev)
    if mode == "decode":
        ids = plan.ids if plan.ids.is_contiguous() else plan.ids.contiguous()
        C.multi_lora_decode(xr.data_ptr(), ldx, y.data_ptr(), ldy, A.data_ptr(),
                            Bt.data_ptr(), view.ranks.data_ptr(), view.scalings.data_ptr(),
                            ids.data_ptr(), ids.dtype == torch.int64, T, in_f, out_f, R, M, code,
                            device_index(dev), st)
        return
    ws = empty((T, R), torch.float32, dev)
    C.multi_lora_prefill(xr.data_ptr(), ldx, y.data_ptr(), ldy, A.data_ptr(),
                         Bt.data_ptr(), view.ranks.data_ptr(), view.scalings.data_ptr(),
                         plan.perm.data_ptr(), plan.seg_off.data_ptr(), ws.data_ptr(), T, in_f,
                         out_f, R, M, code, device_index(dev), st)


def add_lora_(y, x, lora_A, lora_Bt, ranks, scalings, adapter_ids, *, mode=None,
              check_ids=True):
    """In place ``y[t] += scalings[i] * (x[t] A_i[:r_i]^T) Bt_i[:r_i]`` with ``i = adapter_ids[t]``
    (the standalone CUDA entry point; the served path goes through the batch plan instead).

    Args:
        y: ``(T, out)`` updated in place (unit stride along ``out``).
        x: ``(T, in)``, same dtype (fp32/fp16/bf16) and device; any strides; may be ``y`` itself.
        lora_A, lora_Bt, ranks, scalings: the pool (module doc). ``r_i = min(ranks[i], max_rank)``.
        adapter_ids: ``(T,)`` int32/int64; ``-1`` leaves ``y[t]`` unchanged.
        mode: ``None`` (:func:`~.plan.choose_path` with the slot count as the adapter bound),
            ``"decode"`` or ``"prefill"``.
        check_ids: bounds-check the ids on the host first (one sync; skipped automatically while a
            CUDA graph is being captured). The kernels never read out of bounds either way: an
            out-of-range id is treated like ``-1``.
    Returns:
        ``y``.
    """
    dev, M = _check_pool(y, x, lora_A, lora_Bt, ranks, scalings, adapter_ids)
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be None or one of {MODES}, got {mode!r}")
    if check_ids and not _capturing(dev):
        V.ids_in_slots("adapter_ids", adapter_ids, M)
    view = PoolView(lora_A, lora_Bt, ranks, scalings, lora_A.shape[1])
    plan = P.build_eager(adapter_ids, M, M, backend="cuda", path=mode or "auto", tiles=False)
    add_(y, x, view, plan)
    return y
