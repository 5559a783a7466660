"""PEFT's ``target_parameters`` LoRA (its ``ParamWrapper``) on 3-D expert parameters, both ways.

PEFT stores LoRA on expert parameter ``W`` (E experts, rank r) of module ``m`` as

    lora_A (r E, in)   rows expert-major:   lora_A[e r + j] = A_e[j]
                       A = lora_A.view(E, r, in)
    lora_B (out, r E)  columns rank-major:  lora_B[:, j E + e] = B_e[:, j]
                       B = lora_B.view(out, r, E).permute(2, 0, 1)

with ``in`` / ``out`` the GEMM's (from the module's ``is_transposed``: ``(E, in, out)`` when
set, ``(E, out, in)`` otherwise); delta ``s B_e A_e``. Keys: ``base_model.model.<m>.lora_A.weight``
for the outermost wrapper; when several parameters of one module are targeted the wrappers nest,
the first registered parameter innermost (``gate_up_proj`` before ``down_proj``), and a wrapper at
depth d has d ``.base_layer`` in its key (the key never names the parameter). ``rank_pattern`` /
``alpha_pattern`` keys are matched against ``<m>.<parameter>``.
"""

from __future__ import annotations

import math
import re

import torch

from . import _validate as V
from .moe import EXPERT_PARAMS, ExpertFactors

_WRAP_KEY = re.compile(r"^(?P<mod>.+?)(?P<depth>(\.base_layer)*)\.lora_(?P<which>A|B)\.weight$")


def to_experts(A2: torch.Tensor, B2: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``lora_A (r E, in)``, ``lora_B (out, r E)`` -> ``(E, r, in)``, ``(E, out, r)``."""
    E = A2.shape[0] // r
    return (A2.reshape(E, r, A2.shape[1]).contiguous(),
            B2.reshape(B2.shape[0], r, E).permute(2, 0, 1).contiguous())


def to_peft(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, r, in)``, ``(E, out, r)`` -> PEFT's ``lora_A (r E, in)``, ``lora_B (out, r E)``."""
    E, r, in_f = A.shape
    return A.reshape(E * r, in_f).contiguous(), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def _params_of(mod: str, targets) -> list[str]:
    """Parameter names of module ``mod`` that ``target_parameters`` match (PEFT's rule), in
    nesting order (innermost first)."""
    names = {t.rpartition(".")[2] for t in targets}
    hit = [p for p in names if any(f"{mod}.{p}" == t or f"{mod}.{p}".endswith("." + t)
                                   for t in targets if t.rpartition(".")[2] == p)]
    known = [p for p in EXPERT_PARAMS if p in hit]
    return known + sorted(p for p in hit if p not in EXPERT_PARAMS)


def _plain_lora(cfg: dict, mod: str, which: str, t: torch.Tensor, pattern) -> bool:
    """Whether the outermost (depth 0) LoRA tensor ``t`` of ``mod`` is a plain
    ``target_modules`` LoRA rather than a ParamWrapper (PEFT refuses a module targeted both
    ways): a ``target_modules`` list entry matches ``mod`` (PEFT's suffix rule); for a string
    (a regex or ``"all-linear"``, not evaluated here) its rank dim equals the module's rank."""
    tm = cfg.get("target_modules")
    if isinstance(tm, (list, tuple)):
        return any(isinstance(x, str) and (mod == x or mod.endswith("." + x)) for x in tm)
    if not isinstance(tm, str) or t.dim() != 2:
        return False
    r = pattern(cfg.get("rank_pattern") or {}, mod, cfg["r"])
    return t.shape[0 if which == "A" else 1] == r


def split_tensors(cfg: dict, tensors: dict, wfn: str, prefix: str, *,
                  pattern) -> tuple[dict, dict]:
    """``(other tensors, {(module, depth): {"A"|"B": tensor}})``: the file's tensors of modules
    that ``target_parameters`` match, taken out (``prefix``: PEFT's ``base_model.model.``;
    ``pattern``: as in :func:`expert_entries`)."""
    targets = list(cfg.get("target_parameters") or [])
    if not targets:
        return tensors, {}
    for t in targets:
        if not isinstance(t, str) or not t:
            raise ValueError(f"{wfn}: target_parameters entries must be non-empty strings, got "
                             f"{t!r}")
    rest, moe = {}, {}
    for key, t in tensors.items():
        m = _WRAP_KEY.match(key)
        mod = m["mod"] if m else ""
        mod = mod[len(prefix):] if mod.startswith(prefix) else mod
        depth = m["depth"].count(".base_layer") if m else 0
        if m is None or not _params_of(mod, targets) or (
                depth == 0 and _plain_lora(cfg, mod, m["which"], t, pattern)):
            rest[key] = t
            continue
        moe.setdefault((mod, depth), {})[m["which"]] = t
    return rest, moe


def expert_entries(cfg: dict, moe: dict, wfn: str, *, pattern, device, dtype) -> dict:
    """``{"<module>.<param>": ExpertFactors}`` of the wrappers :func:`split_tensors` took out;
    ``pattern(pattern dict, key, default)``: PEFT's rank/alpha pattern lookup
    (:func:`lora_kernels.peft_io.pattern_value`). ``ValueError`` naming the module for a file
    that does not fit PEFT's layout."""
    targets = list(cfg.get("target_parameters") or [])
    depths: dict[str, list[int]] = {}
    for mod, d in moe:
        depths.setdefault(mod, []).append(d)
    out = {}
    for mod, ds in depths.items():
        params = _params_of(mod, targets)
        if sorted(ds) != list(range(len(params))):
            raise ValueError(f"{wfn}: module {mod!r} has LoRA wrappers at depths {sorted(ds)} "
                             f"(number of '.base_layer' in the key) but target_parameters "
                             f"{targets} name {len(params)} of its parameters {params}: cannot "
                             "tell which wrapper adapts which parameter")
        for d in ds:
            p = params[len(params) - 1 - d]        # outermost (d = 0) = last registered
            key = f"{mod}.{p}"
            ab = moe[(mod, d)]
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{wfn}: expert parameter {key!r} has no "
                                 f"{'lora_A' if 'A' not in ab else 'lora_B'}.weight")
            A2, B2 = ab["A"], ab["B"]
            r = pattern(cfg.get("rank_pattern") or {}, key, cfg["r"])
            if (A2.dim() != 2 or B2.dim() != 2 or not A2.is_floating_point()
                    or not B2.is_floating_point() or A2.shape[0] % r or A2.shape[0] == 0
                    or B2.shape[1] != A2.shape[0]):
                raise ValueError(f"{wfn}: expert parameter {key!r} has lora_A {tuple(A2.shape)} "
                                 f"and lora_B {tuple(B2.shape)}; PEFT's ParamWrapper layout is "
                                 f"float (r*E, in) and (out, r*E) with r={r}")
            alpha = pattern(cfg.get("alpha_pattern") or {}, key, cfg.get("lora_alpha", 8))
            alpha = V.scalar(f"{wfn}: lora_alpha of {key!r}", alpha)
            s = alpha / (math.sqrt(r) if cfg.get("use_rslora", False) else r)
            s = V.scaling32(f"{wfn}: expert parameter {key!r} scaling (lora_alpha / r)", s)
            A, B = to_experts(A2, B2, r)
            out[key] = ExpertFactors(A.to(device=device, dtype=dtype or A.dtype),
                                     B.to(device=device, dtype=dtype or B.dtype), float(s))
    return out


def peft_tensors(entries: dict, prefix: str, *, dtype=None) -> dict:
    """PEFT file tensors (``base_model.model.``-prefixed keys) of ``{"<module>.<param>":
    ExpertFactors}`` (wrappers nested in :data:`lora_kernels.moe.EXPERT_PARAMS` order)."""
    by_mod: dict[str, dict] = {}
    for key, f in entries.items():
        mod, _, p = key.rpartition(".")
        if not mod or p not in EXPERT_PARAMS:
            raise ValueError(f"model_or_dict[{key!r}]: expert factors must be keyed "
                             f"'<experts module>.<{'|'.join(EXPERT_PARAMS)}>'")
        by_mod.setdefault(mod, {})[p] = f
    out = {}
    for mod, fs in by_mod.items():
        params = [p for p in EXPERT_PARAMS if p in fs]
        for i, p in enumerate(params):
            A, B, _ = fs[p]
            V.float_tensor(f"model_or_dict[{mod + '.' + p!r}].lora_A", A, ndim=3)
            V.float_tensor(f"model_or_dict[{mod + '.' + p!r}].lora_B", B, ndim=3)
            if B.shape[0] != A.shape[0] or B.shape[2] != A.shape[1]:
                raise ValueError(f"model_or_dict[{mod + '.' + p!r}]: lora_A {tuple(A.shape)} and "
                                 f"lora_B {tuple(B.shape)} must be (E, r, in) and (E, out, r)")
            A2, B2 = to_peft(A.detach(), B.detach())
            pre = f"{prefix}{mod}" + ".base_layer" * (len(params) - 1 - i)
            out[f"{pre}.lora_A.weight"] = A2.to("cpu", dtype or A2.dtype).contiguous()
            out[f"{pre}.lora_B.weight"] = B2.to("cpu", dtype or B2.dtype).contiguous()
    return out
