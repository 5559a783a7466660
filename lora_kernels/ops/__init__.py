"""Launchers (validate, allocate, launch), registered ``torch.library`` ops and their autograd.

One module per op family; the Triton kernels they launch are in ``lora_kernels.kernels``.
"""
