"""``GLoRALinear``: generalised LoRA, ``W + W*A + B`` and ``b + b*D + E + W@C`` re-parameterised."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validate as V
from ..ops.glora import glora_delta, glora_linear
from .base import AdapterLinear, same

#: Forms each support can take (the GLoRA paper's search space).
FORMS: dict[str, tuple[str, ...]] = {
    "A": ("lora", "vector", "scalar", "none"),
    "B": ("lora", "vector", "scalar", "none"),
    "C": ("lora", "vector", "none"),
    "D": ("vector", "scalar", "none"),
    "E": ("vector", "scalar", "none"),
}
#: Default config: every support in its richest form.
DEFAULT_CONFIG: dict[str, str] = {"A": "lora", "B": "lora", "C": "lora", "D": "vector",
                                  "E": "vector"}


def check_config(config: dict | None) -> dict[str, str]:
    """A full config ``{"A": form, ..., "E": form}`` (missing keys -> "none"); ValueError on
    unknown keys or forms. ``None`` -> :data:`DEFAULT_CONFIG`."""
    if config is None:
        return dict(DEFAULT_CONFIG)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict like {DEFAULT_CONFIG}, got {type(config).__name__}")
    bad = set(config) - set(FORMS)
    if bad:
        raise ValueError(f"config has unknown supports {sorted(bad)}; expected keys {list(FORMS)}")
    out = {}
    for k, forms in FORMS.items():
        f = config.get(k, "none")
        if f not in forms:
            raise ValueError(f"config[{k!r}] must be one of {forms}, got {f!r}")
        out[k] = f
    return out


def support_params(config: dict, in_features: int, out_features: int, rank: int) -> int:
    """Trainable parameters of one GLoRA layer with ``config`` (see :func:`check_config`)."""
    cfg = check_config(config)
    n = 0
    for k, f in cfg.items():
        if f == "lora":
            n += rank * (out_features + in_features) if k in "AB" else rank * (in_features + 1)
        elif f == "vector":
            n += in_features if k == "C" else out_features
        elif f == "scalar":
            n += 1
    return n


def init_support(k: str, form: str, in_features: int, out_features: int, rank: int,
                 **kw) -> dict[str, nn.Parameter]:
    """Fresh trainable tensors of support ``k`` in ``form``, keyed by name suffix:
    ``{"_down": (rows, r) zeros, "_up": (r, cols) kaiming-uniform}`` for "lora" (C: rows = in,
    cols = 1; A/B: rows = out, cols = in), ``{"": zeros}`` of shape ``(out,)`` (C: ``(in,)``) for
    "vector" and ``(1,)`` for "scalar" (FSDP2's ``fully_shard`` refuses 0-d parameters), ``{}`` for
    "none". Zero "down" parts, vectors and scalars: the layer starts at the base model."""
    i, o = in_features, out_features
    if form == "lora":
        rows, cols = (i, 1) if k == "C" else (o, i)
        up = torch.empty(rank, cols, **kw)
        nn.init.kaiming_uniform_(up, a=math.sqrt(5))
        return {"_down": nn.Parameter(torch.zeros(rows, rank, **kw)), "_up": nn.Parameter(up)}
    if form == "vector":
        return {"": nn.Parameter(torch.zeros(i if k == "C" else o, **kw))}
    if form == "scalar":
        return {"": nn.Parameter(torch.zeros(1, **kw))}
    return {}


class GLoRALinear(AdapterLinear):
    """``y = x (W + W*A + B)^T + b + b*D + E + W@C`` (frozen ``weight``/``bias``).

    ``config`` picks each support's form (:data:`FORMS`, default :data:`DEFAULT_CONFIG`). The
    trainable parameters are named ``A_down (out, r)`` / ``A_up (r, in)`` for a low-rank A (same
    for B; C: ``C_down (in, r)``, ``C_up (r, 1)``) and ``A`` (``()`` or ``(out,)``; C: ``(in,)``)
    for scalar/vector forms; a scalar support is stored as shape ``(1,)`` (FSDP2's ``fully_shard``
    refuses 0-d parameters) and passed to :func:`glora_linear` as a 0-d view. Init: every "down"
    factor, vector and scalar is zero (the layer
    starts exactly at the base model); "up" factors are kaiming-uniform like PEFT's lora_A.
    ``merged()`` folds everything into a plain ``nn.Linear``; there is no ``as_lora()`` (``W*A``
    is not low-rank).
    """

    def __init__(self, weight, bias, rank: int, config: dict | None = None,
                 backend: str | None = None):
        super().__init__(weight, bias, backend)
        self.config = check_config(config)
        i, o = self.in_features, self.out_features
        needs_rank = "lora" in self.config.values()
        if needs_rank:
            V.rank("rank", rank, max_rank=min(i, o), what="min(in_features, out_features)")
        self.rank = rank
        kw = dict(dtype=self.weight.dtype, device=self.weight.device)
        for k, f in self.config.items():
            for suffix, param in init_support(k, f, i, o, rank, **kw).items():
                setattr(self, k + suffix, param)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, config: dict | None = None,
                    backend: str | None = None) -> GLoRALinear:
        cls._check_linear(linear)
        return cls(linear.weight, linear.bias, rank, config, backend)

    def supports(self, view=same) -> dict:
        """``{"A": None | tensor | (down, up), ...}`` as :func:`glora_linear` takes them; ``view``
        maps each stored tensor first (the tensor-parallel forward: to its local shard)."""
        out = {}
        for k, f in self.config.items():
            if f == "lora":
                out[k] = (view(getattr(self, f"{k}_down")), view(getattr(self, f"{k}_up")))
            elif f == "none":
                out[k] = None
            elif f == "scalar":  # stored (1,) for FSDP2, passed 0-d
                out[k] = view(getattr(self, k)).reshape(())
            else:
                out[k] = view(getattr(self, k))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return glora_linear(x, self.weight, self.bias, **self.supports(), backend=self.backend)

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return glora_delta(self.weight, self.bias, **self.supports())[0]

    def delta_bias(self) -> torch.Tensor | None:
        with torch.no_grad():
            return glora_delta(self.weight, self.bias, **self.supports())[1]

    def extra_repr(self) -> str:
        cfg = ",".join(f"{k}={v}" for k, v in self.config.items())
        return super().extra_repr() + f", rank={self.rank}, config=({cfg})"
