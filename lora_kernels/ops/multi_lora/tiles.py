"""Tile sizes of the multi-LoRA Triton kernels, in one place: the launchers
(:mod:`.triton_backend`), the batch plan's tile tables (:mod:`.plan`, ``BLOCK_M``) and the
ahead-of-time compile check (``kernels.multi_lora.AOT_CONFIGS``, read by ``tests/aot_tools.py``)
all read these dicts. No triton import here: the plan needs ``BLOCK_M`` on triton-less hosts.

Kinds -> kernels: ``decode`` -> ``bgmv_kernel``, ``prefill`` -> ``sgmv_kernel``, ``fused`` ->
``sgmv_gemm_kernel``, ``tn`` -> ``seg_tn_kernel``.

GPU sizes compile for sm_80/sm_90 with Triton's compiler (AOT check); no GPU timing chose them.
Decode keeps its (RB, BLOCK) fp32 register tile at <= 4096 elements (32 per thread at 4 warps),
so its ``BLOCK_K = BLOCK_N`` shrinks to ``max(32, min(256, 4096 // RB))`` for large ranks (the
table holds the RB <= 16 entry). The interpreter uses small tiles (numpy work per program).
"""

from __future__ import annotations

from .._triton import triton_interpret

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


def tiles(kind: str, rb: int = 16) -> dict:
    """Launch meta-parameters (``BLOCK_*``, ``num_warps``, ``num_stages``) of ``kind`` for the
    current mode (interpreter or GPU); ``rb`` = the padded rank (decode's block shrinks)."""
    if triton_interpret():
        return dict(INTERPRET[kind])
    cfg = dict(GPU[kind])
    if kind == "decode":
        blk = max(32, min(256, 4096 // rb))
        cfg.update(BLOCK_K=blk, BLOCK_N=blk)
    return cfg


def block_m(kind: str) -> int:
    """Rows per tile of the tile table the plan builds for ``kind`` (``prefill`` / ``fused``)."""
    return tiles(kind)["BLOCK_M"]
