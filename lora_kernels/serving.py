"""Multi-adapter serving: :class:`MultiAdapterModel` (one forward for a batch whose sequences
each pick their own adapter, on any model made of ``nn.Linear``s) and :class:`ServingLinear`,
the layer it puts in place of each served linear.

Per forward, the model builds the batch plan ONCE (``ops.multi_lora.plan``: adapter of every
token, sorted order, tile tables, decode or prefill) and every :class:`ServingLinear` reads it
from the shared :class:`_ServingState`; each layer only adds its own pool's factors
(:class:`~lora_kernels.pool.AdapterPool`, re-exported here).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from . import _validate as V
from . import peft_extras as _extras
from . import serving_extras
from ._backend import resolve_backend
from .ops import qlora as _qlora
from .ops.multi_lora import plan as _plan
from .ops.multi_lora.api import apply_plans
from .pool import AdapterPool, PoolView
from .serving_bias import add_bias_rows, bias_deltas
from .serving_embedding import ServingEmbedding, check_embedding_entries

__all__ = ["AdapterPool", "MultiAdapterModel", "PoolView", "ServingEmbedding", "ServingLinear"]


# ============================================================================ model level
def _adapter_list(adapters, what: str = "a list (one name or None per sequence)") -> None:
    """``adapters`` must be a sequence (not a str): else TypeError saying ``what`` it must be."""
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters must be {what}, got {type(adapters).__name__}")


def _split_dora(adapter: Mapping, layers: dict) -> tuple[dict, dict]:
    """``({module: (lora_A, lora_B, scaling)}, {module: g (out,) fp32})``: DoRA entries (4-tuples
    ``(lora_A, lora_B, scaling, magnitude)``) split into their LoRA factors and the row scale
    ``g = magnitude / ||W + scaling B A||_row`` against the served layer's base weight. LoRA
    entries pass through unchanged. Raises before anything is stored."""
    from .ops.dora import dora_norm

    if not isinstance(adapter, Mapping):
        return adapter, {}                    # refused by the store, with its message
    out, gs = {}, {}
    for mod, entry in adapter.items():
        if mod not in layers or not (isinstance(entry, (tuple, list)) and len(entry) == 4):
            out[mod] = entry
            continue
        A, B, s, m = entry
        lay = layers[mod]
        if isinstance(lay, ServingEmbedding):
            raise ValueError(f"adapter[{mod!r}]: DoRA on an embedding is not supported")
        w = lay.weight
        for nm, t, shape in (("lora_A", A, (None, lay.in_features)),
                             ("lora_B", B, (lay.out_features, None)),
                             ("magnitude", m, (lay.out_features,))):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != len(
                    shape) or any(e is not None and d != e for d, e in zip(t.shape, shape)):
                raise ValueError(f"adapter[{mod!r}] (DoRA): {nm} must be a float tensor of shape "
                                 f"{shape} (None: any), got {getattr(t, 'shape', t)}")
        if B.shape[1] != A.shape[0]:
            raise ValueError(f"adapter[{mod!r}] (DoRA): lora_B {tuple(B.shape)} and lora_A "
                             f"{tuple(A.shape)} must share the rank")
        s = V.scalar(f"adapter[{mod!r}].scaling", s)
        with torch.no_grad():
            Aw, Bw = A.to(w.device, w.dtype), B.to(w.device, w.dtype)
            gs[mod] = m.to(w.device, torch.float32) / dora_norm(w.detach(), Aw, Bw, s)
        out[mod] = (A, B, s)
    return out, gs


class _ServingState:
    """Per-call adapter selection shared by every :class:`ServingLinear` of one model: the
    per-sequence slot table set by :meth:`MultiAdapterModel.using`, and the batch plans built from
    it -- once per (tokens per sequence, device, backend), i.e. once per forward (a KV-cached
    ``generate`` reuses its decode-step plan across steps: same ids, same shapes).

    ``owner``: the thread that set the selection (:func:`threading.get_ident`; None while torch
    traces). A layer called from any other thread -- a request thread calling ``server.model``
    directly, or ``server(x)`` without adapters, while another thread is inside ``using`` --
    does not see it and runs the base linear (see :meth:`applies`)."""

    def __init__(self, max_adapters: int):
        self.max_adapters = max_adapters
        self.seq_ids: torch.Tensor | None = None   # (passes, batch) int64 on the model device
        self.count: torch.Tensor | None = None     # CPU int64 (1,): distinct adapters in batch
        self.seq_names: list[str | None] = []      # one stored adapter (or None) per sequence
        self.owner: int | None = None
        # aLoRA: per sequence None (every token) or the offset from the end where its adapter
        # starts (serving_extras.tails); None when no aLoRA adapter is in the batch
        self.alora_tails: list | None = None
        self._plans: dict = {}

    def applies(self) -> bool:
        """Whether a selection is set for the calling thread."""
        if self.seq_ids is None:
            return False
        return (torch.compiler.is_compiling() or self.owner is None
                or self.owner == threading.get_ident())

    def plans(self, per_seq: int, device: torch.device, backend: str) -> tuple:
        """One :class:`~lora_kernels.ops.multi_lora.BatchPlan` per pass (summed adapters add
        passes) for ``per_seq`` tokens per sequence, built on first use."""
        key = (per_seq, device.type, device.index, backend)
        plans = self._plans.get(key)
        if plans is None:
            ids = self.seq_ids.to(device)
            tok = [ids[j].repeat_interleave(per_seq) for j in range(ids.shape[0])]
            if self.alora_tails is not None:    # aLoRA: tokens before the invocation -> base
                live = _extras.alora_mask(self.alora_tails, per_seq, ids.device)
                tok = [torch.where(live, t, -1) for t in tok]
            plans = tuple(_plan.build(t, self.max_adapters, self.count, backend=backend)
                          for t in tok)
            self._plans[key] = plans
        return plans

    def clear(self):
        self.seq_ids = None
        self.count = None
        self.seq_names = []
        self.owner = None
        self.alora_tails = None
        self._plans = {}


class ServingLinear(nn.Module):
    """Drop-in for an ``nn.Linear`` that adds, for every token, the adapter its sequence picked.

    Keeps the original ``weight``/``bias`` parameters (no copy) and an :class:`AdapterPool`. The
    batch plan (per-token adapter ids and their grouping) comes from the owning
    :class:`MultiAdapterModel` for the duration of one call; outside such a call (or for ``None``
    adapters) the layer is the plain base linear. ``x`` must be batch-first ``(batch, ..., in)``;
    token ``t`` of sequence ``b`` uses that sequence's adapter(s) (a summed adapter served as
    several slots adds one pass per part).
    """

    def __init__(self, linear: nn.Linear, pool: AdapterPool, state: _ServingState,
                 backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # a bitsandbytes Linear4bit's weight: an NF4Weight taken as it is (ops.qlora)
        self.weight = _qlora.serving_base(linear)[0]
        self.bias = linear.bias
        self.pool = pool
        self._state = state
        self.backend = backend
        # DoRA adapters: name -> g = m / ||W + s B A||_row (out,) fp32 on the weight's device; the
        # pool holds their LoRA factors, the output row scale is applied after the fused op
        self.dora_g: dict[str, torch.Tensor] = {}
        # adapters with biases (PEFT lora_bias / bias="lora_only"|"all"): name -> delta (out,)
        # fp32 added to that adapter's rows (lora_kernels.serving_bias)
        self.bias_delta: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._state
        if not st.applies() or (len(self.pool) == 0 and not self.bias_delta):
            return _qlora.base_linear(x, self.weight, self.bias, self.backend or "torch")
        batch = st.seq_ids.shape[1]
        if x.dim() < 2 or x.shape[0] != batch:
            raise ValueError(f"ServingLinear expects batch-first input (batch={batch}, ..., "
                             f"{self.in_features}), got shape {tuple(x.shape)}")
        if x.dtype != self.pool.dtype:
            raise TypeError(f"x must have the adapters' dtype {self.pool.dtype}, got {x.dtype}")
        x2 = x.reshape(-1, self.in_features)
        be = resolve_backend(self.backend, x.device, "multi_lora_linear")
        plans = st.plans(x2.shape[0] // batch, x.device, be)
        # the plans' ids come from the server's own name -> slot map (always in range); a slot
        # this module's pool leaves empty has rank 0, which every backend treats as "no adapter"
        y = apply_plans(x2, self.weight, self.bias, self.pool, plans, be)
        if self.dora_g:
            y = self._dora_rows(y, batch)
        if self.bias_delta:
            y = add_bias_rows(y, batch, st.seq_names, self.bias_delta)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _dora_rows(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        """DoRA sequences: ``y = g * (x W^T + s x A^T B^T) + b = g * (y - b) + b``, on the rows
        of those sequences only (LoRA / base rows are left bit-identical). A torch op over the
        DoRA rows (not fused into the multi-LoRA kernels)."""
        idx = [i for i, n in enumerate(self._state.seq_names) if n in self.dora_g]
        if not idx:
            return y
        y3 = y.view(batch, -1, self.out_features)
        it = torch.tensor(idx, device=y.device)
        G = torch.stack([self.dora_g[self._state.seq_names[i]] for i in idx]).to(y.dtype)
        sel = y3.index_select(0, it)
        new = (torch.addcmul(self.bias, sel - self.bias, G[:, None, :]) if self.bias is not None
               else sel * G[:, None, :])
        if torch.is_grad_enabled() and y.requires_grad:
            return y3.index_copy(0, it, new).reshape(y.shape)
        return y3.index_copy_(0, it, new).reshape(y.shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, adapters={len(self.pool)}")


def _serialized(fn):
    """A :class:`MultiAdapterModel` method run under the server's lock (class doc, "Threads")."""
    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        with self._locked():
            return fn(self, *args, **kwargs)
    return run


class MultiAdapterModel(nn.Module):
    """Serve many LoRA adapters on one base model, one forward per mixed batch.

    ``MultiAdapterModel(model, target_modules)`` replaces, IN PLACE, every ``nn.Linear`` of
    ``model`` matched by ``target_modules`` (the rules of :func:`lora_kernels.inject`) with a
    :class:`ServingLinear` holding an :class:`AdapterPool` of ``max_adapters`` slots of rank up to
    ``max_rank`` (dtype/device of that linear's weight); a matched ``nn.Embedding`` becomes a
    :class:`ServingEmbedding` (embedding LoRA: its pool holds ``lora_A (r, num_embeddings)``,
    ``lora_B (dim, r)``). One adapter = one slot index shared by
    every layer; a module an adapter does not cover keeps that slot empty (rank 0: no work).

    ``server(input_ids, adapters=[name | None, ...], **kwargs)`` runs ``model(input_ids,
    **kwargs)`` once, each sequence with its adapter (``None`` = base model). ``with
    server.using(adapters): ...`` selects adapters for any other call (e.g. ``generate``).

    Summed adapters: ``add_sum(name, [a, b, ...])`` serves ``delta_a + delta_b + ...`` without
    copying any weight (the layer adds one pass per part, each with its own rank and scale);
    ``add(name, compose.sum_loras(...) per module)`` is the copying alternative (one slot of the
    concatenated rank).

    Threads: calls may come from several request threads. Each ``server(x, adapters)`` /
    ``generate`` / ``using`` block holds the server's lock for its duration, as do ``add``,
    ``add_sum``, ``remove``, ``prefetch`` and ``unload``, so concurrent calls run one after
    another and each gets exactly its own adapters (the slots a batch reads are never rewritten
    under it, and the selection is never another thread's). A thread that calls the wrapped model
    without a selection (``server.model(x)``, ``server(x)``) while another is inside ``using``
    gets the base model. (Under ``torch.compile`` the lock is not taken: a compiled server is
    called from one thread at a time by its caller.)
    """

    def __init__(self, model: nn.Module, target_modules, max_adapters: int = 8,
                 max_rank: int = 64, backend: str | None = None,
                 max_extra_bytes: int | None = None, *, target_parameters=None):
        super().__init__()
        from ._conv1d import as_linear
        from .inject import find_linears, set_submodule
        from .moe import find_expert_params
        from .serving_moe import ServingExperts, pool_key

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        V.positive_int("max_adapters", max_adapters)
        V.positive_int("max_rank", max_rank)
        # every argument checked before the first layer is swapped in: a refused call changes
        # nothing in the model
        if max_extra_bytes is not None and (isinstance(max_extra_bytes, bool) or not isinstance(
                max_extra_bytes, int) or max_extra_bytes < 0):
            raise ValueError(f"max_extra_bytes must be None or an int >= 0, got "
                             f"{max_extra_bytes!r}")
        if target_modules is None and target_parameters is None:
            raise ValueError("target_modules is required (e.g. ['q_proj', 'v_proj'])")
        names = ([] if target_modules is None else
                 find_linears(model, target_modules, embeddings=True))
        # MoE (target_parameters: PEFT's rule): experts modules served by ServingExperts
        experts = ({} if target_parameters is None else
                   find_expert_params(model, target_parameters))
        self.model = model
        self.max_adapters, self.max_rank, self.backend = max_adapters, max_rank, backend
        self._state = _ServingState(max_adapters)
        # one call at a time (see "Threads" in the class doc); re-entrant so a nested using()
        # in the same thread reaches its clear "do not nest" error instead of deadlocking
        self._lock = threading.RLock()
        self.layers: dict[str, ServingLinear | ServingEmbedding] = {}
        # the replaced modules themselves, for unload() (a plain dict: not submodules)
        self._originals: dict[str, nn.Module] | None = {}
        for name in names:
            self._originals[name] = model.get_submodule(name)
            if isinstance(self._originals[name], nn.Embedding):
                emb = self._originals[name]
                pool = AdapterPool(emb.num_embeddings, emb.embedding_dim, max_adapters, max_rank,
                                   dtype=emb.weight.dtype, device=emb.weight.device)
                layer = ServingEmbedding(emb, pool, self._state, backend)
                set_submodule(model, name, layer)
                self.layers[name] = layer
                continue
            # a transformers Conv1D is served through its (out, in) weight view (same storage)
            lin = as_linear(model.get_submodule(name))
            pool = AdapterPool(lin.in_features, lin.out_features, max_adapters, max_rank,
                               dtype=_qlora.serving_base(lin)[1], device=lin.weight.device)
            layer = ServingLinear(lin, pool, self._state, backend)
            set_submodule(model, name, layer)
            self.layers[name] = layer
        self.expert_layers: dict[str, ServingExperts] = {}
        for name, params in experts.items():
            self._originals[name] = model.get_submodule(name)
            layer = ServingExperts(self._originals[name], params, self._state, max_adapters,
                                   max_rank, backend)
            set_submodule(model, name, layer)
            self.expert_layers[name] = layer
        from .store import AdapterStore

        # every stored adapter (any number) in host memory; the hot ones in the max_adapters slots
        # (an experts module: one pool per expert parameter and expert, serving_moe.pool_key)
        self.store = AdapterStore({**{n: lay.pool for n, lay in self.layers.items()},
                                   **{pool_key(n, p, e): pool
                                      for n, lay in self.expert_layers.items()
                                      for p, ps in lay.pools.items()
                                      for e, pool in enumerate(ps)}})
        if max_extra_bytes is not None:
            self.store.max_extra_bytes = max_extra_bytes
        self._sums: dict[str, list[str]] = {}     # served sums: name -> stored parts

    # ------------------------------------------------------------------ adapters
    @property
    def module_names(self) -> list[str]:
        return list(self.layers)

    @property
    def _slots(self) -> dict[str, int]:
        """``{name: slot}`` of the stored adapters now on the device."""
        return self.store.resident()

    @property
    def stats(self):
        """The store's :class:`~lora_kernels.store.StoreStats` (hits, misses, evictions,
        bytes moved)."""
        return self.store.stats

    def adapters(self) -> list[str]:
        self._live()
        return self.store.names() + list(self._sums)

    def __contains__(self, name) -> bool:
        self._live()
        return name in self.store or name in self._sums

    @_serialized
    # copy.deepcopy / pickle: a lock belongs to one object and is never copied; the copy gets
    # its own (a server copied for a reference model, or sent to another process)
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()

    def add(self, name: str, adapter: Mapping) -> int | None:
        """Load ``adapter`` ({module name: (lora_A, lora_B, scaling)}, e.g. from
        :func:`lora_kernels.load_peft_adapter`) under ``name``. Any number of adapters may be
        added: each is kept in host memory (:class:`~lora_kernels.store.AdapterStore`) and swapped
        into one of the ``max_adapters`` device slots when a batch names it. Returns its slot if a
        free one took it now, else None. Every entry is validated against its layer before
        anything is written; modules of the model the adapter does not name keep the base
        weights. DoRA entries (``DoRAFactors`` / ``(lora_A, lora_B, scaling, magnitude)``, e.g. a
        ``use_dora`` PEFT adapter) are served as LoRA factors in the pool plus the layer's output
        row scale ``g = magnitude / ||W + scaling B A||_row`` (applied to that adapter's rows
        after the multi-LoRA op), so DoRA and LoRA adapters mix in one batch."""
        from .inject import check_base_weights
        from .serving_moe import expand_expert_entries

        self._live()
        V.adapter_name(name)
        if name in self._sums:
            raise ValueError(f"name {name!r} is already loaded; remove it first")
        check_base_weights(self.model, adapter)
        check_embedding_entries(adapter, self.layers)
        deltas = bias_deltas(self.model, adapter, self.layers)
        # the store validates the dict (type, modules, every entry) before anything is written;
        # DoRA entries ((lora_A, lora_B, scaling, magnitude), from a use_dora PEFT adapter): the
        # pool stores the LoRA factors, the layer its row scale g (computed here, in low rank)
        built = serving_extras.prepare(self, name, adapter)
        adapter, dora_g = _split_dora(adapter, self.layers)
        # MoE entries (ExpertFactors "<experts module>.<param>") -> one entry per expert pool
        adapter = expand_expert_entries(adapter, self.expert_layers)
        slot = self.store.add(name, adapter)
        serving_extras.commit(self, name, built)
        for mod, g in dora_g.items():
            self.layers[mod].dora_g[name] = g
        for mod, d in deltas.items():
            self.layers[mod].bias_delta[name] = d
        return slot

    @_serialized
    def prefetch(self, adapters: Sequence[str | None]) -> list[str]:
        """Start loading the adapters of a coming batch (copies overlap the current one on a
        GPU); returns the stored names whose loads were started."""
        _adapter_list(adapters, "a list of names or None")
        names = []
        for a in adapters:
            if a is not None and a not in self:
                raise ValueError(f"adapters: {a!r} is not loaded (loaded: {len(self.store)} "
                                 "adapters)")
            if a is not None:
                names += self._sums.get(a, [a])
        return self.store.prefetch(names)

    def load_peft(self, name: str, path, **kwargs) -> int | None:
        """Load a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``)
        under ``name``; see :func:`lora_kernels.load_peft_adapter`."""
        from .peft_io import load_peft_adapter

        return self.add(name, load_peft_adapter(path, **kwargs))

    @_serialized
    def add_sum(self, name: str, parts: Sequence[str]) -> None:
        """Serve ``sum(delta_p for p in parts)`` as adapter ``name`` (no weights copied)."""
        self._live()
        V.adapter_name(name)
        if name in self:
            raise ValueError(f"name {name!r} is already loaded; remove it first")
        if isinstance(parts, str) or not isinstance(parts, Sequence) or not parts:
            raise TypeError("parts must be a non-empty list of adapter names")
        flat: list[str] = []
        for p in parts:
            if p in self._sums:
                flat.extend(self._sums[p])
            elif p in self.store:
                if any(p in getattr(lay, "bias_delta", {}) for lay in self.layers.values()):
                    raise ValueError(f"parts: {p!r} carries biases; summing adapters with "
                                     "biases is not supported")
                if p in self.store.extras:
                    raise ValueError(f"parts: {p!r} carries trainable tokens / modules_to_save / "
                                     "aLoRA; summing such adapters is not supported")
                if any(p in lay.dora_g for lay in self.layers.values()):
                    raise ValueError(f"parts: {p!r} is a DoRA adapter; a sum of DoRA adapters is "
                                     "not one (each rescales the base output): not supported")
                flat.append(p)
            else:
                raise ValueError(f"parts: {p!r} is not loaded (loaded: {self.adapters()})")
        self._sums[name] = flat

    @_serialized
    def remove(self, name: str) -> None:
        """Unload ``name`` (a stored adapter's slot is zeroed and reused by later adds)."""
        if name in self._sums:
            del self._sums[name]
            return
        if name not in self.store:
            raise ValueError(f"name {name!r} is not loaded (loaded: {self.adapters()})")
        users = [s for s, ps in self._sums.items() if name in ps]
        if users:
            raise ValueError(f"name {name!r} is part of the summed adapter(s) {users}; remove "
                             "those first")
        self.store.remove(name)
        for lay in self.layers.values():
            lay.dora_g.pop(name, None)
            getattr(lay, "bias_delta", {}).pop(name, None)

    @_serialized
    def unload(self) -> nn.Module:
        """Give the plain model back: every served layer is replaced by the very module it
        replaced (the same objects: weights never copied or modified, a GPT-2 ``Conv1D`` stays a
        ``Conv1D``), every adapter is dropped and the device slots are freed; returns the model.
        The server is empty afterwards: any later call raises ``ValueError``."""
        from .inject import set_submodule

        self._live()
        model = self.model
        for name, mod in self._originals.items():
            set_submodule(model, name, mod)
        self._originals = None
        self.layers = {}
        self.expert_layers = {}
        self._sums = {}
        self.store = None
        del self.model
        return model

    def _live(self) -> None:
        if self._originals is None:
            raise ValueError("this MultiAdapterModel was unload()ed: it serves nothing any more "
                             "(build a new one on the returned model)")

    # ------------------------------------------------------------------ forward
    def _seq_ids(self, adapters, batch: int, device):
        """``(ids (passes, batch) int64 on device, distinct adapters, lease)``: the stored
        adapters the batch names are made resident and held until the lease is released."""
        _adapter_list(adapters)
        if len(adapters) != batch:
            raise ValueError(f"adapters must have one entry per sequence: batch is {batch}, got "
                             f"{len(adapters)}")
        rows = []
        for a in adapters:
            if a is None:
                rows.append([])
            elif not isinstance(a, str):
                raise TypeError(f"adapters entries must be names or None, got {type(a).__name__}")
            elif a in self._sums:
                rows.append(self._sums[a])
            elif a in self.store:
                rows.append([a])
            else:
                raise ValueError(f"adapters: {a!r} is not loaded (loaded: {self.adapters()})")
        names = list(dict.fromkeys(n for r in rows for n in r))
        if len(names) > self.max_adapters:
            raise ValueError(f"adapters: the batch names {len(names)} distinct stored adapters "
                             f"but the model has max_adapters={self.max_adapters} device slots; "
                             "split the batch or raise max_adapters")
        lease = self.store.acquire(names)
        passes = 1
        for r in rows:                       # (no max(genexpr): torch.compile traces this)
            passes = max(passes, len(r))
        table = [[lease.slots[r[j]] if j < len(r) else -1 for r in rows] for j in range(passes)]
        return torch.tensor(table, dtype=torch.int64).to(device), len(names), lease

    @contextlib.contextmanager
    def using(self, adapters: Sequence[str | None], input_ids: torch.Tensor | None = None):
        """Select one adapter per sequence (batch dim of every served linear's input) for the
        calls made inside the ``with`` block. ``input_ids (batch, length)``: needed when an aLoRA
        adapter is in the batch (its tokens start at the last invocation sequence in them; a
        KV-cached ``generate`` keeps the prompt's offsets for every decode step, as PEFT)."""
        self._live()
        _adapter_list(adapters)
        with self._locked():
            lays = [*self.layers.values(), *self.expert_layers.values()]
            dev = lays[0].weight.device if lays else "cpu"
            if self._state.seq_ids is not None:
                raise RuntimeError("MultiAdapterModel calls do not nest")
            tails = serving_extras.tails(self, adapters, input_ids)
            ids, distinct, lease = self._seq_ids(adapters, len(adapters), dev)
            self._state.alora_tails = tails
            self._state.seq_ids = ids
            self._state.count = torch.tensor([distinct], dtype=torch.int64)   # CPU: no sync
            self._state.seq_names = [a if a is not None and a not in self._sums else None
                                     for a in adapters]
            if not torch.compiler.is_compiling():
                self._state.owner = threading.get_ident()
            try:
                yield self
            finally:
                self._state.clear()
                self.store.release(lease)

    @contextlib.contextmanager
    def _locked(self):
        """The server's lock (class doc, "Threads"); not taken while torch traces."""
        if torch.compiler.is_compiling():
            yield
            return
        with self._lock:
            yield

    def forward(self, input_ids: torch.Tensor, adapters: Sequence[str | None] | None = None,
                **kwargs):
        """``model(input_ids, **kwargs)`` with sequence ``b`` using ``adapters[b]``."""
        self._live()
        if adapters is None:
            return self.model(input_ids, **kwargs)
        V.tensor("input_ids", input_ids, min_ndim=1)
        _adapter_list(adapters)
        if len(adapters) != input_ids.shape[0]:
            raise ValueError(f"adapters must have one entry per sequence: input_ids has batch "
                             f"{input_ids.shape[0]}, got {len(adapters)} adapters")
        with self.using(adapters, input_ids):
            return self.model(input_ids, **kwargs)

    def generate(self, input_ids: torch.Tensor, adapters: Sequence[str | None], **kwargs):
        """``model.generate`` with per-sequence adapters (KV-cached decode steps included).

        ``adapters[b]`` serves input row ``b``; with ``num_beams = k > 1`` (beam search) or
        ``num_return_sequences = n`` without beams, transformers runs ``k`` (resp. ``n``) rows
        per input, each name is repeated as many times (as PEFT does for ``adapter_names``), and
        the output has those rows in the same order. Both are read from ``kwargs`` or, if absent,
        from ``generation_config`` (the argument or the model's)."""
        from .generate import expand_adapters

        rows = expand_adapters(self.model, input_ids, adapters, kwargs)
        with self.using(rows, input_ids.repeat_interleave(len(rows) // max(len(adapters), 1), 0)):
            return self.model.generate(input_ids, **kwargs)

