"""Multi-adapter serving: :class:`AdapterPool` (stacked device storage for many adapters of one
linear layer) and :class:`MultiAdapterModel` (one forward for a batch whose sequences each pick
their own adapter, on any model made of ``nn.Linear``s).

Pool layout (fixed; the Triton and CUDA kernels read it directly), rank-major so a kernel loops
only over an adapter's real rank and reads contiguous rows:

  ``lora_A``   (max_adapters, max_rank, in_features)   pool dtype; rows >= rank are zero
  ``lora_Bt``  (max_adapters, max_rank, out_features)  pool dtype; lora_B transposed, rows >= rank 0
  ``ranks``    int32 (max_adapters,) on the pool device; 0 for a free slot
  ``scalings`` float32 (max_adapters,) on the pool device; 0 for a free slot

A host-side mirror (slot -> name, rank) answers ``len``/``slot``/id validation without touching
the device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _validate as V
from ._backend import resolve_backend
from .ops import multi_lora as _ml

_POOL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def _adapter_name(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("name must be a non-empty string")
    return name


@torch.library.custom_op("lora_kernels::check_ids", mutates_args=())
def _check_ids_op(ids: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """``ids`` copied to ``ranks``' device after checking each is -1 or a slot with a nonzero
    rank (``ValueError`` otherwise): the validation :meth:`AdapterPool.check_ids` runs under
    ``torch.compile``, where a data-dependent ``if`` would break the graph."""
    maxa = ranks.shape[0]
    clamped = ids.clamp(0, maxa - 1).long().to(ranks.device)
    bad = ((ids < -1) | (ids >= maxa)).to(ranks.device)
    free = (ids.to(ranks.device) >= 0) & ~bad & (ranks[clamped] == 0)
    if bool((bad | free).any()):
        t = int((bad | free).nonzero()[0, 0])
        raise ValueError(f"adapter_ids[{t}] = {int(ids[t])} is not -1 or a loaded slot of the "
                         f"pool (max_adapters={maxa})")
    return ids.to(ranks.device, copy=True)


@_check_ids_op.register_fake
def _(ids, ranks):
    return torch.empty_like(ids, device=ranks.device)


class AdapterPool:
    """Stacked storage for up to ``max_adapters`` LoRA adapters of one ``in -> out`` layer.

    ``add(name, lora_A (r, in), lora_B (out, r), scaling)`` stores an adapter of any rank
    ``1 <= r <= max_rank`` in the lowest free slot (factors of any float dtype/device are copied
    into the pool's dtype and device) and returns the slot; ``remove(name)`` zeroes the slot and
    frees it, so a reused slot never sees stale weights. Every refused call (bad name, shape,
    dtype, rank, full pool) raises before anything is written: the pool is unchanged.

    Training: ``pool.requires_grad_()`` makes ``lora_A`` / ``lora_Bt`` leaf tensors requiring grad;
    :func:`lora_kernels.multi_lora_linear` then accumulates ``pool.lora_A.grad`` (max_adapters,
    max_rank, in) and ``pool.lora_Bt.grad`` (zero for unused slots and rows >= rank, so SGD/Adam
    keep those entries at zero). :meth:`grad` gives one adapter's gradients in PEFT layout.
    """

    def __init__(self, in_features: int, out_features: int, max_adapters: int, max_rank: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.in_features = _pos_int("in_features", in_features)
        self.out_features = _pos_int("out_features", out_features)
        self.max_adapters = _pos_int("max_adapters", max_adapters)
        self.max_rank = _pos_int("max_rank", max_rank)
        if dtype not in _POOL_DTYPES:
            raise TypeError(f"dtype must be one of {_POOL_DTYPES}, got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device if device is not None else "cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        kw = dict(dtype=dtype, device=self.device)
        self.lora_A = torch.zeros(max_adapters, max_rank, in_features, **kw)
        self.lora_Bt = torch.zeros(max_adapters, max_rank, out_features, **kw)
        self.ranks = torch.zeros(max_adapters, dtype=torch.int32, device=self.device)
        self.scalings = torch.zeros(max_adapters, dtype=torch.float32, device=self.device)
        self._slot_of: dict[str, int] = {}
        self._name_at: list[str | None] = [None] * max_adapters
        self._rank_at: list[int] = [0] * max_adapters
        self._scaling_at: list[float] = [0.0] * max_adapters
        self._occupied = torch.zeros(max_adapters, dtype=torch.bool)  # host mirror (CPU)

    # ------------------------------------------------------------------ host-side queries
    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, name) -> bool:
        return name in self._slot_of

    def names(self) -> list[str]:
        """Loaded adapter names, in slot order."""
        return [n for n in self._name_at if n is not None]

    def slot(self, name: str) -> int:
        """The slot (adapter id) of ``name``; ``ValueError`` if it is not loaded."""
        _adapter_name(name)
        if name not in self._slot_of:
            raise ValueError(f"name {name!r} is not in the pool (loaded: {self.names()})")
        return self._slot_of[name]

    def rank(self, name: str) -> int:
        return self._rank_at[self.slot(name)]

    def scaling(self, name: str) -> float:
        return self._scaling_at[self.slot(name)]

    @property
    def max_active_rank(self) -> int:
        """The largest rank currently loaded (0 when empty); host-side, no device read."""
        return max(self._rank_at)

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Copies of ``(lora_A (r, in), lora_B (out, r), scaling)`` of ``name``."""
        s = self.slot(name)
        r = self._rank_at[s]
        return (self.lora_A[s, :r].detach().clone(), self.lora_Bt[s, :r].detach().t().clone(),
                self._scaling_at[s])

    def grad(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(dA (r, in), dB (out, r))`` of ``name`` from the pool's ``.grad`` (None if absent)."""
        s = self.slot(name)
        r = self._rank_at[s]
        ga, gb = self.lora_A.grad, self.lora_Bt.grad
        return (ga[s, :r] if ga is not None else None, gb[s, :r].t() if gb is not None else None)

    def ids(self, adapters: Sequence[str | None], device=None) -> torch.Tensor:
        """Adapter ids (int32) for a list of names (``None`` -> -1), on ``device`` (default CPU)."""
        if isinstance(adapters, str) or not isinstance(adapters, Sequence):
            raise TypeError(f"adapters must be a list of names or None, got "
                            f"{type(adapters).__name__}")
        out = [-1 if a is None else self.slot(a) for a in adapters]
        return torch.tensor(out, dtype=torch.int32, device=device)

    def check_ids(self, adapter_ids, num_tokens: int, name: str = "adapter_ids") -> torch.Tensor:
        """Validate ``adapter_ids`` for ``num_tokens`` tokens; return them on the pool's device.

        CPU ids: checked against the host mirror of occupied slots (no device sync), then copied.
        Ids on the pool's (GPU) device: one fused device check (one sync); while a CUDA graph is
        being captured the check is skipped (the kernels treat invalid ids as -1, so nothing is
        read out of bounds). Raises ``TypeError`` (not an int tensor) / ``ValueError`` (shape,
        device, an id outside ``[-1, max_adapters)``, an id naming a freed slot).
        """
        ids = adapter_ids
        if isinstance(ids, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise TypeError(f"{name} as a list must hold ints")
            ids = torch.tensor(ids, dtype=torch.int64)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be an int32/int64 tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must have dtype int32 or int64, got {ids.dtype}")
        if ids.dim() != 1 or ids.shape[0] != num_tokens:
            raise ValueError(f"{name} must have shape ({num_tokens},) (one id per token of x), "
                             f"got {tuple(ids.shape)}")
        maxa = self.max_adapters
        if torch.compiler.is_compiling():  # data-dependent: checked inside one opaque op
            return torch.ops.lora_kernels.check_ids(ids, self.ranks)
        if ids.device.type == "cpu":
            bad = (ids < -1) | (ids >= maxa)
            used = ids >= 0
            free = used & ~bad & ~self._occupied[ids.clamp(0, maxa - 1).long()]
            if bool((bad | free).any()):
                self._raise_bad_ids(name, ids, bad, free)
            return ids.to(self.device, non_blocking=True) if self.device.type != "cpu" else ids
        if ids.device != self.device:
            raise ValueError(f"{name} must be on the CPU or on the pool's device {self.device}, "
                             f"got {ids.device}")
        if ids.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return ids
        clamped = ids.clamp(0, maxa - 1).long()
        bad = (ids < -1) | (ids >= maxa)
        free = (ids >= 0) & ~bad & (self.ranks[clamped] == 0)
        if bool((bad | free).any()):                                # the one device sync
            self._raise_bad_ids(name, ids.cpu(), bad.cpu(), free.cpu())
        return ids

    def _raise_bad_ids(self, name, ids, bad, free):
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}[{t}] = {int(ids[t])} is outside the pool: ids must be -1 "
                             f"(base only) or a slot in [0, {self.max_adapters})")
        t = int(free.nonzero()[0, 0])
        raise ValueError(f"{name}[{t}] = {int(ids[t])} names a free slot (no adapter loaded "
                         f"there; loaded: { {n: s for n, s in self._slot_of.items()} })")

    # ------------------------------------------------------------------ mutation
    def _prepare(self, name, lora_A, lora_B, scaling, slot):
        """Validate an ``add`` and convert the factors; touches nothing in the pool."""
        _adapter_name(name)
        if name in self._slot_of:
            raise ValueError(f"name {name!r} is already in the pool (slot {self._slot_of[name]}); "
                             "remove it first")
        V.float_tensor("lora_A", lora_A, ndim=2)
        V.float_tensor("lora_B", lora_B, ndim=2)
        r = lora_A.shape[0]
        if r < 1:
            raise ValueError(f"lora_A must have at least one row (rank >= 1), got "
                             f"{tuple(lora_A.shape)}")
        V.shape("lora_A", lora_A, (r, self.in_features), "(r, in_features) of the pool")
        V.shape("lora_B", lora_B, (self.out_features, r),
                f"(out_features, r) with r={r} from lora_A")
        if r > self.max_rank:
            raise ValueError(f"lora_A has rank {r} > the pool's max_rank={self.max_rank}")
        s = V.scalar("scaling", scaling)
        if not math.isfinite(s):
            raise ValueError(f"scaling must be finite, got {s}")
        if slot is None:
            if len(self._slot_of) >= self.max_adapters:
                raise ValueError(f"the pool is full (max_adapters={self.max_adapters}): remove an "
                                 f"adapter first (loaded: {self.names()})")
            slot = self._name_at.index(None)
        else:
            if isinstance(slot, bool) or not isinstance(slot, int):
                raise TypeError(f"slot must be an int or None, got {type(slot).__name__}")
            if not 0 <= slot < self.max_adapters:
                raise ValueError(f"slot must be in [0, {self.max_adapters}), got {slot}")
            if self._name_at[slot] is not None:
                raise ValueError(f"slot {slot} is taken by {self._name_at[slot]!r}")
        a = lora_A.detach().to(device=self.device, dtype=self.dtype)
        bt = lora_B.detach().t().to(device=self.device, dtype=self.dtype)
        return slot, r, s, a, bt

    @torch.no_grad()
    def _write(self, name, slot, r, s, a, bt):
        self.lora_A[slot].zero_()
        self.lora_Bt[slot].zero_()
        self.lora_A[slot, :r].copy_(a)
        self.lora_Bt[slot, :r].copy_(bt)
        self.ranks[slot] = r
        self.scalings[slot] = s
        self._slot_of[name] = slot
        self._name_at[slot] = name
        self._rank_at[slot] = r
        self._scaling_at[slot] = s
        self._occupied[slot] = True

    def add(self, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float = 1.0,
            *, slot: int | None = None) -> int:
        """Store ``delta = scaling * lora_B @ lora_A`` under ``name``; return its slot (the id
        tokens use). ``slot`` picks a specific free slot (default: the lowest free one)."""
        prepared = self._prepare(name, lora_A, lora_B, scaling, slot)
        self._write(name, *prepared)
        return prepared[0]

    @torch.no_grad()
    def remove(self, name: str) -> int:
        """Free ``name``'s slot (its weights are zeroed); return the slot."""
        slot = self.slot(name)
        self.lora_A[slot].zero_()
        self.lora_Bt[slot].zero_()
        self.ranks[slot] = 0
        self.scalings[slot] = 0.0
        del self._slot_of[name]
        self._name_at[slot] = None
        self._rank_at[slot] = 0
        self._scaling_at[slot] = 0.0
        self._occupied[slot] = False
        return slot

    def requires_grad_(self, requires_grad: bool = True) -> AdapterPool:
        """Make ``lora_A`` / ``lora_Bt`` trainable leaves (see the class docstring)."""
        self.lora_A.requires_grad_(requires_grad)
        self.lora_Bt.requires_grad_(requires_grad)
        return self

    def parameters(self) -> list[torch.Tensor]:
        """``[lora_A, lora_Bt]``, e.g. for an optimizer after :meth:`requires_grad_`."""
        return [self.lora_A, self.lora_Bt]

    def __repr__(self) -> str:
        return (f"AdapterPool(in_features={self.in_features}, out_features={self.out_features}, "
                f"max_adapters={self.max_adapters}, max_rank={self.max_rank}, dtype={self.dtype}, "
                f"device={self.device}, adapters={self._ranks_by_name()})")

    def _ranks_by_name(self) -> dict[str, int]:
        return {n: self._rank_at[s] for n, s in self._slot_of.items()}


# ============================================================================ model level
def _split_dora(adapter: Mapping, layers: dict) -> tuple[dict, dict]:
    """``({module: (lora_A, lora_B, scaling)}, {module: g (out,) fp32})``: DoRA entries (4-tuples
    ``(lora_A, lora_B, scaling, magnitude)``) split into their LoRA factors and the row scale
    ``g = magnitude / ||W + scaling B A||_row`` against the served layer's base weight. LoRA
    entries pass through unchanged. Raises before anything is stored."""
    from .ops.dora import dora_norm

    out, gs = {}, {}
    for mod, entry in adapter.items():
        if not (isinstance(entry, (tuple, list)) and len(entry) == 4):
            out[mod] = entry
            continue
        A, B, s, m = entry
        lay = layers[mod]
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
    """Per-forward adapter selection shared by every :class:`ServingLinear` of one model."""

    def __init__(self):
        self.seq_ids: torch.Tensor | None = None   # (passes, batch) int32 on the model device
        self.num_adapters = 0                      # distinct adapters in the batch (host-known)
        self.seq_names: list[str | None] = []      # one stored adapter (or None) per sequence
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def token_ids(self, per_seq: int, device) -> torch.Tensor:
        key = (per_seq, device)
        t = self._cache.get(key)
        if t is None:
            t = self.seq_ids.to(device).repeat_interleave(per_seq, dim=1)
            self._cache[key] = t
        return t

    def clear(self):
        self.seq_ids = None
        self.num_adapters = 0
        self.seq_names = []
        self._cache = {}


class ServingLinear(nn.Module):
    """Drop-in for an ``nn.Linear`` that adds, for every token, the adapter its sequence picked.

    Keeps the original ``weight``/``bias`` parameters (no copy) and an :class:`AdapterPool`. The
    per-token adapter ids come from the owning :class:`MultiAdapterModel` for the duration of one
    call; outside such a call (or for ``None`` adapters) the layer is the plain base linear.
    ``x`` must be batch-first ``(batch, ..., in)``; token ``t`` of sequence ``b`` uses that
    sequence's adapter(s) (a summed adapter served as several slots adds one pass per part).
    """

    def __init__(self, linear: nn.Linear, pool: AdapterPool, state: _ServingState,
                 backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.pool = pool
        self._state = state
        self.backend = backend
        # DoRA adapters: name -> g = m / ||W + s B A||_row (out,) fp32 on the weight's device; the
        # pool holds their LoRA factors, the output row scale is applied after the fused op
        self.dora_g: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._state
        if st.seq_ids is None or len(self.pool) == 0:
            return F.linear(x, self.weight, self.bias)
        batch = st.seq_ids.shape[1]
        if x.dim() < 2 or x.shape[0] != batch:
            raise ValueError(f"ServingLinear expects batch-first input (batch={batch}, ..., "
                             f"{self.in_features}), got shape {tuple(x.shape)}")
        if x.dtype != self.pool.dtype:
            raise TypeError(f"x must have the adapters' dtype {self.pool.dtype}, got {x.dtype}")
        x2 = x.reshape(-1, self.in_features)
        T = x2.shape[0]
        ids = st.token_ids(T // batch, x.device)
        path = _ml.choose_path(T, st.num_adapters)
        be = resolve_backend(self.backend, x.device, "multi_lora_linear")
        p = self.pool
        # ids were built from the server's own name -> slot map (always in range); a slot this
        # module's pool leaves empty has rank 0, which every backend treats as "no adapter"
        y = _ml.apply(x2, self.weight, self.bias, p, ids[0], be, path)
        for j in range(1, ids.shape[0]):      # summed adapters: one more pass per extra part
            if torch.is_grad_enabled() and (y.requires_grad or p.lora_A.requires_grad):
                y = y + _ml.apply(x2, None, None, p, ids[j], be, path)
            else:
                torch.ops.lora_kernels.multi_lora_add_(y, x2, p.lora_A, p.lora_Bt, p.ranks,
                                                       p.scalings, ids[j], p.max_active_rank,
                                                       be, path)
        if self.dora_g:
            y = self._dora_rows(y, batch)
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


class MultiAdapterModel(nn.Module):
    """Serve many LoRA adapters on one base model, one forward per mixed batch.

    ``MultiAdapterModel(model, target_modules)`` replaces, IN PLACE, every ``nn.Linear`` of
    ``model`` matched by ``target_modules`` (the rules of :func:`lora_kernels.inject`) with a
    :class:`ServingLinear` holding an :class:`AdapterPool` of ``max_adapters`` slots of rank up to
    ``max_rank`` (dtype/device of that linear's weight). One adapter = one slot index shared by
    every layer; a module an adapter does not cover keeps that slot empty (rank 0: no work).

    ``server(input_ids, adapters=[name | None, ...], **kwargs)`` runs ``model(input_ids,
    **kwargs)`` once, each sequence with its adapter (``None`` = base model). ``with
    server.using(adapters): ...`` selects adapters for any other call (e.g. ``generate``).

    Summed adapters: ``add_sum(name, [a, b, ...])`` serves ``delta_a + delta_b + ...`` without
    copying any weight (the layer adds one pass per part, each with its own rank and scale);
    ``add(name, compose.sum_loras(...) per module)`` is the copying alternative (one slot of the
    concatenated rank).
    """

    def __init__(self, model: nn.Module, target_modules, max_adapters: int = 8,
                 max_rank: int = 64, backend: str | None = None):
        super().__init__()
        from .inject import _set, find_linears

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _pos_int("max_adapters", max_adapters)
        _pos_int("max_rank", max_rank)
        names = find_linears(model, target_modules)
        self.model = model
        self.max_adapters, self.max_rank, self.backend = max_adapters, max_rank, backend
        self._state = _ServingState()
        self.layers: dict[str, ServingLinear] = {}
        for name in names:
            lin = model.get_submodule(name)
            pool = AdapterPool(lin.in_features, lin.out_features, max_adapters, max_rank,
                               dtype=lin.weight.dtype, device=lin.weight.device)
            layer = ServingLinear(lin, pool, self._state, backend)
            _set(model, name, layer)
            self.layers[name] = layer
        from .store import AdapterStore

        # every stored adapter (any number) in host memory; the hot ones in the max_adapters slots
        self.store = AdapterStore({n: lay.pool for n, lay in self.layers.items()})
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
        return self.store.names() + list(self._sums)

    def __contains__(self, name) -> bool:
        return name in self.store or name in self._sums

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
        _adapter_name(name)
        if name in self:
            raise ValueError(f"name {name!r} is already loaded; remove it first")
        if not isinstance(adapter, Mapping):
            raise TypeError(f"adapter must be a dict {{module name: (lora_A, lora_B, scaling)}}, "
                            f"got {type(adapter).__name__}")
        if not adapter:
            raise ValueError("adapter must name at least one module")
        unknown = [k for k in adapter if k not in self.layers]
        if unknown:
            raise ValueError(f"adapter names modules that are not served: {unknown[:5]} "
                             f"(served: {self.module_names})")
        # DoRA entries ((lora_A, lora_B, scaling, magnitude), from a use_dora PEFT adapter): the
        # pool stores the LoRA factors, the layer its row scale g (computed here, in low rank)
        adapter, dora_g = _split_dora(adapter, self.layers)
        slot = self.store.add(name, adapter)
        for mod, g in dora_g.items():
            self.layers[mod].dora_g[name] = g
        return slot

    def prefetch(self, adapters: Sequence[str | None]) -> list[str]:
        """Start loading the adapters of a coming batch (copies overlap the current one on a
        GPU); returns the stored names whose loads were started."""
        if isinstance(adapters, str) or not isinstance(adapters, Sequence):
            raise TypeError(f"adapters must be a list of names or None, got "
                            f"{type(adapters).__name__}")
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

    def add_sum(self, name: str, parts: Sequence[str]) -> None:
        """Serve ``sum(delta_p for p in parts)`` as adapter ``name`` (no weights copied)."""
        _adapter_name(name)
        if name in self:
            raise ValueError(f"name {name!r} is already loaded; remove it first")
        if isinstance(parts, str) or not isinstance(parts, Sequence) or not parts:
            raise TypeError("parts must be a non-empty list of adapter names")
        flat: list[str] = []
        for p in parts:
            if p in self._sums:
                flat.extend(self._sums[p])
            elif p in self.store:
                if any(p in lay.dora_g for lay in self.layers.values()):
                    raise ValueError(f"parts: {p!r} is a DoRA adapter; a sum of DoRA adapters is "
                                     "not one (each rescales the base output): not supported")
                flat.append(p)
            else:
                raise ValueError(f"parts: {p!r} is not loaded (loaded: {self.adapters()})")
        self._sums[name] = flat

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

    # ------------------------------------------------------------------ forward
    def _seq_ids(self, adapters, batch: int, device):
        """``(ids (passes, batch) int32 on device, distinct adapters, lease)``: the stored
        adapters the batch names are made resident and held until the lease is released."""
        if isinstance(adapters, str) or not isinstance(adapters, Sequence):
            raise TypeError(f"adapters must be a list (one name or None per sequence), got "
                            f"{type(adapters).__name__}")
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
        passes = max(1, max((len(r) for r in rows), default=1))
        table = [[lease.slots[r[j]] if j < len(r) else -1 for r in rows] for j in range(passes)]
        return torch.tensor(table, dtype=torch.int32).to(device), len(names), lease

    @contextlib.contextmanager
    def using(self, adapters: Sequence[str | None]):
        """Select one adapter per sequence (batch dim of every served linear's input) for the
        calls made inside the ``with`` block."""
        if isinstance(adapters, str) or not isinstance(adapters, Sequence):
            raise TypeError(f"adapters must be a list (one name or None per sequence), got "
                            f"{type(adapters).__name__}")
        dev = next(iter(self.layers.values())).weight.device if self.layers else "cpu"
        if self._state.seq_ids is not None:
            raise RuntimeError("MultiAdapterModel calls do not nest")
        ids, distinct, lease = self._seq_ids(adapters, len(adapters), dev)
        self._state.seq_ids, self._state.num_adapters = ids, distinct
        self._state.seq_names = [a if a is not None and a not in self._sums else None
                                 for a in adapters]
        try:
            yield self
        finally:
            self._state.clear()
            self.store.release(lease)

    def forward(self, input_ids: torch.Tensor, adapters: Sequence[str | None] | None = None,
                **kwargs):
        """``model(input_ids, **kwargs)`` with sequence ``b`` using ``adapters[b]``."""
        if adapters is None:
            return self.model(input_ids, **kwargs)
        V.tensor("input_ids", input_ids, min_ndim=1)
        if not isinstance(adapters, Sequence) or isinstance(adapters, str):
            raise TypeError(f"adapters must be a list (one name or None per sequence), got "
                            f"{type(adapters).__name__}")
        if len(adapters) != input_ids.shape[0]:
            raise ValueError(f"adapters must have one entry per sequence: input_ids has batch "
                             f"{input_ids.shape[0]}, got {len(adapters)} adapters")
        with self.using(adapters):
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
        with self.using(rows):
            return self.model.generate(input_ids, **kwargs)

