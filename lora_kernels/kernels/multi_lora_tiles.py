"""Tile sizes of the multi-LoRA Triton kernels (``kernels.multi_lora``), in one place: the
launchers (``ops.multi_lora.triton_backend`` through ``ops.multi_lora.tiles.tiles``), the batch
plan's tile tables (``ops.multi_lora.plan``, ``BLOCK_M``) and the ahead-of-time compile check
(``kernels.multi_lora.AOT_CONFIGS``, read by ``tests/cuda/aot_tools.py``) all read these dicts.
No triton import here: the plan needs ``BLOCK_M`` on triton-less hosts.

Kinds -> kernels: ``decode`` -> ``bgmv_kernel``, ``prefill`` -> ``sgmv_kernel``, ``fused`` ->
``sgmv_gemm_kernel``, ``tn`` -> ``seg_tn_kernel``.

GPU sizes compile for sm_80/sm_90 with Triton's compiler (AOT check); no GPU timing chose them.
Decode keeps its (RB, BLOCK) fp32 register tile at <= 4096 elements (32 per thread at 4 warps),
so its ``BLOCK_K = BLOCK_N`` shrinks to ``max(32, min(256, 4096 // RB))`` for large ranks (the
table holds the RB <= 16 entry). The interpreter uses small tiles (numpy work per program).
"""

KERNELS = {"decode": "bgmv_kernel", "prefill": "sgmv_kernel", "fused": "sgmv_gemm_kernel",
           "tn": "seg_tn_kernel"}

GPU = {
    "decode": dict(BLOCK_K=256, BLOCK_N=256, num_warps=4),
    "prefill": dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=128, num_warps=4, num_stages=3),
    "fused": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "tn": dict(BLOCK_T=64, BLOCK_N=128, num_warps=4),
}

INTERPRET = {
    "decode": dict(BLOCK_K=64, BLOCK_N=64),
    "prefill": dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32),
    "fused": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
    "tn": dict(BLOCK_T=32, BLOCK_N=32),
}
