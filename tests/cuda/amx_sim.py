"""Simulate, on any CPU, how torch's bf16 GEMM behaves on Intel AMX CPUs (issue 10).

Observed there (oneDNN brgemm on AMX, torch 2.13): for a row-strided operand (row stride ld > K,
unit column stride) the kernel loads whole K tiles, i.e. the ``ld - K`` padding elements after each
row too, and multiplies them by zero-padded weights. Finite padding gives the exact result;
NaN/inf padding makes the output NaN (``NaN * 0 = NaN``)::

    buf = torch.full((130, 105), float("nan"), dtype=torch.bfloat16); v = buf[:, :97]; v.copy_(x)
    F.linear(v, w)   # NaN on such a CPU (K = 97); the exact result elsewhere

:func:`padding_reading_linear` / :func:`padding_reading_mm` reproduce that: they widen a row-strided
low-precision operand to its full row stride (the padding read as data) and the other operand with
zeros, then call the real GEMM. Used by the tests to show that the emulation's stand-in GEMM and the
torch backend's guard (``lora_kernels._cpu_gemm.compact_rows_for_cpu_gemm``) keep padding out.
"""

from __future__ import annotations

import torch

LOW = (torch.bfloat16, torch.float16)


def _widened(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` (rows, K) read at its row stride: (rows, K + pad) including the padding (as far as
    the storage reaches after the last row), or None when ``t`` has no padding."""
    if t.dim() != 2 or t.dtype not in LOW or t.shape[0] < 1 or t.stride(1) != 1:
        return None
    rows, k = t.shape
    ld = t.stride(0)
    if ld <= k:
        return None
    avail = t.untyped_storage().nbytes() // t.element_size()
    width = min(ld, avail - t.storage_offset() - (rows - 1) * ld)  # stay inside the storage
    if width <= k:
        return None
    return t.as_strided((rows, width), (ld, 1))


def padding_reading_linear(orig):
    """An ``F.linear`` that reads x's row padding like the AMX kernel (``orig`` does the math)."""

    def linear(x, w, b=None):
        wide = _widened(x) if x.dim() == 2 else None
        if wide is None:
            return orig(x, w, b)
        pad = wide.shape[1] - x.shape[1]
        w_wide = torch.cat([w, w.new_zeros(w.shape[0], pad)], dim=1)
        return orig(wide, w_wide, b)

    return linear


def padding_reading_mm(orig):
    """A ``torch.mm`` that reads the row padding of its first operand like the AMX kernel."""

    def mm(a, b):
        wide = _widened(a)
        if wide is None:
            return orig(a, b)
        pad = wide.shape[1] - a.shape[1]
        return orig(wide, torch.cat([b, b.new_zeros(pad, b.shape[1])], dim=0))

    return mm
