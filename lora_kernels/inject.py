"""Model surgery: replace matching ``nn.Linear``s of any model (Hugging Face or not) with adapter
layers, with PEFT's target-module rules and no per-architecture code."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn


def _matcher(target_modules):
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules must not be empty")
        try:
            pat = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: "
                             f"{e}") from None
        return lambda name: pat.fullmatch(name) is not None
    if not isinstance(target_modules, Iterable):
        raise TypeError("target_modules must be a list of module names / name suffixes or a "
                        f"regex string, got {type(target_modules).__name__}")
    targets = list(target_modules)
    if not targets:
        raise ValueError("target_modules must not be empty")
    for t in targets:
        if not isinstance(t, str) or not t:
            raise TypeError(f"target_modules entries must be non-empty strings, got {t!r}")
    return lambda name: any(name == t or name.endswith("." + t) for t in targets)


def find_linears(model: nn.Module, target_modules) -> list[str]:
    """Names of the modules of ``model`` matched by ``target_modules``, all checked to be
    ``nn.Linear``.

    Rules (PEFT's): a list matches a module whose full name equals an entry or ends with
    ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); a string is a
    regex that must match the full name. Raises ``ValueError`` if nothing matches and
    ``TypeError`` if a matched module is not an ``nn.Linear``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    match = _matcher(target_modules)
    names = []
    for name, mod in model.named_modules():
        if not name or not match(name):
            continue
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"target_modules matched {name!r}, a {type(mod).__name__}; only "
                            "nn.Linear modules can be targeted (narrow target_modules)")
        names.append(name)
    if not names:
        some = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"target_modules {target_modules!r} matched no module of the model "
                         f"(its linears include: {some})")
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, method: str = "lora", target_modules=None, **method_kwargs):
    """Replace every ``nn.Linear`` of ``model`` matched by ``target_modules`` with
    ``METHODS[method].from_linear(linear, **method_kwargs)``, in place; return ``model``.

    ``method`` is a key of :data:`lora_kernels.METHODS` (``"lora"``, ...); ``method_kwargs`` are
    that layer's ``from_linear`` arguments (e.g. ``r=8, alpha=16`` for LoRA). All new layers are
    built before the first replacement, so a refused call (unknown method, nothing matched, a
    matched non-Linear, bad kwargs) leaves the model unchanged. Freezing the rest of the model is
    left to the caller (``model.requires_grad_(False)`` before injecting freezes all but the new
    adapter parameters).
    """
    from .layers import METHODS

    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if target_modules is None:
        raise ValueError("target_modules is required (e.g. ['q_proj', 'v_proj'])")
    cls = METHODS[method]
    names = find_linears(model, target_modules)
    new = {name: cls.from_linear(model.get_submodule(name), **method_kwargs) for name in names}
    for name, layer in new.items():
        _set(model, name, layer)
    return model
