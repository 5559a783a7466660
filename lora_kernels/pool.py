"""Adapter storage for multi-adapter serving: :class:`AdapterPool` (stacked device storage for
many adapters of one linear layer) and :class:`PoolView`, the value the multi-LoRA ops take.

Pool layout (fixed; the Triton and CUDA kernels read it directly), rank-major so a kernel loops
only over an adapter's real rank and reads contiguous rows:

  ``lora_A``   (max_adapters, max_rank, in_features)   pool dtype; rows >= rank are zero
  ``lora_Bt``  (max_adapters, max_rank, out_features)  pool dtype; lora_B transposed, rows >= rank 0
  ``ranks``    int32 (max_adapters,) on the pool device; 0 for a free slot
  ``scalings`` float32 (max_adapters,) on the pool device; 0 for a free slot

A host-side mirror (slot -> name, rank, scaling, occupied) answers ``len``/``slot``/id validation
and the rank bound without touching the device. Serving stores every adapter as LoRA-equivalent
factors: ``delta_i = scalings[i] * lora_Bt[i]^T lora_A[i]`` (``(out, in)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _validate as V
from ._cache import content, version
from .ops._register import define_op

_POOL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_ids_impl(ids: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """``ids`` copied to ``ranks``' device after ``_validate.ids_in_slots`` against the slots
    with a nonzero rank: the check :meth:`AdapterPool.check_ids` runs under ``torch.compile`` (as
    the registered op ``lora_kernels::check_ids``), where a data-dependent ``if`` would break the
    graph."""
    V.ids_in_slots("adapter_ids", ids.to(ranks.device), ranks.shape[0], ranks > 0)
    return ids.to(ranks.device, copy=True)


CHECK_IDS_OP = define_op("lora_kernels::check_ids", _check_ids_impl,
                         fake=lambda ids, ranks: torch.empty_like(ids, device=ranks.device))


class PoolView(NamedTuple):
    """What the multi-LoRA ops read from an :class:`AdapterPool` (unpacked only at the
    ``torch.library`` op boundary, whose schema takes plain tensors):

    ``lora_A`` (MAXA, MAXR, in), ``lora_Bt`` (MAXA, MAXR, out), ``ranks`` int32 (MAXA,),
    ``scalings`` fp32 (MAXA,) -- the pool's own tensors, not copies -- and ``rank_bound``, the
    largest rank loaded (host int; kernels loop over ``next_pow2(rank_bound)`` rank rows, 0 = no
    adapter loaded: every op is then the base linear alone).
    """

    lora_A: torch.Tensor
    lora_Bt: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    rank_bound: int

    @property
    def max_adapters(self) -> int:
        return self.lora_A.shape[0]

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[1]


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
        self.in_features = V.positive_int("in_features", in_features)
        self.out_features = V.positive_int("out_features", out_features)
        self.max_adapters = V.positive_int("max_adapters", max_adapters)
        self.max_rank = V.positive_int("max_rank", max_rank)
        if dtype not in _POOL_DTYPES:
            raise TypeError(f"dtype must be one of {_POOL_DTYPES}, got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device if device is not None else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(self.device)!r} but this torch has no usable CUDA "
                             f"device (torch {torch.__version__}, torch.version.cuda="
                             f"{torch.version.cuda}): use device='cpu' or a CUDA build of torch")
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
        self._last_ok = None          # the ids last passed by check_ids (_checked_before)
        # an AdapterStore owning every slot (it sets these): add/remove through it, so its name
        # map and the pool's agree; _owner_writes > 0 while the store itself writes
        self._owner: str | None = None
        self._owner_writes = 0

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
        V.adapter_name(name)
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
        read out of bounds). Under ``torch.compile`` the check runs inside the opaque
        ``lora_kernels::check_ids`` op. Raises ``TypeError`` (not an int tensor) /
        ``ValueError`` (shape, device, an id outside ``[-1, max_adapters)``, an id naming a
        freed slot). Every branch runs the one check, :func:`lora_kernels._validate.ids_in_slots`.
        """
        ids = V.adapter_ids(name, adapter_ids, num_tokens)
        if torch.compiler.is_compiling():  # data-dependent: checked inside one opaque op
            return CHECK_IDS_OP(ids, self.ranks)
        if ids.device.type == "cpu":
            key = content(ids)
            if not self._checked_before(key):
                if not self._host_ok(ids):  # numpy on the host mirror; the check names the bad id
                    V.ids_in_slots(name, ids, self.max_adapters, self._occupied,
                                   self._loaded_desc())
                v_occ = version(self._occupied)
                self._last_ok = (None if v_occ is None else (key, self._occupied, v_occ))
            return ids.to(self.device, non_blocking=True) if self.device.type != "cpu" else ids
        if ids.device != self.device:
            raise ValueError(f"{name} must be on the CPU or on the pool's device {self.device}, "
                             f"got {ids.device}")
        ids = ids.contiguous()          # kernels read ids[t] at unit stride (an expand()ed tensor)
        if ids.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return ids
        V.ids_in_slots(name, ids, self.max_adapters, self.ranks > 0, self._loaded_desc())
        return ids

    def _checked_before(self, key: tuple) -> bool:
        """Whether CPU ids of exactly this content (``key``: ``_cache.content``, dtype and
        bytes) passed :meth:`check_ids` last time, with the pool's occupancy unchanged since
        (the pool's own host tensor, written only by the pool and the store: its version
        counter). Keyed on the ids' bytes, not on their tensor's version counter: a tensor made
        by ``torch.from_numpy(buf)`` and rewritten through ``buf``, or written through
        ``.data``, keeps its version, and a bounds check is never skipped on such a guess. A
        served model's layers each check one ids tensor per forward: the first check costs ~10
        numpy calls (~9 us for 8 ids, ~28 us for 4096 on the 2-core CI box), a repeat one bytes
        compare (~1 us; ~1.7 us for 4096)."""
        last = self._last_ok
        return (last is not None and last[0] == key and last[1] is self._occupied
                and last[2] == version(self._occupied))

    def _host_ok(self, ids: torch.Tensor) -> bool:
        """Whether every (CPU) id is -1 or an occupied slot, by numpy on the host mirror."""
        k = ids.numpy()
        if k.size == 0:
            return True
        if k.min() < -1 or k.max() >= self.max_adapters:
            return False
        return bool(self._occupied.numpy()[k[k >= 0]].all())

    def _loaded_desc(self) -> str:
        return str({n: s for n, s in self._slot_of.items()})

    def view(self) -> PoolView:
        """The pool's tensors as one small value for the ops (see :class:`PoolView`)."""
        return PoolView(self.lora_A, self.lora_Bt, self.ranks, self.scalings,
                        self.max_active_rank)

    # ------------------------------------------------------------------ mutation
    def _prepare(self, name, lora_A, lora_B, scaling, slot):
        """Validate an ``add`` and convert the factors; touches nothing in the pool."""
        self._check_owner("add")
        V.adapter_name(name)
        if name in self._slot_of:
            raise ValueError(f"name {name!r} is already in the pool (slot {self._slot_of[name]}); "
                             "remove it first")
        s = V.slot_factors(lora_A, lora_B, scaling, self.in_features, self.out_features,
                           self.max_rank)
        r = lora_A.shape[0]
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
        self._check_owner("remove")
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

    # ------------------------------------------------------------------ an owner's access
    @property
    def owner(self) -> str | None:
        """Who owns every slot (an :class:`~lora_kernels.store.AdapterStore`), or None."""
        return self._owner

    def claim(self, owner: str) -> None:
        """Hand every slot to ``owner``: ``add`` / ``remove`` then refuse (the owner writes
        through :meth:`swap_slot`, so its name map and the pool's agree)."""
        if self._owner is not None:
            raise ValueError(f"this pool is already owned by {self._owner}")
        self._owner = owner

    def occupancy(self) -> list[tuple[str, int, int, float]]:
        """``(name, slot, rank, scaling)`` of every loaded adapter, sorted; host-side."""
        return sorted((n, s, self._rank_at[s], self._scaling_at[s])
                      for n, s in self._slot_of.items())

    def copy_host_state(self, other: AdapterPool) -> None:
        """Take ``other``'s host mirror (names, slots, ranks, scalings, occupancy) as this
        pool's; the device tensors are the caller's to fill (e.g. a tensor-parallel shard)."""
        self._slot_of = dict(other._slot_of)
        self._name_at = list(other._name_at)
        self._rank_at = list(other._rank_at)
        self._scaling_at = list(other._scaling_at)
        self._occupied = other._occupied.clone()

    @torch.no_grad()
    def swap_slot(self, s: int, old: str | None, new: str | None, entry) -> None:
        """The owning store's write (:class:`~lora_kernels.store.AdapterStore`). Slot ``s``:
        ``old`` (if it is there) leaves, ``new`` enters with ``entry = (A (r, in), Bt (r, out),
        scaling)`` already on the pool's device and dtype (validated by the store), or nothing
        (``entry=None``: the slot is left empty).

        Writes only what changes: the new rows ``[0, r)``, zeros over the old occupant's rows
        ``[r, r_old)`` (rows past ``r_old`` are zero already: the pool layout's invariant), the
        slot's rank and scaling; then the pool's host mirror (what ``add`` / ``remove``
        keep: name <-> slot, rank, scaling, occupied), so the pool answers ``slot`` / ``ids`` /
        ``check_ids`` as if ``remove(old)`` + ``add(new, slot=s)`` had run, with 2-4 copies or fills
        instead of their ~12 device ops."""
        here = old is not None and self._name_at[s] == old
        r_old = self._rank_at[s] if here else 0
        if entry is None and not here:
            return
        if type(self)._prepare is not AdapterPool._prepare:
            # a pool with its own add (e.g. parallel.ShardedAdapterPool: slices the unsharded
            # factors, agrees with the other ranks) is written through its public API
            self._owner_writes += 1
            try:
                if here:
                    self.remove(old)
                if entry is not None:
                    self.add(new, entry[0], entry[1].t(), entry[2], slot=s)
            finally:
                self._owner_writes -= 1
            return
        r = 0
        if entry is not None:
            a, bt, sc = entry
            r = a.shape[0]
            self.lora_A[s, :r].copy_(a)
            self.lora_Bt[s, :r].copy_(bt)
        if r_old > r:
            self.lora_A[s, r:r_old].zero_()
            self.lora_Bt[s, r:r_old].zero_()
        self.ranks[s] = r
        self.scalings[s] = sc if entry is not None else 0.0
        if here:
            del self._slot_of[old]
        if entry is not None:
            self._slot_of[new] = s
        self._name_at[s] = new if entry is not None else None
        self._rank_at[s] = r
        self._scaling_at[s] = sc if entry is not None else 0.0
        self._occupied[s] = entry is not None

    def _check_owner(self, what: str) -> None:
        if self._owner is not None and not self._owner_writes:
            raise ValueError(f"this pool's slots are owned by {self._owner}: {what} adapters "
                             f"through it (store.{what} / server.{what}), not pool.{what} (its "
                             "name -> slot map would no longer match the pool)")

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
