"""PEFT LoRA adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

Read with ``safetensors`` only (a pickle-based ``adapter_model.bin`` is refused, never loaded).
The config is validated field by field against what PEFT (0.13 .. 0.21) writes for a LoRA:

* used: ``peft_type`` (must be ``"LORA"``), ``r``, ``lora_alpha``, ``use_rslora``,
  ``rank_pattern``, ``alpha_pattern`` (PEFT's matching rule: pattern ``p`` applies to module
  ``m`` when ``re.match(rf"(.*\\.)?({p})$", m)``; first match wins), ``use_dora`` (DoRA: each
  module also has a ``lora_magnitude_vector`` and loads as :class:`DoRAFactors`);
* biases: ``lora_bias`` (``<module>.lora_B.bias`` -> the result's ``lora_biases``) and ``bias``
  = ``"lora_only"`` | ``"all"`` (trained base biases ``<module>.base_layer.bias`` /
  ``<module>.bias`` -> ``base_biases``; they replace the model's, as PEFT loads them);
* embedding LoRA (a target that is an ``nn.Embedding``): PEFT's ``<module>.lora_embedding_A (r,
  num_embeddings)`` / ``lora_embedding_B (dim, r)`` load as :class:`EmbeddingFactors` (the
  LoRA-equivalent factors of the table's linear view, ``in = num_embeddings``); the base tables
  PEFT also writes for ``embed_tokens`` / ``lm_head`` targets (``save_embedding_layers``:
  ``<module>.base_layer.weight``) are kept in the result's ``base_weights`` and must equal the
  model's (checked by ``inject_adapter`` / ``MultiAdapterModel.add``; a resized vocabulary is
  refused there, by name);
* metadata / training-time only, ignored: see :data:`IGNORED_FIELDS` (the weights file, not
  ``target_modules``, says which modules have an adapter);
* fields that change what the adapter computes and that we do not implement must be unset
  (None / False / empty / their default): see :data:`UNSUPPORTED_FIELDS`; e.g.
  ``layer_replication``, init methods that rewrite the base weights (PiSSA, OLoRA,
  LoftQ, CorDA);
* ``trainable_token_indices``, ``modules_to_save``, ``alora_invocation_tokens``: read by
  :mod:`lora_kernels.peft_extras` (the result's ``trainable_tokens`` / ``modules_to_save`` /
  ``alora_invocation_tokens``);
* ``fan_in_fan_out`` (GPT-2's ``Conv1D`` layout) is accepted either way: PEFT stores
  ``lora_A (r, in)`` / ``lora_B (out, r)`` for Conv1D targets too (the flag only says how the
  *base* weight is laid out, and PEFT itself overrides it per layer type), so the factors load
  unchanged;
* any other field (e.g. one added by a newer PEFT) is accepted when its value is unset (``None``,
  ``False``, ``""``, ``[]``, ``{}``), with one warning naming it; set to anything else it is
  refused (``ValueError`` naming it): it may change the adapter's meaning.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from . import _validate as V
from . import peft_extras

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."

USED_FIELDS = {"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
               "use_dora", "bias", "lora_bias", "target_parameters", "trainable_token_indices",
               "modules_to_save", "alora_invocation_tokens"}
IGNORED_FIELDS = {
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "megatron_core", "qalora_group_size", "init_lora_weights",
    "ensure_weight_tying", "eva_config", "lora_ga_config", "fan_in_fan_out",
}
# field -> the values that mean "not used"
UNSUPPORTED_FIELDS = {
    "layer_replication": (None, []),
    "use_qalora": (False, None),
    "megatron_config": (None, {}),
    "loftq_config": (None, {}),
    "corda_config": (None, {}),
    "velora_config": (None, {}),
    "monteclora_config": (None, {}),
    "arrow_config": (None, {}),
    "kasa_config": (None, {}),
    "use_bdlora": (None, False),
}
# init_lora_weights values that leave the base model untouched (others rewrite the base weights,
# so the adapter only makes sense on a modified base model)
SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")

# unknown fields already named in a warning (each is named once per process)
_WARNED_UNKNOWN: set[str] = set()

_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<which>A|B)\.weight$")
# PEFT's DoRA magnitude (its state-dict key minus the adapter name; ".weight" in older PEFT)
_MAG_KEY = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(\.weight)?$")
# PEFT's embedding LoRA (ParameterDict entries: no ".weight")
_EMB_KEY = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<which>A|B)$")
# base tables PEFT saves with embedding / lm_head targets (save_embedding_layers)
_BASE_KEY = re.compile(r"^(?P<mod>.+)\.base_layer\.weight$")
# lora_bias=True: the bias of PEFT's lora_B linear
_LORA_BIAS_KEY = re.compile(r"^(?P<mod>.+)\.lora_B\.bias$")
# bias="lora_only" | "all": trained base biases (of a LoRA layer's base_layer, or any module)
_BIAS_KEY = re.compile(r"^(?P<mod>.+?)(\.base_layer)?\.bias$")


class EmbeddingFactors(NamedTuple):
    """One embedding-LoRA module of a PEFT adapter (PEFT's ``lora.Embedding``): ``lora_A (r,
    num_embeddings)`` (``lora_embedding_A``), ``lora_B (dim, r)`` (``lora_embedding_B``),
    ``scaling``: ``y = W[ids] + scaling * A[:, ids]^T B^T``. A 3-tuple, so everything taking
    ``(lora_A, lora_B, scaling)`` takes it (the LoRA of the table's one-hot linear view)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float


class PeftAdapter(dict):
    """What :func:`load_peft_adapter` returns: ``{module name: factors}`` plus

    * ``base_weights`` ``{module: tensor}``: base tables the file carries (PEFT's
      ``save_embedding_layers``), which the model's must equal;
    * ``lora_biases`` ``{module: (out,)}``: ``lora_bias=True`` (the bias of PEFT's ``lora_B``;
      the module adds ``scaling * lora_bias``);
    * ``base_biases`` ``{module: (out,)}``: ``bias="lora_only" | "all"``: trained base biases
      that replace the model's (any module: a LoRA target's or, with ``"all"``, e.g. a norm's);

    * ``trainable_tokens`` ``{module: TokenRows(indices (n,), rows (n, dim))}``,
      ``modules_to_save`` ``{module: state_dict}``, ``alora_invocation_tokens`` (tuple or None):
      see :mod:`lora_kernels.peft_extras`;
    * ``tied`` ``{lm_head module: embedding module}``: PEFT's ``ensure_weight_tying`` (the
      linear's ``lora_A`` / ``lora_B`` are the embedding's ``lora_B^T`` / ``lora_A^T``, one
      storage); :func:`lora_kernels.inject_adapter` ties them the same way.
    """

    base_weights: dict
    lora_biases: dict
    base_biases: dict
    tied: dict
    trainable_tokens: dict
    modules_to_save: dict
    alora_invocation_tokens: tuple | None


class DoRAFactors(NamedTuple):
    """One DoRA module of a PEFT adapter: LoRA factors plus PEFT's ``lora_magnitude_vector``
    (``y = g * (x W^T + scaling * x A^T B^T) + b``, ``g = magnitude / ||W + scaling B A||_row``)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor


def _is_unset(v, allowed) -> bool:
    return any(v is a or (type(v) is type(a) and v == a) for a in allowed)


def validate_config(cfg) -> dict:
    """Check a parsed ``adapter_config.json``; return it. ``ValueError``/``TypeError`` naming the
    offending field otherwise."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{CONFIG_NAME} must hold a JSON object, got {type(cfg).__name__}")
    pt = cfg.get("peft_type")
    if pt != "LORA":
        raise ValueError(f"{CONFIG_NAME}: peft_type must be 'LORA' (only LoRA adapters are "
                         f"supported), got {pt!r}")
    unknown = sorted(set(cfg) - USED_FIELDS - IGNORED_FIELDS - set(UNSUPPORTED_FIELDS))
    set_unknown = [f for f in unknown if not _is_unset(cfg[f], (None, False, "", [], {}))]
    if set_unknown:
        raise ValueError(f"{CONFIG_NAME}: unknown field(s) "
                         f"{ {f: cfg[f] for f in set_unknown} } are set: refusing to guess what "
                         "they change (a newer PEFT feature?); unknown fields are accepted only "
                         "when unset (None / False / empty)")
    fresh = [f for f in unknown if f not in _WARNED_UNKNOWN]
    if fresh:
        _WARNED_UNKNOWN.update(fresh)
        warnings.warn(f"{CONFIG_NAME}: ignoring unknown field(s) {fresh} (each unset: None / "
                      "False / empty)", stacklevel=3)
    for f, unset in UNSUPPORTED_FIELDS.items():
        if f in cfg and not _is_unset(cfg[f], unset):
            raise ValueError(f"{CONFIG_NAME}: {f}={cfg[f]!r} is not supported (must be one of "
                             f"{list(unset)})")
    init = cfg.get("init_lora_weights", True)
    if not any(init is s or (isinstance(init, str) and init == s) for s in SAFE_INITS):
        raise ValueError(f"{CONFIG_NAME}: init_lora_weights={init!r} rewrites the base model's "
                         f"weights, which this loader does not do (supported: {list(SAFE_INITS)})")
    peft_extras.validate(cfg)
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{CONFIG_NAME}: r must be a positive int, got {r!r}")
    _finite_number("lora_alpha", cfg.get("lora_alpha", 8))
    if not isinstance(cfg.get("use_dora", False) or False, bool):
        raise ValueError(f"{CONFIG_NAME}: use_dora must be a bool, got {cfg['use_dora']!r}")
    if cfg.get("fan_in_fan_out") not in (None, True, False):
        raise ValueError(f"{CONFIG_NAME}: fan_in_fan_out must be a bool, got "
                         f"{cfg['fan_in_fan_out']!r}")
    if cfg.get("bias", "none") not in ("none", "lora_only", "all", None):
        raise ValueError(f"{CONFIG_NAME}: bias must be 'none', 'lora_only' or 'all', got "
                         f"{cfg['bias']!r}")
    if cfg.get("lora_bias") not in (None, True, False):
        raise ValueError(f"{CONFIG_NAME}: lora_bias must be a bool, got {cfg['lora_bias']!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise ValueError(f"{CONFIG_NAME}: use_rslora must be a bool, got {cfg['use_rslora']!r}")
    for f in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(f) or {}
        if not isinstance(pat, dict):
            raise ValueError(f"{CONFIG_NAME}: {f} must be an object, got {type(pat).__name__}")
        for k, v in pat.items():
            if f == "rank_pattern" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{CONFIG_NAME}: {f}[{k!r}] must be a positive int, got {v!r}")
            if f == "alpha_pattern":
                _finite_number(f"{f}[{k!r}]", v)
            check_pattern(f, k)
    return cfg


def _finite_number(name: str, v) -> float:
    """``v`` as a finite float (a JSON int too large for a float, ``1e400`` (parsed as inf),
    ``NaN`` / ``Infinity``: ValueError naming the field)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{CONFIG_NAME}: {name} must be a finite number, got {v!r}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ValueError(f"{CONFIG_NAME}: {name} must be a finite number, got "
                         f"{v if isinstance(v, float) else str(v)[:20] + '...'}")
    return f


# Bounds on rank_pattern / alpha_pattern keys. Python's ``re`` backtracks without a time limit:
# ``(a+)+$`` against 40 a's and a mismatch runs for hours. PEFT matches a key ``p`` as
# ``(.*\.)?(p)$`` (one unbounded ``.*`` of its own). A key is accepted only with no repeated
# group (``(...)*``, ``(...)+``, ``(...){m,n}``; ``(...)?`` is fine), at most MAX_PATTERN_LOOPS
# repetitions (``*``, ``+``, ``{m,n}``) and MAX_PATTERN_OPTIONAL optional parts (``?``), and
# module names are at most MAX_MODULE_NAME characters: backtracking is then polynomial and
# small. Worst cases measured (2-core CI box, 512-character names): ``.*.*x`` 18 ms, ``.?.?.*.*x``
# ~0.2 s; one more ``.*`` (refused) 1.4 s, two more (refused) hours. Real keys (module names,
# ``model.layers.0.self_attn.q_proj``, ``.*\.layers\.\d+\.mlp``, ``(q|k|v)_proj``) pass and
# keep PEFT's matching.
MAX_PATTERN_LEN = 512
MAX_PATTERN_LOOPS = 2
MAX_PATTERN_OPTIONAL = 2
MAX_MODULE_NAME = 512


def check_pattern(field: str, key) -> None:
    """Refuse a ``rank_pattern`` / ``alpha_pattern`` key that is not a string, not a valid
    regex, longer than MAX_PATTERN_LEN, or shaped for catastrophic backtracking (see above)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{CONFIG_NAME}: {field} keys must be non-empty strings, got {key!r}")
    if len(key) > MAX_PATTERN_LEN:
        raise ValueError(f"{CONFIG_NAME}: {field} key of {len(key)} characters (at most "
                         f"{MAX_PATTERN_LEN})")
    try:
        re.compile(key)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{CONFIG_NAME}: {field} key {key!r} is not a valid regex: {e}") from None
    bare = _strip_classes(key)
    if "(?" in bare.replace("(?:", "") or "\x01" in bare:
        raise ValueError(f"{CONFIG_NAME}: {field} key {key!r}: lookarounds, backreferences and "
                         "inline flags are not supported in pattern keys")
    if re.search(r"\)(?:[*+]|\{)", bare):
        raise ValueError(f"{CONFIG_NAME}: {field} key {key!r} repeats a group ((...)*, (...)+, "
                         "(...){m,n}): refused, such patterns can backtrack for hours; list the "
                         "modules instead")
    loops = optional = 0
    for i, c in enumerate(bare):
        if c in "*+{":
            loops += 1
        elif c == "?" and i and bare[i - 1] not in "(*+?}":  # not a lazy suffix, not (?:
            optional += 1
    if loops > MAX_PATTERN_LOOPS or optional > MAX_PATTERN_OPTIONAL:
        raise ValueError(f"{CONFIG_NAME}: {field} key {key!r} has {loops} repetitions (*, +, "
                         f"{{m,n}}; at most {MAX_PATTERN_LOOPS}) and {optional} optional parts "
                         f"(?; at most {MAX_PATTERN_OPTIONAL}): refused, matching could backtrack "
                         "for a very long time; list the modules instead")


def _strip_classes(key: str) -> str:
    """``key`` with every escape replaced by one character (``\\x00``; a backreference
    ``\\1``-``\\9`` by ``\\x01``) and every ``[...]`` class by ``\\x02``, so only real groups,
    alternations and quantifiers remain as metacharacters."""
    out, i, n = [], 0, len(key)
    while i < n:
        c = key[i]
        if c == "\\":
            out.append("\x01" if key[i + 1:i + 2] in tuple("123456789") else "\x00")
            i += 2
        elif c == "[":
            j = i + 1
            if j < n and key[j] == "^":
                j += 1
            if j < n and key[j] == "]":
                j += 1
            while j < n and key[j] != "]":
                j += 2 if key[j] == "\\" else 1
            out.append("\x02")
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def pattern_value(pattern: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``(.*\\.)?(p)$`` matching (keys
    checked by :func:`check_pattern`, names at most MAX_MODULE_NAME characters)."""
    if len(module) > MAX_MODULE_NAME:
        raise ValueError(f"module name of {len(module)} characters (at most {MAX_MODULE_NAME}): "
                         f"{module[:60]!r}...")
    for key, v in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return v
    return default


def read_config(path) -> dict:
    """Read and validate ``path/adapter_config.json``."""
    fn = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(fn):
        raise ValueError(f"path {os.fspath(path)!r} has no {CONFIG_NAME}")
    try:
        with open(fn, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{fn} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{fn}: JSON nested too deeply") from None
    return validate_config(cfg)


def load_peft_adapter(path, *, device="cpu", dtype: torch.dtype | None = None) -> dict:
    """Load a PEFT LoRA directory as ``{module name: (lora_A (r, in), lora_B (out, r), scaling)}``
    (a DoRA adapter, ``use_dora=True``: ``{module name: DoRAFactors(lora_A, lora_B, scaling,
    magnitude (out,))}``).

    Module names are the base model's (PEFT's ``base_model.model.`` prefix stripped), so they
    match ``model.named_modules()`` of the model the adapter was trained on. ``scaling`` is
    ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) with ``rank_pattern`` / ``alpha_pattern``
    applied per module. Tensors are read with safetensors only; ``dtype`` converts them.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if dtype is not None and dtype not in V.FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"dtype must be a float dtype or None, got {dtype}")
    cfg = read_config(path)
    wfn = os.path.join(os.fspath(path), WEIGHTS_NAME)
    if not os.path.isfile(wfn):
        pick = [n for n in PICKLE_NAMES if os.path.isfile(os.path.join(os.fspath(path), n))]
        if pick:
            raise ValueError(f"path {os.fspath(path)!r} holds only {pick[0]} (a pickle file, which "
                             f"is never loaded): re-save it as {WEIGHTS_NAME} "
                             "(PEFT: save_pretrained(..., safe_serialization=True))")
        raise ValueError(f"path {os.fspath(path)!r} has no {WEIGHTS_NAME}")
    try:
        tensors = load_file(wfn, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{wfn} is not a valid safetensors file: {e}") from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()
    base_weights: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {"lora": {}, "base": {}}
    dora = bool(cfg.get("use_dora", False))
    origin: dict[tuple[str, str], str] = {}
    from . import peft_moe  # target_parameters: PEFT's ParamWrapper tensors, taken out

    tensors, wrapped = peft_moe.split_tensors(cfg, tensors, wfn, PREFIX,
                                               pattern=pattern_value)
    if wrapped and dora:
        raise ValueError(f"{wfn}: use_dora with target_parameters (PEFT refuses DoRA on "
                         "ParamWrapper)")

    def claim(mod_key: str, kind: str, key: str) -> str:
        """The module name (PEFT's prefix stripped); ValueError if another key of the file
        already gave this module this tensor (e.g. stored with and without the prefix)."""
        mod = mod_key[len(PREFIX):] if mod_key.startswith(PREFIX) else mod_key
        prev = origin.setdefault((mod, kind), key)
        if prev != key:
            raise ValueError(f"{wfn}: module {mod!r} is stored twice ({prev!r} and {key!r}): "
                             "refusing to pick one")
        return mod

    extras = peft_extras.Parser(cfg, wfn, PREFIX)
    for key, t in tensors.items():
        if extras.claim(key, t):
            continue
        m = _LORA_BIAS_KEY.match(key) or _BIAS_KEY.match(key)
        if m is not None:
            kind = "lora" if key.endswith(".lora_B.bias") else "base"
            if kind == "lora" and not cfg.get("lora_bias", False):
                raise ValueError(f"{wfn}: tensor {key!r} (LoRA bias) but the config does not set "
                                 "lora_bias=true")
            if kind == "base" and cfg.get("bias", "none") in ("none", None):
                raise ValueError(f"{wfn}: tensor {key!r} (a trained bias) but the config says "
                                 "bias='none'")
            if t.dim() != 1 or not t.is_floating_point():
                raise ValueError(f"{wfn}: tensor {key!r} must be a 1-D float bias, got {t.dtype} "
                                 f"{tuple(t.shape)}")
            mod = claim(m["mod"], kind + " bias", key)
            biases[kind][mod] = t.to(device=device, dtype=dtype or t.dtype)
            continue
        m = _EMB_KEY.match(key) or _BASE_KEY.match(key)
        if m is not None:
            mod = claim(m["mod"], m.groupdict().get("which") or "base", key)
            if "which" not in m.groupdict():
                if t.dim() != 2 or not t.is_floating_point():
                    raise ValueError(f"{wfn}: tensor {key!r} (a saved base weight) must be a "
                                     f"2-D float tensor, got {t.dtype} {tuple(t.shape)}")
                base_weights[mod] = t
                continue
            if dora:
                raise ValueError(f"{wfn}: tensor {key!r}: DoRA embedding LoRA is not supported")
            embeddings.add(mod)
            factors.setdefault(mod, {})["E" + m["which"]] = t
            continue
        m = _KEY.match(key)
        if m is None and dora and _MAG_KEY.match(key):
            m = _MAG_KEY.match(key)
            mod = claim(m["mod"], "m", key)
            factors.setdefault(mod, {})["m"] = t
            continue
        if m is None:
            what = ("DoRA magnitude (but use_dora is not set)"
                    if "lora_magnitude_vector" in key else
                    "LoRA bias" if re.search(r"\.lora_B\.bias$", key) else "unexpected tensor")
            raise ValueError(f"{wfn}: tensor {key!r} ({what}) is not supported; only "
                             "'<module>.lora_A.weight' / '<module>.lora_B.weight' / "
                             "'<module>.lora_embedding_A|B' are")
        mod = claim(m["mod"], m["which"], key)
        factors.setdefault(mod, {})[m["which"]] = t
    if not factors and not wrapped:
        raise ValueError(f"{wfn} holds no LoRA tensors")
    out = PeftAdapter()
    out.update(peft_moe.expert_entries(cfg, wrapped, wfn, pattern=pattern_value,
                                       device=device, dtype=dtype))
    for mod in base_weights:
        if mod not in factors:
            raise ValueError(f"{wfn}: base weight of {mod!r} saved without a LoRA on that module "
                             "(a modules_to_save copy?): not supported")
    out.base_weights = {m: t.to(device=device) for m, t in base_weights.items()}
    out.lora_biases, out.base_biases = biases["lora"], biases["base"]
    for mod, b in out.lora_biases.items():
        if mod not in factors or "EA" in factors[mod] or b.shape[0] != factors[mod]["B"].shape[0]:
            raise ValueError(f"{wfn}: LoRA bias of {mod!r} {tuple(b.shape)} does not match a "
                             "lora_B (out, r) of that module")
    for mod, ab in factors.items():
        if mod in embeddings:
            if set(ab) != {"EA", "EB"}:
                raise ValueError(f"{wfn}: module {mod!r} mixes or lacks lora_embedding_A / "
                                 f"lora_embedding_B (has {sorted(ab)})")
            ab = {"A": ab["EA"], "B": ab["EB"]}
        if set(ab) != ({"A", "B", "m"} if dora and mod not in embeddings else {"A", "B"}):
            miss = ("lora_A.weight" if "A" not in ab else "lora_B.weight" if "B" not in ab
                    else "lora_magnitude_vector (the config says use_dora=true)")
            raise ValueError(f"{wfn}: module {mod!r} has no {miss}")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"{wfn}: module {mod!r} has lora_A {tuple(A.shape)} and lora_B "
                             f"{tuple(B.shape)}; expected (r, in) and (out, r)")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise ValueError(f"{wfn}: module {mod!r} factors must be floating point, got "
                             f"{A.dtype}/{B.dtype}")
        r = pattern_value(cfg.get("rank_pattern") or {}, mod, cfg["r"])
        if A.shape[0] != r:
            raise ValueError(f"{wfn}: module {mod!r} has rank {A.shape[0]} but the config says "
                             f"r={r}")
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, mod, cfg.get("lora_alpha", 8))
        scaling = V.scaling32(f"{wfn}: module {mod!r} scaling (lora_alpha / r)",
                              _finite_number("lora_alpha", alpha)
                              / (math.sqrt(r) if cfg.get("use_rslora", False) else r))
        A = A.to(device=device, dtype=dtype or A.dtype)
        B = B.to(device=device, dtype=dtype or B.dtype)
        if mod in embeddings:
            out[mod] = EmbeddingFactors(A, B, float(scaling))
        elif dora:
            mag = ab["m"]
            if mag.dim() != 1 or mag.shape[0] != B.shape[0] or not mag.is_floating_point():
                raise ValueError(f"{wfn}: module {mod!r} has lora_magnitude_vector "
                                 f"{tuple(mag.shape)} {mag.dtype}; expected float ({B.shape[0]},)")
            out[mod] = DoRAFactors(A, B, float(scaling),
                                   mag.to(device=device, dtype=dtype or mag.dtype))
        else:
            out[mod] = (A, B, float(scaling))
    out.tied = _tied_pairs(out) if cfg.get("ensure_weight_tying", False) else {}
    extras.finish(out, device, dtype)
    return out


def _tied_pairs(adapter: dict) -> dict:
    """``{linear module: embedding module}`` whose factors are each other's transposes (PEFT's
    ``ensure_weight_tying``: lm_head ``lora_A = lora_embedding_B^T``, ``lora_B =
    lora_embedding_A^T``)."""
    embs = {n: e for n, e in adapter.items() if isinstance(e, EmbeddingFactors)}
    out = {}
    for name, e in adapter.items():
        if isinstance(e, EmbeddingFactors) or not isinstance(e, tuple) or len(e) != 3:
            continue
        for en, ee in embs.items():
            if (e[0].shape == ee[1].t().shape and e[1].shape == ee[0].t().shape
                    and torch.equal(e[0], ee[1].t()) and torch.equal(e[1], ee[0].t())):
                out[name] = en
                break
    return out


def adapter_dict(model: nn.Module) -> dict:
    """``{module name: as_lora()}`` of every adapter layer of ``model`` (LoRA-equivalent factors,
    so NoRA/CURLoRA/Deep LoRA export as plain LoRA); ``ValueError`` for a layer without one."""
    from .layers import AdapterLinear, LoRAEmbedding
    from .moe import expert_entries

    out = dict(expert_entries(model))
    for name, mod in model.named_modules():
        if isinstance(mod, LoRAEmbedding):
            A, B, s = mod.as_lora()
            out[name] = EmbeddingFactors(A.detach(), B.detach(), float(s))
        elif isinstance(mod, AdapterLinear) and hasattr(mod, "as_dora"):
            A, B, s, mag = mod.as_dora()
            out[name] = DoRAFactors(A.detach(), B.detach(), float(s), mag.detach())
        elif isinstance(mod, AdapterLinear):
            try:
                A, B, s = mod.as_lora()
            except NotImplementedError:
                raise ValueError(f"module {name!r} ({type(mod).__name__}) has no LoRA form and "
                                 "cannot be saved as a PEFT LoRA adapter") from None
            out[name] = (A.detach(), B.detach(), float(s))
    return out


def _patterns(values: dict, default) -> dict:
    """Per-module overrides for PEFT's ``rank_pattern``/``alpha_pattern``. A key ``p`` also
    matches every module named ``*.p``, so such modules are listed too, and keys go longest first
    (PEFT takes the first match): each module then matches its own key first."""
    keys = {n for n, v in values.items() if v != default}
    keys |= {m for m in values for p in keys if m.endswith("." + p)}
    return {n: values[n] for n in sorted(keys, key=lambda n: (-len(n), n))}


def _biases_to_save(model_or_dict, ad: dict) -> tuple[dict, dict]:
    """``({module: lora_bias}, {module: trained base bias})`` to write: a model's LoRA biases
    (``LoRALinear.lora_bias``) and every bias parameter that requires grad (an adapter layer's:
    ``bias="lora_only"``; any other module's: ``bias="all"``); a loaded adapter's
    ``lora_biases`` / ``base_biases``."""
    if not isinstance(model_or_dict, nn.Module):
        return (dict(getattr(model_or_dict, "lora_biases", None) or {}),
                dict(getattr(model_or_dict, "base_biases", None) or {}))
    lora_b, base_b = {}, {}
    # a modules_to_save copy's biases are saved with the copy (peft_extras.to_save)
    saved = [n for n, m in model_or_dict.named_modules()
             if getattr(m, "lora_kernels_saved_module", False)]
    for name, mod in model_or_dict.named_modules():
        lb = getattr(mod, "lora_bias", None)
        if isinstance(lb, torch.Tensor) and name in ad:
            lora_b[name] = lb
        b = mod._parameters.get("bias") if hasattr(mod, "_parameters") else None
        if isinstance(b, torch.Tensor) and b.requires_grad and not any(
                name == m or name.startswith(m + ".") for m in saved):
            base_b[name] = b
    return lora_b, base_b


def _saves_tied(model_or_dict) -> bool:
    """Whether to write PEFT's ``ensure_weight_tying``: a model with a LoRA linear whose factors
    share storage with an embedding LoRA's (as :func:`lora_kernels.inject_adapter` ties them), or
    a loaded adapter with ``tied`` pairs."""
    if not isinstance(model_or_dict, nn.Module):
        return bool(getattr(model_or_dict, "tied", None))
    from .layers import LoRAEmbedding, LoRALinear

    embs = {m.lora_B.data_ptr() for m in model_or_dict.modules() if isinstance(m, LoRAEmbedding)}
    return any(isinstance(m, LoRALinear) and m.lora_A.data_ptr() in embs
               for m in model_or_dict.modules())


def save_peft_adapter(model_or_dict, path, *, base_model_name_or_path: str | None = None,
                      dtype: torch.dtype | None = None,
                      fan_in_fan_out: bool | None = None) -> None:
    """Write ``path/adapter_config.json`` + ``path/adapter_model.safetensors`` loadable by
    ``peft.PeftModel.from_pretrained(base_model, path)`` (and :func:`load_peft_adapter`).

    ``model_or_dict``: a model whose adapter layers are saved (module names are its
    ``named_modules()`` names, so save the model as PEFT would see it: the same class PEFT wraps)
    or ``{module name: (lora_A, lora_B, scaling)}`` (DoRA: every entry a
    ``(lora_A, lora_B, scaling, magnitude)`` tuple / :class:`DoRAFactors`, written with
    ``use_dora=true``; DoRA layers of a model are saved so). Ranks and scalings may differ per
    module: ``r``/``lora_alpha`` are the most common ones and the others go in ``rank_pattern`` /
    ``alpha_pattern`` keyed by full module name (``lora_alpha = scaling * r``). The factors are
    stored unchanged (``dtype`` converts them), so PEFT computes exactly our delta.

    Embedding LoRA: a model's :class:`~lora_kernels.LoRAEmbedding` layers and
    :class:`EmbeddingFactors` entries of a dict are written as PEFT's ``lora_embedding_A`` /
    ``lora_embedding_B`` (a plain tuple is always a linear's ``lora_A`` / ``lora_B``).

    ``fan_in_fan_out`` (PEFT's flag for transformers ``Conv1D`` targets, GPT-2): ``None`` writes
    True when a saved model's adapter layers were built from a ``Conv1D`` (False for a dict);
    the factors are the same either way (PEFT stores ``lora_A (r, in)`` for Conv1D too).
    """
    from safetensors.torch import save_file

    if fan_in_fan_out is not None and not isinstance(fan_in_fan_out, bool):
        raise TypeError(f"fan_in_fan_out must be a bool or None, got {fan_in_fan_out!r}")
    if isinstance(model_or_dict, nn.Module):
        ad = adapter_dict(model_or_dict)
        if fan_in_fan_out is None:
            from .layers import AdapterLinear

            fan_in_fan_out = any(getattr(m, "fan_in_fan_out", False) for m in
                                 model_or_dict.modules() if isinstance(m, AdapterLinear))
        if not ad:
            raise ValueError("model_or_dict: the model has no adapter layers to save")
    elif isinstance(model_or_dict, Mapping):
        ad = dict(model_or_dict)
        if not ad:
            raise ValueError("model_or_dict: the adapter dict is empty")
    else:
        raise TypeError(f"model_or_dict must be an nn.Module or a dict, got "
                        f"{type(model_or_dict).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if dtype is not None and dtype not in V.FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"dtype must be a float dtype or None, got {dtype}")
    from .moe import ExpertFactors
    from .peft_moe import peft_tensors

    experts = {n: e for n, e in ad.items() if isinstance(e, ExpertFactors)}
    ad = {n: e for n, e in ad.items() if n not in experts}
    tensors = peft_tensors(experts, PREFIX, dtype=dtype)
    ranks = {n: e.lora_A.shape[1] for n, e in experts.items()}
    alphas = {n: V.scalar(f"model_or_dict[{n!r}].scaling", e.scaling) * ranks[n]
              for n, e in experts.items()}
    is_dora = {n: isinstance(e, (tuple, list)) and len(e) == 4 for n, e in ad.items()}
    dora = any(is_dora.values())
    if dora and not all(is_dora.values()):
        raise ValueError("model_or_dict mixes DoRA (4-tuple / DoRALinear) and LoRA modules; a "
                         "PEFT adapter is all DoRA or all LoRA (use_dora is one config flag): "
                         f"LoRA modules {sorted(n for n, d in is_dora.items() if not d)[:4]}")
    for name, entry in ad.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"model_or_dict keys must be module names, got {name!r}")
        if dora:
            entry, mag = tuple(entry[:3]), entry[3]
        A, B, s = V.lora_triple(f"model_or_dict[{name!r}]", entry)
        if dora:
            V.float_tensor(f"model_or_dict[{name!r}].magnitude", mag, ndim=1)
            V.shape(f"model_or_dict[{name!r}].magnitude", mag, (B.shape[0],), "(out_features,)")
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = mag.detach().to(
                "cpu", dtype or mag.dtype).contiguous()
        if not math.isfinite(s):
            raise ValueError(f"model_or_dict[{name!r}]: scaling must be finite, got {s}")
        r = A.shape[0]
        ranks[name], alphas[name] = r, s * r
        ka, kb = (("lora_embedding_A", "lora_embedding_B") if isinstance(entry, EmbeddingFactors)
                  else ("lora_A.weight", "lora_B.weight"))
        tensors[f"{PREFIX}{name}.{ka}"] = A.detach().to("cpu", dtype or A.dtype).contiguous()
        tensors[f"{PREFIX}{name}.{kb}"] = B.detach().to("cpu", dtype or B.dtype).contiguous()
    lora_b, base_b = _biases_to_save(model_or_dict, ad)
    for name, b in lora_b.items():
        tensors[f"{PREFIX}{name}.lora_B.bias"] = b.detach().to("cpu", dtype or b.dtype).contiguous()
    for name, b in base_b.items():
        key = f"{PREFIX}{name}.base_layer.bias" if name in ad else f"{PREFIX}{name}.bias"
        tensors[key] = b.detach().to("cpu", dtype or b.dtype).contiguous()
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    cfg = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r0, "lora_alpha": a0, "use_rslora": False,
        "rank_pattern": _patterns(ranks, r0), "alpha_pattern": _patterns(alphas, a0),
        "target_modules": sorted(ad), "lora_dropout": 0.0,
        "target_parameters": sorted(experts) or None,
        "bias": ("all" if set(base_b) - set(ad) else "lora_only" if base_b else "none"),
        "ensure_weight_tying": _saves_tied(model_or_dict),
        "lora_bias": bool(lora_b),
        "fan_in_fan_out": bool(fan_in_fan_out), "use_dora": dora, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    extra_tensors, extra_fields = peft_extras.to_save(model_or_dict, PREFIX, dtype)
    tensors.update(extra_tensors)
    cfg.update(extra_fields)
    os.makedirs(os.fspath(path), exist_ok=True)
    save_file(tensors, os.path.join(os.fspath(path), WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(os.fspath(path), CONFIG_NAME), "w", encoding="utf-8") as f:
        # not sort_keys: the order of the pattern keys matters (PEFT takes the first match)
        json.dump(dict(sorted(cfg.items())), f, indent=2)
