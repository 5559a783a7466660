"""Lazy loader for the optional compiled CUDA module ``lora_kernels._C``.

Nothing here runs at ``import lora_kernels``: the module is imported on first use and its absence
is reported as a string (``module_error()``), never as an ImportError at package import.
"""

from __future__ import annotations

import importlib

_CACHE: list = []  # (module | None, error | None), filled on first use


def _load():
    if not _CACHE:
        try:
            _CACHE.append((importlib.import_module("lora_kernels._C"), None))
        except ImportError as e:  # surfaced by module_error() and backend='cuda', not hidden
            _CACHE.append((None, f"the compiled module lora_kernels._C is not built ({e}); "
                                 "build it with nvcc present: pip install -e ."))
    return _CACHE[0]


def module():
    """The ``lora_kernels._C`` module; raises ``RuntimeError`` with the reason if it is absent."""
    mod, err = _load()
    if mod is None:
        raise RuntimeError(err)
    return mod


def module_error() -> str | None:
    """None if ``lora_kernels._C`` imports, else why it does not."""
    return _load()[1]


def has_op(op: str) -> bool:
    """Whether the CUDA module provides a kernel for the public op ``op``."""
    mod, _ = _load()
    return mod is not None and op in getattr(mod, "OPS", ())
