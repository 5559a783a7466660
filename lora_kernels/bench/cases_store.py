"""Benchmark group ``store``: decode with more adapters than device slots.

A stack of ``L`` served layers (``K -> N``, rank ``r``) decodes ``T`` tokens per step. Every step
names ``HOT = slots / 2`` adapters that stay hot plus ``m`` cold ones taken round-robin from a
pool of ``COLD`` adapters (so a cold one is never resident when named again), hot names last so
LRU evicts the colds first. Over a schedule the number of colds per step is spread
(Bresenham) so that ``hits / (hits + misses)`` is exactly the target hit rate ``h``:
``m_avg = HOT (1 - h) / h`` (0.89 per step at 90 %, 8 at 50 % with HOT = 8); ``store_schedule``
is checked against :class:`~lora_kernels.store.AdapterStore`'s own counters in
``tests/test_store.py``.

Implementations (same tokens, same adapters, outputs checked against ``all_resident``):

``all_resident``        every adapter of the schedule in one pool (slots = working set): ids
                        only, no copies; the baseline.
``store_hits100``       the store with every step's adapters hot (the store's per-step
                        bookkeeping alone: acquire / release, no copies).
``store_hitsNN``        the store at NN % hits, loading on demand inside the step.
``store_hitsNN_prefetch``  the same, with the next step's adapters prefetched right after the
                        current step is enqueued (on a GPU the copies run on the store's side
                        stream while this step computes; on a CPU copies are synchronous).

Per step: ``acquire`` -> one ``multi_lora_linear`` per layer -> ``release``. Work counts are the
decode's (base GEMM + adapters per layer) plus, for the store rows, the bytes a miss moves host ->
device (``L r (K + N) e`` per miss) in ``extra``. DESIGN.md's goal (GPU): at 90 % hits
``<= 1.10 x all_resident`` (headline ``decode_overhead_at_90pct_hits``).
"""

from __future__ import annotations

import math

import torch

from .cases import dt, esize, gen, randn
from .harness import Case, Impl

HIT_RATES = (0.9, 0.5)
COLD = 64


def store_key(T, K, N, r, layers, slots, dtype) -> str:
    return f"T{T}-{K}x{N}-r{r}-L{layers}-{slots}slots-{dt(dtype)}"


def store_schedule(hit_rate: float, slots: int, steps: int, cold: int = COLD) -> list[list[str]]:
    """``steps`` lists of adapter names (colds first, hot last) whose store hit rate is
    ``hit_rate`` (after the first step, which loads the hot set)."""
    hot = [f"hot{j}" for j in range(slots // 2)]
    if not 0.0 < hit_rate <= 1.0:
        raise ValueError(f"hit_rate must be in (0, 1], got {hit_rate}")
    per = len(hot) * (1.0 - hit_rate) / hit_rate           # colds per step, on average
    if per > slots - len(hot):
        raise ValueError(f"hit_rate {hit_rate} needs {per:.1f} colds per step, more than the "
                         f"{slots - len(hot)} free slots")
    out, acc, c = [list(hot)], 0.0, 0            # step 0 loads the hot set (every impl alike)
    for _ in range(steps - 1):
        acc += per
        m = int(math.floor(acc + 1e-9))
        acc -= m
        out.append([f"cold{(c + j) % cold}" for j in range(m)] + hot)
        c += m
    return out


def _inputs(T, K, N, r, layers, dtype):
    shared = {}

    def make(device, k):
        if "W" not in shared:      # one model for every input set (its weights are the floor)
            g = gen(device, 777)
            shared["W"] = [randn((N, K), dtype, device, g, 1 / math.sqrt(K))
                           for _ in range(layers)]
            shared["b"] = [randn((N,), dtype, device, g, 0.1) for _ in range(layers)]
            names = [f"hot{j}" for j in range(32)] + [f"cold{j}" for j in range(COLD)]
            gh = torch.Generator().manual_seed(778)
            shared["ads"] = {n: [((torch.randn(r, K, generator=gh) / math.sqrt(K)).to(dtype),
                                  (torch.randn(N, r, generator=gh) / math.sqrt(r)).to(dtype),
                                  0.5) for _ in range(layers)] for n in names}
        g = gen(device, 9000 + k)
        return dict(x=randn((T, K), dtype, device, g), W=shared["W"], b=shared["b"],
                    ads=shared["ads"])
    return make


def _token_names(names: list[str], T: int) -> list[str]:
    return [names[t % len(names)] for t in range(T)]


def _impl(name: str, hit_rate: float | None, slots: int, prefetch: bool, steps: int) -> Impl:
    """``hit_rate=None``: all resident (one pool slot per adapter of the schedule)."""
    sched = store_schedule(hit_rate or 0.9, slots, steps)

    def prepare(sets, device):
        from lora_kernels import AdapterPool, multi_lora_linear
        from lora_kernels.store import AdapterStore

        d0 = sets[0]
        W, b, ads = d0["W"], d0["b"], d0["ads"]
        L, (N, K) = len(W), W[0].shape
        r, dtype = ads["hot0"][0][0].shape[0], W[0].dtype
        # all_resident serves every adapter any schedule names (hot set + every cold)
        used = sorted({n for h in HIT_RATES for s in store_schedule(h, slots, steps) for n in s})
        n_slots = len(used) if hit_rate is None else slots
        pools = [AdapterPool(K, N, n_slots, r, dtype=dtype, device=device) for _ in range(L)]
        T = d0["x"].shape[0]
        if hit_rate is None:
            for n in used:
                for lay, p in enumerate(pools):
                    p.add(n, *ads[n][lay])
            store = None
        else:
            store = AdapterStore({str(lay): p for lay, p in enumerate(pools)})
            for n in used:
                store.add(n, {str(lay): ads[n][lay] for lay in range(L)}, load=False)
        state = {"c": 0}
        hot_only = [s[-(slots // 2):] for s in sched]

        def step(i):
            c = state["c"]
            state["c"] = c + 1
            names = (hot_only if hit_rate == 1.0 else sched)[c % steps]
            tok = _token_names(names, T)
            x = sets[i]["x"]
            if store is None:
                ids = torch.tensor([pools[0].slot(n) for n in tok], dtype=torch.int32)
                return tuple(multi_lora_linear(x, W[lay], b[lay], pools[lay], ids)
                             for lay in range(L))
            lease = store.acquire(names)
            ids = torch.tensor([lease.slots[n] for n in tok], dtype=torch.int32)
            ys = tuple(multi_lora_linear(x, W[lay], b[lay], pools[lay], ids) for lay in range(L))
            store.release(lease)
            if prefetch:
                store.prefetch((hot_only if hit_rate == 1.0 else sched)[(c + 1) % steps])
            return ys
        return step

    if hit_rate is None:
        note = "every adapter of the schedule resident (one slot each): ids only"
    else:
        note = (f"AdapterStore, {slots} slots, designed hit rate {hit_rate:.0%}"
                + (", next step prefetched after this one is enqueued" if prefetch else
                   ", loads on demand in the step"))
    return Impl(name, prepare, graph=False, note=note)


def store_case(T, K, N, r, layers, slots, dtype, device, *, steps: int = 90) -> Case:
    e = esize(dtype)
    flops = layers * (2.0 * T * N * K + 2.0 * T * r * (K + N))
    n_used = min(T, slots)
    nbytes = layers * (e * (N * K + N + T * K + T * N) + e * n_used * r * (K + N) + 8.0 * T)
    impls = [_impl("all_resident", None, slots, False, steps),
             _impl("store_hits100", 1.0, slots, False, steps)]
    for h in HIT_RATES:
        tag = f"store_hits{round(h * 100)}"
        impls += [_impl(tag, h, slots, False, steps), _impl(tag + "_prefetch", h, slots, True,
                                                            steps)]
    miss_bytes = layers * r * (K + N) * e
    return Case("store", "multi_lora_decode_store",
                store_key(T, K, N, r, layers, slots, dtype),
                dict(T=T, in_features=K, out_features=N, r=r, layers=layers, slots=slots,
                     hot=slots // 2, cold=COLD, steps=steps),
                dtype, flops, nbytes, _inputs(T, K, N, r, layers, dtype), impls,
                ref="all_resident", baseline="all_resident", grad=False, graph=False,
                extra={"bytes_per_miss": miss_bytes,
                       "misses_per_step": {f"{round(h * 100)}": (slots // 2) * (1 - h) / h
                                           for h in HIT_RATES}})


# The DESIGN.md GPU point for decode_overhead_at_90pct_hits, and the CPU sweep's point
HEAD_STORE = (16, 4096, 4096, 16, 8, 16, torch.bfloat16)
CPU_STORE = (16, 512, 512, 8, 4, 16, torch.float32)


def store_cases(device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        return [store_case(*HEAD_STORE, device)]
    return [store_case(*CPU_STORE, device)]
