"""Triton kernels (``@triton.jit`` functions only; launchers live in ``lora_kernels.ops``)."""
