"""GLoRA's layer-wise configuration search: a weight-sharing supernet plus an evolutionary search
under a trainable-parameter budget (Chavan et al. 2023, "One-for-All: Generalized LoRA").

Workflow::

    names = inject_supernet(model, target_modules=["q_proj", "v_proj"], rank=8)
    train_supernet(model, loss_fn, batches, steps=500)     # a random config per layer per step
    result = evolutionary_search(model, eval_fn, budget=200_000)
    finalize(model, result.configs)                         # -> GLoRALinear, weights inherited

* :class:`GLoRASupernetLinear` holds one tensor per (support, form) of the search space
  (:data:`lora_kernels.layers.glora.FORMS`): ``A_lora_down/A_lora_up``, ``A_vector``,
  ``A_scalar``, ... . A config selects one form per support; forms never share storage, so a
  sampled sub-network trains exactly the tensors it uses. Every form starts at zero (low-rank
  pairs: "down" zero, "up" kaiming), so every sub-network starts at the base model.
* :func:`evolutionary_search`: a population of per-layer configs; the top ``parents`` survive
  each generation (elitism, so the best score never gets worse) and children come from
  crossover (per layer, from either parent) and mutation (each support re-sampled with
  probability ``mutate_prob``). Candidates over ``budget`` trainable parameters are rejected.
* :func:`finalize` swaps each supernet layer for a :class:`~lora_kernels.GLoRALinear` with the
  chosen config and the supernet's trained tensors (fine-tune further or ``merged()`` it).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _validate as V
from .layers.base import AdapterLinear
from .layers.glora import FORMS, GLoRALinear, check_config, init_support, support_params
from .ops.glora import glora_linear


class GLoRASupernetLinear(AdapterLinear):
    """A GLoRA layer holding every form of every support; ``config`` picks the active ones."""

    def __init__(self, weight, bias, rank: int, backend: str | None = None):
        super().__init__(weight, bias, backend)
        i, o = self.in_features, self.out_features
        V.rank("rank", rank, max_rank=min(i, o), what="min(in_features, out_features)")
        self.rank = rank
        kw = dict(dtype=self.weight.dtype, device=self.weight.device)
        for k, forms in FORMS.items():
            for f in forms:
                for suffix, param in init_support(k, f, i, o, rank, **kw).items():
                    setattr(self, f"{k}_{f}{suffix}", param)
        self.config = {k: "none" for k in FORMS}

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, backend: str | None = None):
        cls._check_linear(linear)
        return cls(linear.weight, linear.bias, rank, backend)

    def set_config(self, config: dict) -> None:
        self.config = check_config(config)

    def supports(self, config: dict | None = None) -> dict:
        cfg = self.config if config is None else check_config(config)
        out = {}
        for k, f in cfg.items():
            if f == "none":
                out[k] = None
            elif f == "lora":
                out[k] = (getattr(self, f"{k}_lora_down"), getattr(self, f"{k}_lora_up"))
            elif f == "scalar":  # stored (1,), passed 0-d
                out[k] = getattr(self, f"{k}_scalar").reshape(())
            else:
                out[k] = getattr(self, f"{k}_{f}")
        return out

    def params(self, config: dict | None = None) -> int:
        cfg = self.config if config is None else config
        return support_params(cfg, self.in_features, self.out_features, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return glora_linear(x, self.weight, self.bias, **self.supports(), backend=self.backend)

    @torch.no_grad()
    def export(self, config: dict | None = None) -> GLoRALinear:
        """A :class:`GLoRALinear` with ``config`` (default: the active one), tensors copied."""
        cfg = self.config if config is None else check_config(config)
        layer = GLoRALinear(self.weight, self.bias, self.rank, cfg, self.backend)
        for k, v in self.supports(cfg).items():
            if v is None:
                continue
            if isinstance(v, tuple):
                getattr(layer, f"{k}_down").copy_(v[0])
                getattr(layer, f"{k}_up").copy_(v[1])
            else:
                getattr(layer, k).copy_(v)
        return layer

    def delta_weight(self) -> torch.Tensor:
        return self.export().delta_weight()

    def delta_bias(self):
        return self.export().delta_bias()


def _matches(name: str, targets) -> bool:
    return targets is None or any(name == t or name.endswith("." + t) for t in targets)


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def inject_supernet(model: nn.Module, target_modules: Iterable[str] | None = None, rank: int = 4,
                    backend: str | None = None) -> list[str]:
    """Replace every ``nn.Linear`` whose name is (or ends with ``.``) one of ``target_modules``
    (all when None) by a :class:`GLoRASupernetLinear`; freeze everything else. Returns names."""
    targets = None if target_modules is None else list(target_modules)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        raise ValueError(f"target_modules={targets} matched no nn.Linear in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        _set_child(model, n, GLoRASupernetLinear.from_linear(model.get_submodule(n), rank, backend))
    return names


def supernet_layers(model: nn.Module) -> dict[str, GLoRASupernetLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GLoRASupernetLinear)}


def sample_config(rng: random.Random) -> dict[str, str]:
    """A uniformly random form per support."""
    return {k: rng.choice(forms) for k, forms in FORMS.items()}


def set_configs(model: nn.Module, configs: dict[str, dict]) -> None:
    layers = supernet_layers(model)
    missing = set(layers) - set(configs)
    if missing:
        raise ValueError(f"configs lacks supernet layers {sorted(missing)}")
    for n, layer in layers.items():
        layer.set_config(configs[n])


def config_params(model: nn.Module, configs: dict[str, dict]) -> int:
    """Trainable parameters of the sub-network ``configs`` (paper formulas, per layer)."""
    return sum(layer.params(configs[n]) for n, layer in supernet_layers(model).items())


def train_supernet(model: nn.Module, loss_fn: Callable, batches: Iterable, steps: int,
                   lr: float = 1e-2, seed: int = 0,
                   optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """Train all supernet tensors: each step samples one random config per layer, then does
    ``loss_fn(model, batch).backward()`` and an optimiser step (AdamW(lr) unless given). Batches
    are cycled. Returns the per-step losses."""
    rng = random.Random(seed)
    layers = supernet_layers(model)
    if not layers:
        raise ValueError("model has no GLoRASupernetLinear (call inject_supernet first)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = list(batches)
    losses = []
    model.train()
    for step in range(steps):
        for layer in layers.values():
            layer.set_config(sample_config(rng))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batches[step % len(batches)])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@dataclass
class SearchResult:
    configs: dict[str, dict]              # layer name -> config
    score: float                          # eval_fn of the best candidate (lower is better)
    params: int                           # its trainable parameters
    history: list[float] = field(default_factory=list)   # best score after each generation


def _key(cands: dict[str, dict]) -> tuple:
    return tuple((n, tuple(sorted(c.items()))) for n, c in sorted(cands.items()))


def evolutionary_search(model: nn.Module, eval_fn: Callable[[nn.Module], float], budget: int,
                        population: int = 20, generations: int = 10, parents: int = 5,
                        mutate_prob: float = 0.2, *, seed: int = 0,
                        max_tries: int = 1000) -> SearchResult:
    """Search per-layer configs minimising ``eval_fn(model)`` (e.g. validation loss, evaluated
    under ``torch.no_grad`` with the candidate set) with at most ``budget`` trainable params.

    The all-"none" config (0 parameters, the base model) is always a feasible fallback. The model
    is left set to the best configs.
    """
    layers = supernet_layers(model)
    if not layers:
        raise ValueError("model has no GLoRASupernetLinear (call inject_supernet first)")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    if population < 2 or not 1 <= parents <= population:
        raise ValueError(f"need population >= 2 and 1 <= parents <= population, got "
                         f"population={population}, parents={parents}")
    rng = random.Random(seed)
    names = list(layers)

    def feasible(c):
        return config_params(model, c) <= budget

    scores: dict[tuple, float] = {}

    def score(c):
        k = _key(c)
        if k not in scores:
            set_configs(model, c)
            was = model.training
            model.eval()
            with torch.no_grad():
                scores[k] = float(eval_fn(model))
            model.train(was)
        return scores[k]

    pop = [{n: {k: "none" for k in FORMS} for n in names}]
    tries = 0
    while len(pop) < population and tries < max_tries:
        tries += 1
        c = {n: sample_config(rng) for n in names}
        if feasible(c):
            pop.append(c)
    history = []
    for _ in range(generations):
        ranked = sorted(pop, key=score)
        history.append(score(ranked[0]))
        elite = ranked[:parents]
        children, tries = [], 0
        while len(elite) + len(children) < population and tries < max_tries:
            tries += 1
            p1, p2 = rng.choice(elite), rng.choice(elite)
            child = {n: dict(p1[n] if rng.random() < 0.5 else p2[n]) for n in names}
            for n in names:
                for k, forms in FORMS.items():
                    if rng.random() < mutate_prob:
                        child[n][k] = rng.choice(forms)
            if feasible(child):
                children.append(child)
        pop = elite + children
    best = min(pop, key=score)
    history.append(score(best))
    set_configs(model, best)
    return SearchResult(best, score(best), config_params(model, best), history)


def finalize(model: nn.Module, configs: dict[str, dict] | None = None) -> dict[str, GLoRALinear]:
    """Replace each supernet layer by a :class:`GLoRALinear` with its config (default: the
    active one) and the supernet's trained tensors. Returns the new layers by name."""
    out = {}
    for n, layer in supernet_layers(model).items():
        new = layer.export(None if configs is None else configs[n])
        new.train(layer.training)
        _set_child(model, n, new)
        out[n] = new
    return out
