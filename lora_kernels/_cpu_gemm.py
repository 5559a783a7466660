"""A CPU GEMM workaround the ops' public entry points apply to their input (not a backend
choice): :func:`compact_rows_for_cpu_gemm`."""

from __future__ import annotations

import torch

__all__ = ["compact_rows_for_cpu_gemm"]


def compact_rows_for_cpu_gemm(x: torch.Tensor) -> torch.Tensor:
    """``x`` (rows, K), or a compact copy when it is a row-padded bf16/fp16 CPU tensor.

    Why: on Intel CPUs with AMX, torch's bf16 GEMM (oneDNN brgemm) reads a row-strided
    operand (row stride ld > K, unit column stride) in whole K tiles, the ``ld - K`` padding
    elements after each row included, and multiplies them by zero: NaN or inf there (memory the
    caller never passed, e.g. other columns of a fused projection's output) turns the result NaN,
    while finite padding gives the exact product. Our ops' outputs must be a function of the
    logical inputs, so the public entry points (``lora_linear``, ``glora_linear``,
    ``multi_lora_linear``, ``multi_lora_add_``) hand such an x to the CPU GEMMs compact. Cost:
    one copy of x (T*K elements) against the 2*T*K*out FLOPs of the base GEMM, i.e. O(1/out) of
    the work; it is taken on every CPU, since the GEMM's kernel choice is not visible from
    Python. CUDA tensors are left alone (cuBLAS honours lda), as are
    fp32 (not seen affected) and already-compact tensors (returned as they are, no copy).
    """
    if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2
            and x.shape[0] > 1 and x.shape[1] > 0 and x.stride(1) == 1
            and x.stride(0) > x.shape[1]):
        return x.contiguous()
    return x
