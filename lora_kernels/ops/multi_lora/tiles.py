"""Launch tiles of the multi-LoRA Triton kernels for the current mode: :func:`tiles` and
:func:`block_m` over the tables of ``kernels.multi_lora_tiles`` (GPU and interpreter sizes,
kinds -> kernels)."""

from __future__ import annotations

from ...kernels.multi_lora_tiles import GPU, INTERPRET, KERNELS
from .._triton import triton_interpret

__all__ = ["GPU", "INTERPRET", "KERNELS", "block_m", "tiles"]


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
