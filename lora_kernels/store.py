"""Host-side adapter store in front of the device :class:`~lora_kernels.AdapterPool` slots: many
more adapters than slots, swapped in on demand, loads overlapping compute.

Picture (one *slot* = one adapter id shared by every served layer's pool)::

    host (pinned on CUDA)            copy engine (side stream)           device pools
    name -> {module: (A, Bt, s)}  --  job: pool.remove(old); pool.add  -> slot s of every pool
      real rank r per module            after: last-use events of s       (rank-major layout)
                                        returns: the slot's load event

* :meth:`AdapterStore.add` keeps an adapter's factors in host memory at its real rank per module
  (``A (r, in)``, ``Bt (r, out)`` in the pool dtype; one buffer per adapter and dtype, pinned when
  the pools live on CUDA), so a swap moves ``sum_modules r (in + out) * elem`` bytes, never
  ``max_rank`` rows.
* :meth:`AdapterStore.acquire` (a batch is about to run) makes every named adapter resident:
  hits keep their slot, misses take a free slot or evict the policy's victim (LRU by default;
  anything with ``touch`` / ``forget`` / ``victim`` plugs in) among slots no in-flight batch
  holds. It returns a :class:`Lease` (name -> slot) and makes the compute stream wait on the
  load event of every slot the batch reads. :meth:`AdapterStore.release` records a *use event*
  on the compute stream for the lease's slots; a later write into such a slot is issued
  after that event, so a batch still running on the device never sees its slot rewritten.
* :meth:`AdapterStore.prefetch` issues the loads of the next batch's adapters now, so the copies
  run on the side stream while the current batch computes; it never evicts a held slot.

Ordering rules (the three a reader needs to trust the store):
  1. read-after-write: a batch reads slot ``s`` only after the compute stream waited on ``s``'s
     latest load event (``engine.wait``);
  2. write-after-read: a load into ``s`` runs after every use event recorded for ``s`` since its
     last write (``engine.submit(job, after=...)``);
  3. no eviction under a held lease: a slot some un-released :class:`Lease` holds is never a
     victim; each write bumps the slot's *generation*, and :meth:`Lease.check` (run by
     ``release``) proves the generations a lease saw are unchanged.

Copy engines (``engine=``): :class:`SyncEngine` (CPU pools: a job runs at once, events are
done), :class:`CudaStreamEngine` (a side stream and CUDA events; host-to-device copies from
pinned memory with ``non_blocking=True``); any object with their methods (``submit``, ``wait``,
``record_use``, ``stage``) serves, e.g. the tests' hand-driven ``ManualEngine``
(``tests/manual_engine.py``), which checks the ordering rules deterministically on a CPU.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import _validate as V
from .pool import AdapterPool

# ============================================================================ events / engines


class DoneEvent:
    """An event that has already completed (synchronous copies, CPU compute)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


_DONE = DoneEvent()


class SyncEngine:
    """Copy engine for CPU pools: a job runs when submitted (its ``after`` events are complete by
    construction: CPU compute is synchronous), every event is already done."""

    pin_memory = False

    def submit(self, job: Callable[[], None], after: Sequence = ()) -> DoneEvent:
        for e in after:
            if not e.query():
                raise RuntimeError("SyncEngine: a job was submitted after an incomplete event")
        job()
        return _DONE

    def record_use(self) -> DoneEvent:
        return _DONE

    def wait(self, event) -> None:
        return None

    def stage(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Inside a job: ``t`` (host) on ``device`` (a plain copy)."""
        return t.to(device)


class CudaStreamEngine:
    """Copy engine for CUDA pools: jobs run on a side stream, ordered after the given events;
    host-to-device copies are issued ``non_blocking`` from pinned memory, so :meth:`submit`
    returns as soon as the work is enqueued (the host never waits for a running batch)."""

    pin_memory = True

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device if device is not None else "cuda")
        self.stream = torch.cuda.Stream(device=self.device)

    def submit(self, job: Callable[[], None], after: Sequence = ()) -> torch.cuda.Event:
        with torch.cuda.stream(self.stream):
            for e in after:
                if isinstance(e, torch.cuda.Event):
                    self.stream.wait_event(e)
            job()
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev

    def record_use(self) -> torch.cuda.Event:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def wait(self, event) -> None:
        if isinstance(event, torch.cuda.Event):
            torch.cuda.current_stream(self.device).wait_event(event)

    def stage(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        # allocated on (and only reused in order on) the side stream by the caching allocator;
        # the pinned source is kept alive by the store (and by the host allocator's own events)
        return t.to(device, non_blocking=True)


def default_engine(device: torch.device):
    """:class:`CudaStreamEngine` for CUDA pools, :class:`SyncEngine` otherwise."""
    return CudaStreamEngine(device) if device.type == "cuda" else SyncEngine()


# ============================================================================ eviction policy


class LRUPolicy:
    """Least recently used: ``touch`` on every use, ``victim`` is the oldest candidate.

    A policy is any object with ``touch(name)`` (the adapter was used or loaded),
    ``forget(name)`` (it left the device) and ``victim(candidates) -> name`` (pick one of these
    evictable resident adapters)."""

    def __init__(self):
        self._order: OrderedDict[str, None] = OrderedDict()

    def touch(self, name: str) -> None:
        self._order[name] = None
        self._order.move_to_end(name)

    def forget(self, name: str) -> None:
        self._order.pop(name, None)

    def victim(self, candidates: Iterable[str]) -> str:
        cand = set(candidates)
        for n in self._order:
            if n in cand:
                return n
        return min(cand)  # never touched (cannot happen through the store): deterministic


# ============================================================================ store


@dataclass
class StoreStats:
    """Counters since the store was made (or :meth:`AdapterStore.reset_stats`).

    ``hits`` / ``misses``: adapters a batch named that were resident (or already loading) / had
    to be loaded; ``prefetches``: loads started by :meth:`AdapterStore.prefetch` or by ``add``
    into a free slot; ``evictions``: resident adapters pushed out to make room; ``bytes_moved``:
    host-to-device bytes of factor rows copied (real ranks; the rank/scaling scalars and the
    on-device zeroing of old rows are not host traffic)."""

    hits: int = 0
    misses: int = 0
    prefetches: int = 0
    evictions: int = 0
    bytes_moved: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0

    def as_dict(self) -> dict:
        return dict(hits=self.hits, misses=self.misses, prefetches=self.prefetches,
                    evictions=self.evictions, bytes_moved=self.bytes_moved,
                    hit_rate=self.hit_rate)


@dataclass
class Lease:
    """The slots one batch reads: ``slots[name]``, and the generation of each slot when it was
    handed out. Held from :meth:`AdapterStore.acquire` to :meth:`AdapterStore.release`."""

    store: AdapterStore
    slots: dict[str, int]
    generations: dict[int, int] = field(default_factory=dict)
    released: bool = False

    def check(self) -> None:
        """``RuntimeError`` if a slot this lease reads was rewritten since it was handed out."""
        for s, g in self.generations.items():
            if self.store._gen[s] != g:
                raise RuntimeError(f"slot {s} was rewritten under a held lease (generation "
                                   f"{g} -> {self.store._gen[s]})")


@dataclass
class _HostAdapter:
    entries: dict[str, tuple[torch.Tensor, torch.Tensor, float]]   # module -> (A, Bt, s)
    nbytes: int
    buffers: list[torch.Tensor]


def _factor_sizes(pool) -> tuple[int, int]:
    """``(in, out)`` of the factors ``pool.add`` takes: a tensor-parallel shard
    (``parallel.ShardedAdapterPool``) takes the unsharded ones and keeps its slice."""
    return (getattr(pool, "full_in_features", pool.in_features),
            getattr(pool, "full_out_features", pool.out_features))


def _check_pools(pools) -> dict:
    if isinstance(pools, AdapterPool):
        pools = {"": pools}
    if not isinstance(pools, Mapping) or not pools:
        raise TypeError("pools must be an AdapterPool or a non-empty {module name: AdapterPool}")
    for k, p in pools.items():
        if not isinstance(p, AdapterPool):
            raise TypeError(f"pools[{k!r}] must be an AdapterPool, got {type(p).__name__}")
    sizes = {p.max_adapters for p in pools.values()}
    if len(sizes) != 1:
        raise ValueError(f"every pool must have the same max_adapters (slots), got {sorted(sizes)}")
    devs = {p.device for p in pools.values()}
    if len(devs) != 1:
        raise ValueError(f"every pool must be on one device, got {sorted(map(str, devs))}")
    for k, p in pools.items():
        if len(p):
            raise ValueError(f"pools[{k!r}] already holds adapters {p.names()}: the store must "
                             "own every slot")
        if p.owner is not None:
            raise ValueError(f"pools[{k!r}] is already owned by {p.owner}")
    return dict(pools)


class AdapterStore:
    """Any number of adapters in host memory, the hot ones in the ``max_adapters`` device slots
    shared by ``pools`` (one :class:`AdapterPool` per served module; a bare pool means the module
    name ``""``). See the module docstring for the ordering rules.

    ``policy``: eviction policy (default :class:`LRUPolicy`); ``engine``: copy engine (default
    :func:`default_engine` for the pools' device). The store owns every slot of the pools: add
    adapters through it, not through ``pool.add``. Batches run on one compute stream (the
    current stream when :meth:`acquire` is called); a slot's load is waited on once by it.
    """

    def __init__(self, pools, *, policy=None, engine=None):
        self.pools = _check_pools(pools)
        for p in self.pools.values():       # pool.add / remove now refuse (the store's slots)
            p.claim(f"an AdapterStore of {len(self.pools)} pool(s)")
        first = next(iter(self.pools.values()))
        self.num_slots = first.max_adapters
        self.device = first.device
        self.policy = policy if policy is not None else LRUPolicy()
        self.engine = engine if engine is not None else default_engine(self.device)
        self.stats = StoreStats()
        self._host: dict[str, _HostAdapter] = {}
        self._slot_of: dict[str, int] = {}                      # resident (or loading) names
        self._name_at: list[str | None] = [None] * self.num_slots
        self._gen = [0] * self.num_slots                         # bumped by every slot write
        self._load_ev: list = [_DONE] * self.num_slots           # latest write into the slot
        self._uses: list[list] = [[] for _ in range(self.num_slots)]  # use events since then
        self._held = [0] * self.num_slots                        # leases holding the slot
        # the compute stream already waited on the slot's latest load (one stream: later work is
        # ordered after it, so one wait per load suffices)
        self._waited = [True] * self.num_slots
        # per-adapter full module copies / token rows (PEFT modules_to_save, trainable tokens:
        # lora_kernels.serving_extras), kept on the device: name -> {"modules", "tokens",
        # "alora", "bytes"}; their bytes are counted against max_extra_bytes (None: no limit)
        self.extras: dict[str, dict] = {}
        self.max_extra_bytes: int | None = None

    # ------------------------------------------------------------------ host side
    def __len__(self) -> int:
        return len(self._host)

    def __contains__(self, name) -> bool:
        return name in self._host

    def names(self) -> list[str]:
        return list(self._host)

    def resident(self) -> dict[str, int]:
        """``{name: slot}`` of the adapters on the device (or being loaded there)."""
        return dict(self._slot_of)

    def slot(self, name: str) -> int | None:
        """``name``'s slot, or None if it waits in host memory."""
        self._known(name)
        return self._slot_of.get(name)

    def host_bytes(self, name: str) -> int:
        """Bytes one load of ``name`` moves host -> device (its real ranks)."""
        return self._known(name).nbytes

    def get(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Copies of ``{module: (lora_A (r, in), lora_B (out, r), scaling)}`` from host memory."""
        h = self._known(name)
        return {m: (a.clone(), bt.t().clone(), s) for m, (a, bt, s) in h.entries.items()}

    def _known(self, name) -> _HostAdapter:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if name not in self._host:
            raise ValueError(f"name {name!r} is not in the store ({len(self._host)} adapters)")
        return self._host[name]

    def _prepare(self, name, adapter) -> _HostAdapter:
        """Validate ``adapter`` against the pools and copy it to host memory at its real rank."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if not name:
            raise ValueError("name must be a non-empty string")
        if name in self._host:
            raise ValueError(f"name {name!r} is already loaded; remove it first")
        if isinstance(adapter, (tuple, list)) and list(self.pools) == [""]:
            adapter = {"": adapter}
        if not isinstance(adapter, Mapping):
            raise TypeError(f"adapter must be a dict {{module name: (lora_A, lora_B, scaling)}}, "
                            f"got {type(adapter).__name__}")
        if not adapter:
            raise ValueError("adapter must name at least one module")
        unknown = [k for k in adapter if k not in self.pools]
        if unknown:
            raise ValueError(f"adapter names modules that are not served: {unknown[:5]} "
                             f"(served: {list(self.pools)[:8]}...)")
        checked = {}
        for mod, entry in adapter.items():
            if not (isinstance(entry, (tuple, list)) and len(entry) == 3):
                raise TypeError(f"adapter[{mod!r}] must be a (lora_A, lora_B, scaling) tuple")
            p = self.pools[mod]
            in_f, out_f = _factor_sizes(p)
            A, B, s = entry
            try:
                s = V.slot_factors(A, B, s, in_f, out_f, p.max_rank)
            except (TypeError, ValueError) as e:
                raise type(e)(f"adapter[{mod!r}]: {e}") from None
            checked[mod] = (A, B, s, p)
        # one host buffer per dtype holding every module's [A; Bt] rows back to back
        by_dtype: dict[torch.dtype, int] = {}
        for A, B, _s, p in checked.values():
            by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + A.shape[0] * (A.shape[1] + B.shape[0])
        pin = bool(getattr(self.engine, "pin_memory", False))
        bufs = {dt: torch.empty(n, dtype=dt, pin_memory=pin) for dt, n in by_dtype.items()}
        off = dict.fromkeys(by_dtype, 0)
        entries, nbytes = {}, 0
        with torch.no_grad():
            for mod, (A, B, s, p) in checked.items():
                r, buf, o = A.shape[0], bufs[p.dtype], off[p.dtype]
                in_f, out_f = A.shape[1], B.shape[0]  # the factors' (validated) sizes
                a = buf[o:o + r * in_f].view(r, in_f)
                o += r * in_f
                bt = buf[o:o + r * out_f].view(r, out_f)
                off[p.dtype] = o + r * out_f
                a.copy_(A.detach())
                bt.copy_(B.detach().t())
                entries[mod] = (a, bt, s)
                nbytes += (a.numel() + bt.numel()) * a.element_size()
        return _HostAdapter(entries, nbytes, list(bufs.values()))

    def add(self, name: str, adapter, *, load: bool = True) -> int | None:
        """Keep ``adapter`` ({module: (lora_A (r, in), lora_B (out, r), scaling)}; for a store
        over one bare pool also a plain tuple) in host memory under ``name``. With ``load`` and a
        free slot it is also loaded now (never evicting anything): returns that slot, else None
        (it is loaded when a batch or :meth:`prefetch` names it). Refused calls change nothing."""
        h = self._prepare(name, adapter)
        self._host[name] = h
        if load:
            free = self._free_slots()
            if free:
                self._load(name, free[0], None)
                self._order_compute(free[0])
                self.stats.prefetches += 1
                return free[0]
        return None

    def remove(self, name: str) -> None:
        """Drop ``name`` from the store (and free its slot once no batch reads it)."""
        self._known(name)
        s = self._slot_of.get(name)
        if s is not None:
            if self._held[s]:
                raise ValueError(f"name {name!r} is in use by an in-flight batch (slot {s}); "
                                 "release its lease first")
            self._evict_submit(s, None)
            self._order_compute(s)
        del self._host[name]
        self.extras.pop(name, None)

    def extra_bytes(self, name: str | None = None) -> int:
        """Bytes of the module copies / token rows of ``name`` (all adapters: None)."""
        if name is not None:
            self._known(name)
            return self.extras.get(name, {}).get("bytes", 0)
        return sum(e.get("bytes", 0) for e in self.extras.values())

    # ------------------------------------------------------------------ slots
    def _order_compute(self, s: int) -> None:
        """``add`` / ``remove`` act like ordinary stream-ordered writes: later work on the
        compute stream (a read of the pool, a kernel) sees them; the host does not block. Only
        :meth:`prefetch` leaves its copies unordered until a batch acquires the slot."""
        self.engine.wait(self._load_ev[s])
        self._waited[s] = True

    def _free_slots(self) -> list[int]:
        return [s for s in range(self.num_slots) if self._name_at[s] is None]

    def _after(self, s: int) -> list:
        """Events a write into slot ``s`` must follow: its pending use events (rule 2)."""
        self._uses[s] = [e for e in self._uses[s] if not e.query()]
        return list(self._uses[s])

    def _evict_submit(self, s: int, new: str | None) -> None:
        """Free slot ``s`` (its occupant leaves the device); if ``new``, load it there."""
        old = self._name_at[s]
        if old is not None:
            del self._slot_of[old]
            self.policy.forget(old)
            self._name_at[s] = None
        if new is None:
            self._submit(s, old, None)
        else:
            self._load(new, s, old)

    def _load(self, name: str, s: int, old: str | None) -> None:
        self._slot_of[name] = s
        self._name_at[s] = name
        self.policy.touch(name)
        self._submit(s, old, name)
        self.stats.bytes_moved += self._host[name].nbytes

    def _submit(self, s: int, old: str | None, new: str | None) -> None:
        """One job on the copy engine: slot ``s`` of every pool leaves ``old`` and gets ``new``
        (its host buffer staged to the device in one copy, then :meth:`AdapterPool.swap_slot` per
        pool: rows >= rank and modules ``new`` does not cover stay zero, as the pool layout
        requires)."""
        pools = self.pools
        h = self._host[new] if new is not None else None
        engine, dev = self.engine, self.device

        def job():
            # one host -> device copy per host buffer (all modules' rows), then views of it
            staged = {} if h is None else {b.dtype: engine.stage(b, dev) for b in h.buffers}
            for mod, pool in pools.items():
                entry = None
                if h is not None and mod in h.entries:
                    a, bt, sc = h.entries[mod]
                    d = staged[a.dtype]
                    entry = (d[a.storage_offset():a.storage_offset() + a.numel()].view(a.shape),
                             d[bt.storage_offset():bt.storage_offset() + bt.numel()]
                             .view(bt.shape), sc)
                pool.swap_slot(s, old, new, entry)

        self._gen[s] += 1
        self._load_ev[s] = engine.submit(job, self._after(s))
        self._waited[s] = False
        self._uses[s] = []

    # ------------------------------------------------------------------ batches
    def _plan(self, names: Sequence[str], allow_evict: bool) -> list[tuple[str, int, bool]]:
        """(name, slot, evicts) for every non-resident name; raises before changing anything."""
        need = [n for n in names if n not in self._slot_of]
        keep = {self._slot_of[n] for n in names if n in self._slot_of}
        free = self._free_slots()
        plan = []
        evictable = [n for n, s in self._slot_of.items() if not self._held[s] and s not in keep]
        for n in need:
            if free:
                plan.append((n, free.pop(0), False))
            elif allow_evict and evictable:
                v = self.policy.victim(evictable)
                evictable.remove(v)
                plan.append((n, self._slot_of[v], True))
            else:
                held = sum(1 for h in self._held if h)
                raise RuntimeError(f"no slot for adapter {n!r}: all {self.num_slots} device slots "
                                   f"are taken by this batch or held by in-flight batches "
                                   f"({held} held); release a lease first")
        return plan

    def _distinct(self, names) -> list[str]:
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise TypeError(f"names must be a list of adapter names, got {type(names).__name__}")
        out = list(dict.fromkeys(names))
        for n in out:
            self._known(n)
        return out

    def acquire(self, names: Sequence[str]) -> Lease:
        """Make ``names`` resident, hold their slots and order the compute stream after their
        loads; returns the :class:`Lease`. ``ValueError`` if more distinct names than slots."""
        names = self._distinct(names)
        if len(names) > self.num_slots:
            raise ValueError(f"a batch names {len(names)} distinct adapters but the device has "
                             f"{self.num_slots} slots (max_adapters={self.num_slots}): split the "
                             "batch or raise max_adapters")
        plan = self._plan(names, allow_evict=True)
        loading = {n for n, _, _ in plan}
        self.stats.hits += len(names) - len(loading)
        self.stats.misses += len(loading)
        for n, s, evicts in plan:
            if evicts:
                self.stats.evictions += 1
            self._evict_submit(s, n)
        slots = {n: self._slot_of[n] for n in names}
        for n, s in slots.items():
            self.policy.touch(n)
            self._held[s] += 1
            if not self._waited[s]:                                # rule 1
                self.engine.wait(self._load_ev[s])
                self._waited[s] = True
        return Lease(self, slots, {s: self._gen[s] for s in slots.values()})

    def release(self, lease: Lease) -> None:
        """The batch holding ``lease`` has been enqueued: its slots may be rewritten after the
        use event recorded now (rule 2)."""
        if lease.store is not self:
            raise ValueError("lease belongs to another store")
        if lease.released:
            raise ValueError("lease was already released")
        lease.check()
        ev = self.engine.record_use()
        for s in lease.slots.values():
            self._held[s] -= 1
            if not ev.query():
                self._uses[s].append(ev)
        lease.released = True

    @contextlib.contextmanager
    def lease(self, names: Sequence[str]):
        """``with store.lease(names) as lease:`` acquire / release around one batch."""
        ls = self.acquire(names)
        try:
            yield ls
        finally:
            self.release(ls)

    def prefetch(self, names: Sequence[str]) -> list[str]:
        """Start loading ``names`` (e.g. the next batch's adapters) without holding them; returns
        the names whose loads were started. Evicts only slots no lease holds; names that find no
        such slot are skipped (a later :meth:`acquire` loads them)."""
        names = self._distinct(names)
        started = []
        for n in names:
            if n in self._slot_of:
                self.policy.touch(n)
                continue
            keep = [m for m in names if m in self._slot_of]   # never evicted for n
            try:
                [(_, s, evicts)] = self._plan(keep + [n], allow_evict=True)
            except RuntimeError:
                continue
            if evicts:
                self.stats.evictions += 1
            self._evict_submit(s, n)
            self.stats.prefetches += 1
            started.append(n)
        return started

    def reset_stats(self) -> None:
        self.stats = StoreStats()

    def __repr__(self) -> str:
        return (f"AdapterStore({len(self._host)} adapters, {self.num_slots} slots on "
                f"{self.device}, resident={len(self._slot_of)}, stats={self.stats.as_dict()})")
