"""multi_lora_linear / multi_lora_add_ / AdapterPool against a per-token float64 reference."""

import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import multi_lora as ML
from lora_kernels.ops.multi_lora import plan as MP
from lora_kernels.ops.multi_lora import torch_backend as MT
from lora_kernels.reference import serving as ref

from conftest import DEVICE, DTYPES, backends
from helpers import assert_close, noncontig, randn, spy_cpu_strategies

IN, OUT, MAXA, MAXR = 97, 75, 6, 16
RANKS = {"r1": 1, "gone": 5, "r7": 7, "r16": 16, "r4": 4}
# (backend, path): the Triton backend has two kernels; the others choose internally
CASES = [(be, p) for be in backends() for p in (ML.PATHS if be == "triton" else (None,))]


def _pool(dtype, ranks=RANKS, maxa=MAXA, maxr=MAXR, remove=("gone",)):
    """A pool with mixed ranks and a freed slot (slot 1, 'gone')."""
    pool = lk.AdapterPool(IN, OUT, maxa, maxr, dtype=dtype, device=DEVICE)
    for k, (name, r) in enumerate(ranks.items()):
        a = torch.randn(r, IN, dtype=torch.float64) / math.sqrt(IN)
        b = torch.randn(OUT, r, dtype=torch.float64) / math.sqrt(r)
        pool.add(name, a, b, 0.5 + 0.25 * k)
    for name in remove:
        pool.remove(name)
    return pool


def _factors64(pool):
    """{slot: (A, B, s)} in float64 from what the pool stores (its dtype's rounding included)."""
    return {pool.slot(n): tuple(t.double() if torch.is_tensor(t) else t for t in pool.get(n))
            for n in pool.names()}


def _ids(pool, T, order="random", gen=None):
    slots = torch.tensor([pool.slot(n) for n in pool.names()] + [-1])
    ids = slots[torch.randint(0, len(slots), (T,), generator=gen)]
    if order == "sorted":
        ids = ids.sort().values
    return ids


def _ref_linear(x, w, b, pool, ids):
    d = lambda t: None if t is None else t.detach().double().cpu()
    return ref.multi_lora_linear(d(x), d(w), d(b), _factors64(pool), ids.cpu())


@pytest.mark.parametrize("backend,path", CASES)
@pytest.mark.parametrize("dtype,T,order", [(d, T, "random") for d in DTYPES for T in (1, 3, 130)]
                         + [(d, 130, "sorted") for d in (torch.float32, torch.bfloat16)])
def test_forward_matches_reference(backend, path, dtype, T, order):
    pool = _pool(dtype)
    ids = _ids(pool, T, order)
    assert (ids == -1).any() or T < 10
    x = randn(T, IN, dtype=dtype)
    if T == 3:
        x = noncontig(x)
    w = randn(OUT, IN, dtype=dtype, scale=1 / math.sqrt(IN))
    b = randn(OUT, dtype=dtype)
    y = lk.multi_lora_linear(x, w, b, pool, ids, backend=backend, path=path)
    assert y.shape == (T, OUT) and y.dtype == dtype and y.device.type == DEVICE.type
    yr = _ref_linear(x, w, b, pool, ids)
    assert_close(y, yr, dtype, "y")
    # the adapter term is really there (a base-only answer would fail the comparison)
    base = torch.nn.functional.linear(x.double().cpu(), w.double().cpu(), b.double().cpu())
    if (ids >= 0).any():
        assert (yr - base).norm() > 0.05 * yr.norm()


@pytest.mark.parametrize("backend,path", CASES)
def test_int32_ids_on_device_leading_dims(backend, path):
    dtype = torch.float32
    pool = _pool(dtype)
    x = randn(2, 5, IN, dtype=dtype)
    ids = _ids(pool, 10).to(torch.int32).to(DEVICE)
    w = randn(OUT, IN, dtype=dtype)
    y = lk.multi_lora_linear(x, w, None, pool, ids, backend=backend, path=path)
    assert y.shape == (2, 5, OUT)
    assert_close(y.reshape(10, OUT), _ref_linear(x.reshape(10, IN), w, None, pool, ids), dtype)


@pytest.mark.parametrize("backend,path", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_only_and_add_inplace(backend, path, dtype):
    pool = _pool(dtype)
    T = 21
    ids = _ids(pool, T)
    ids[0] = -1
    x = randn(T, IN, dtype=dtype)
    d = lk.multi_lora_linear(x, None, None, pool, ids, backend=backend, path=path)
    dr = _ref_linear(x, None, None, pool, ids)
    assert_close(d, dr, dtype, "delta")
    assert (d[ids == -1] == 0).all()
    y0 = randn(T, OUT, dtype=dtype)
    y = y0.clone()
    with torch.no_grad():
        out = lk.multi_lora_add_(y, x, pool, ids, backend=backend, path=path)
    assert out is y
    assert_close(y, y0.double().cpu() + dr, dtype, "y += delta")
    assert torch.equal(y[ids == -1], y0[ids == -1])     # untouched rows: bit-identical


@pytest.mark.parametrize("backend,path", CASES)
def test_rows_are_isolated(backend, path):
    """NaN in the x rows of base-only tokens must not leak into any other token's update, and a
    free slot's (zeroed) storage contributes nothing."""
    dtype = torch.float32
    pool = _pool(dtype)
    T = 40
    ids = _ids(pool, T)
    ids[::5] = -1
    x = randn(T, IN, dtype=dtype)
    x[ids == -1] = float("nan")
    y0 = randn(T, OUT, dtype=dtype)
    y = y0.clone()
    with torch.no_grad():
        lk.multi_lora_add_(y, x, pool, ids, backend=backend, path=path)
    keep = ids >= 0
    assert torch.isfinite(y[keep]).all()
    assert torch.equal(y[~keep], y0[~keep])
    xr = x.clone()
    xr[~keep] = 0
    assert_close(y[keep], (y0.double().cpu() + _ref_linear(xr, None, None, pool, ids))[keep],
                 dtype)


@pytest.mark.parametrize("backend,path", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,order", [(1, "random"), (41, "random"), (41, "sorted")])
def test_gradients(backend, path, dtype, T, order):
    pool = _pool(dtype).requires_grad_()
    ids = _ids(pool, T, order)
    if T > 1:
        assert len(set(ids.tolist())) >= 4      # a real mix
    x = randn(T, IN, dtype=dtype, requires_grad=True)
    w = randn(OUT, IN, dtype=dtype, scale=1 / math.sqrt(IN), requires_grad=True)
    b = randn(OUT, dtype=dtype, requires_grad=True)
    y = lk.multi_lora_linear(x, w, b, pool, ids, backend=backend, path=path)
    dy = randn(T, OUT, dtype=dtype)
    got = torch.autograd.grad(y, [x, w, b, pool.lora_A, pool.lora_Bt], dy)

    # float64 reference through the per-token formula, differentiating the pool tensors
    A = pool.lora_A.detach().double().cpu().requires_grad_()
    Bt = pool.lora_Bt.detach().double().cpu().requires_grad_()
    x64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
    ads = {pool.slot(n): (A[pool.slot(n), :pool.rank(n)], Bt[pool.slot(n), :pool.rank(n)].t(),
                          pool.scaling(n)) for n in pool.names()}
    yr = ref.multi_lora_linear(x64, w64, b64, ads, ids) + 0 * (A.sum() + Bt.sum())
    want = torch.autograd.grad(yr, [x64, w64, b64, A, Bt], dy.double().cpu())
    for name, g, gr, t in zip(["dx", "dW", "db", "dA", "dBt"], got, want,
                              [x, w, b, pool.lora_A, pool.lora_Bt]):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        if gr.norm() == 0:
            assert (g == 0).all(), name
        else:
            assert_close(g, gr, dtype, name)
    # gradient layout: zero outside each adapter's real rank and in free slots
    dA = got[3]
    for n in pool.names():
        assert (dA[pool.slot(n), pool.rank(n):] == 0).all()
    assert (dA[1] == 0).all()                    # the freed slot


@pytest.mark.parametrize("backend,path", CASES)
def test_training_step_updates_only_used_adapters(backend, path):
    dtype = torch.float32
    pool = _pool(dtype).requires_grad_()
    before = pool.lora_A.detach().clone()
    opt = torch.optim.SGD(pool.parameters(), lr=0.1)
    ids = torch.full((9,), pool.slot("r7"))
    ids[:3] = -1
    x = randn(9, IN, dtype=dtype)
    w = randn(OUT, IN, dtype=dtype)
    y = lk.multi_lora_linear(x, w, None, pool, ids, backend=backend, path=path)
    y.square().sum().backward()
    opt.step()
    changed = (pool.lora_A.detach() != before).flatten(1).any(1)
    assert changed.tolist() == [s == pool.slot("r7") for s in range(MAXA)]
    assert (pool.lora_A.detach()[pool.slot("r7"), 7:] == 0).all()
    assert pool.grad("r7")[0].shape == (7, IN) and pool.grad("r7")[1].shape == (OUT, 7)


@pytest.mark.parametrize("backend,path", CASES)
def test_slot_reuse_has_no_stale_weights(backend, path):
    dtype = torch.float32
    pool = _pool(dtype, remove=())
    old = pool.slot("r16")
    pool.remove("r16")
    assert pool.max_active_rank == 7
    assert (pool.lora_A[old] == 0).all() and (pool.lora_Bt[old] == 0).all()
    assert int(pool.ranks[old]) == 0 and float(pool.scalings[old]) == 0.0
    x = randn(4, IN, dtype=dtype)
    with pytest.raises(ValueError, match="adapter_ids.*free slot"):
        lk.multi_lora_linear(x, None, None, pool, torch.tensor([old, -1, -1, -1]),
                             backend=backend, path=path)
    a, b = torch.randn(2, IN, dtype=torch.float64), torch.randn(OUT, 2, dtype=torch.float64)
    assert pool.add("new", a, b, 3.0) == old            # lowest free slot
    assert (pool.lora_A[old, 2:] == 0).all() and (pool.lora_Bt[old, 2:] == 0).all()
    ids = torch.tensor([old, -1, old, pool.slot("r1")])
    y = lk.multi_lora_linear(x, None, None, pool, ids, backend=backend, path=path)
    assert_close(y, _ref_linear(x, None, None, pool, ids), dtype)
    exp0 = 3.0 * (x[0].double().cpu() @ a.t()) @ b.t()
    assert_close(y[0], exp0, dtype, "reused slot = new adapter only")


def test_choose_path_and_auto_path():
    assert ML.choose_path(1, 8) == "decode"
    assert ML.choose_path(64, 64) == "decode"
    assert ML.choose_path(130, 3) == "prefill"
    assert ML.choose_path(4096, 4) == "prefill"
    pool = _pool(torch.float32)
    x = randn(30, IN)
    ids = _ids(pool, 30)
    y = lk.multi_lora_linear(x, None, None, pool, ids, backend="torch")
    assert_close(y, _ref_linear(x, None, None, pool, ids), torch.float32)


def test_segments_metadata():
    gen = torch.Generator().manual_seed(1)
    for T, maxa, bm in [(1, 3, 16), (37, 5, 4), (130, 6, 16), (9, 20, 2)]:
        ids = torch.randint(-3, maxa + 2, (T,), generator=gen).to(DEVICE)  # incl. invalid ids
        perm, ta, ts, te, ss, sc = ML.segments(ids, maxa, bm)
        assert sorted(perm.tolist()) == list(range(T))
        assert ta.shape[0] == -(-T // bm) + min(maxa, T)
        seen = []
        for a, s, e in zip(ta.tolist(), ts.tolist(), te.tolist()):
            if a < 0:
                continue
            assert 0 < e - s <= bm
            rows = perm[s:e].tolist()
            assert all(int(ids[t]) == a for t in rows)
            seen += rows
        valid = [t for t in range(T) if 0 <= int(ids[t]) < maxa]
        assert sorted(seen) == valid
        for a in range(maxa):
            seg = perm[ss[a]:ss[a] + sc[a]].tolist()
            assert seg == [t for t in range(T) if int(ids[t]) == a]     # stable order


@pytest.mark.parametrize("backend,path", CASES)
def test_kernels_skip_invalid_ids_unchecked(backend, path):
    """The kernels' own guards: ids that slipped past validation (e.g. a CUDA graph replayed
    with bad ids) are treated as -1, never read out of bounds."""
    dtype = torch.float32
    pool = _pool(dtype)
    T = 6
    bad = torch.tensor([MAXA, 1_000_000, -7, 1, pool.slot("r7"), -1], device=DEVICE)  # 1 = free
    x = randn(T, IN, dtype=dtype)
    y0 = randn(T, OUT, dtype=dtype)
    y = y0.clone()
    be = lk.resolve_backend(backend, DEVICE, "multi_lora_linear")
    torch.ops.lora_kernels.multi_lora_add_(y, x, pool.lora_A, pool.lora_Bt, pool.ranks,
                                           pool.scalings, bad, pool.max_active_rank, be,
                                           path or "decode")
    assert torch.equal(y[[0, 1, 2, 3, 5]], y0[[0, 1, 2, 3, 5]])
    ok = torch.tensor([-1, -1, -1, -1, pool.slot("r7"), -1])
    assert_close(y[4], (y0.double().cpu() + _ref_linear(x, None, None, pool, ok))[4], dtype)


def test_empty_batch_and_empty_pool():
    pool = lk.AdapterPool(IN, OUT, 2, 4, device=DEVICE)
    x = randn(3, IN)
    w = randn(OUT, IN)
    for be, path in CASES:
        y = lk.multi_lora_linear(x, w, None, pool, torch.full((3,), -1), backend=be, path=path)
        assert torch.equal(y, torch.nn.functional.linear(x, w))
        y0 = lk.multi_lora_linear(x[:0], w, None, pool, torch.zeros(0, dtype=torch.long),
                                  backend=be, path=path)
        assert y0.shape == (0, OUT)


# ----------------------------------------------------------------------------- pool API
def _snapshot(pool):
    return (pool.lora_A.detach().clone(), pool.lora_Bt.detach().clone(), pool.ranks.clone(),
            pool.scalings.clone(), dict(pool._slot_of), list(pool._name_at), list(pool._rank_at),
            pool._occupied.clone())


def _same(s1, s2):
    return all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(s1, s2))


def test_pool_api():
    pool = lk.AdapterPool(IN, OUT, 3, 8, dtype=torch.float16, device=DEVICE)
    assert len(pool) == 0 and pool.max_active_rank == 0
    a, b = torch.randn(3, IN), torch.randn(OUT, 3)
    assert pool.add("x", a, b, 2.0) == 0
    assert pool.add("y", torch.randn(8, IN), torch.randn(OUT, 8)) == 1
    assert len(pool) == 2 and "x" in pool and "z" not in pool
    assert pool.slot("y") == 1 and pool.rank("x") == 3 and pool.scaling("x") == 2.0
    assert pool.names() == ["x", "y"] and pool.max_active_rank == 8
    ga, gb, gs = pool.get("x")
    assert torch.equal(ga, a.half().to(DEVICE)) and torch.equal(gb, b.half().to(DEVICE))
    assert gs == 2.0
    assert pool.lora_A.shape == (3, 8, IN) and pool.lora_Bt.shape == (3, 8, OUT)
    assert pool.lora_A.dtype == torch.float16 and pool.ranks.dtype == torch.int32
    assert pool.scalings.dtype == torch.float32
    assert pool.ranks.tolist() == [3, 8, 0]
    assert torch.equal(pool.lora_Bt[0, :3], b.t().half().to(DEVICE))
    assert pool.ids(["y", None, "x"]).tolist() == [1, -1, 0]
    assert pool.remove("x") == 0 and len(pool) == 1 and pool.max_active_rank == 8
    assert pool.add("z", a, b, slot=2) == 2
    assert "AdapterPool" in repr(pool)


@pytest.mark.parametrize("call,exc,match", [
    (lambda p: p.add("a", torch.randn(2, IN), torch.randn(OUT, 2)), ValueError, "already"),
    (lambda p: p.add("n", torch.randn(9, IN), torch.randn(OUT, 9)), ValueError, "max_rank"),
    (lambda p: p.add("n", torch.randn(2, IN + 1), torch.randn(OUT, 2)), ValueError, "lora_A"),
    (lambda p: p.add("n", torch.randn(2, IN), torch.randn(OUT, 3)), ValueError, "lora_B"),
    (lambda p: p.add("n", torch.randn(2, IN), torch.randn(OUT + 1, 2)), ValueError, "lora_B"),
    (lambda p: p.add("n", torch.randn(0, IN), torch.randn(OUT, 0)), ValueError, "lora_A"),
    (lambda p: p.add("n", torch.randn(IN), torch.randn(OUT, 1)), ValueError, "lora_A"),
    (lambda p: p.add("n", torch.ones(2, IN, dtype=torch.int64), torch.randn(OUT, 2)),
     TypeError, "lora_A"),
    (lambda p: p.add("n", torch.randn(2, IN), torch.randn(OUT, 2), float("nan")),
     ValueError, "scaling"),
    (lambda p: p.add("n", torch.randn(2, IN), torch.randn(OUT, 2), "1"), TypeError, "scaling"),
    (lambda p: p.add(3, torch.randn(2, IN), torch.randn(OUT, 2)), TypeError, "name"),
    (lambda p: p.add("", torch.randn(2, IN), torch.randn(OUT, 2)), ValueError, "name"),
    (lambda p: p.add("n", torch.randn(2, IN), torch.randn(OUT, 2), slot=0), ValueError, "slot"),
    (lambda p: p.add("n", torch.randn(2, IN), torch.randn(OUT, 2), slot=7), ValueError, "slot"),
    (lambda p: p.remove("nope"), ValueError, "name"),
    (lambda p: p.slot("nope"), ValueError, "name"),
])
def test_pool_refusals_leave_it_unchanged(call, exc, match):
    pool = lk.AdapterPool(IN, OUT, 3, 8, device=DEVICE)
    pool.add("a", torch.randn(4, IN), torch.randn(OUT, 4), 1.5)
    pool.add("b", torch.randn(2, IN), torch.randn(OUT, 2), 0.5)
    pool.remove("b")
    snap = _snapshot(pool)
    with pytest.raises(exc, match=match):
        call(pool)
    assert _same(snap, _snapshot(pool))


def test_pool_full_and_constructor_checks():
    pool = lk.AdapterPool(IN, OUT, 2, 4, device=DEVICE)
    pool.add("a", torch.randn(1, IN), torch.randn(OUT, 1))
    pool.add("b", torch.randn(1, IN), torch.randn(OUT, 1))
    snap = _snapshot(pool)
    with pytest.raises(ValueError, match="full"):
        pool.add("c", torch.randn(1, IN), torch.randn(OUT, 1))
    assert _same(snap, _snapshot(pool))
    with pytest.raises(ValueError, match="max_rank"):
        lk.AdapterPool(IN, OUT, 2, 0)
    with pytest.raises(TypeError, match="max_adapters"):
        lk.AdapterPool(IN, OUT, 2.0, 4)
    with pytest.raises(TypeError, match="dtype"):
        lk.AdapterPool(IN, OUT, 2, 4, dtype=torch.int32)


# ----------------------------------------------------------------------------- bad op input
def _bad_calls(pool, x, w, ids):
    f = lk.multi_lora_linear
    T = x.shape[0]
    return [
        (lambda: f(x, w, None, pool, ids.float()), TypeError, "adapter_ids"),
        (lambda: f(x, w, None, pool, ids[:-1]), ValueError, "adapter_ids"),
        (lambda: f(x, w, None, pool, ids[None]), ValueError, "adapter_ids"),
        (lambda: f(x, w, None, pool, torch.full((T,), MAXA)), ValueError, "adapter_ids.*outside"),
        (lambda: f(x, w, None, pool, torch.full((T,), -2)), ValueError, "adapter_ids.*outside"),
        (lambda: f(x, w, None, pool, torch.full((T,), 1)), ValueError, "adapter_ids.*free"),
        (lambda: f(x, w, None, pool, ids.to("meta")), ValueError, "adapter_ids.*device"),
        (lambda: f(x, w, None, pool, "0"), TypeError, "adapter_ids"),
        (lambda: f(x.half(), w.half(), None, pool, ids), TypeError, "x.*dtype"),
        (lambda: f(x[:, :-1], w[:, :-1], None, pool, ids), ValueError, "x"),
        (lambda: f(x, w[:-1], None, pool, ids), ValueError, "weight"),
        (lambda: f(x, w, torch.zeros(OUT + 1, device=DEVICE), pool, ids), ValueError, "bias"),
        (lambda: f(x, None, torch.zeros(OUT, device=DEVICE), pool, ids), ValueError, "bias"),
        (lambda: f(x, w, None, "pool", ids), TypeError, "pool"),
        (lambda: f(x, w, None, pool, ids, path="fast"), ValueError, "path"),
        (lambda: f(x, w, None, pool, ids, backend="nope"), ValueError, "backend"),
        (lambda: lk.multi_lora_add_(torch.zeros(T, OUT + 1, device=DEVICE), x, pool, ids),
         ValueError, "y"),
        (lambda: lk.multi_lora_add_(torch.zeros(T, OUT, device=DEVICE, dtype=torch.float64), x,
                                    pool, ids), TypeError, "y"),
        (lambda: lk.multi_lora_add_(torch.zeros(T, OUT, device=DEVICE), x.requires_grad_(),
                                    pool, ids), ValueError, "inference-only"),
    ]


def test_bad_input_raises_and_pool_unchanged():
    pool = _pool(torch.float32)
    T = 5
    x = randn(T, IN)
    w = randn(OUT, IN)
    ids = _ids(pool, T)
    snap = _snapshot(pool)
    for k, (call, exc, match) in enumerate(_bad_calls(pool, x, w, ids)):
        with pytest.raises(exc, match=match):
            call()
        assert _same(snap, _snapshot(pool)), k
        x.requires_grad_(False)


def test_registered_ops_opcheck():
    pool = _pool(torch.float32)
    T = 5
    x = randn(T, IN)
    w = randn(OUT, IN)
    ids = _ids(pool, T).to(DEVICE)
    rb = pool.max_active_rank
    p = (pool.lora_A, pool.lora_Bt, pool.ranks, pool.scalings, ids, rb)
    torch.library.opcheck(torch.ops.lora_kernels.multi_lora_fwd,
                          (x, w, None, *p, "torch", "decode"))
    torch.library.opcheck(torch.ops.lora_kernels.multi_lora_bwd,
                          (randn(T, OUT), x, w, *p, "torch", True, True, False))
    torch.library.opcheck(torch.ops.lora_kernels.multi_lora_add_,
                          (randn(T, OUT), x, *p, "torch", "decode"))
    torch.library.opcheck(torch.ops.lora_kernels.check_ids, (ids.cpu(), pool.ranks))
    torch.library.opcheck(torch.ops.lora_kernels.multi_lora_plan,
                          (ids, torch.tensor([3]), MAXA, "torch", "auto"))
    plan = MP.build(ids, MAXA, 3, backend="torch")         # the ops with a plan's tensors
    torch.library.opcheck(torch.ops.lora_kernels.multi_lora_fwd,
                          (x, w, None, *p, "torch", "auto", *plan.tensors()))
    torch.library.opcheck(torch.ops.lora_kernels.multi_lora_add_,
                          (randn(T, OUT), x, *p, "torch", "auto", *plan.tensors()))


@pytest.mark.parametrize("backend", backends())
def test_compile_fullgraph(backend):
    """``multi_lora_linear`` traces with ``fullgraph=True`` (the id check runs inside the
    ``lora_kernels::check_ids`` op): same values and gradients as eager, and a bad id still raises
    inside the compiled graph."""
    torch._dynamo.reset()
    pool = _pool(torch.float32).requires_grad_()
    T = 11
    ids = _ids(pool, T)
    x = randn(T, IN, requires_grad=True)
    w, b = randn(OUT, IN), randn(OUT)

    def f(x, ids):
        return lk.multi_lora_linear(x, w, b, pool, ids, backend=backend)

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, ids)
    g = torch.autograd.grad(y.sum(), [x, pool.lora_A, pool.lora_Bt])
    y2 = f(x, ids)
    g2 = torch.autograd.grad(y2.sum(), [x, pool.lora_A, pool.lora_Bt])
    assert_close(y, y2.double(), torch.float32, "y")
    for a, c in zip(g, g2):
        assert_close(a, c.double(), torch.float32, "grad")
    bad = ids.clone()
    bad[3] = 1  # the freed slot
    with pytest.raises(ValueError, match="adapter_ids"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(x, bad)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host-sync and CUDA-graph checks need a GPU")
@pytest.mark.parametrize("backend", [b for b in backends() if b != "torch"])
def test_decode_is_sync_free_and_graph_capturable(backend):
    dtype = torch.bfloat16
    pool = _pool(dtype)
    T = 8
    x = randn(T, IN, dtype=dtype)
    w = randn(OUT, IN, dtype=dtype)
    ids = _ids(pool, T).to(DEVICE)
    be = lk.resolve_backend(backend, DEVICE, "multi_lora_linear")
    args = (pool.lora_A, pool.lora_Bt, pool.ranks, pool.scalings, ids, pool.max_active_rank, be)
    y = torch.nn.functional.linear(x, w)
    for path in ("decode", "prefill"):  # warm-up (compilation) outside the checks
        torch.ops.lora_kernels.multi_lora_add_(y.clone(), x, *args, path)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for path in ("decode", "prefill"):
            torch.ops.lora_kernels.multi_lora_add_(y.clone(), x, *args, path)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    yg = y.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        lk.multi_lora_add_(yg, x, pool, ids, backend=backend, path="decode")
    yg.copy_(y)
    g.replay()
    torch.cuda.synchronize()
    assert_close(yg, _ref_linear(x, w, None, pool, ids), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 130])
def test_gather_path_on_cpu(dtype, T):
    """The torch backend runs per-adapter GEMMs on CPU and the gather-BMM elsewhere (no host
    sync): the gather path is called directly here so CPU CI covers what the GPU torch path
    runs, forward and every gradient, against the float64 per-token reference."""
    pool = _pool(dtype)
    ids = _ids(pool, T).to(DEVICE)
    x = randn(T, IN, dtype=dtype)
    if T == 3:
        x = noncontig(x)
    y = torch.zeros((T, OUT), dtype=dtype, device=DEVICE)
    plan = MP.build(ids, pool.max_adapters, len(pool), backend="torch")
    MT.gather_add_(y, x, pool.view(), plan)
    assert_close(y, _ref_linear(x, None, None, pool, ids.cpu()), dtype, "gather y")

    dy = randn(T, OUT, dtype=dtype)
    dx, dA, dBt = MT.bwd(dy, x, None, pool.view(), plan, (True, True, True), gather=True)
    A = pool.lora_A.detach().double().cpu().requires_grad_()
    Bt = pool.lora_Bt.detach().double().cpu().requires_grad_()
    x64 = x.detach().double().cpu().requires_grad_()
    ads = {pool.slot(n): (A[pool.slot(n), :pool.rank(n)], Bt[pool.slot(n), :pool.rank(n)].t(),
                          pool.scaling(n)) for n in pool.names()}
    yr = ref.multi_lora_linear(x64, None, None, ads, ids.cpu()) + 0 * (A.sum() + Bt.sum())
    want = torch.autograd.grad(yr, [x64, A, Bt], dy.double().cpu())
    for name, g, gr in zip(["dx", "dA", "dBt"], (dx, dA, dBt), want):
        if gr.norm() == 0:
            assert (g == 0).all(), name
        else:
            assert_close(g, gr, dtype, name)


@pytest.mark.parametrize("backend,path", CASES)
def test_add_inplace_y_is_x(backend, path):
    """``multi_lora_add_(y, y, ...)`` (in == out): every row's delta is computed from the
    original x, although the kernels split each token's columns over several programs."""
    pool = lk.AdapterPool(IN, IN, 3, 8, device=DEVICE)
    pool.add("a", torch.randn(5, IN) / 10, torch.randn(IN, 5) / 10, 1.5)
    pool.add("b", torch.randn(8, IN) / 10, torch.randn(IN, 8) / 10, 0.5)
    T = 37
    ids = torch.tensor([0, 1, -1] * 12 + [1])
    x = randn(T, IN)
    want = x.double().cpu() + _ref_linear(x, None, None, pool, ids)
    y = x.clone()
    with torch.no_grad():
        lk.multi_lora_add_(y, y, pool, ids, backend=backend, path=path)
    assert_close(y, want, torch.float32, "y += delta(y)")


@pytest.mark.parametrize("backend,path", CASES)
def test_large_ranks(backend, path):
    """Ranks up to 256 in one pool (rank loops in RB chunks, decode's smaller tiles for large RB),
    forward and gradients against the float64 reference."""
    dtype = torch.float32
    pool = lk.AdapterPool(IN, OUT, 3, 256, dtype=dtype, device=DEVICE)
    for k, r in enumerate((256, 1, 130)):
        pool.add(f"a{k}", torch.randn(r, IN) / math.sqrt(IN), torch.randn(OUT, r) / math.sqrt(r),
                 0.5 + k)
    pool.requires_grad_()
    T = 23
    ids = torch.tensor([0, 1, 2, -1] * 5 + [2, 0, 1])
    x = randn(T, IN, requires_grad=True)
    y = lk.multi_lora_linear(x, None, None, pool, ids, backend=backend, path=path)
    assert_close(y, _ref_linear(x, None, None, pool, ids), dtype, "y")
    dy = randn(T, OUT)
    got = torch.autograd.grad(y, [x, pool.lora_A, pool.lora_Bt], dy)
    A = pool.lora_A.detach().double().cpu().requires_grad_()
    Bt = pool.lora_Bt.detach().double().cpu().requires_grad_()
    x64 = x.detach().double().cpu().requires_grad_()
    ads = {pool.slot(n): (A[pool.slot(n), :pool.rank(n)], Bt[pool.slot(n), :pool.rank(n)].t(),
                          pool.scaling(n)) for n in pool.names()}
    yr = ref.multi_lora_linear(x64, None, None, ads, ids) + 0 * (A.sum() + Bt.sum())
    want = torch.autograd.grad(yr, [x64, A, Bt], dy.double().cpu())
    for name, g, gr in zip(["dx", "dA", "dBt"], got, want):
        assert_close(g, gr, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ranks", [{"a": 3, "b": 1, "c": 7}, {"a": 16, "b": 13, "c": 9}])
def test_cpu_runs_strategy(dtype, ranks):
    """The CPU runs strategy (per run of equal ids, two GEMMs on row slices), forward and dx
    (swap), with a base-only run whose x is NaN and a repeated adapter, on a non-contiguous x,
    against the float64 reference."""
    pool = lk.AdapterPool(IN, OUT, 4, 16, dtype=dtype)
    for k, (name, r) in enumerate(ranks.items()):
        pool.add(name, torch.randn(r, IN, dtype=torch.float64) / IN ** .5,
                 torch.randn(OUT, r, dtype=torch.float64) / r ** .5, 0.5 + k)
    lens = [(0, 11), (-1, 9), (2, 13), (1, 17), (0, 10)]          # a repeated adapter too
    ids = torch.cat([torch.full((n,), a) for a, n in lens])
    T = ids.shape[0]
    x = noncontig(randn(T, IN, dtype=dtype).cpu())          # a CPU strategy: CPU tensors
    x[ids == -1] = float("nan")
    plan = MP.build(ids, pool.max_adapters, len(pool), backend="torch", path="prefill")
    runs = plan.runs()
    assert runs is not None and len(runs) == len(lens)
    y0 = randn(T, OUT, dtype=dtype).cpu()
    y = y0.clone()
    MT.runs_add_(y, x, pool.view(), runs)
    keep = ids >= 0
    xr = x.clone()
    xr[~keep] = 0
    assert torch.equal(y[~keep], y0[~keep])
    assert_close(y[keep], (y0.double() + _ref_linear(xr, None, None, pool, ids))[keep], dtype)
    # dx: P = lora_Bt, Q = lora_A (the backward's swap), against the reference's dx
    dy = randn(T, OUT, dtype=dtype).cpu()
    dx = torch.zeros(T, IN, dtype=dtype)
    MT.runs_add_(dx, dy, pool.view(), runs, swap=True)
    x64 = xr.double().requires_grad_()
    yr = ref.multi_lora_linear(x64, None, None, _factors64(pool), ids)
    want, = torch.autograd.grad(yr, x64, dy.double())
    assert_close(dx[keep], want[keep], dtype, "dx")
    assert (dx[~keep] == 0).all()


def test_cpu_dense_strategy_weights_follow_the_pool():
    """The dense strategy's per-pool slot-weight table is rebuilt when a scaling or rank
    changes (add / remove / re-add): no stale weight survives a pool change."""
    pool = _pool(torch.float32)
    T = 5
    ids = torch.tensor([pool.slot("r7"), -1, pool.slot("r1"), pool.slot("r7"), pool.slot("r4")])
    x = randn(T, IN)
    plan = MP.build(ids, pool.max_adapters, len(pool), backend="torch", path="decode")
    for step in range(3):
        y = torch.zeros(T, OUT)
        MT.dense_add_(y, x, pool.view(), plan)
        assert_close(y, _ref_linear(x, None, None, pool, ids), torch.float32, f"step {step}")
        a, b, s = pool.get("r7")
        pool.remove("r7")
        pool.add("r7", a[:3], b[:, :3], s * 3 + 1, slot=ids[0].item())   # new rank and scale


def test_id_check_is_redone_after_any_change():
    """check_ids skips re-checking the very same unchanged ids tensor on an unchanged pool;
    writing to the ids in place or freeing a slot they name makes the check run again."""
    pool = _pool(torch.float32)
    x, w = randn(4, IN), randn(OUT, IN)
    ids = torch.tensor([pool.slot("r7"), pool.slot("r1"), -1, pool.slot("r7")])
    lk.multi_lora_linear(x, w, None, pool, ids)
    lk.multi_lora_linear(x, w, None, pool, ids)          # the cached answer
    ids[2] = MAXA                                          # out of range, written in place
    with pytest.raises(ValueError, match="adapter_ids"):
        lk.multi_lora_linear(x, w, None, pool, ids)
    ids[2] = -1
    lk.multi_lora_linear(x, w, None, pool, ids)
    pool.remove("r1")                                      # ids[1] now names a freed slot
    with pytest.raises(ValueError, match="adapter_ids"):
        lk.multi_lora_linear(x, w, None, pool, ids)


@pytest.mark.parametrize("T,strategy", [(60, "dense_add_"), (3000, "runs_add_")])
def test_cpu_prefill_picks_dense_or_runs_by_cost(monkeypatch, one_thread, T, strategy):
    """A sorted CPU prefill batch runs the dense strategy while its extra FLOPs cost less than
    the runs' fixed costs (short batches, small pool) and per-run GEMMs beyond (long runs); the
    public op gives the reference result either way. (CPU strategies: CPU tensors.)"""
    pool = lk.AdapterPool(IN, OUT, MAXA, MAXR)
    for k, (name, r) in enumerate(RANKS.items()):
        pool.add(name, torch.randn(r, IN) / IN ** .5, torch.randn(OUT, r) / r ** .5, 0.5 + k)
    slots = [pool.slot(n) for n in pool.names()]
    ids = torch.tensor(slots).repeat_interleave(-(-T // len(slots)))[:T]
    x, w = randn(T, IN).cpu(), randn(OUT, IN).cpu()
    seen = spy_cpu_strategies(monkeypatch)
    y = lk.multi_lora_linear(x, w, None, pool, ids, backend="torch")
    assert seen == [strategy]
    assert_close(y, _ref_linear(x, w, None, pool, ids), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_sorted_strategy(dtype):
    """The CPU sorted strategy (fragmented batches over many slots) on a random-order batch with
    base-only tokens whose x is NaN, an id naming an emptied slot and out-of-range ids (a raw
    op call skips the pool's check), non-contiguous x, forward and dx, against float64."""
    pool = lk.AdapterPool(IN, OUT, MAXA, MAXR, dtype=dtype)
    for k, (name, r) in enumerate(RANKS.items()):
        pool.add(name, torch.randn(r, IN, dtype=torch.float64) / IN ** .5,
                 torch.randn(OUT, r, dtype=torch.float64) / r ** .5, 0.5 + k)
    pool.remove("gone")
    g = torch.Generator().manual_seed(3)
    T = 53
    ids = torch.tensor([pool.slot(n) for n in pool.names()] + [-1])[
        torch.randint(0, 5, (T,), generator=g)]
    ids[[4, 9]] = 1                                       # the freed slot
    ids[[7, 20]] = torch.tensor([MAXA, 1_000_000])
    keep = (ids >= 0) & (ids < MAXA) & (ids != 1)
    x = noncontig(randn(T, IN, dtype=dtype).cpu())
    x[~keep] = float("nan")
    plan = MP.build(ids, MAXA, len(pool), backend="torch", path="prefill")
    assert plan.runs() is None                            # fragmented: no run table
    y0 = randn(T, OUT, dtype=dtype).cpu()
    y = y0.clone()
    MT.sorted_add_(y, x, pool.view(), plan)
    assert torch.equal(y[~keep], y0[~keep])
    xr, ok = x.clone(), torch.where(keep, ids, -1)
    xr[~keep] = 0
    assert_close(y[keep], (y0.double() + _ref_linear(xr, None, None, pool, ok))[keep], dtype)
    dy = randn(T, OUT, dtype=dtype).cpu()
    dy[~keep] = float("nan")
    dx = torch.zeros(T, IN, dtype=dtype)
    MT.sorted_add_(dx, dy, pool.view(), plan, swap=True)
    x64 = xr.double().requires_grad_()
    want, = torch.autograd.grad(ref.multi_lora_linear(x64, None, None, _factors64(pool), ok),
                                x64, torch.where(keep[:, None], dy.double(), 0.0))
    assert_close(dx[keep], want[keep], dtype, "dx")
    assert (dx[~keep] == 0).all()


def test_cpu_fragmented_batches_pick_by_cost(monkeypatch, one_thread):
    """Fragmented CPU batches: dense for a small pool, sorted for a pool of many rank rows (the
    gather strategy is the GPU's); the public op matches the reference."""
    seen = spy_cpu_strategies(monkeypatch)
    for maxa, maxr, want in ((6, 16, "dense_add_"), (40, 16, "sorted_add_")):
        pool = lk.AdapterPool(IN, OUT, maxa, maxr)
        for j in range(maxa):
            pool.add(f"a{j}", torch.randn(j % 16 + 1, IN), torch.randn(OUT, j % 16 + 1), 0.3)
        ids = torch.randint(-1, maxa, (90,), generator=torch.Generator().manual_seed(maxa))
        x, w = randn(90, IN).cpu(), randn(OUT, IN).cpu()
        seen.clear()
        y = lk.multi_lora_linear(x, w, None, pool, ids)
        assert seen == [want]
        assert_close(y, _ref_linear(x, w, None, pool, ids), torch.float32, want)
