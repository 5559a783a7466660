"""MoE blocks: LoRA on the 3-D expert parameters of transformers 5 experts modules.

transformers 5 keeps a layer's experts as 3-D parameters in one module whose forward is
``experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``; the block around
it (router, top-k, shared expert) is left as it is. Layouts (``is_transposed``, PEFT's flag):

* Qwen3-MoE / Qwen2-MoE / Mixtral: ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``:
  ``(E, out, in)``; ``act(gate) * up`` with ``gate, up = h.chunk(2)``; no biases.
* gpt-oss (``is_transposed=True``): ``gate_up_proj (E, H, 2I)``, ``down_proj (E, I, H)``:
  ``(E, in, out)``, read through the view ``W.transpose(1, 2)`` (never copied); per-expert
  biases ``gate_up_proj_bias (E, 2I)``, ``down_proj_bias (E, H)``; the module's own
  ``_apply_gate`` (interleaved gate/up, clamped sigmoid GLU).

:class:`LoRAExperts` replaces such a module: with rows ``x_j = hidden[t]`` for each token t and
its k choices (``j = t k + i``, expert ``e_j = top_k_index[t, i]``), one expert plan (a sort of
the T k rows by expert) is shared by both expert GEMMs (:func:`lora_kernels.moe_lora_linear`):

    h_j = x_j Wgu_e^T + bgu_e + s_gu x_j Agu_e^T Bgu_e^T         (T k, 2I)
    a_j = act(h_j)                                               (T k, I)
    o_j = a_j Wd_e^T + bd_e + s_d a_j Ad_e^T Bd_e^T              (T k, H)
    y_t = sum_i top_k_weights[t, i] o_{t k + i}                  (T, H)

LoRA factors per targeted parameter, per expert: ``lora_A (E, r, in)``, ``lora_B (E, out, r)``
(PEFT's ``ParamWrapper`` stores the same numbers as ``lora_A (r E, in)`` expert-major rows and
``lora_B (out, r E)`` rank-major columns: :mod:`lora_kernels.peft_moe` converts). The delta of
parameter P is ``s B_e A_e`` in the ``(E, out, in)`` orientation, transposed for
``is_transposed`` modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from . import _validate as V
from .ops.moe_lora import expert_plan, moe_lora_linear
from .quant import QuantizedExperts

#: the 3-D expert parameters a LoRA can target, in transformers' registration order (PEFT nests
#: its wrappers in that order: the first registered one innermost)
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


class ExpertFactors(NamedTuple):
    """LoRA on one 3-D expert parameter: ``lora_A (E, r, in)``, ``lora_B (E, out, r)``,
    ``scaling``; expert e's delta is ``scaling * lora_B[e] @ lora_A[e]`` (``(out, in)``)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float


def is_experts(mod: nn.Module) -> bool:
    """True for a transformers 5 experts module (3-D ``gate_up_proj`` and ``down_proj``)."""
    return all(isinstance(getattr(mod, p, None), torch.Tensor) and getattr(mod, p).dim() == 3
               for p in EXPERT_PARAMS) and not isinstance(mod, LoRAExperts)


def expert_dims(mod: nn.Module, param: str) -> tuple[int, int, int]:
    """``(E, in, out)`` of the GEMM of expert parameter ``param`` of experts module ``mod``."""
    w = getattr(mod, param)
    if isinstance(w, QuantizedExperts):      # always stored (E, out, in), either layout
        E, out_f, in_f = w.shape
        return E, in_f, out_f
    E, a, b = w.shape
    return (E, a, b) if getattr(mod, "is_transposed", False) else (E, b, a)


def _weight_view(mod: nn.Module, param: str) -> torch.Tensor:
    """``(E, out, in)`` view of the expert parameter (no copy)."""
    w = getattr(mod, param)
    if isinstance(w, QuantizedExperts):
        return w
    return w.transpose(1, 2) if getattr(mod, "is_transposed", False) else w


def find_expert_params(model: nn.Module, target_parameters) -> dict[str, list[str]]:
    """``{experts module name: [targeted parameter names]}`` by PEFT's rule: parameter ``p`` of
    module ``m`` is targeted when ``f"{m}.{p}"`` equals an entry or ends with ``"." + entry``.
    ``ValueError`` naming the entries if nothing matches or an entry matches a parameter that is
    not a 3-D expert parameter of a transformers experts module."""
    if isinstance(target_parameters, str) or not isinstance(target_parameters, (list, tuple,
                                                                                set)):
        raise TypeError(f"target_parameters must be a list of parameter names, got "
                        f"{type(target_parameters).__name__}")
    targets = sorted(set(target_parameters))
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_parameters must be non-empty strings, got {target_parameters!r}")
    found: dict[str, list[str]] = {}
    wrapped = {f"{n}.base_layer" for n, m in model.named_modules() if isinstance(m, LoRAExperts)}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            key = f"{mname}.{pname}" if mname else pname
            if not any(key == t or key.endswith("." + t) for t in targets):
                continue
            if mname in wrapped:
                raise TypeError(f"target_parameters match {key!r}, whose experts module already "
                                "carries a LoRA (LoRAExperts); merge_and_unload it first")
            if not is_experts(mod) or pname not in EXPERT_PARAMS:
                raise ValueError(f"target_parameters {targets} match {key!r}, which is not a 3-D "
                                 f"expert parameter ({'/'.join(EXPERT_PARAMS)}) of a transformers "
                                 f"experts module ({type(mod).__name__})")
            found.setdefault(mname, []).append(pname)
    if not found:
        some = [n for n, m in model.named_modules() if is_experts(m)][:4]
        raise ValueError(f"target_parameters {targets} name no parameter of the model (its "
                         f"experts modules: {some}, parameters {list(EXPERT_PARAMS)})")
    return found


class LoRAExperts(nn.Module):
    """A transformers experts module with LoRA on some of its 3-D expert parameters.

    ``base_layer`` is the original module (its parameters, biases, activation and
    ``is_transposed`` flag are used as they are); ``lora_A[p] (E, r, in)``, ``lora_B[p] (E, out,
    r)`` and ``scaling[p]`` per targeted parameter ``p``. ``forward(hidden (T, H), top_k_index
    (T, k), top_k_weights (T, k)) -> (T, H)`` as the base module's (index ``E``, transformers'
    mask id, and ``-1`` are skipped choices).

    ``quantize``: freeze the base experts quantized (QLoRA on experts; CPU / torch path only:
    ``moe_lora_linear`` runs quantized experts on ``backend='torch'``). ``"nf4"`` (``blocksize``
    64 default), ``"int8"`` (per output channel), ``"fp8"`` (per output channel, or per 128x128
    block with ``block_size=128``): both ``gate_up_proj`` and ``down_proj`` are quantized expert by
    expert in the ``(E, out, in)`` orientation (gpt-oss's ``(E, in, out)`` parameters are
    transposed once before quantizing) by :meth:`QuantizedExperts.from_float`. Or a mapping
    ``{param: QuantizedExperts (E, out, in)}`` of already quantized experts. The dense parameter is
    then replaced in ``base_layer`` by its :class:`~lora_kernels.quant.QuantizedExperts` (a
    submodule of buffers); biases stay dense. The LoRA factors take the dense weight's dtype.
    ``ValueError`` for an unknown format or quantized experts of another shape (layout) than
    ``(E, out, in)`` of the parameter."""

    def __init__(self, base: nn.Module, params, r: int = 8, alpha: float = 8.0, *,
                 use_rslora: bool = False, backend: str | None = None,
                 quantize: str | Mapping | None = None, blocksize: int = 64,
                 block_size: int | None = None):
        super().__init__()
        if not is_experts(base):
            raise TypeError(f"base must be a transformers experts module (3-D gate_up_proj / "
                            f"down_proj), got {type(base).__name__}")
        params = list(params)
        if not params or any(p not in EXPERT_PARAMS for p in params):
            raise ValueError(f"params must be a non-empty subset of {list(EXPERT_PARAMS)}, got "
                             f"{params}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        alpha = V.scalar("alpha", alpha)
        qweights = _quantized_weights(base, quantize, blocksize, block_size)
        if qweights and backend not in (None, "torch"):
            raise ValueError(f"quantized experts run on backend='torch' only, got "
                             f"backend={backend!r}")
        self.base_layer = base
        self.backend = backend
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        w0 = getattr(base, params[0])
        for p in params:
            E, in_f, out_f = expert_dims(base, p)
            A = torch.empty(E, r, in_f, device=w0.device, dtype=w0.dtype)
            # PEFT's init of its lora_A = nn.Linear(in, r E): kaiming_uniform(a=sqrt 5), i.e.
            # U(-1/sqrt(in), 1/sqrt(in)); lora_B zero, so the adapter starts as the identity
            nn.init.uniform_(A, -1 / math.sqrt(in_f), 1 / math.sqrt(in_f))
            self.lora_A[p] = nn.Parameter(A)
            self.lora_B[p] = nn.Parameter(torch.zeros(E, out_f, r, device=w0.device,
                                                      dtype=w0.dtype))
            self.scaling[p] = alpha / (math.sqrt(r) if use_rslora else r)
        for p, q in qweights.items():    # checks passed: replace the dense parameter
            delattr(base, p)
            setattr(base, p, q)
        if qweights:
            self.backend = "torch"

    @property
    def num_experts(self) -> int:
        return getattr(self.base_layer, EXPERT_PARAMS[0]).shape[0]

    def factors(self) -> dict[str, ExpertFactors]:
        """``{param: ExpertFactors}`` (the live parameters)."""
        return {p: ExpertFactors(self.lora_A[p], self.lora_B[p], self.scaling[p])
                for p in self.lora_A}

    def set_factors(self, param: str, f: ExpertFactors, *, name: str = "factors") -> None:
        """Copy ``f`` into the factors of ``param`` (rank may differ: the parameters are
        replaced). ``ValueError`` naming ``name`` if the shapes do not fit this module."""
        A, B, s = check_factors(name, self.base_layer, param, f)
        w = getattr(self.base_layer, param)
        self.lora_A[param] = nn.Parameter(A.detach().to(w.device, w.dtype).clone())
        self.lora_B[param] = nn.Parameter(B.detach().to(w.device, w.dtype).clone())
        self.scaling[param] = s

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(self.base_layer, self.factors(), hidden_states, top_k_index,
                               top_k_weights, backend=self.backend)

    def merged(self) -> nn.Module:
        """The base experts module with every LoRA folded in (``W_e + s B_e A_e`` summed in
        float64, rounded once to the weight's dtype): the base module, its targeted parameters
        replaced by new frozen ones."""
        base = self.base_layer
        for p in self.lora_A:
            w = getattr(base, p)
            if isinstance(w, QuantizedExperts):     # (E, out, in): folded into deq(W) dense
                d = torch.einsum("eor,eri->eoi", self.lora_B[p].detach().double(),
                                 self.lora_A[p].detach().double()) * self.scaling[p]
                new = (w.double() + d).to(self.lora_A[p].dtype)
                if getattr(base, "is_transposed", False):
                    new = new.transpose(1, 2).contiguous()
                delattr(base, p)
                setattr(base, p, nn.Parameter(new, requires_grad=False))
                continue
            d = torch.einsum("eor,eri->eoi", self.lora_B[p].detach().double(),
                             self.lora_A[p].detach().double()) * self.scaling[p]
            if getattr(base, "is_transposed", False):
                d = d.transpose(1, 2)
            new = (w.detach().double() + d).to(w.dtype)
            setattr(base, p, nn.Parameter(new, requires_grad=False))
        return base

    def extra_repr(self) -> str:
        return ", ".join(f"{p}: r={self.lora_A[p].shape[1]}, scaling={self.scaling[p]:g}"
                         for p in self.lora_A)


def _quantized_weights(base: nn.Module, quantize, blocksize: int, block_size) -> dict:
    """``{param: QuantizedExperts (E, out, in)}`` for ``LoRAExperts(quantize=...)``, checked."""
    if quantize is None:
        return {}
    if isinstance(quantize, str):
        if quantize not in ("nf4", "int8", "fp8"):
            raise ValueError(f"quantize must be 'nf4', 'int8', 'fp8' or a mapping {{param: "
                             f"QuantizedExperts}}, got {quantize!r}")
        return {p: QuantizedExperts.from_float(_weight_view(base, p).detach(), quantize,
                                               blocksize=blocksize, block_size=block_size,
                                               dtype=getattr(base, p).dtype)
                for p in EXPERT_PARAMS}
    if not isinstance(quantize, Mapping):
        raise TypeError(f"quantize must be a format name or a mapping {{param: "
                        f"QuantizedExperts}}, got {type(quantize).__name__}")
    out = {}
    for p, q in quantize.items():
        if p not in EXPERT_PARAMS:
            raise ValueError(f"quantize names {p!r}; expert parameters are {list(EXPERT_PARAMS)}")
        if not isinstance(q, QuantizedExperts):
            raise TypeError(f"quantize[{p!r}] must be a lora_kernels.quant.QuantizedExperts, got "
                            f"{type(q).__name__}")
        E, in_f, out_f = expert_dims(base, p)
        if tuple(q.shape) != (E, out_f, in_f):
            raise ValueError(f"quantize[{p!r}] holds experts {tuple(q.shape)}; the model's {p} "
                             f"{tuple(getattr(base, p).shape)} needs (E={E}, out={out_f}, "
                             f"in={in_f}) (quantized experts are always (E, out, in), also for "
                             f"is_transposed layouts: quantize W.transpose(1, 2))")
        out[p] = q
    return out


def _gemm(base: nn.Module, factors: Mapping, p: str, x: torch.Tensor, plan, backend):
    w = _weight_view(base, p)
    b = getattr(base, p + "_bias", None)
    lids = None
    if p in factors:
        A, B, s, *rest = factors[p]
        lids = rest[0] if rest else None
    else:   # a parameter without LoRA: rank-1 zero factors (E (in + out) numbers)
        E, out_f, in_f = w.shape
        A = x.new_zeros(E, 1, in_f)
        B = x.new_zeros(E, out_f, 1)
        s = 0.0
    return moe_lora_linear(x, w, b, A, B, plan, s, lora_ids=lids, backend=backend)


def experts_forward(base: nn.Module, factors: Mapping, hidden: torch.Tensor,
                    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *,
                    backend: str | None = None) -> torch.Tensor:
    """The MoE-LoRA experts computation (module docstring) of transformers experts module
    ``base`` with ``factors`` ``{param: (lora_A (E, r, in), lora_B (E, out, r), scaling)}``
    (parameters without an entry: base only), or ``{param: (lora_A (L, r, in), lora_B (L, out,
    r), scaling, lora_ids (T k,))}``: row j's factor set ``lora_ids[j]`` (-1: base only; see
    ``moe_lora_linear(lora_ids=...)``; serving). ``hidden (T, H)``, ``top_k_index (T, k)``,
    ``top_k_weights (T, k)`` -> ``(T, H)`` in hidden's dtype."""
    E = base.gate_up_proj.shape[0]
    V.float_tensor("hidden_states", hidden, ndim=2)
    if top_k_index.dim() != 2 or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(f"top_k_index must be (T, k) with T={hidden.shape[0]}, got "
                         f"{tuple(top_k_index.shape)}")
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(f"top_k_weights must have top_k_index's shape "
                         f"{tuple(top_k_index.shape)}, got {tuple(top_k_weights.shape)}")
    T, H = hidden.shape
    k = top_k_index.shape[1]
    ids = top_k_index.reshape(-1)
    ids = torch.where(ids == E, -1, ids)    # transformers' mask id E (expert parallel): skipped
    plan = expert_plan(ids, E)
    x = hidden.unsqueeze(1).expand(T, k, H).reshape(T * k, H)   # row j = t k + i
    h = _gemm(base, factors, "gate_up_proj", x, plan, backend)
    if hasattr(base, "_apply_gate"):                             # gpt-oss
        a = base._apply_gate(h)
    else:
        gate, up = h.chunk(2, dim=-1)
        a = base.act_fn(gate) * up
    o = _gemm(base, factors, "down_proj", a, plan, backend)
    y = (o.view(T, k, -1) * top_k_weights.to(o.dtype).unsqueeze(-1)).sum(1)
    return y.to(hidden.dtype)


def check_factors(name: str, base: nn.Module, param: str, f) -> tuple:
    """``(lora_A, lora_B, scaling)`` of ``f`` checked against expert parameter ``param`` of
    ``base``: ``ValueError`` naming ``name`` for another expert count, rank or layout."""
    if not (isinstance(f, (tuple, list)) and len(f) == 3):
        raise TypeError(f"{name} must be ExpertFactors(lora_A (E, r, in), lora_B (E, out, r), "
                        f"scaling), got {type(f).__name__}")
    A, B, s = f
    V.float_tensor(f"{name}.lora_A", A, ndim=3)
    V.float_tensor(f"{name}.lora_B", B, ndim=3)
    E, in_f, out_f = expert_dims(base, param)
    if A.shape[0] != E or B.shape[0] != E:
        raise ValueError(f"{name} holds factors for {A.shape[0]} experts (lora_A "
                         f"{tuple(A.shape)}, lora_B {tuple(B.shape)}) but the model's {param} has "
                         f"E={E} experts")
    r = A.shape[1]
    if r < 1 or tuple(A.shape) != (E, r, in_f) or tuple(B.shape) != (E, out_f, r):
        raise ValueError(f"{name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; the "
                         f"model's {param} {tuple(getattr(base, param).shape)} needs "
                         f"(E={E}, r, in={in_f}) and (E={E}, out={out_f}, r) (another layout?)")
    s = V.scalar(f"{name}.scaling", s)
    if not math.isfinite(s):
        raise ValueError(f"{name}: scaling must be finite, got {s}")
    return A, B, s


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_experts(model: nn.Module, target_parameters, *, r: int = 8, alpha: float = 8.0,
                   use_rslora: bool = False, backend: str | None = None, **unused) -> dict:
    """Build :class:`LoRAExperts` layers for every experts module whose parameters
    ``target_parameters`` names (PEFT's rule, :func:`find_expert_params`); return ``{module
    name: layer}`` without installing them (the caller replaces once every check passed).
    ``unused``: refused keyword arguments (dropout, DoRA, ...: PEFT refuses them on expert
    parameters too)."""
    bad = {k: v for k, v in unused.items() if v not in (None, 0, 0.0, False)}
    if bad:
        raise ValueError(f"LoRA on expert parameters (target_parameters) takes r, alpha and "
                         f"use_rslora only (as PEFT's ParamWrapper: no dropout / DoRA / "
                         f"lora_bias), got {bad}")
    found = find_expert_params(model, target_parameters)
    return {name: LoRAExperts(model.get_submodule(name), params, r, alpha,
                              use_rslora=use_rslora, backend=backend)
            for name, params in found.items()}


def experts_from_adapter(model: nn.Module, entries: Mapping, *, trainable: bool = True,
                         backend: str | None = None) -> dict:
    """``{experts module name: LoRAExperts}`` for adapter entries ``{"<module>.<param>":
    ExpertFactors}`` (e.g. from :func:`lora_kernels.load_peft_adapter`), built and checked, not
    installed. ``ValueError`` naming the entry for a parameter the model lacks or factors of
    another expert count / layout."""
    mods = dict(model.named_modules())
    by_mod: dict[str, dict[str, ExpertFactors]] = {}
    for key, f in entries.items():
        mname, _, p = key.rpartition(".")
        mod = mods.get(mname)
        if mod is None or not mname or p not in EXPERT_PARAMS or not (
                is_experts(mod) or isinstance(mod, LoRAExperts)):
            some = [n for n, m in mods.items() if is_experts(m)][:4]
            raise ValueError(f"adapter names expert parameter {key!r}, which the model does not "
                             f"have (its experts modules: {some}, parameters "
                             f"{list(EXPERT_PARAMS)})")
        if isinstance(mod, LoRAExperts):
            raise TypeError(f"adapter[{key!r}]: the model's {mname!r} already carries a LoRA "
                            "(LoRAExperts); merge_and_unload it first")
        check_factors(f"adapter[{key!r}]", mod, p, f)
        by_mod.setdefault(mname, {})[p] = f
    out = {}
    for mname, fs in by_mod.items():
        layer = LoRAExperts(mods[mname], list(fs), 1, 1.0, backend=backend)
        for p, f in fs.items():
            layer.set_factors(p, f, name=f"adapter[{mname + '.' + p!r}]")
        for prm in (*layer.lora_A.values(), *layer.lora_B.values()):
            prm.requires_grad_(trainable)
        out[mname] = layer
    return out


def expert_entries(model: nn.Module) -> dict[str, ExpertFactors]:
    """``{"<module>.<param>": ExpertFactors}`` of every :class:`LoRAExperts` of ``model``
    (detached)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRAExperts):
            for p, (A, B, s) in m.factors().items():
                out[f"{name}.{p}"] = ExpertFactors(A.detach(), B.detach(), s)
    return out


def merge_experts(model: nn.Module) -> list[str]:
    """Fold every :class:`LoRAExperts` of ``model`` into its base experts module, in place;
    return their names."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, LoRAExperts)]
    merged = {n: model.get_submodule(n).merged() for n in names}
    for n, base in merged.items():
        _set(model, n, base)
    return names
