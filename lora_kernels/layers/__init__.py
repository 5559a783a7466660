"""Thin ``nn.Module`` wrappers: every layer keeps the frozen base ``weight``/``bias`` and calls one
functional op. ``METHODS`` maps ``inject(method=...)`` names to layer classes."""

from .base import AdapterLinear
from .lora import LoRALinear

METHODS: dict[str, type[AdapterLinear]] = {"lora": LoRALinear}

__all__ = ["METHODS", "AdapterLinear", "LoRALinear"]
