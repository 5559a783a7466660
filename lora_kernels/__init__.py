"""lora_kernels: fused Triton and CUDA kernels for low-rank adapters.

Importing this package makes no GPU query and needs no compiled code; the CUDA module
``lora_kernels._C`` is loaded on first use (see :func:`cuda_available`).
"""

from ._backend import BACKENDS, cuda_available, resolve_backend, triton_available
from .layers import METHODS, AdapterLinear, LoRALinear
from .ops.lora import lora_linear

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "METHODS",
    "AdapterLinear",
    "LoRALinear",
    "cuda_available",
    "lora_linear",
    "resolve_backend",
    "triton_available",
]
