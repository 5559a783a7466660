"""AdapterStore: thousands of adapters in host memory served through a few device slots.

The ordering rules (a batch reads a slot only after its load; a load into a slot runs only after
the batches reading it; a held slot is never evicted) are checked deterministically with
ManualEngine, whose copies and batch completions the test drives by hand.
"""

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.store import AdapterStore, LRUPolicy, SyncEngine

from conftest import DEVICE, TOL, backends
from helpers import assert_close
from manual_engine import ManualEngine

IN = OUT = 16


def _factors(g, r, in_f=IN, out_f=OUT, dtype=torch.float32):
    A = torch.randn(r, in_f, generator=g, dtype=torch.float64) / in_f ** 0.5
    B = torch.randn(out_f, r, generator=g, dtype=torch.float64) / r ** 0.5
    return A.to(dtype), B.to(dtype)


def _pool(slots=2, max_rank=4, dtype=torch.float32):
    return lk.AdapterPool(IN, OUT, slots, max_rank, dtype=dtype, device=DEVICE)


def _store(slots=2, engine=None, policy=None, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    store = AdapterStore(_pool(slots), engine=engine, policy=policy)
    ads = {}
    for k in range(n):
        A, B = _factors(g, 1 + k % 4)
        ads[f"a{k}"] = (A, B, 0.5 + k)
        store.add(f"a{k}", ads[f"a{k}"], load=False)
    return store, ads


def _slot_holds(pool, slot, ad):
    A, B, s = ad
    r = A.shape[0]
    return (int(pool.ranks[slot]) == r and float(pool.scalings[slot]) == pytest.approx(s)
            and torch.equal(pool.lora_A[slot, :r].cpu(), A.cpu().to(pool.dtype))
            and torch.equal(pool.lora_Bt[slot, :r].cpu(), B.t().cpu().to(pool.dtype))
            and bool((pool.lora_A[slot, r:] == 0).all()))


# ----------------------------------------------------------------------------- ordering

def test_batch_waits_on_its_load():
    """Rule 1: a prefetched load stays queued (the slot is still empty); acquire makes the
    compute side wait on that load's event, after which the slot holds the adapter."""
    eng = ManualEngine()
    store, ads = _store(engine=eng)
    pool = store.pools[""]
    assert store.prefetch(["a1"]) == ["a1"]
    s = store.slot("a1")
    assert int(pool.ranks[s]) == 0 and len(pool) == 0          # copy not run yet
    lease = store.acquire(["a1"])
    # the wait is issued, and the copy it waits for completes before the batch goes on
    assert eng.log == [("submit", "load1"), ("wait", "load1"), ("run", "load1")]
    assert _slot_holds(pool, s, ads["a1"])
    store.release(lease)
    # resident and already waited on: a second batch issues no copy and no wait
    with store.lease(["a1"]):
        pass
    assert len(eng.log) == 3
    assert store.stats.hits == 2 and store.stats.misses == 0 and store.stats.prefetches == 1


def test_write_waits_for_batches_reading_the_slot():
    """Rule 2: after a batch on slots {a0, a1} is enqueued (its use event not complete), a load
    that evicts a0 is queued behind that event: running it is refused, a0's weights stay intact
    until the batch completes, then the slot is rewritten (generation bumped)."""
    eng = ManualEngine()
    store, ads = _store(engine=eng)
    pool = store.pools[""]
    lease = store.acquire(["a0", "a1"])
    slot0 = lease.slots["a0"]
    gen0 = store._gen[slot0]
    store.release(lease)
    [use] = store._uses[slot0]
    assert not use.query()
    assert store.prefetch(["a2"]) == ["a2"]                   # LRU victim: a0
    assert store.slot("a2") == slot0 and "a0" not in store.resident()
    with pytest.raises(RuntimeError, match="must wait"):
        eng.run()
    assert _slot_holds(pool, slot0, ads["a0"])                # not overwritten under the batch
    use.set()                                                 # the batch finished
    assert eng.run() == 1
    assert _slot_holds(pool, slot0, ads["a2"])
    assert store._gen[slot0] == gen0 + 1
    assert store.stats.evictions == 1


def test_held_slots_are_never_evicted():
    """Rule 3: while a lease holds both slots nothing can be loaded (acquire refuses, prefetch
    skips, remove refuses) and nothing changes; the generation check catches a rewrite."""
    eng = ManualEngine()
    store, ads = _store(engine=eng)
    lease = store.acquire(["a0", "a1"])
    before = (store.resident(), list(store._gen), len(eng.queue))
    with pytest.raises(RuntimeError, match="held by in-flight"):
        store.acquire(["a2"])
    assert store.prefetch(["a2"]) == []
    with pytest.raises(ValueError, match="in-flight batch"):
        store.remove("a0")
    assert (store.resident(), list(store._gen), len(eng.queue)) == before
    lease.check()
    store._gen[lease.slots["a0"]] += 1                        # a (forbidden) rewrite
    with pytest.raises(RuntimeError, match="rewritten under a held lease"):
        store.release(lease)


def test_too_many_distinct_adapters_for_the_slots():
    store, _ = _store(engine=SyncEngine())
    with pytest.raises(ValueError, match="3 distinct adapters but the device has 2 slots"):
        store.acquire(["a0", "a1", "a2", "a0"])
    assert store.resident() == {} and store.stats.misses == 0
    with pytest.raises(ValueError, match="not in the store"):
        store.acquire(["zzz"])
    with pytest.raises(TypeError, match="names"):
        store.acquire("a0")


def test_lru_and_pluggable_policy():
    store, _ = _store(slots=2, engine=SyncEngine(), n=4)
    for names in (["a0"], ["a1"], ["a0"], ["a2"]):           # a1 is least recently used
        with store.lease(names):
            pass
    assert set(store.resident()) == {"a0", "a2"}

    class KeepA0(LRUPolicy):
        def victim(self, candidates):
            return sorted(c for c in candidates if c != "a0")[0]
    store, _ = _store(slots=2, engine=SyncEngine(), policy=KeepA0(), n=4)
    for names in (["a0"], ["a1"], ["a2"], ["a3"]):
        with store.lease(names):
            pass
    assert set(store.resident()) == {"a0", "a3"}
    assert store.stats.evictions == 2 and store.stats.misses == 4


def test_bytes_moved_is_real_rank_and_add_refusals():
    store = AdapterStore(lk.AdapterPool(IN, 7, 2, 8, device=DEVICE))
    g = torch.Generator().manual_seed(3)
    A, B = _factors(g, 1, IN, 7)
    assert store.add("r1", (A, B, 1.0)) == 0                  # a free slot: loaded now
    A3, B3 = _factors(g, 3, IN, 7)
    assert store.add("r3", (A3, B3, 1.0), load=False) is None
    assert store.host_bytes("r3") == 3 * (IN + 7) * 4
    with store.lease(["r3"]):
        pass
    assert store.stats.bytes_moved == (1 + 3) * (IN + 7) * 4  # not 2 x max_rank 8 rows
    got = store.get("r3")[""]
    assert torch.equal(got[0], A3) and torch.equal(got[1], B3)
    before = (store.names(), store.resident())
    for bad, exc, match in [((A, B), TypeError, "tuple"),
                            ((torch.randn(9, IN), torch.randn(7, 9), 1.0), ValueError, "max_rank"),
                            ((A, B.t(), 1.0), ValueError, "lora_B"),
                            ((A, B, float("inf")), ValueError, "finite"),
                            ({"nope": (A, B, 1.0)}, ValueError, "not served")]:
        with pytest.raises(exc, match=match):
            store.add("bad", bad)
    with pytest.raises(ValueError, match="already"):
        store.add("r1", (A, B, 1.0))
    assert (store.names(), store.resident()) == before
    store.remove("r1")
    assert "r1" not in store and int(store.pools[""].ranks[0]) == 0
    with pytest.raises(ValueError, match="already holds"):
        AdapterStore(store.pools[""])                          # the store must own every slot


# ----------------------------------------------------------------------------- at scale

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(IN, OUT)
        self.down = nn.Linear(OUT, IN)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _ref(model, x, ad):
    """float64 reference of one sequence through its own adapter (None: base)."""
    def lin(name, h):
        m = getattr(model, name)
        y = h @ m.weight.double().cpu().t() + m.bias.double().cpu()
        if ad is not None and name in ad:
            A, B, s = ad[name]
            y = y + s * (h @ A.double().t()) @ B.double().t()
        return y
    return lin("down", torch.tanh(lin("up", x.double())))


def test_thousand_adapters_through_eight_slots():
    """1,000 adapters (ranks 1..4, one or both layers) in host memory, 8 device slots, 30
    batches of 6 sequences with random picks (and base rows): every batch equals the per-adapter
    float64 reference; the swaps really happened (misses, evictions, bytes)."""
    torch.manual_seed(0)
    model = _Tiny().to(DEVICE)
    server = lk.MultiAdapterModel(model, ["up", "down"], max_adapters=8, max_rank=4)
    g = torch.Generator().manual_seed(1)
    ads = {}
    for k in range(1000):
        ad = {}
        for mod in (["up", "down"] if k % 3 else ["up"]):
            A, B = _factors(g, 1 + (k * 7 + len(mod)) % 4)
            ad[mod] = (A.to(DEVICE), B.to(DEVICE), 0.25 + (k % 5) / 4)
        ads[f"ad{k}"] = ad
        server.add(f"ad{k}", ad)
    assert len(server.store) == 1000 and len(server._slots) == 8
    rng = torch.Generator().manual_seed(2)
    worst = 0.0
    for step in range(30):
        picks = torch.randint(0, 1000, (6,), generator=rng).tolist()
        names = [None if p % 11 == 0 else f"ad{p}" for p in picks]
        if step % 3 == 0:
            names[1] = names[0]                                  # a repeated adapter
        x = torch.randn(6, 3, IN, generator=rng).to(DEVICE)
        if step % 4 == 0:
            server.prefetch([f"ad{p}" for p in picks[:2]])
        with torch.no_grad():
            y = server(x, adapters=names)
        for b, n in enumerate(names):
            want = _ref(model, x[b].cpu(), None if n is None else
                        {m: (A.cpu(), B.cpu(), s) for m, (A, B, s) in ads[n].items()})
            err = ((y[b].double().cpu() - want).norm() / want.norm()).item()
            worst = max(worst, err)
            assert err < TOL[torch.float32], (step, b, n, err)
    st = server.stats
    assert st.misses > 100 and st.evictions > 100 and worst < 1e-5
    loads = st.misses + st.prefetches
    assert st.bytes_moved > loads * (IN + OUT) * 4                # ranks 1..4, real sizes


def test_server_refuses_more_adapters_than_slots_and_keeps_state():
    model = _Tiny().to(DEVICE)
    server = lk.MultiAdapterModel(model, ["up"], max_adapters=2, max_rank=4)
    g = torch.Generator().manual_seed(4)
    for k in range(3):
        A, B = _factors(g, 2)
        server.add(f"a{k}", {"up": (A.to(DEVICE), B.to(DEVICE), 1.0)})
    before = server.store.resident()
    with pytest.raises(ValueError, match="3 distinct stored adapters .* max_adapters=2"):
        server(torch.randn(3, 1, IN, device=DEVICE), adapters=["a0", "a1", "a2"])
    assert server.store.resident() == before and server._state.seq_ids is None
    assert all(h == 0 for h in server.store._held)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graph and pinned-memory copies need a GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replay_with_swapped_adapters(backend):
    """A decode step captured once replays with new ids and with adapters swapped into its slots
    between replays (side-stream copies from pinned memory, ordered by events)."""
    from helpers import randn

    if backend not in backends():
        pytest.skip(f"backend {backend!r} not available here")
    dtype, T, slots, max_rank = torch.bfloat16, 8, 4, 8
    pool = lk.AdapterPool(64, 48, slots, max_rank, dtype=dtype, device=DEVICE)
    store = AdapterStore(pool)
    g = torch.Generator().manual_seed(5)
    ads = {}
    for k in range(12):
        A, B = _factors(g, max_rank if k == 0 else 1 + k % max_rank, 64, 48)
        ads[f"a{k}"] = (A, B, 0.5 + k / 4)
        store.add(f"a{k}", ads[f"a{k}"], load=False)
    assert all(b.is_pinned() for h in store._host.values() for b in h.buffers)
    lease = store.acquire(["a0", "a1", "a2", "a3"])             # rank bound max_rank captured
    store.release(lease)
    x = randn(T, 64, dtype=dtype)
    ids = torch.zeros(T, dtype=torch.int32, device=DEVICE)
    y = torch.zeros(T, 48, dtype=dtype, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            lk.multi_lora_add_(y, x, pool, ids, backend=backend, path="decode")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.zero_()
        lk.multi_lora_add_(y, x, pool, ids, backend=backend, path="decode")
    rng = torch.Generator().manual_seed(6)
    for step in range(4):
        names = [f"a{int(i)}" for i in torch.randint(0, 12, (3,), generator=rng)]
        lease = store.acquire(names)                            # swaps in, compute waits
        slot_ids = torch.tensor([lease.slots[names[t % 3]] for t in range(T)], dtype=torch.int32)
        ids.copy_(slot_ids, non_blocking=False)
        x.copy_(randn(T, 64, dtype=dtype))
        graph.replay()
        store.release(lease)
        want = torch.zeros(T, 48, dtype=torch.float64)
        for t in range(T):
            A, B, s = ads[names[t % 3]]
            want[t] = s * (x[t].double().cpu() @ A.double().t()) @ B.double().t()
        torch.cuda.synchronize()
        assert_close(y, want, dtype, f"replay {step}")
    assert store.stats.misses > 0


@pytest.mark.parametrize("hit_rate", [0.9, 0.5])
def test_bench_schedule_hits_its_target(hit_rate):
    """The store benchmark's schedule gives the store exactly the hit rate it is labelled with
    (after the first step, which loads the hot set)."""
    from lora_kernels.bench.cases_store import store_schedule

    sched = store_schedule(hit_rate, 16, 91)
    store = AdapterStore(lk.AdapterPool(4, 4, 16, 1, device=DEVICE))
    for n in sorted({n for s in sched for n in s}):
        store.add(n, (torch.ones(1, 4), torch.ones(4, 1), 1.0), load=False)
    with store.lease(sched[0]):
        pass
    store.reset_stats()
    for names in sched[1:]:
        with store.lease(names):
            pass
    assert store.stats.hit_rate == pytest.approx(hit_rate, abs=0.01)
    assert store.stats.evictions == store.stats.misses - 8    # once the 8 free slots are filled


def test_swap_to_lower_rank_and_uncovered_module_leaves_zeros():
    """A slot rewritten by a lower-rank adapter keeps the pool layout (rows >= rank zero); a
    module the new adapter does not cover is emptied; the pools' host mirrors follow."""
    g = torch.Generator().manual_seed(7)
    pools = {"p": _pool(1, 4), "q": _pool(1, 4)}
    store = AdapterStore(pools)
    A4, B4 = _factors(g, 4)
    A1, B1 = _factors(g, 1)
    store.add("big", {"p": (A4, B4, 1.0), "q": (A4, B4, 1.0)})
    store.add("small", {"p": (A1, B1, 2.0)}, load=False)
    with store.lease(["small"]) as lease:
        assert lease.slots == {"small": 0}
    assert _slot_holds(pools["p"], 0, (A1, B1, 2.0))
    assert pools["p"].names() == ["small"] and pools["p"].slot("small") == 0
    assert "big" not in pools["p"] and len(pools["q"]) == 0 and int(pools["q"].ranks[0]) == 0
    assert (pools["q"].lora_A == 0).all() and (pools["q"].lora_Bt == 0).all()
    assert store.stats.bytes_moved == 2 * 4 * (IN + OUT) * 4 + 1 * (IN + OUT) * 4


def test_server_prefetch_waits_for_the_batch_in_flight():
    """Server level, with the hand-driven engine: a prefetch issued while the previous batch is
    still 'running' (its use event not complete) is queued behind it and cannot run; once the
    batch completes, the next forward waits on the load and serves the new adapter exactly."""
    torch.manual_seed(1)
    model = _Tiny().to(DEVICE)
    server = lk.MultiAdapterModel(model, ["up", "down"], max_adapters=2, max_rank=4)
    eng = ManualEngine()
    server.store.engine = eng
    g = torch.Generator().manual_seed(8)
    ads = {}
    for k in range(3):
        ads[f"a{k}"] = {m: (*(t.to(DEVICE) for t in _factors(g, 1 + k)), 0.5 + k)
                        for m in ("up", "down")}
        server.add(f"a{k}", ads[f"a{k}"])
    x = torch.randn(2, 3, IN, generator=g).to(DEVICE)
    with torch.no_grad():
        server(x, adapters=["a0", "a1"])
    [use] = {e for lst in server.store._uses for e in lst}          # the batch "in flight"
    assert server.prefetch(["a2"]) == ["a2"]                           # evicts a0 (LRU)
    with pytest.raises(RuntimeError, match="must wait"):
        eng.run()
    a0_slot = server.layers["up"].pool.slot("a0")                      # a0 still in place
    assert _slot_holds(server.layers["up"].pool, a0_slot, ads["a0"]["up"])
    use.set()
    with torch.no_grad():
        y = server(x, adapters=["a2", "a1"])
    assert eng.log[-2:] == [("wait", eng.log[-1][1]), ("run", eng.log[-1][1])]
    for b, n in enumerate(["a2", "a1"]):
        want = _ref(model, x[b].cpu(), {m: (A.cpu(), B.cpu(), s) for m, (A, B, s) in
                                        ads[n].items()})
        assert_close(y[b], want, torch.float32, n)
