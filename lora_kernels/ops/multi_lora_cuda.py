"""Compatibility name of the CUDA backend of multi-adapter LoRA, which lives in
:mod:`lora_kernels.ops.multi_lora.cuda_backend` (``add_lora_``, ``MODES``)."""

from .multi_lora.cuda_backend import MODES, add_lora_

__all__ = ["MODES", "add_lora_"]
