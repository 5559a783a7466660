"""Hostile but fair input and concurrency (issue 21): one tenant's non-finite adapter stays in its
own rows on every strategy and backend, id checks are never skipped on a stale cache, refused
calls change nothing (bitwise), concurrent server calls are correct."""

import numpy as np
import pytest
import torch

import lora_kernels as lk
from lora_kernels import AdapterPool
from lora_kernels.ops.multi_lora import plan_for
from lora_kernels.ops.multi_lora import torch_backend as MT
from lora_kernels.reference import serving as ref
from lora_kernels.store import AdapterStore

from helpers import assert_refused, snapshot, spy_cpu_strategies

IN, OUT, MAXA, MAXR = 24, 20, 4, 4       # MAXA * MAXR = 16 rank rows: the dense strategy's range


def _pool(bad_slot, bad, where="A", dtype=torch.float32):
    """Four adapters (ranks 1-4); slot ``bad_slot``'s ``where`` factor holds ``bad`` (NaN/inf)
    in one entry. Returns the pool and the float64 factors per slot."""
    g = torch.Generator().manual_seed(7)
    pool = AdapterPool(IN, OUT, MAXA, MAXR, dtype=dtype)
    ads = {}
    for j in range(MAXA):
        r = j + 1
        A = torch.randn(r, IN, generator=g, dtype=torch.float64) / IN ** 0.5
        B = torch.randn(OUT, r, generator=g, dtype=torch.float64) / r ** 0.5
        if j == bad_slot:
            (A if where == "A" else B)[0, 0] = bad
        pool.add(f"a{j}", A, B, 0.5 + j)
        ads[j] = (A, B, 0.5 + j)
    return pool, ads


def _ids(kind, T, bad_slot):
    g = torch.Generator().manual_seed(T)
    if kind == "runs":                 # long runs in token order (runs / dense)
        k = torch.tensor([-1, bad_slot, (bad_slot + 1) % MAXA, (bad_slot + 2) % MAXA])
        return k.repeat_interleave(T // 4)
    return torch.randint(-1, MAXA, (T,), generator=g)      # fragmented (sorted / dense)


def _check_isolated(y, x, w, b, ads, ids, bad_slot, what):
    y64 = ref.multi_lora_linear(x.double(), w.double() if w is not None else None,
                                b.double() if b is not None else None, ads, ids)
    other = ids != bad_slot
    assert other.any()
    assert torch.isfinite(y[other]).all(), f"{what}: NaN/inf leaked into other tenants' rows"
    torch.testing.assert_close(y[other].double(), y64[other], rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"{what}: {m}")


BADS = [("A", float("nan")), ("B", float("nan")), ("A", float("inf")), ("B", float("-inf"))]


@pytest.mark.parametrize("bad_slot", [0, 2])
@pytest.mark.parametrize("where,bad", BADS)
@pytest.mark.parametrize("kind,T", [("decode", 6), ("runs", 64), ("frag", 64), ("frag", 5)])
def test_nonfinite_adapter_stays_in_its_rows_cpu(monkeypatch, bad_slot, where, bad, kind, T):
    """The public op (whatever strategy its cost model picks) and every CPU strategy run
    directly: rows of other adapters and of base-only tokens (-1) match float64; the dense
    strategy (every slot's factors in one GEMM: 0 * NaN = NaN) is not picked for such a pool."""
    pool, ads = _pool(bad_slot, bad, where)
    ids = _ids(kind, T, bad_slot)
    ids[0] = -1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, IN, generator=g)
    w, b = torch.randn(OUT, IN, generator=g), torch.randn(OUT, generator=g)
    seen = spy_cpu_strategies(monkeypatch)
    y = lk.multi_lora_linear(x, w, b, pool, ids, backend="torch")
    assert "dense_add_" not in seen
    _check_isolated(y, x, w, b, ads, ids, bad_slot, f"auto ({seen})")
    plan = plan_for(pool, ids, backend="torch")
    runs = plan.runs()
    for name, fn in [("sorted", lambda y_: MT.sorted_add_(y_, x, pool.view(), plan)),
                     ("gather", lambda y_: MT.gather_add_(y_, x, pool.view(), plan))] + (
            [("runs", lambda y_: MT.runs_add_(y_, x, pool.view(), runs))] if runs else []):
        y = torch.zeros(T, OUT)
        fn(y)
        _check_isolated(y, x, None, None, ads, ids, bad_slot, name)


@pytest.mark.parametrize("bad_slot", [0, 2])
def test_nonfinite_adapter_gradients_isolated(bad_slot):
    """Training through a pool with one NaN adapter: dx of other rows, and the factor gradients
    of other slots, match float64 (CPU segments and the GPU-style gather)."""
    pool, ads = _pool(bad_slot, float("nan"), "B")
    pool.requires_grad_()
    T = 32
    ids = _ids("frag", T, bad_slot)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, IN, generator=g, requires_grad=True)
    w = torch.randn(OUT, IN, generator=g)
    dy = torch.randn(T, OUT, generator=g)
    y = lk.multi_lora_linear(x, w, None, pool, ids, backend="torch")
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    A64 = [a.clone().requires_grad_() for a, _, _ in ads.values()]
    y64 = ref.multi_lora_linear(x64, w.double(), None,
                                {j: (A64[j], ads[j][1], ads[j][2]) for j in ads}, ids)
    (y64 * dy.double()).sum().backward()
    other = ids != bad_slot
    torch.testing.assert_close(x.grad[other].double(), x64.grad[other], rtol=1e-4, atol=1e-4)
    for j in range(MAXA):
        if j != bad_slot:
            torch.testing.assert_close(pool.lora_A.grad[j, :j + 1].double(), A64[j].grad,
                                       rtol=1e-4, atol=1e-4)
    view = pool.view()
    plan = plan_for(pool, ids, backend="torch")
    dx, dA, _ = MT.bwd(dy, x.detach(), w, view, plan, (True, True, False), gather=True)
    torch.testing.assert_close(dx[other].double(), x64.grad[other], rtol=1e-4, atol=1e-4)
    for j in range(MAXA):
        if j != bad_slot:
            assert torch.isfinite(dA[j]).all()


def test_nonfinite_adapter_isolated_triton():
    pytest.importorskip("triton")
    from lora_kernels._backend import triton_interpret

    if not triton_interpret():
        pytest.skip("Triton kernels run here through TRITON_INTERPRET=1 only")
    pool, ads = _pool(0, float("nan"), "A")
    for kind, T in (("decode", 6), ("runs", 32)):
        ids = _ids(kind, T, 0)
        ids[0] = -1
        x = torch.randn(T, IN)
        w, b = torch.randn(OUT, IN), torch.randn(OUT)
        y = lk.multi_lora_linear(x, w, b, pool, ids, backend="triton")
        _check_isolated(y, x, w, b, ads, ids, 0, f"triton {kind}")


def test_finite_pool_still_uses_dense(monkeypatch):
    """The guard costs nothing for a healthy pool: the dense strategy is still picked."""
    pool, ads = _pool(-1, 0.0)
    ids = torch.tensor([0, 1, 2, 3, -1, 1])
    x = torch.randn(6, IN)
    seen = spy_cpu_strategies(monkeypatch)
    y = lk.multi_lora_linear(x, None, None, pool, ids, backend="torch")
    assert seen == ["dense_add_"]
    _check_isolated(y, x, None, None, ads, ids, -1, "dense")


# ------------------------------------------------------------------ stale caches (item 2)
def _small_pool():
    pool = AdapterPool(8, 6, 4, 2)
    pool.add("a", torch.randn(2, 8), torch.randn(6, 2), 0.5)
    pool.add("b", torch.randn(1, 8), torch.randn(6, 1), 2.0)
    return pool


def _ref_of(pool):
    return {pool.slot(n): pool.get(n) for n in pool.names()}


def test_ids_rewritten_behind_version_counter_numpy():
    """``torch.from_numpy(buf)`` ids rewritten through ``buf`` (no version bump): the next call
    checks the new ids (an id of 1000 refused) and uses a plan of the new ids."""
    pool = _small_pool()
    buf = np.array([0, 0, 1, -1, 1, 0], dtype=np.int64)
    ids = torch.from_numpy(buf)
    x = torch.randn(6, 8)
    y = lk.multi_lora_linear(x, None, None, pool, ids, backend="torch")
    torch.testing.assert_close(y, ref.multi_lora_linear(x, None, None, _ref_of(pool), ids))
    buf[:] = [1, 1, 0, 0, -1, 1]
    y = lk.multi_lora_linear(x, None, None, pool, ids, backend="torch")
    torch.testing.assert_close(y, ref.multi_lora_linear(x, None, None, _ref_of(pool), ids))
    buf[2] = 1000
    with pytest.raises(ValueError, match="adapter_ids"):
        lk.multi_lora_linear(x, None, None, pool, ids, backend="torch")
    with pytest.raises(ValueError, match="adapter_ids"):
        pool.check_ids(ids, 6)


def test_ids_rewritten_through_data_freed_slot():
    """A write through ``.data`` (no version bump) naming a freed slot is refused."""
    pool = _small_pool()
    pool.add("c", torch.randn(2, 8), torch.randn(6, 2))
    pool.remove("c")                                   # slot 2 freed
    ids = torch.tensor([0, 1, 1, 0], dtype=torch.int32)
    x = torch.randn(4, 8)
    lk.multi_lora_linear(x, None, None, pool, ids, backend="torch")
    ids.data[1] = 2
    with pytest.raises(ValueError, match="adapter_ids"):
        lk.multi_lora_linear(x, None, None, pool, ids, backend="torch")
    ids.data[1] = 1
    y = lk.multi_lora_linear(x, None, None, pool, ids, backend="torch")
    torch.testing.assert_close(y, ref.multi_lora_linear(x, None, None, _ref_of(pool), ids))


def test_cur_indices_rewritten_through_data():
    """CURLoRA's index check is not skipped after a ``.data`` write (CPU: content key)."""
    from lora_kernels.layers.cur import CURLoRALinear

    lin = torch.nn.Linear(12, 10)
    m = CURLoRALinear.from_linear(lin, rank=3, generator=torch.Generator().manual_seed(0))
    m(torch.randn(2, 12))
    m.col_idx.data[0] = 10_000
    with pytest.raises(ValueError):
        m(torch.randn(2, 12))


# ------------------------------------------------------------------ pool refusals (items 4, 8)
@pytest.mark.parametrize("scaling", [1e39, -1e39, float("inf"), float("nan")])
def test_pool_add_scaling_not_finite_in_float32(scaling):
    pool = _small_pool()
    assert_refused(lambda: pool.add("c", torch.randn(2, 8), torch.randn(6, 2), scaling),
                   ValueError, pool, match="scaling")


def test_store_add_scaling_not_finite_in_float32():
    pools = {"m": AdapterPool(8, 6, 2, 2)}
    store = AdapterStore(pools)
    store.add("ok", {"m": (torch.randn(2, 8), torch.randn(6, 2), 1.0)})
    assert_refused(lambda: store.add("bad", {"m": (torch.randn(2, 8), torch.randn(6, 2), 1e39)}),
                   ValueError, store, match="scaling")
    assert "bad" not in store
    store.add("bad", {"m": (torch.randn(2, 8), torch.randn(6, 2), 1.0)})   # the name is free


def test_pool_cuda_device_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    with pytest.raises(ValueError, match="device"):
        AdapterPool(8, 6, 2, 2, device="cuda")


def test_pool_add_behind_the_stores_back():
    pool = AdapterPool(8, 6, 2, 2)
    store = AdapterStore(pool)
    store.add("a", (torch.randn(2, 8), torch.randn(6, 2), 1.0))
    assert_refused(lambda: pool.add("x", torch.randn(2, 8), torch.randn(6, 2)), ValueError,
                   pool, store, match="store")
    assert_refused(lambda: pool.remove("a"), ValueError, pool, store, match="store")
    store.remove("a")                       # the store itself still writes
    assert len(pool) == 0
    with pytest.raises(ValueError, match="owned"):
        AdapterStore(pool)


def test_snapshot_sees_one_bit():
    """The refusal helper is not vacuous: a one-bit change (a NaN payload, -0.0) is seen."""
    pool = _small_pool()
    s = snapshot(pool)
    pool.lora_A.data[0, 0, 0] = -pool.lora_A[0, 0, 0]
    assert snapshot(pool) != s
    pool = _small_pool()
    s = snapshot(pool)
    pool._rank_at[3] = 0 if pool._rank_at[3] else 1
    assert snapshot(pool) != s


# ------------------------------------------------------------------ adapter files (item 7)
def _saved(tmp_path, mods=("model.layers.0.q_proj", "model.layers.1.q_proj")):
    from lora_kernels.peft_io import save_peft_adapter

    path = tmp_path / "ad"
    save_peft_adapter({m: (torch.randn(2, 8), torch.randn(6, 2), 1.0) for m in mods}, path)
    return path


def _edit(path, **changes):
    import json

    fn = path / "adapter_config.json"
    cfg = json.loads(fn.read_text())
    cfg.update(changes)
    fn.write_text(json.dumps(cfg))


@pytest.mark.parametrize("key", ["(a+)+", "(q|k)*_proj", "(.*)*x", ".*.*.*x", "a?a?a?b",
                                 "(?=q)q_proj", "(q)\\1", "x" * 600, "[a-", ""],
                         ids=lambda k: k[:14])
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_keys_that_can_hang_refused(tmp_path, field, key):
    """Keys shaped for catastrophic backtracking are refused before any match runs (a server
    loading uploaded adapters must not hang); a clear ValueError naming the field."""
    from lora_kernels.peft_io import load_peft_adapter

    path = _saved(tmp_path)
    _edit(path, **{field: {key: 2}})
    with pytest.raises(ValueError, match=field):
        load_peft_adapter(path)


def test_pattern_keys_keep_peft_semantics(tmp_path):
    """Real keys still match as PEFT matches them (``(.*\\.)?(p)$``, first match wins)."""
    from lora_kernels.peft_io import load_peft_adapter

    path = _saved(tmp_path)
    for pat, want in [({"model.layers.0.q_proj": 4.0}, (2.0, 0.5)),
                      ({".*\\.layers\\.\\d+\\.q_proj": 6.0}, (3.0, 3.0)),
                      ({"(q|k|v)_proj": 4.0}, (2.0, 2.0)),
                      ({"layers.1.q_proj": 8.0, "q_proj": 4.0}, (2.0, 4.0)),
                      ({"0.q_proj": 4.0}, (2.0, 0.5)),       # a suffix after a "."
                      ({"ayers.0.q_proj": 4.0}, (0.5, 0.5))]:  # not after a "."
        _edit(path, alpha_pattern=pat, lora_alpha=1.0)
        ad = load_peft_adapter(path)
        got = (ad["model.layers.0.q_proj"][2], ad["model.layers.1.q_proj"][2])
        assert got == want, (pat, got)
    pytest.importorskip("peft")
    from peft.utils.other import get_pattern_key

    from lora_kernels.peft_io import check_pattern, pattern_value

    pats = {".*\\.layers\\.\\d+\\.q_proj": 6, "(q|k|v)_proj": 4, "0.q_proj": 5,
            "ayers.0.q_proj": 7, "model.layers.[0-9].q_proj": 9, "q_pro?j": 3}
    for k in pats:
        check_pattern("rank_pattern", k)
        for m in ("model.layers.0.q_proj", "model.layers.1.q_proj", "q_proj", "x.k_proj"):
            pk = get_pattern_key([k], m)
            assert pattern_value({k: pats[k]}, m, None) == (pats[k] if pk == k else None), (k, m)


def test_pattern_worst_allowed_case_terminates():
    """The most backtracking an accepted key allows (two repetitions, two optional parts, a
    512-character name built to mismatch) runs to the end (~0.2 s on the CI box)."""
    import re

    from lora_kernels.peft_io import MAX_MODULE_NAME, check_pattern, pattern_value

    key = ".?.?.*.*x"
    check_pattern("rank_pattern", key)
    name = "a." * (MAX_MODULE_NAME // 2)
    assert pattern_value({key: 3}, name, 1) == 1
    assert re.match(rf"(.*\.)?({key})$", name) is None
    with pytest.raises(ValueError, match="module name"):
        pattern_value({key: 3}, "a" * (MAX_MODULE_NAME + 1), 1)


@pytest.mark.parametrize("text,match", [
    ('"lora_alpha": NaN', "lora_alpha"), ('"lora_alpha": Infinity', "lora_alpha"),
    ('"lora_alpha": 1e400', "lora_alpha"), ('"lora_alpha": 1' + "0" * 400, "lora_alpha"),
    ('"alpha_pattern": {"q_proj": NaN}', "alpha_pattern"),
    ('"alpha_pattern": {"q_proj": -Infinity}', "alpha_pattern"),
    ('"alpha_pattern": {"q_proj": 1e400}', "alpha_pattern"),
    ('"lora_alpha": 1e40', "scaling"),                     # finite, but not in float32
    ('"rank_pattern": {"q_proj": 1' + "0" * 400 + "}", "rank"),
], ids=lambda v: v[:28])
def test_config_numbers_refused(tmp_path, text, match):
    import json

    from lora_kernels.peft_io import load_peft_adapter

    path = _saved(tmp_path)
    fn = path / "adapter_config.json"
    cfg = json.loads(fn.read_text())
    key = text.split('"')[1]
    cfg.pop(key, None)
    fn.write_text(json.dumps(cfg)[:-1] + ", " + text + "}")
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(path)


def test_deeply_nested_config_refused(tmp_path):
    from lora_kernels.peft_io import load_peft_adapter

    path = _saved(tmp_path)
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + "[" * 100_000
                                              + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_peft_adapter(path)


def test_module_stored_twice_refused(tmp_path):
    """The same module with and without PEFT's ``base_model.model.`` prefix: refused, not one
    copy silently picked."""
    from safetensors.torch import load_file, save_file

    from lora_kernels.peft_io import load_peft_adapter

    path = _saved(tmp_path, mods=("lin",))
    fn = path / "adapter_model.safetensors"
    t = load_file(fn)
    t["lin.lora_A.weight"] = torch.zeros(2, 8)
    save_file(t, fn)
    with pytest.raises(ValueError, match="stored twice"):
        load_peft_adapter(path)


# ------------------------------------------------------------------ threads (item 3)
class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = torch.nn.Linear(16, 24)
        self.down = torch.nn.Linear(24, 12)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _tiny_server(n_adapters=5, max_adapters=4):
    server = lk.MultiAdapterModel(_Tiny(), ["up", "down"], max_adapters=max_adapters,
                                  max_rank=4)
    g = torch.Generator().manual_seed(1)
    for k in range(n_adapters):
        r = 1 + k % 4
        server.add(f"t{k}", {m: (torch.randn(r, i, generator=g), torch.randn(o, r, generator=g),
                                 0.5 + k)
                             for m, i, o in (("up", 16, 24), ("down", 24, 12))})
    return server


def test_server_threads_mixed_batches():
    """Four request threads, each serving its own mixes (adapters shared across threads, more
    adapters than slots: evictions under load): every call returns exactly what the same call
    returns alone, none raises."""
    import threading

    server = _tiny_server()
    names = [f"t{k}" for k in range(5)] + [None]
    g = torch.Generator().manual_seed(2)
    calls = []
    for _ in range(24):
        mix = [names[int(i)] for i in torch.randint(0, 6, (3,), generator=g)]
        if len({m for m in mix if m}) > 4:
            continue
        calls.append((torch.randn(3, 5, 16, generator=g), mix))
    with torch.no_grad():
        want = [server(x, adapters=mix) for x, mix in calls]
    errors, wrong = [], []

    def worker(tid):
        order = torch.randperm(len(calls), generator=torch.Generator().manual_seed(tid))
        for _rep in range(3):
            for i in order.tolist():
                x, mix = calls[i]
                try:
                    with torch.no_grad():
                        y = server(x, adapters=mix)
                except Exception as e:  # noqa: BLE001 -- collected and reported below
                    errors.append(repr(e))
                    continue
                if not torch.allclose(y, want[i], rtol=1e-5, atol=1e-5):
                    wrong.append((tid, i, mix))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not wrong, f"{len(wrong)} of {4 * 3 * len(calls)} calls wrong, e.g. {wrong[:3]}"


def test_server_other_thread_sees_base_model():
    """While one thread is inside ``server.using``, another thread calling the wrapped model
    directly gets the base model, not the first thread's adapters."""
    import threading

    server = _tiny_server()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        base = server(x)
        adapted = server(x, adapters=["t1", "t2"])
    inside, done = threading.Event(), threading.Event()
    got = {}

    def holder():
        with server.using(["t1", "t2"]), torch.no_grad():
            inside.set()
            done.wait(10)
            got["holder"] = server.model(x)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(10)
    with torch.no_grad():
        got["other"] = server.model(x)
    done.set()
    t.join()
    torch.testing.assert_close(got["other"], base)
    torch.testing.assert_close(got["holder"], adapted)
    with server.using(["t1", None]), pytest.raises(RuntimeError, match="nest"):
        with server.using(["t0", None]):
            pass
    import copy

    twin = copy.deepcopy(server)                     # the lock is not copied: a fresh one
    assert twin._lock is not server._lock
    with torch.no_grad():
        torch.testing.assert_close(twin(x, adapters=["t1", "t2"]), adapted)


# ------------------------------------------------------------------ refusals change nothing (4)
def _ad(r=2, s=1.0, up=(16, 24), down=(24, 12)):
    return {"up": (torch.randn(r, up[0]), torch.randn(up[1], r), s),
            "down": (torch.randn(r, down[0]), torch.randn(down[1], r), s)}


def test_refusals_change_nothing_pool_and_store():
    pool = _small_pool()
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    for call, exc in [
        (lambda: pool.add(3, A, B), TypeError), (lambda: pool.add("a", A, B), ValueError),
        (lambda: pool.add("c", torch.randn(2, 9), B), ValueError),
        (lambda: pool.add("c", torch.randn(3, 8), torch.randn(6, 3)), ValueError),
        (lambda: pool.add("c", A, B, float("nan")), ValueError),
        (lambda: pool.add("c", A, B, 1e39), ValueError),
        (lambda: pool.add("c", A, B, slot=0), ValueError),
        (lambda: pool.add("c", A.int(), B), TypeError),
        (lambda: pool.remove("zz"), ValueError),
    ]:
        assert_refused(call, exc, pool)
    full = AdapterPool(8, 6, 1, 2)
    full.add("x", A, B)
    assert_refused(lambda: full.add("y", A, B), ValueError, full, match="full")

    pools = {"up": AdapterPool(16, 24, 2, 2), "down": AdapterPool(24, 12, 2, 2)}
    store = AdapterStore(pools)
    store.add("a", _ad())
    store.add("b", _ad(r=1))
    store.add("c", _ad(), load=False)
    lease = store.acquire(["a"])
    for call, exc in [
        (lambda: store.add("d", {"nope": _ad()["up"]}), ValueError),
        (lambda: store.add("d", {"up": _ad()["up"], "down": (torch.randn(2, 3),) * 2 + (1.,)}),
         ValueError),
        (lambda: store.add("d", _ad(s=1e39)), ValueError),
        (lambda: store.add("d", _ad(r=3)), ValueError),
        (lambda: store.add("a", _ad()), ValueError),
        (lambda: store.remove("zz"), ValueError),
        (lambda: store.remove("a"), ValueError),              # held by a lease
        (lambda: store.acquire(["a", "zz"]), ValueError),
        (lambda: store.acquire(["b", "c"]), RuntimeError),    # slot of "a" held: no room
    ]:
        assert_refused(call, exc, store, *pools.values())
    store.release(lease)
    assert_refused(lambda: store.release(lease), ValueError, store, *pools.values())


def test_refusals_change_nothing_server(tmp_path):
    server = _tiny_server(n_adapters=3)
    server.add_sum("s", ["t0", "t1"])
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, '
                                                 '"lora_alpha": 1e40}')
    for call, exc in [
        (lambda: server.add("n", _ad(s=1e39)), ValueError),
        (lambda: server.add("n", {"up": _ad()["up"], "down": (torch.randn(2, 5),
                                                            torch.randn(12, 2), 1.0)}),
         ValueError),
        (lambda: server.add("n", {"up": _ad()["up"] + (torch.randn(3),)}), ValueError),
        (lambda: server.add("t0", _ad()), ValueError),
        (lambda: server.add("s", _ad()), ValueError),
        (lambda: server.add_sum("n", ["t0", "zz"]), ValueError),
        (lambda: server.add_sum("t1", ["t0"]), ValueError),
        (lambda: server.remove("zz"), ValueError),
        (lambda: server.remove("t0"), ValueError),           # part of "s"
        (lambda: server.prefetch(["zz"]), ValueError),
        (lambda: server(torch.randn(2, 3, 16), adapters=["t0"]), ValueError),
        (lambda: server(torch.randn(2, 3, 16), adapters=["t0", "zz"]), ValueError),
        (lambda: server.load_peft("n", bad_dir), ValueError),
    ]:
        assert_refused(call, exc, server)


def test_refusals_change_nothing_inject_and_loaders(tmp_path):
    from lora_kernels.peft_io import load_peft_adapter

    model = _Tiny()
    for call, exc in [
        (lambda: lk.inject(model, "nope", ["up"]), ValueError),
        (lambda: lk.inject(model, "lora", None), ValueError),
        (lambda: lk.inject(model, "lora", ["up", "down"], r=0), ValueError),
        (lambda: lk.inject_adapter(model, {"up": _ad()["up"], "down": (torch.randn(2, 5),
                                                                      torch.randn(12, 2), 1.)}),
         ValueError),
        (lambda: lk.inject_adapter(model, {"zz": _ad()["up"]}), ValueError),
        (lambda: lk.patch_peft(model, backend="nope"), ValueError),
    ]:
        assert_refused(call, exc, model)
    path = _saved(tmp_path)
    _edit(path, rank_pattern={"(a+)+": 2})
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(ValueError):
        load_peft_adapter(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files


# ------------------------------------------------------------------ Triton layouts (items 5, 6)
def _interp():
    pytest.importorskip("triton")
    from lora_kernels._backend import triton_interpret

    if not triton_interpret():
        pytest.skip("Triton kernels run here through TRITON_INTERPRET=1 only")


def _strided_bias(n):
    return torch.randn(2 * n)[::2]


def test_triton_strided_bias_lora_dora_qlora():
    """A bias with stride 2 (``b[::2]``): the fused LoRA, DoRA and QLoRA (NF4, int8) kernels
    read it as the torch reference does (interpreted)."""
    _interp()
    from lora_kernels.quant import Int8Weight, NF4Weight

    T, K, N, r = 5, 64, 24, 3
    x, w = torch.randn(T, K), torch.randn(N, K) * 0.2
    A, B, b = torch.randn(r, K) * 0.2, torch.randn(N, r) * 0.2, _strided_bias(N)
    for name, f in [
        ("lora", lambda be, bb: lk.lora_linear(x, w, bb, A, B, 0.5, backend=be)),
        ("dora", lambda be, bb: lk.dora_linear(x, w, bb, A, B, torch.rand(N) + 0.5, 0.5,
                                               backend=be)),
        ("nf4", lambda be, bb: lk.lora_linear(x, NF4Weight.from_float(w), bb, A, B, 0.5,
                                              backend=be)),
        ("int8", lambda be, bb: lk.lora_linear(x, Int8Weight.from_float(w), bb, A, B, 0.5,
                                               backend=be)),
    ]:
        torch.manual_seed(0)
        got = f("triton", b)
        torch.manual_seed(0)
        want = f("torch", b.contiguous())
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_triton_strided_bias_prefill_fused_and_expanded_ids():
    """Multi-LoRA Triton: a strided bias in the fused prefill GEMM; decode with an expand()ed
    ids tensor (stride 0: the kernel must not read ids[t] at t * 1 past its one element)."""
    _interp()
    pool, ads = _pool(-1, 0.0)
    T = 40
    ids = _ids("runs", T, 1)
    x, w, b = torch.randn(T, IN), torch.randn(OUT, IN), _strided_bias(OUT)
    got = lk.multi_lora_linear(x, w, b, pool, ids, backend="triton", path="prefill_fused")
    _check_isolated(got, x, w, b.contiguous(), ads, ids, -1, "prefill_fused strided bias")
    ids1 = torch.tensor([2]).expand(6)
    x6 = torch.randn(6, IN)
    got = lk.multi_lora_linear(x6, None, None, pool, ids1, backend="triton", path="decode")
    _check_isolated(got, x6, None, None, ads, ids1, -1, "decode expanded ids")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_multi_lora_add_overlapping_y_refused(backend):
    if backend == "triton":
        _interp()
    pool, _ = _pool(-1, 0.0)
    x = torch.randn(4, IN)
    y = torch.zeros(1, OUT).expand(4, OUT)
    assert_refused(lambda: lk.multi_lora_add_(y, x, pool, torch.tensor([0, 1, 2, -1]),
                                              backend=backend), ValueError, pool, y,
                   match="overlapping")


def _sparse_storage(tmp_path, numel, dtype):
    """A file-backed storage of ``numel`` elements whose pages are only allocated when touched
    (a sparse file, shared mapping): huge strides on a few elements without allocating GBs."""
    fn = tmp_path / "sparse.bin"
    with open(fn, "wb") as f:
        f.truncate(numel * torch.tensor([], dtype=dtype).element_size())
    return torch.from_file(str(fn), shared=True, size=numel, dtype=dtype)


def test_triton_offsets_past_2_31(tmp_path):
    """64-bit offsets: the dX-style GEMM reads ``W^T`` with ``k * stride_wk`` past 2^31
    elements (W (4, 8) with a row stride of 2^30: rows 2, 3 start beyond 2^31) and
    ``tn_kernel`` reads ``lhs`` with ``m * stride_lm`` past 2^31; int32 offsets wrap there and
    read the wrong rows (interpreted; a sparse file holds the few touched pages)."""
    _interp()
    from lora_kernels.ops.lowrank import gemm_lowrank, tn

    big = 1 << 30
    st = _sparse_storage(tmp_path, 3 * big + 64, torch.float32)
    W = st.as_strided((4, 8), (big, 1))                 # (out=4, in=8), rows 2^30 apart
    W.copy_(torch.randn(4, 8))
    dy = torch.randn(5, 4)
    dx = gemm_lowrank(dy, W.t(), out_dtype=torch.float32)   # dx = dy W: w = W^T, stride_wk 2^30
    torch.testing.assert_close(dx, dy @ W.clone(), rtol=1e-4, atol=1e-4)
    L = st.as_strided((6, 4), (1, big), storage_offset=16)  # (T=6, M=4): column m at m * 2^30
    L.copy_(torch.randn(6, 4))
    R = torch.randn(6, 3)
    torch.testing.assert_close(tn(L, R), L.clone().t() @ R, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ smaller items (8)
def test_lora_cosine_of_nan_adapter_is_nan():
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    An = A.clone()
    An[0, 0] = float("nan")
    assert np.isnan(lk.lora_cosine((An, B, 1.0), (A, B, 1.0)))
    Ai = A.clone()
    Ai[1, 3] = float("inf")
    assert np.isnan(lk.lora_cosine((Ai, B, 1.0), (A, B, 1.0)))
    assert lk.lora_cosine((A, B, 1.0), (A, B, 2.0)) == pytest.approx(1.0)


def test_dora_linear_float64():
    from lora_kernels.reference import dora as rd

    g = torch.Generator().manual_seed(0)
    d = torch.float64
    x = torch.randn(5, 12, dtype=d, generator=g, requires_grad=True)
    w = torch.randn(7, 12, dtype=d, generator=g)
    A = torch.randn(3, 12, dtype=d, generator=g, requires_grad=True)
    B = torch.randn(7, 3, dtype=d, generator=g, requires_grad=True)
    m = (torch.rand(7, dtype=d, generator=g) + 0.5).requires_grad_()
    b = torch.randn(7, dtype=d, generator=g)
    y = lk.dora_linear(x, w, b, A, B, m, 0.7, backend="torch")
    assert y.dtype == d
    leaves = [x, A, B, m]
    got = torch.autograd.grad(y.sum(), leaves)
    ref = rd.dora_linear(x, w, b, A, B, m, 0.7)
    # the row scale g = m / ||W + s B A|| is fp32 for every dtype (ops.dora): fp32 accuracy
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for gg, rr in zip(got, torch.autograd.grad(ref.sum(), leaves)):
        torch.testing.assert_close(gg, rr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_from_float_non_finite_row_refused(bad):
    from lora_kernels.quant import Int8Weight

    w = torch.randn(6, 16)
    w[3, 5] = bad
    with pytest.raises(ValueError, match=r"w has non-finite.*\[3\]"):
        Int8Weight.from_float(w)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_linear_scaling_zero_propagates_nan_factors(backend):
    """One semantics for every backend and PEFT (``result + lora_B(lora_A(x)) * scaling``):
    NaN factors with scaling 0 give NaN (0 * NaN), they are not masked."""
    if backend == "triton":
        _interp()
    x, w = torch.randn(3, 16), torch.randn(6, 16)
    A, B = torch.randn(2, 16), torch.randn(6, 2)
    A[0, 0] = float("nan")
    y = lk.lora_linear(x, w, None, A, B, 0.0, backend=backend)
    peft_like = x @ w.t() + ((x @ A.t()) @ B.t()) * 0.0
    assert torch.equal(torch.isnan(y), torch.isnan(peft_like))
    assert torch.isnan(y).all()
    A[0, 0] = 1.0
    y = lk.lora_linear(x, w, None, A, B, 0.0, backend=backend)
    torch.testing.assert_close(y, x @ w.t())



@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_server_bad_max_extra_bytes_leaves_model_untouched(bad):
    model = _Tiny()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="max_extra_bytes"):
        lk.MultiAdapterModel(model, ["up", "down"], max_extra_bytes=bad)
    assert {n: type(m) for n, m in model.named_modules()} == before
