"""Thin ``nn.Module`` wrappers: every layer keeps the frozen base ``weight``/``bias`` and calls one
functional op. ``METHODS`` maps ``inject(method=...)`` names to layer classes."""

from .base import AdapterLinear
from .cur import CURLoRALinear
from .deep import DeepLoRALinear
from .dora import DoRALinear
from .embedding import LoRAEmbedding
from .glora import GLoRALinear
from .lora import LoRALinear
from .nora import NoRALinear

METHODS: dict[str, type[AdapterLinear]] = {
    "lora": LoRALinear, "nora": NoRALinear, "curlora": CURLoRALinear, "deep_lora": DeepLoRALinear,
    "glora": GLoRALinear, "dora": DoRALinear}

__all__ = [
    "METHODS", "AdapterLinear", "CURLoRALinear", "DeepLoRALinear", "DoRALinear", "GLoRALinear",
    "LoRAEmbedding", "LoRALinear", "NoRALinear",
]
