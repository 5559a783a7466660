"""Model surgery: replace matching ``nn.Linear``s (or transformers ``Conv1D``s, GPT-2) of any model
(Hugging Face or not) with adapter layers, with PEFT's target-module rules and no
per-architecture code; make a model trainable from a loaded adapter (:func:`inject_adapter`) and
fold every adapter layer back (:func:`merge_and_unload`)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from . import _validate as V
from ._conv1d import is_conv1d, is_linear_like, to_conv1d


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


def find_linears(model: nn.Module, target_modules, *, embeddings: bool = False) -> list[str]:
    """Names of the modules of ``model`` matched by ``target_modules``, all checked to be
    ``nn.Linear`` or transformers ``Conv1D`` (or ``nn.Embedding`` when ``embeddings``: embedding
    LoRA).

    Rules (PEFT's): a list matches a module whose full name equals an entry or ends with
    ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); a string is a
    regex that must match the full name. Raises ``ValueError`` if nothing matches and
    ``TypeError`` if a matched module is neither an ``nn.Linear`` nor a ``Conv1D``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    match = _matcher(target_modules)
    names = []
    for name, mod in model.named_modules():
        if not name or not match(name):
            continue
        if not (is_linear_like(mod) or (embeddings and isinstance(mod, nn.Embedding))):
            what = "nn.Linear / transformers Conv1D" + (" / nn.Embedding" if embeddings else "")
            raise TypeError(f"target_modules matched {name!r}, a {type(mod).__name__}; only "
                            f"{what} modules can be targeted (narrow target_modules)")
        names.append(name)
    if not names:
        some = [n for n, m in model.named_modules() if is_linear_like(m)][:8]
        raise ValueError(f"target_modules {target_modules!r} matched no module of the model "
                         f"(its linears include: {some})")
    return names


def check_base_weights(model: nn.Module, adapter) -> None:
    """``ValueError`` unless every base table ``adapter`` carries (``adapter.base_weights``, from
    :func:`lora_kernels.load_peft_adapter`: PEFT's ``save_embedding_layers``) equals the model's
    weight of that module (the file's values cast to the model's dtype); no-op for a plain
    dict."""
    for name, t in (getattr(adapter, "base_weights", None) or {}).items():
        mod = dict(model.named_modules()).get(name)
        if mod is None:
            raise ValueError(f"adapter carries a base weight for module {name!r}, which the model "
                             "does not have")
        w = getattr(mod, "base_layer", mod).weight
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"adapter carries a base weight for {name!r}, whose weight is "
                             f"{type(w).__name__} (a quantized base): cannot be compared")
        if is_conv1d(getattr(mod, "base_layer", mod)):
            w = w.t()
        if tuple(t.shape) != tuple(w.shape) or not torch.equal(t.to(w.device, w.dtype), w):
            raise ValueError(
                f"adapter carries its own base weight for {name!r} {tuple(t.shape)} (PEFT's "
                f"save_embedding_layers) that differs from the model's {tuple(w.shape)}: a "
                "resized or retrained vocabulary is not supported here; copy it into the model "
                "first")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (its parent must exist)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, method: str = "lora", target_modules=None, *,
           target_parameters=None, **method_kwargs):
    """Replace every ``nn.Linear`` (or transformers ``Conv1D``: the layer reads its weight through
    the transposed view, see :mod:`lora_kernels._conv1d`) of ``model`` matched by
    ``target_modules`` with ``METHODS[method].from_linear(linear, **method_kwargs)``, in place;
    return ``model``.

    ``method`` is a key of :data:`lora_kernels.METHODS` (``"lora"``, ...); ``method_kwargs`` are
    that layer's ``from_linear`` arguments (e.g. ``r=8, alpha=16`` for LoRA). All new layers are
    built before the first replacement, so a refused call (unknown method, nothing matched, a
    matched non-Linear, bad kwargs) leaves the model unchanged. With ``method="lora"`` a matched
    ``nn.Embedding`` becomes a :class:`~lora_kernels.LoRAEmbedding` (PEFT's embedding LoRA; the
    same ``r`` / ``alpha`` / ``use_rslora``, no dropout). Freezing the rest of the model is
    left to the caller (``model.requires_grad_(False)`` before injecting freezes all but the new
    adapter parameters). ``target_parameters`` (``method="lora"``; PEFT's rule): 3-D expert
    parameters of transformers experts modules (``["gate_up_proj", "down_proj"]``) get a LoRA per
    expert, the module becoming a :class:`lora_kernels.moe.LoRAExperts` (``r``, ``alpha``,
    ``use_rslora``); ``target_modules`` may then be None.
    """
    from .layers import METHODS

    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if target_modules is None and target_parameters is None:
        raise ValueError("target_modules is required (e.g. ['q_proj', 'v_proj'])")
    from .layers import LoRAEmbedding

    cls = METHODS[method]
    new = {}
    if target_parameters is not None:
        from .moe import inject_experts

        if method != "lora":
            raise ValueError(f"target_parameters takes method='lora', got {method!r}")
        new.update(inject_experts(model, target_parameters, **method_kwargs))
    names = ([] if target_modules is None else
             find_linears(model, target_modules, embeddings=method == "lora"))
    for name in names:
        mod = model.get_submodule(name)
        new[name] = (LoRAEmbedding.from_embedding(mod, **method_kwargs)
                     if isinstance(mod, nn.Embedding) else cls.from_linear(mod, **method_kwargs))
    for name, layer in new.items():
        set_submodule(model, name, layer)
    return model


def inject_adapter(model: nn.Module, adapter: Mapping, *, dropout: float = 0.0,
                   trainable: bool = True, backend: str | None = None) -> nn.Module:
    """Make ``model`` carry a loaded adapter as trainable :class:`~lora_kernels.LoRALinear` layers,
    in place; return ``model``.

    ``adapter``: ``{module name: (lora_A (r, in), lora_B (out, r), scaling)}`` (e.g.
    :func:`lora_kernels.load_peft_adapter`): each named ``nn.Linear`` / ``Conv1D`` becomes a
    ``LoRALinear`` of that module's own rank with that exact scaling (so per-module
    ``rank_pattern`` / ``alpha_pattern`` and rsLoRA's ``alpha / sqrt(r)`` carry over; ``alpha`` is
    recorded as ``scaling * r``) and the factors copied in (converted to the base weight's dtype
    and device). ``trainable=False`` freezes the factors. Everything is checked and built before
    the first replacement: a refused call (unknown module, non-linear module, shape mismatch)
    leaves the model unchanged. A DoRA entry (``DoRAFactors`` / a 4-tuple ``(lora_A, lora_B,
    scaling, magnitude)``, from a ``use_dora=True`` PEFT adapter) becomes a
    :class:`~lora_kernels.DoRALinear` with its magnitude copied in too. An ``nn.Embedding``
    module becomes a :class:`~lora_kernels.LoRAEmbedding`. A loaded PEFT adapter's biases
    (``lora_biases``: a trainable ``lora_bias``; ``base_biases``: the trained base biases, copied
    into the layer or, for a module without a LoRA, into the model's module) and tied pairs
    (``tied``, PEFT's ``ensure_weight_tying``: the linear's factors alias the embedding's,
    transposed) are applied too; base tables it carries must equal the model's.
    """
    from .layers import AdapterLinear, DoRALinear, LoRALinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(adapter, Mapping):
        raise TypeError("adapter must be a dict {module name: (lora_A, lora_B, scaling)}, got "
                        f"{type(adapter).__name__}")
    if not adapter:
        raise ValueError("adapter is empty")
    check_base_weights(model, adapter)
    from . import peft_extras
    from .moe import ExpertFactors, experts_from_adapter

    extras, alora = peft_extras.inject(model, adapter, trainable)
    mods = dict(model.named_modules())
    new = experts_from_adapter(model, {k: v for k, v in adapter.items()
                                       if isinstance(v, ExpertFactors)},
                               trainable=trainable, backend=backend)
    for name, entry in adapter.items():
        if isinstance(entry, ExpertFactors):
            continue
        mag = None
        if isinstance(entry, (tuple, list)) and len(entry) == 4:      # DoRA
            entry, mag = tuple(entry[:3]), entry[3]
        A, B, s = V.lora_triple(f"adapter[{name!r}]", entry)
        if name not in mods or not name:
            some = [n for n, m in mods.items() if is_linear_like(m)][:8]
            raise ValueError(f"adapter names module {name!r}, which the model does not have "
                             f"(its linears include: {some})")
        mod = mods[name]
        if isinstance(mod, AdapterLinear):
            raise TypeError(f"adapter[{name!r}]: the model's {name!r} is already an adapter "
                            f"layer ({type(mod).__name__}); merge_and_unload it first")
        if isinstance(mod, nn.Embedding):
            new[name] = _embedding_layer(name, mod, (A, B, s), mag, trainable, backend)
            continue
        if not is_linear_like(mod):
            raise TypeError(f"adapter[{name!r}]: the model's {name!r} is a "
                            f"{type(mod).__name__}, not an nn.Linear / Conv1D / nn.Embedding")
        w = mod.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if is_conv1d(mod) else tuple(w.shape)
        r = A.shape[0]
        if A.shape[1] != in_f or B.shape[0] != out_f:
            raise ValueError(f"adapter[{name!r}] maps {A.shape[1]} -> {B.shape[0]} features but "
                             f"the model's {name!r} maps {in_f} -> {out_f}")
        if not math.isfinite(s):
            raise ValueError(f"adapter[{name!r}]: scaling must be finite, got {s}")
        if mag is not None and (not isinstance(mag, torch.Tensor) or mag.dim() != 1
                                or mag.shape[0] != out_f or not mag.is_floating_point()):
            raise ValueError(f"adapter[{name!r}]: the DoRA magnitude must be a float ({out_f},) "
                             f"tensor, got {getattr(mag, 'shape', type(mag).__name__)}")
        cls = LoRALinear if mag is None else DoRALinear
        if alora is not None:
            cls = peft_extras.ALoRALinear
        layer = cls.from_linear(mod, r, alpha=s * r, dropout=dropout, backend=backend)
        layer.scaling = float(s)  # exact (alpha / r might not round-trip to the same float)
        with torch.no_grad():
            layer.lora_A.copy_(A.to(layer.lora_A.dtype))
            layer.lora_B.copy_(B.to(layer.lora_B.dtype))
            if mag is not None:
                layer.magnitude.copy_(mag.to(layer.magnitude.dtype))
        for prm in layer.parameters():
            if prm is not layer.weight and prm is not layer.bias:
                prm.requires_grad_(trainable)
        new[name] = layer
    copies = _adapter_biases(model, adapter, new, trainable)
    for lm, emb in (getattr(adapter, "tied", None) or {}).items():
        # PEFT's ensure_weight_tying: the linear's factors are the embedding's, transposed, in
        # the same storage (separate parameters, as PEFT: each gets its own gradient)
        if lm in new and emb in new and hasattr(new[emb], "num_embeddings"):
            new[lm].lora_A = nn.Parameter(new[emb].lora_B.detach().t(), requires_grad=trainable)
            new[lm].lora_B = nn.Parameter(new[emb].lora_A.detach().t(), requires_grad=trainable)
    for name, layer in new.items():
        set_submodule(model, name, layer)
    for name, mod in extras:       # trainable tokens, modules_to_save (peft_extras)
        set_submodule(model, name, mod)
    if alora is not None:
        peft_extras.set_alora(model, alora, [m for m in new.values()
                                             if isinstance(m, peft_extras.ALoRALinear)])
    for bias, b in copies:      # bias="all": trained biases of modules without a LoRA
        with torch.no_grad():
            bias.copy_(b.to(bias.dtype))
        bias.requires_grad_(trainable)
    return model


def _adapter_biases(model: nn.Module, adapter, new: dict, trainable: bool) -> list:
    """Apply a loaded adapter's biases (``adapter.lora_biases``: PEFT's ``lora_bias=True``;
    ``adapter.base_biases``: ``bias="lora_only" | "all"``) to the new layers ``new``; return the
    ``(model bias parameter, value)`` copies left for modules without a LoRA (done by the caller
    after every check passed). ``ValueError`` naming the module for a bias that fits nothing."""
    from .layers import LoRALinear

    for name, b in (getattr(adapter, "lora_biases", None) or {}).items():
        layer = new.get(name)
        if type(layer) is not LoRALinear:
            raise ValueError(f"adapter has a LoRA bias (lora_bias=True) for {name!r}, which is "
                             f"not a plain LoRA linear here ({type(layer).__name__})")
        if b.shape != (layer.out_features,):
            raise ValueError(f"adapter's LoRA bias for {name!r} has shape {tuple(b.shape)}; "
                             f"expected ({layer.out_features},)")
    copies = []
    mods = dict(model.named_modules())
    for name, b in (getattr(adapter, "base_biases", None) or {}).items():
        target = new.get(name, mods.get(name))
        bias = getattr(target, "bias", None)
        if not isinstance(bias, torch.Tensor) or bias.shape != b.shape:
            raise ValueError(f"adapter carries a trained bias {tuple(b.shape)} for {name!r} "
                             f"(PEFT bias='lora_only'/'all'), but the model's {name!r} has "
                             f"{'no bias' if bias is None else tuple(bias.shape)}")
        if name not in new:
            copies.append((bias, b))
    for name, b in (getattr(adapter, "lora_biases", None) or {}).items():
        new[name].add_lora_bias(b)
        new[name].lora_bias.requires_grad_(trainable)
    for name, b in (getattr(adapter, "base_biases", None) or {}).items():
        if name in new:
            old = new[name].bias
            new[name].bias = nn.Parameter(b.detach().to(old.device, old.dtype).clone(),
                                          requires_grad=trainable)
    return copies


def _embedding_layer(name: str, mod: nn.Embedding, factors, mag, trainable: bool,
                     backend: str | None) -> nn.Module:
    """A :class:`~lora_kernels.LoRAEmbedding` over ``mod`` carrying ``factors`` (``lora_A (r,
    num_embeddings)``, ``lora_B (dim, r)``, scaling; PEFT's ``lora_embedding_A/B``), checked
    against the table first."""
    from .layers import LoRAEmbedding

    A, B, s = factors
    if mag is not None:
        raise ValueError(f"adapter[{name!r}]: a DoRA embedding adapter is not supported")
    num, dim = mod.weight.shape
    if A.shape[1] != num:
        raise ValueError(f"adapter[{name!r}] is an embedding LoRA for a vocabulary of "
                         f"{A.shape[1]} tokens (lora_embedding_A {tuple(A.shape)}) but the model's "
                         f"{name!r} has num_embeddings={num}")
    if B.shape[0] != dim:
        raise ValueError(f"adapter[{name!r}] is an embedding LoRA of dim {B.shape[0]} (lora_"
                         f"embedding_B {tuple(B.shape)}) but the model's {name!r} has "
                         f"embedding_dim={dim}")
    if not math.isfinite(s):
        raise ValueError(f"adapter[{name!r}]: scaling must be finite, got {s}")
    r = A.shape[0]
    layer = LoRAEmbedding.from_embedding(mod, r, alpha=s * r, backend=backend)
    layer.scaling = float(s)
    with torch.no_grad():
        layer.lora_A.copy_(A.to(layer.lora_A.dtype))
        layer.lora_B.copy_(B.to(layer.lora_B.dtype))
    layer.lora_A.requires_grad_(trainable)
    layer.lora_B.requires_grad_(trainable)
    return layer


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter layer of ``model`` (any :class:`~lora_kernels.AdapterLinear`: LoRA,
    NoRA, CURLoRA, Deep LoRA, GLoRA, ...) into a plain ``nn.Linear`` (a ``Conv1D`` for layers
    built from one), in place; return ``model``. The merged weight is ``W + delta`` summed in
    float64 and rounded once to the base dtype (:meth:`AdapterLinear.merged`); requires_grad of
    the new base parameters follows the frozen base (False). ``ValueError`` if the model has no
    adapter layer (nothing is changed)."""
    from .layers import AdapterLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, AdapterLinear):
        raise TypeError("model is itself an adapter layer: use its merged() method")
    from .moe import LoRAExperts, merge_experts

    names = [n for n, m in model.named_modules() if n and isinstance(m, AdapterLinear)]
    if not names and not any(isinstance(m, LoRAExperts) for m in model.modules()):
        raise ValueError("model has no adapter layer to merge")
    merge_experts(model)
    new = {}
    for name in names:
        layer = model.get_submodule(name)
        lin = layer.merged()
        lin.requires_grad_(False)
        new[name] = to_conv1d(lin) if layer.fan_in_fan_out else lin
        new[name].requires_grad_(False)
        new[name].train(layer.training)
    for name, m in new.items():
        set_submodule(model, name, m)
    return model
