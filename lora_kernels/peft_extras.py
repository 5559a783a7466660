"""The parts of a PEFT LoRA adapter that are not low-rank factors: trainable tokens
(``trainable_token_indices``, PEFT 0.21's ``TrainableTokensLayer``), ``modules_to_save`` (a full
per-adapter copy of a small module) and activated LoRA (``alora_invocation_tokens``).

File format (PEFT 0.21.2, keys after the ``base_model.model.`` prefix):

* trainable tokens: ``<module>.token_adapter.trainable_tokens_delta (n, dim)`` -- the NEW rows
  (values, not deltas) of the module's table for the ``n`` token ids the config lists
  (``trainable_token_indices``: a list for the input embedding, or ``{module: [ids]}``). A weight
  tied to the input embedding (``lm_head`` of a ``tie_word_embeddings`` model) follows the
  embedding's rows and is not stored;
* ``modules_to_save``: ``<module>.<param>`` for every entry of the copy's ``state_dict``; the
  config's names match every module whose name ENDS with one of them (PEFT's plain string
  ``endswith``: ``"norm"`` also takes ``input_layernorm``), the outermost such module owning a key;
* aLoRA: the config's ``alora_invocation_tokens`` (non-empty list of token ids) and nothing in
  the weights file. PEFT's rule (``peft.tuners.lora.variants``): per sequence of ``input_ids``,
  ``offset`` = length - start of the LAST occurrence of the invocation sequence (None if absent);
  a LoRA layer's output gets the adapter on the last ``min(offset, T)`` of its ``T`` tokens (none
  for None). ``generate`` computes the offsets once from the prompt and passes them to every
  step, so each decode step (``T = 1``) applies the adapter iff the prompt holds the invocation.

:func:`apply_tokens` is the substitution both training and serving run: a lookup's rows for the
listed ids replaced by the adapter's rows (an ``nn.Embedding``), or a tied linear's output
columns for those ids recomputed from them (``y[..., ids] = x rows^T``).
"""

from __future__ import annotations

import copy
import types
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers.lora import LoRALinear

CONFIG = "adapter_config.json"
_DELTA_SUFFIX = ".token_adapter.trainable_tokens_delta"


class TokenRows(NamedTuple):
    """One module's trainable tokens: ``indices (n,) int64`` and their ``rows (n, dim)``."""

    indices: torch.Tensor
    rows: torch.Tensor


def _ids(field: str, v) -> list[int]:
    if not isinstance(v, list) or not v or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in v):
        raise ValueError(f"{CONFIG}: {field} must be a non-empty list of non-negative token ids, "
                         f"got {v!r}")
    return v


def validate(cfg: dict) -> None:
    """Check the three fields of a parsed config (``ValueError`` naming the field)."""
    tti = cfg.get("trainable_token_indices")
    if isinstance(tti, dict):
        for k, v in tti.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"{CONFIG}: trainable_token_indices keys must be module names, "
                                 f"got {k!r}")
            _ids(f"trainable_token_indices[{k!r}]", v)
    elif tti not in (None, []):
        _ids("trainable_token_indices", tti)
    mts = cfg.get("modules_to_save")
    if mts is not None and (not isinstance(mts, list)
                            or any(not isinstance(m, str) or not m for m in mts)):
        raise ValueError(f"{CONFIG}: modules_to_save must be a list of module names, got {mts!r}")
    al = cfg.get("alora_invocation_tokens")
    if al not in (None, []):
        _ids("alora_invocation_tokens", al)
        if cfg.get("use_dora"):
            raise ValueError(f"{CONFIG}: alora_invocation_tokens with use_dora=true is not "
                             "supported (PEFT has one variant per layer)")


class Parser:
    """Collects the extras' tensors while :func:`lora_kernels.load_peft_adapter` reads a file."""

    def __init__(self, cfg: dict, wfn: str, prefix: str):
        self.cfg, self.wfn, self.prefix = cfg, wfn, prefix
        self.mts = list(cfg.get("modules_to_save") or [])
        self.tokens: dict[str, torch.Tensor] = {}
        self.modules: dict[str, dict[str, torch.Tensor]] = {}

    def claim(self, key: str, t: torch.Tensor) -> bool:
        """Whether ``key`` is a trainable-tokens or modules_to_save tensor (then kept)."""
        k = key[len(self.prefix):] if key.startswith(self.prefix) else key
        if k.endswith(_DELTA_SUFFIX):
            if self.cfg.get("trainable_token_indices") in (None, [], {}):
                raise ValueError(f"{self.wfn}: tensor {key!r} (trainable tokens) but the config "
                                 "has no trainable_token_indices")
            self.tokens[k[:-len(_DELTA_SUFFIX)]] = t
            return True
        if not self.mts or "lora_" in k:
            return False
        parts = k.split(".")
        for i in range(1, len(parts)):
            mod = ".".join(parts[:i])
            if any(mod.endswith(m) for m in self.mts):
                sd = self.modules.setdefault(mod, {})
                sd[".".join(parts[i:])] = t
                return True
        return False

    def finish(self, out, device, dtype) -> None:
        """Attach ``trainable_tokens`` ``{module: TokenRows}``, ``modules_to_save`` ``{module:
        state_dict}`` and ``alora_invocation_tokens`` (tuple or None) to the result ``out``."""
        tti = self.cfg.get("trainable_token_indices")
        toks = {}
        for mod, t in self.tokens.items():
            if isinstance(tti, dict):
                keys = [k for k in tti if mod == k or mod.endswith("." + k)]
                if not keys:
                    raise ValueError(f"{self.wfn}: trainable tokens of {mod!r} but "
                                     f"trainable_token_indices names {sorted(tti)}")
                ids = tti[keys[0]]
            else:
                ids = tti
            if t.dim() != 2 or not t.is_floating_point() or t.shape[0] != len(ids):
                raise ValueError(f"{self.wfn}: trainable tokens of {mod!r} are {t.dtype} "
                                 f"{tuple(t.shape)}; expected float ({len(ids)}, dim) for the "
                                 f"{len(ids)} trainable_token_indices")
            toks[mod] = TokenRows(torch.tensor(ids, dtype=torch.int64, device=device),
                                  t.to(device=device, dtype=dtype or t.dtype))
        if tti not in (None, [], {}) and not toks:
            raise ValueError(f"{self.wfn}: the config sets trainable_token_indices but the file "
                             "holds no trainable_tokens_delta")
        if self.mts and not self.modules:
            raise ValueError(f"{self.wfn}: the config sets modules_to_save={self.mts} but the "
                             "file holds none of their weights")
        out.trainable_tokens = toks
        out.modules_to_save = {m: {k: v.to(device=device, dtype=dtype or v.dtype)
                                   if v.is_floating_point() else v.to(device)
                                   for k, v in sd.items()} for m, sd in self.modules.items()}
        al = self.cfg.get("alora_invocation_tokens")
        out.alora_invocation_tokens = tuple(al) if al else None


# ============================================================================ applying
def has_extras(adapter) -> bool:
    return bool(getattr(adapter, "trainable_tokens", None)
                or getattr(adapter, "modules_to_save", None)
                or getattr(adapter, "alora_invocation_tokens", None))


def input_embedding_name(model: nn.Module) -> str | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return None
    return next((n for n, m in model.named_modules() if m is emb), None)


def tied_to(model: nn.Module, emb_name: str, originals: Mapping | None = None) -> list[str]:
    """Names of the linears whose ``weight`` IS the embedding ``emb_name``'s (weight tying, as
    ``tie_word_embeddings`` makes ``lm_head``); ``originals``: replaced modules by name."""
    originals = originals or {}
    mods = dict(model.named_modules())
    w = getattr(originals.get(emb_name, mods.get(emb_name)), "weight", None)
    if w is None:
        return []
    return [n for n, m in mods.items()
            if n != emb_name and isinstance(originals.get(n, m), nn.Linear)
            and originals.get(n, m).weight is w]


def _context(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for f in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, f, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check(model: nn.Module, adapter, originals: Mapping | None = None) -> dict:
    """Validate ``adapter``'s extras against ``model`` (``originals``: modules a server replaced,
    by name) and build them; nothing is changed. Returns ``{"tokens": {module: (TokenRows,
    kind)}, "modules": {module: copy}, "alora": tuple | None, "bytes": int}`` where ``kind`` is
    ``"embedding"`` or ``"linear"`` (a tied output layer: its ``out_features`` are the ids) and
    each copy is a deep copy of the module with the adapter's ``state_dict`` loaded (untied).
    ``ValueError`` naming the field: an id out of the vocabulary, rows of another width, an
    invocation sequence longer than the model's context, a module the model does not have."""
    originals = originals or {}
    mods = dict(model.named_modules())

    def orig(n):
        return originals.get(n, mods.get(n))

    out = {"tokens": {}, "modules": {}, "alora": None, "bytes": 0}
    emb_name = input_embedding_name(model)
    for mod, tr in (getattr(adapter, "trainable_tokens", None) or {}).items():
        m = orig(mod)
        if isinstance(m, nn.Embedding):
            kind, (num, dim) = "embedding", m.weight.shape
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                raise ValueError(f"trainable_token_indices: {mod!r} is a linear with a bias "
                                 "(not supported)")
            kind, (num, dim) = "linear", m.weight.shape
        else:
            raise ValueError(f"trainable_token_indices: the model has no embedding / linear "
                             f"{mod!r} (got {type(m).__name__})")
        idx, rows = tr
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num):
            raise ValueError(f"trainable_token_indices of {mod!r}: ids {idx.tolist()} out of "
                             f"range for its {num} rows (valid: 0..{num - 1})")
        if rows.shape != (idx.numel(), dim):
            raise ValueError(f"trainable tokens of {mod!r}: rows {tuple(rows.shape)}, expected "
                             f"({idx.numel()}, {dim})")
        w = m.weight
        tr = TokenRows(idx.to(w.device), rows.detach().to(w.device, w.dtype))
        out["tokens"][mod] = (tr, kind)
        out["bytes"] += tr.rows.numel() * tr.rows.element_size() + idx.numel() * 8
        if mod == emb_name:                 # tied output layers follow the embedding's rows
            for lin in tied_to(model, mod, originals):
                if lin not in (getattr(adapter, "trainable_tokens", None) or {}):
                    out["tokens"][lin] = (tr, "linear")
    for mod, sd in (getattr(adapter, "modules_to_save", None) or {}).items():
        m = orig(mod)
        if m is None or not mod:
            raise ValueError(f"modules_to_save: the model has no module {mod!r}")
        cp = copy.deepcopy(m)
        try:
            cp.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"modules_to_save: the saved {mod!r} does not fit the model's "
                             f"({type(m).__name__}): {str(e)[:300]}") from None
        cp.requires_grad_(False).eval()
        out["modules"][mod] = cp
        out["bytes"] += sum(t.numel() * t.element_size() for t in cp.state_dict().values())
    al = getattr(adapter, "alora_invocation_tokens", None)
    if al:
        vocab = getattr(orig(emb_name), "num_embeddings", None) if emb_name else None
        if vocab is not None and max(al) >= vocab:
            raise ValueError(f"alora_invocation_tokens {list(al)}: id {max(al)} out of range for "
                             f"the vocabulary of {vocab}")
        ctx = _context(model)
        if ctx is not None and len(al) > ctx:
            raise ValueError(f"alora_invocation_tokens: {len(al)} tokens, longer than the "
                             f"model's context of {ctx} positions")
        out["alora"] = tuple(int(i) for i in al)
    return out


def apply_tokens(x: torch.Tensor, y: torch.Tensor, tr: TokenRows, kind: str,
                 padding_idx: int | None = None) -> torch.Tensor:
    """The trainable-tokens substitution (differentiable in ``tr.rows``).

    ``kind="embedding"``: ``x`` ids (...), ``y = W[x]`` (..., dim): rows of ids in
    ``tr.indices`` become the matching ``tr.rows`` (PEFT's ``F.embedding(x, W.index_copy(0, ids,
    rows))``; the row of ``padding_idx`` gets no gradient, as there). ``kind="linear"``: ``x``
    (..., dim), ``y = x W^T`` (..., num): columns ``tr.indices`` become ``x rows^T`` (PEFT's
    ``F.linear(x, W.index_copy(...))``, the tied lm_head)."""
    idx, rows = tr
    if kind == "linear":
        cols = F.linear(x.to(rows.dtype), rows).to(y.dtype)
        return y.index_copy(-1, idx, cols) if y.requires_grad or cols.requires_grad \
            else y.index_copy_(-1, idx, cols)
    if padding_idx is not None and rows.requires_grad:
        pad = idx == padding_idx
        if bool(pad.any()):
            rows = torch.where(pad[:, None], rows.detach(), rows)
    match = x.unsqueeze(-1) == idx                 # (..., n)
    hit = match.any(-1)
    new = rows[match.to(torch.int8).argmax(-1)].to(y.dtype)
    return torch.where(hit.unsqueeze(-1), new, y)


def alora_offsets(input_ids: torch.Tensor, tokens) -> list[int | None]:
    """PEFT's ``calculate_alora_offsets`` for one adapter: per row, ``length - start`` of the
    last occurrence of ``tokens`` in ``input_ids`` (batch, length), None where absent."""
    inv = torch.as_tensor(tokens, dtype=input_ids.dtype, device=input_ids.device)
    n, L = inv.numel(), input_ids.shape[-1]
    out: list[int | None] = [None] * input_ids.shape[0]
    if n > L:
        return out
    win = input_ids.unfold(-1, n, 1)                        # (batch, L - n + 1, n)
    hit = (win == inv).all(-1)
    for b in range(input_ids.shape[0]):
        pos = hit[b].nonzero()
        if pos.numel():
            out[b] = L - int(pos[-1])
    return out


def alora_mask(tails, per_seq: int, device) -> torch.Tensor:
    """``(batch * per_seq,)`` bool: token ``t`` of sequence ``b`` gets its adapter iff ``t >=
    per_seq - min(tails[b], per_seq)`` (PEFT's aLoRA mask over a layer's ``T = per_seq`` tokens);
    ``tails[b]`` None means every token (a plain adapter), 0 none."""
    k = torch.tensor([per_seq if t is None else min(int(t), per_seq) for t in tails],
                     dtype=torch.int64, device=device)
    pos = torch.arange(per_seq, device=device)
    return (pos[None, :] >= (per_seq - k)[:, None]).reshape(-1)


# ============================================================================ saving
def to_save(model_or_dict, prefix: str, dtype) -> tuple[dict, dict]:
    """``(tensors, config fields)`` PEFT's loader reads back for the extras of a loaded adapter
    (its ``trainable_tokens`` / ``modules_to_save`` / ``alora_invocation_tokens``) or of a model
    built by :func:`lora_kernels.inject_adapter` (:class:`TrainableTokens` layers, modules marked
    ``lora_kernels_saved_module``, the model's ``lora_kernels_alora``)."""
    toks, mts, al = {}, {}, None
    if isinstance(model_or_dict, nn.Module):
        for name, m in model_or_dict.named_modules():
            if isinstance(m, TrainableTokens) and not m.tied:
                toks[name] = TokenRows(m.token_indices, m.rows)
            elif getattr(m, "lora_kernels_saved_module", False):
                mts[name] = m.state_dict()
        al = getattr(model_or_dict, "lora_kernels_alora", None)
    else:
        toks = dict(getattr(model_or_dict, "trainable_tokens", None) or {})
        mts = dict(getattr(model_or_dict, "modules_to_save", None) or {})
        al = getattr(model_or_dict, "alora_invocation_tokens", None)
    tensors = {}
    for name, (_idx, rows) in toks.items():
        tensors[f"{prefix}{name}{_DELTA_SUFFIX}"] = rows.detach().to(
            "cpu", dtype or rows.dtype).contiguous()
    for name, sd in mts.items():
        for k, v in sd.items():
            tensors[f"{prefix}{name}.{k}"] = v.detach().to(
                "cpu", dtype if dtype and v.is_floating_point() else v.dtype).contiguous()
    fields = {
        "trainable_token_indices": ({n: [int(i) for i in t.indices.tolist()]
                                     for n, t in toks.items()} or None),
        "modules_to_save": sorted(mts) or None,
        "alora_invocation_tokens": list(al) if al else None,
    }
    if al:
        fields["task_type"] = "CAUSAL_LM"
    return tensors, fields


# ============================================================================ training
class TrainableTokens(nn.Module):
    """PEFT's trainable tokens on one module: ``base`` (an ``nn.Embedding``, or a linear tied to
    one) with the rows of ``token_indices`` replaced by the trainable ``rows (n, dim)``
    (:func:`apply_tokens`); a tied linear shares its embedding's ``rows`` Parameter (``tied``:
    not saved, as PEFT). ``weight`` / ``num_embeddings`` / ... read through to ``base``."""

    def __init__(self, base: nn.Module, tr: TokenRows, kind: str, rows: nn.Parameter | None = None):
        super().__init__()
        self.base = base
        self.kind = kind
        self.tied = rows is not None
        self.register_buffer("token_indices", tr.indices.clone(), persistent=False)
        self.rows = rows if rows is not None else nn.Parameter(tr.rows.detach().clone())

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def forward(self, x, *args, **kwargs):
        y = self.base(x, *args, **kwargs)
        return apply_tokens(x, y, TokenRows(self.token_indices, self.rows), self.kind,
                            getattr(self.base, "padding_idx", None))


def inject(model: nn.Module, adapter, trainable: bool) -> list:
    """The extras of ``adapter`` for :func:`lora_kernels.inject_adapter`: checked first
    (:func:`check`), returned as ``[(module name, new module)]`` replacements to make once every
    check passed (a :class:`TrainableTokens` per token module, the loaded copy of each
    ``modules_to_save`` module, marked and trainable); aLoRA is set by the caller."""
    built = check(model, adapter)
    mods = dict(model.named_modules())
    out, shared = [], {}
    for name, (tr, kind) in sorted(built["tokens"].items(), key=lambda kv: kv[1][1] != "embedding"):
        key = id(tr)
        layer = TrainableTokens(mods[name], tr, kind, shared.get(key))
        shared.setdefault(key, layer.rows)
        layer.rows.requires_grad_(trainable)
        out.append((name, layer))
    for name, cp in built["modules"].items():
        cp.requires_grad_(trainable)
        cp.train(model.training)
        cp.lora_kernels_saved_module = True
        out.append((name, cp))
    return out, built["alora"]


class ALoRAState:
    """Per-forward aLoRA offsets of one model (:func:`set_alora`): ``tails`` per batch row (None:
    no adapter tokens; see :func:`alora_offsets`), from the ``input_ids`` of each forward or, in
    ``generate``, from the prompt for every step (``pinned``)."""

    def __init__(self, tokens):
        self.tokens = tuple(tokens)
        self.tails: list | None = None
        self.pinned = False

    def set_from(self, input_ids) -> None:
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
            input_ids = input_ids[None]
        self.tails = (None if not isinstance(input_ids, torch.Tensor)
                      else [0 if o is None else o
                            for o in alora_offsets(input_ids, self.tokens)])

    def mask(self, batch: int, T: int, device) -> torch.Tensor | None:
        """``(batch, T)`` bool of the tokens that get the adapter; None: none do."""
        if not self.tails or not any(self.tails):
            return None
        tails = self.tails
        if len(tails) != batch and batch % len(tails) == 0:   # generate's expanded rows
            tails = [t for t in tails for _ in range(batch // len(tails))]
        if len(tails) != batch:
            raise ValueError(f"aLoRA: offsets for {len(tails)} rows, the layer sees {batch}")
        return alora_mask(tails, T, device).view(batch, T)


class ALoRALinear(LoRALinear):
    """PEFT's aLoRA linear (``ALoraLinearVariant``): the LoRA term only on the tokens from the
    last invocation sequence onward (``alora_state``, set per forward by :func:`set_alora`'s
    hook). ``x (batch, T, in)`` or ``(batch, in)`` (``T = 1``, a decode step): base rows by
    ``F.linear``, adapter rows by the fused op on those rows only (their gradient likewise)."""

    alora_state: ALoRAState | None = None

    def merged(self) -> nn.Linear:
        raise ValueError("an aLoRA layer cannot be merged (its delta depends on the tokens' "
                         "positions; PEFT refuses too)")

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        st = self.alora_state
        batch, T = x.shape[0], (x.shape[1] if x.dim() == 3 else 1)
        live = st.mask(batch, T, x.device) if st is not None else None
        y = F.linear(x, self.weight, self.effective_bias())
        if live is None:
            return y
        idx = live.reshape(-1).nonzero().squeeze(1)
        x2 = x.reshape(-1, self.in_features)
        sub = super().forward(x2.index_select(0, idx), generator)
        return y.reshape(-1, self.out_features).index_copy(0, idx, sub.to(y.dtype)).view(y.shape)


def _alora_pre_hook(model, args, kwargs):
    st = model.lora_kernels_alora_state
    if not st.pinned:
        st.set_from(kwargs.get("input_ids", args[0] if args else None))


def _alora_generate(model, *args, **kwargs):
    """``generate`` of a model :func:`set_alora` made: offsets from the prompt for every step."""
    st = model.lora_kernels_alora_state
    if (kwargs.get("num_beams") or 1) > 1:
        raise ValueError("num_beams: beam search is not supported with aLoRA (as PEFT)")
    st.set_from(kwargs.get("input_ids", args[0] if args else None))
    st.pinned = True
    try:
        return type(model).generate(model, *args, **kwargs)
    finally:
        st.pinned = False


def set_alora(model: nn.Module, tokens, layers) -> ALoRAState:
    """Make ``layers`` (:class:`ALoRALinear`) of ``model`` aLoRA with invocation ``tokens``: a
    forward pre-hook on ``model`` computes the offsets from each call's ``input_ids`` (no
    ``input_ids``: the adapter stays off, as PEFT), and ``model.generate`` computes them once
    from the prompt for every step, as PEFT's ``generate``. The state is an attribute of the
    model and its layers (``copy.deepcopy`` of the model gets its own)."""
    st = ALoRAState(tokens)
    for m in layers:
        m.alora_state = st
    model.lora_kernels_alora = st.tokens
    model.lora_kernels_alora_state = st
    model.register_forward_pre_hook(_alora_pre_hook, with_kwargs=True)
    if hasattr(type(model), "generate"):
        model.generate = types.MethodType(_alora_generate, model)
    return st


def patched_alora(layer, x: torch.Tensor, offsets, W, adapter: str, backend):
    """:func:`lora_kernels.patch_peft`'s forward of a PEFT LoRA ``Linear`` whose one active
    ``adapter`` is aLoRA (``ALoraLinearVariant``): PEFT's mask (``offsets`` per row, None: off;
    the last ``min(offset, T)`` tokens of each row) with the fused op on the adapter's rows and
    the base ``F.linear`` elsewhere; None when the fused op does not apply (then PEFT runs)."""
    from .ops.lora import lora_linear

    v = (getattr(layer, "lora_variant", {}) or {}).get(adapter)
    if v is None or getattr(v, "__name__", type(v).__name__) != "ALoraLinearVariant":
        return None
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    b = layer.base_layer.bias
    if (not isinstance(W, torch.Tensor) or layer.lora_B[adapter].bias is not None
            or any(t is not None and t.dtype != x.dtype for t in (A, B, W, b))):
        return None
    batch, T = x.shape[0], (x.shape[1] if x.dim() == 3 else 1)
    y = F.linear(x, W, b)
    if offsets is None:
        return y
    if len(offsets) != batch:
        return None
    live = alora_mask([0 if o is None else o for o in offsets], T, x.device)
    idx = live.nonzero().squeeze(1)
    if idx.numel() == 0:
        return y
    d = layer.lora_dropout[adapter]
    p = float(d.p) if isinstance(d, nn.Dropout) and d.training else 0.0
    x2 = x.reshape(-1, x.shape[-1])
    sub = lora_linear(x2.index_select(0, idx), W, b, A, B, float(layer.scaling[adapter]), p,
                      backend=backend)
    return y.reshape(-1, y.shape[-1]).index_copy(0, idx, sub).view(y.shape)


def patched_tokens_forward(self, x, *args, **kwargs):
    """:func:`lora_kernels.patch_peft`'s forward of PEFT's ``TrainableTokensLayer`` (``self``):
    the base lookup (or the tied linear, bias-free as PEFT's) plus :func:`apply_tokens` -- only
    the listed rows / columns are touched, where PEFT copies the whole table per forward
    (``W.index_copy``); same values and gradients. One active adapter, a plain ``nn.Embedding``
    or ``nn.Linear`` base, no embedding scale; anything else runs PEFT's forward."""
    orig = type(self).forward
    active = self.active_adapters
    base = self.base_layer
    plain_emb = (type(base) is nn.Embedding and base.max_norm is None
                 and not base.scale_grad_by_freq and not base.sparse)
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or active[0] not in self.trainable_tokens_delta
            or not (plain_emb or type(base) is nn.Linear)
            or (hasattr(self, "_get_embed_scale") and self._get_embed_scale() is not None)):
        return orig(self, x, *args, **kwargs)
    rows = self.trainable_tokens_delta[active[0]]
    idx = torch.as_tensor(self.token_indices[active[0]], dtype=torch.int64, device=rows.device)
    if plain_emb:
        y = F.embedding(x, base.weight, base.padding_idx)
        return apply_tokens(x, y, TokenRows(idx, rows.to(y.dtype)), "embedding", base.padding_idx)
    y = F.linear(x, base.weight)
    return apply_tokens(x, y, TokenRows(idx, rows.to(y.dtype)), "linear")
