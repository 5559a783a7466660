"""One-call speed-up of an existing PEFT model: :func:`patch_peft` / :func:`unpatch_peft`.

``patch_peft(peft_model)`` swaps the ``forward`` of every PEFT LoRA ``Linear`` layer (base
``nn.Linear`` or transformers ``Conv1D``) for the fused :func:`lora_kernels.lora_linear`, in place
(Liger-Kernel style: an instance attribute ``forward`` shadows the class's). Nothing else changes:
the layer keeps PEFT's class, its ``lora_A`` / ``lora_B`` ``nn.Linear`` modules and their
parameters (read as they are: ``lora_A[name].weight (r, in)``, ``lora_B[name].weight (out, r)``,
PEFT's layout is ours), so the optimizer built on them, the training script, ``state_dict`` /
``save_pretrained`` and PEFT's own methods (``merge_and_unload``, ``set_adapter``,
``disable_adapter()``, ``delete_adapter``) keep working. ``unpatch_peft`` deletes the attribute.

Per call, the patched forward computes exactly PEFT's ``lora.Linear.forward``::

    y = base(x) + sum_{a in active adapters} scaling[a] * lora_B[a](lora_A[a](dropout[a](x)))

with the base GEMM and the first active adapter in one fused op (:func:`lora_kernels.dora_linear`
for a DoRA adapter, ``use_dora=True``, when it is the only active one; ``scaling[a]`` is PEFT's, so
rsLoRA's ``alpha / sqrt(r)`` and ``rank_pattern`` / ``alpha_pattern`` are whatever PEFT set;
``dropout[a]`` is PEFT's ``nn.Dropout``: its ``p`` goes to our fused dropout when that module is in
training mode; the masks come from our RNG stream, not ``nn.Dropout``'s, so with dropout > 0 a
patched model trains with the same distribution but not the same random draws). Further active
adapters are added with PEFT's own expression. It falls back to PEFT's original forward, per call,
whenever the fused op would not compute the same thing:

* adapters disabled (``with model.disable_adapter():``), merged (``merge_adapter()``), or a mixed
  batch (``adapter_names=``), or any extra forward argument;
* an active adapter that is a PEFT *variant* other than DoRA, a DoRA adapter active together
  with others or with a LoRA bias, a LoRA bias (``lora_bias=True``) on an adapter other than the
  first active one (the first one's ``scaling * lora_B.bias`` is folded into the fused op's
  bias; ``bias="lora_only" | "all"`` needs nothing: PEFT trains the base bias, the op gives its
  gradient);
* dtypes that differ between x, the base weight and the factors (e.g. PEFT's fp32 adapters on a
  bf16 base: PEFT computes that branch in fp32), or autocast enabled.

A DoRA adapter (``use_dora=True``), the only active one, runs on :func:`lora_kernels.dora_linear`
with PEFT's ``lora_magnitude_vector[a].weight``: the same output (PEFT's dropout semantics
included, ``ops.dora``) and gradients to ``lora_A``, ``lora_B`` and the magnitude.

QLoRA: a PEFT LoRA ``Linear`` (or PEFT's ``bnb.Linear4bit``, its class on CUDA; unverified on a
GPU) over a bitsandbytes NF4 ``Linear4bit`` runs on the fused op with the
packed NF4 codes read as they are (:meth:`lora_kernels.quant.NF4Weight.from_bnb`, cached, rebuilt
when PEFT replaces the base weight). PEFT LoRA ``Embedding`` layers over a plain
``nn.Embedding`` run on :func:`lora_kernels.lora_embedding` (:func:`_fused_embedding_forward`).
Layers that are not PEFT LoRA ``Linear``s over a plain ``nn.Linear`` / ``Conv1D`` / NF4
``Linear4bit`` or ``Embedding``s (convolution LoRA, 8-bit / GPTQ / HQQ bases) are left to PEFT;
one warning lists them, and the adapters that will always fall back.

MoE (``target_parameters``): a chain of PEFT ``ParamWrapper``s over a transformers 5 experts
module runs as one MoE block on :func:`lora_kernels.moe.experts_forward` (both expert GEMMs on
:func:`lora_kernels.moe_lora_linear` with PEFT's factors read per expert, one routing plan)
instead of PEFT's dense ``W + s B A`` of every expert on each forward
(:func:`_fused_experts_forward`).
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

from ._conv1d import conv1d_class

_FLAG = "_lora_kernels_patched"
_BACKEND = "_lora_kernels_backend"
_QW = "_lora_kernels_qweight"   # (bnb Params4bit, its data_ptr, NF4Weight) of a 4-bit base


def _peft_lora():
    """PEFT's ``peft.tuners.lora.layer`` module (PEFT must be installed: the model was built
    with it)."""
    import peft.tuners.lora.layer as L

    return L


def _plain_base(base) -> bool:
    """Whether ``base`` is a plain ``nn.Linear`` / ``Conv1D`` (no subclass overriding forward)
    or a bitsandbytes NF4 ``Linear4bit`` (an ``nn.Linear`` subclass; its packed weight is read
    as it is through :meth:`lora_kernels.quant.NF4Weight.from_bnb`)."""
    conv = conv1d_class()
    if conv is not None and isinstance(base, conv):
        return type(base).forward is conv.forward
    if _is_bnb4(base):
        return True
    return isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward


def _is_bnb4(base) -> bool:
    from .quant import is_bnb_linear4bit

    qs = getattr(getattr(base, "weight", None), "quant_state", None)
    return is_bnb_linear4bit(base) and getattr(qs, "quant_type", None) == "nf4"


def _base_weight(layer):
    """The ``(out, in)`` base weight the fused op reads: ``nn.Linear.weight``, a Conv1D's
    ``weight.t()`` view, or a bnb NF4 weight wrapped (codes referenced, not copied) and cached
    until the layer's base weight object or storage changes (PEFT's merge / unmerge re-quantise
    it). None when a bnb weight cannot be wrapped (e.g. repacked for bitsandbytes' CPU kernel):
    the caller then runs PEFT's forward."""
    base = layer.base_layer
    if not _is_bnb4(base):
        return base.weight if isinstance(base, nn.Linear) else base.weight.t()
    src = base.weight
    cache = getattr(layer, _QW, None)
    if cache is None or cache[0] is not src or cache[1] != src.data_ptr():
        from .quant import NF4Weight

        try:
            qw = NF4Weight.from_bnb(src)
        except ValueError:
            return None
        cache = (src, src.data_ptr(), qw)
        setattr(layer, _QW, cache)
    return cache[2]


def _is_dora(layer, adapter: str) -> bool:
    """Whether ``adapter`` of a PEFT LoRA layer is a plain DoRA adapter (``use_dora=True``: PEFT's
    ``DoraLinearVariant``), which :func:`lora_kernels.dora_linear` computes."""
    v = (getattr(layer, "lora_variant", {}) or {}).get(adapter)
    return (v is not None and (getattr(layer, "use_dora", {}) or {}).get(adapter, False)
            and getattr(v, "__name__", type(v).__name__) == "DoraLinearVariant"
            and adapter in getattr(layer, "lora_magnitude_vector", {}))


def _variant_adapters(layer) -> list[str]:
    """Adapters of a PEFT LoRA layer that the fused ops never compute (variants other than DoRA,
    DoRA with a LoRA bias)."""
    bad = {a for a, v in (getattr(layer, "lora_variant", {}) or {}).items()
           if not _is_dora(layer, a) and getattr(v, "__name__", type(v).__name__)
           != "ALoraLinearVariant"}   # aLoRA: peft_extras.patched_alora
    biased = {a for a, v in (getattr(layer, "lora_bias", {}) or {}).items() if v}
    biased |= {a for a, m in layer.lora_B.items() if getattr(m, "bias", None) is not None}
    bad |= {a for a in biased if _is_dora(layer, a)}
    return sorted(bad)


def _fused_forward(self, x, *args, **kwargs):
    """PEFT's ``lora.Linear.forward`` on the fused op (see the module docstring); ``self`` is the
    PEFT layer."""
    from .ops.lora import lora_linear

    orig = type(self).forward
    # aLoRA: PEFT passes alora_offsets to every LoRA layer (ignored by non-aLoRA adapters)
    alora = bool(kwargs) and set(kwargs) == {"alora_offsets"}
    if ((args or kwargs) and not alora) or self.disable_adapters or self.merged \
            or torch.is_autocast_enabled(x.device.type):
        return orig(self, x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    base = self.base_layer
    if not active:
        return base(x)
    variants = getattr(self, "lora_variant", {}) or {}
    lora_bias = getattr(self, "lora_bias", {}) or {}
    W = _base_weight(self)   # Conv1D: the (out, in) view; bnb 4-bit: the wrapped NF4 codes
    if W is None:
        return orig(self, x, **kwargs)
    b = base.bias
    if alora:
        from .peft_extras import patched_alora

        y = (patched_alora(self, x, kwargs["alora_offsets"], W, active[0],
                           getattr(self, _BACKEND)) if len(active) == 1 else None)
        if y is not None:
            return y
        if any(a in variants for a in active):
            return orig(self, x, **kwargs)
    # DoRA: fused only as the one active adapter (PEFT feeds a second adapter's DoRA term the
    # running result, earlier adapters included, as its "base" output)
    dora = len(active) == 1 and _is_dora(self, active[0])
    for a in active:
        A, B = self.lora_A[a].weight, self.lora_B[a].weight
        lb = self.lora_B[a].bias
        if ((a in variants and not dora)
                or ((lora_bias.get(a, False) or lb is not None) and (dora or a != active[0]))
                or (lb is not None and lb.dtype != x.dtype)
                or A.dtype != x.dtype or B.dtype != x.dtype or W.dtype != x.dtype
                or (b is not None and b.dtype != x.dtype)):
            return orig(self, x)
    first, rest = active[0], active[1:]

    def p_of(a):
        d = self.lora_dropout[a]
        return float(d.p) if isinstance(d, nn.Dropout) and d.training else 0.0

    if dora:
        from .ops.dora import dora_linear

        if not isinstance(W, torch.Tensor):   # DoRA over a 4-bit base: PEFT's forward
            return orig(self, x)

        mag = self.lora_magnitude_vector[first].weight
        if mag.dtype != x.dtype:
            return orig(self, x)
        return dora_linear(x, W, b, self.lora_A[first].weight, self.lora_B[first].weight, mag,
                           float(self.scaling[first]), p_of(first),
                           backend=getattr(self, _BACKEND))

    lb = self.lora_B[first].bias      # lora_bias=True: y += scaling * lora_B.bias, fused
    if lb is not None:
        lb = lb * float(self.scaling[first])
        b = lb if b is None else b + lb
    y = lora_linear(x, W, b, self.lora_A[first].weight, self.lora_B[first].weight,
                    float(self.scaling[first]), p_of(first), backend=getattr(self, _BACKEND))
    for a in rest:  # PEFT's own expression for the further active adapters
        y = y + self.lora_B[a](self.lora_A[a](self.lora_dropout[a](x))) * self.scaling[a]
    return y


def _param_chain(layer) -> tuple[list, nn.Module]:
    """``([ParamWrapper, ...] outermost first, the wrapped module)`` of a PEFT ParamWrapper."""
    chain = [layer]
    while type(chain[-1].base_layer).__name__ == "ParamWrapper":
        chain.append(chain[-1].base_layer)
    return chain, chain[-1].base_layer


def _fused_experts_forward(self, hidden, top_k_index=None, top_k_weights=None, *args, **kwargs):
    """PEFT's ParamWrapper chain over a transformers experts module (``target_parameters``) on
    :func:`lora_kernels.moe.experts_forward`: per wrapper, PEFT's ``lora_A (r E, in)`` /
    ``lora_B (out, r E)`` read as ``(E, r, in)`` / ``(E, out, r)`` (:mod:`lora_kernels.peft_moe`;
    gradients flow back to PEFT's parameters); ``self`` is the outermost wrapper. PEFT's own
    forward (the dense ``W + s B A`` per expert) whenever not exactly one adapter is active per
    wrapper, adapters are disabled or merged, dtypes differ, or extra arguments are given."""
    from .moe import experts_forward
    from .peft_moe import to_experts

    orig = type(self).forward
    if (args or kwargs or top_k_index is None or top_k_weights is None
            or torch.is_autocast_enabled(hidden.device.type)):
        return orig(self, hidden, top_k_index, top_k_weights, *args, **kwargs)
    chain, experts = _param_chain(self)
    factors = {}
    for w in chain:
        active = [a for a in w.active_adapters if a in w.lora_A]
        if w.disable_adapters or w.merged or len(active) > 1:
            return orig(self, hidden, top_k_index, top_k_weights)
        if not active:
            continue
        a = active[0]
        A2, B2 = w.lora_A[a].weight, w.lora_B[a].weight
        if A2.dtype != hidden.dtype or B2.dtype != hidden.dtype or w.get_param().dtype != (
                hidden.dtype) or w.lora_B[a].bias is not None:
            return orig(self, hidden, top_k_index, top_k_weights)
        factors[w.parameter_name] = (*to_experts(A2, B2, w.r[a]), float(w.scaling[a]))
    return experts_forward(experts, factors, hidden, top_k_index, top_k_weights,
                           backend=getattr(self, _BACKEND, None))


def _plain_embedding(base) -> bool:
    """A plain ``nn.Embedding`` whose lookup :func:`lora_kernels.lora_embedding` reproduces (no
    forward override, no max_norm renormalisation, no gradient rescaling, dense gradients)."""
    return (isinstance(base, nn.Embedding) and type(base).forward is nn.Embedding.forward
            and base.max_norm is None and not base.scale_grad_by_freq and not base.sparse)


def _fused_embedding_forward(self, x, *args, **kwargs):
    """PEFT's ``lora.Embedding.forward`` (``y = base(x) + sum_a scaling[a] * F.embedding(x,
    A_a^T) B_a^T``) with the lookup and the first active adapter on
    :func:`lora_kernels.lora_embedding`; PEFT's own forward whenever that would differ
    (disabled / merged adapters, ``adapter_names=`` or other arguments, variants, an embed
    scale (Gemma), tensor-parallel hooks, dtypes unlike the table's, autocast)."""
    from .ops.embedding import lora_embedding

    orig = type(self).forward
    if (args or kwargs or self.disable_adapters or self.merged
            or torch.is_autocast_enabled(x.device.type)):
        return orig(self, x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.lora_embedding_A]
    base = self.base_layer
    if not active:
        return base(x)
    W = base.weight
    scale_fn = getattr(self, "_get_embed_scale", None)
    for a in active:
        if (a in (getattr(self, "lora_variant", {}) or {})
                or a in (getattr(self, "input_fns", {}) or {})
                or self.lora_embedding_A[a].dtype != W.dtype
                or self.lora_embedding_B[a].dtype != W.dtype
                or (scale_fn is not None and scale_fn() is not None)):
            return orig(self, x)
    first = active[0]
    y = lora_embedding(x, W, self.lora_embedding_A[first], self.lora_embedding_B[first],
                       float(self.scaling[first]), padding_idx=base.padding_idx,
                       backend=getattr(self, _BACKEND))
    for a in active[1:]:   # PEFT's own expression for the further active adapters
        y = y + (self._embed(x, self.lora_embedding_A[a].T) @ self.lora_embedding_B[a].T
                 * self.scaling[a])
    return y


def patch_peft(peft_model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Run every PEFT LoRA ``Linear`` layer of ``peft_model`` on the fused LoRA op, in place;
    return ``peft_model`` (see the module docstring for exactly what is fused and what falls back
    to PEFT per call).

    ``backend`` is passed to :func:`lora_kernels.lora_linear` (``None``: the default for the
    tensors' device). Patching twice is harmless (the backend is updated). ``TypeError`` if
    ``peft_model`` is not an ``nn.Module``; ``ValueError`` if it has no PEFT LoRA layer that can
    be patched (nothing is changed). One warning lists the LoRA layers left to PEFT and the
    adapters that will always fall back to PEFT's forward.
    """
    from ._backend import BACKENDS

    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be an nn.Module (a PEFT model), got "
                        f"{type(peft_model).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {list(BACKENDS)}, got {backend!r}")
    from .moe import is_experts

    L = _peft_lora()
    targets, left, partial = [], [], []
    inner = {id(m.base_layer) for m in peft_model.modules()
             if type(m).__name__ == "ParamWrapper"}
    tokens = []     # PEFT's TrainableTokensLayer: peft_extras.patched_tokens_forward
    for name, m in peft_model.named_modules():
        if type(m).__name__ == "TrainableTokensLayer":
            tokens.append(m)
        if not isinstance(m, L.LoraLayer):
            continue
        if type(m).__name__ == "ParamWrapper" and is_experts(_param_chain(m)[1]):
            if id(m) not in inner:          # the outermost wrapper runs the whole chain
                targets.append(m)
            continue
        peft_bnb4 = (type(m).__name__ == "Linear4bit"
                     and type(m).__module__ == "peft.tuners.lora.bnb")  # PEFT's CUDA QLoRA class
        if type(m) is L.Embedding and _plain_embedding(m.base_layer):
            targets.append(m)
        elif (type(m) is L.Linear or peft_bnb4) and _plain_base(m.base_layer):
            targets.append(m)
            bad = _variant_adapters(m)
            if bad:
                partial.append(f"{name} (adapters {bad})")
        else:
            base = getattr(m, "base_layer", None)
            left.append(f"{name} ({type(m).__name__} over {type(base).__name__})")
    if not targets:
        raise ValueError("peft_model has no PEFT LoRA Linear layer over an nn.Linear / Conv1D "
                         f"to patch (LoRA layers found: {left or 'none'})")
    for m in targets + tokens:
        setattr(m, _BACKEND, backend)
        if not getattr(m, _FLAG, False):
            from . import peft_extras

            fwd = (peft_extras.patched_tokens_forward if any(m is t for t in tokens) else
                   _fused_embedding_forward if type(m) is L.Embedding else
                   _fused_experts_forward if type(m).__name__ == "ParamWrapper" else
                   _fused_forward)
            m.forward = types.MethodType(fwd, m)
            setattr(m, _FLAG, True)
    if left or partial:
        msg = [f"patch_peft: {len(targets)} LoRA layer(s) run on lora_kernels"]
        if left:
            msg.append(f"{len(left)} left to PEFT (not fusable): {left}")
        if partial:
            msg.append("these adapters always run PEFT's forward (variants other than DoRA, "
                       f"DoRA with a LoRA bias): {partial}")
        warnings.warn("; ".join(msg), stacklevel=2)
    return peft_model


def unpatch_peft(peft_model: nn.Module) -> nn.Module:
    """Undo :func:`patch_peft`: every patched layer runs PEFT's own forward again; return
    ``peft_model``. ``ValueError`` if nothing in it is patched."""
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be an nn.Module (a PEFT model), got "
                        f"{type(peft_model).__name__}")
    patched = [m for m in peft_model.modules() if getattr(m, _FLAG, False)]
    if not patched:
        raise ValueError("peft_model has no layer patched by lora_kernels.patch_peft")
    for m in patched:
        del m.forward
        delattr(m, _FLAG)
        delattr(m, _BACKEND)
        if hasattr(m, _QW):
            delattr(m, _QW)
    return peft_model


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` (a PEFT LoRA layer) runs on lora_kernels."""
    return bool(getattr(module, _FLAG, False))
