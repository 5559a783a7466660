"""Launchers (validate, allocate, launch), registered ``torch.library`` ops and their autograd.

Two floors (``tests/test_structure.py``): the engine (``lowrank``: "base GEMM + low-rank chain"
forward / backward on every backend, over ``weights``, ``lora_cuda``, ``_triton`` and
``_register``) and, above it, one module per op family (its backend table, its ``define_op``
call(s), its public function). The Triton kernels they launch are in ``lora_kernels.kernels``.
"""
