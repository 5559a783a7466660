"""The batch plan of multi-adapter serving: built once per forward and shared by every served
layer; the CPU path slices runs of rows and never scatters with ``index_add_``; the served model
compiles with ``fullgraph=True`` and does not recompile when the number of distinct adapters in
a batch changes."""

import copy
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

import lora_kernels as lk
from lora_kernels.ops.multi_lora import plan as MP
from lora_kernels.reference import serving as ref

from conftest import DEVICE
from helpers import assert_close, randn, tiny_llama

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _server(model, targets, names="abc", rank=4, seed=0):
    server = lk.MultiAdapterModel(model, targets, max_adapters=4, max_rank=8)
    g = torch.Generator().manual_seed(seed)
    for n in names:
        server.add(n, {m: (torch.randn(rank, lay.in_features, generator=g) / 8,
                           torch.randn(lay.out_features, rank, generator=g) / 8, 1.0)
                       for m, lay in server.layers.items()})
    return server


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def test_plan_built_once_per_forward(base):
    """One plan per forward for 14 served layers (prefill- and decode-shaped batches); a summed
    adapter adds one pass, hence one more plan; a KV-cached generate reuses its step plan."""
    server = _server(copy.deepcopy(base), TARGETS)
    assert len(server.layers) == 14
    for shape in [(4, 6), (4, 1)]:
        ids = torch.randint(0, 64, shape).to(DEVICE)
        b0 = MP.builds()
        with torch.no_grad():
            server(ids, adapters=["b", None, "a", "b"])
        assert MP.builds() - b0 == 1, shape
    server.add_sum("a+c", ["a", "c"])
    b0 = MP.builds()
    with torch.no_grad():
        server(torch.randint(0, 64, (2, 5)).to(DEVICE), adapters=["a+c", "b"])
    assert MP.builds() - b0 == 2                       # two passes: one plan each
    b0 = MP.builds()
    with torch.no_grad():
        server.generate(torch.randint(0, 64, (2, 3)).to(DEVICE), ["a", "c"], max_new_tokens=4,
                        do_sample=False, pad_token_id=0)
    assert MP.builds() - b0 == 2                       # the prompt's plan + one decode plan


class _Calls(TorchFunctionMode):
    """Records scatters: index_add_ / index_put_ and item assignment with a tensor index (slice
    assignment, a copy into a view, is not one)."""

    def __init__(self):
        super().__init__()
        self.scatters = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        idx = args[1] if name == "__setitem__" and len(args) > 1 else None
        idx = idx if isinstance(idx, tuple) else (idx,)
        if name in ("index_add_", "index_add", "index_put_", "index_put", "index_copy_") or any(
                isinstance(i, torch.Tensor) for i in idx):
            self.scatters.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_runs_path_no_scatter(dtype):
    """A batch-first mixed batch (sequences of different adapters in any order, base-only rows
    with NaN x) takes the runs path: forward and every gradient equal the float64 reference,
    base rows are untouched, and no index_add_ / index_put_ scatter runs."""
    IN, OUT = 37, 29
    pool = lk.AdapterPool(IN, OUT, 4, 8, dtype=dtype)
    for k, r in enumerate((3, 8, 1)):
        pool.add(f"a{k}", torch.randn(r, IN) / math.sqrt(IN), torch.randn(OUT, r) / math.sqrt(r),
                 0.5 + k)
    ids = torch.tensor([2] * 9 + [0] * 11 + [-1] * 8 + [2] * 10 + [1] * 9)
    T = ids.shape[0]
    plan = lk.ops.multi_lora.plan_for(pool, ids)
    assert plan.resolved_path() == "prefill" and plan.runs() is not None
    x = randn(T, IN, dtype=dtype)
    x[ids == -1] = float("nan")
    w = randn(OUT, IN, dtype=dtype, scale=IN ** -0.5)
    y0 = randn(T, OUT, dtype=dtype)
    y = y0.clone()
    calls = _Calls()
    with torch.no_grad(), calls:
        lk.multi_lora_add_(y, x, pool, plan)
    assert torch.equal(y[ids == -1], y0[ids == -1])
    keep = ids >= 0
    factors = {pool.slot(n): tuple(t.double() if torch.is_tensor(t) else t for t in pool.get(n))
               for n in pool.names()}
    xr = x.double().masked_fill(~keep[:, None], 0.0)
    want = y0.double() + ref.multi_lora_linear(xr, None, None, factors, ids)
    assert_close(y[keep], want[keep], dtype, "y")
    # gradients (finite x), through the runs path forward and the segment gradients
    pool.requires_grad_()
    x = randn(T, IN, dtype=dtype, requires_grad=True)
    with calls:
        out = lk.multi_lora_linear(x, w, None, pool, plan)
        grads = torch.autograd.grad(out.float().square().sum(), [x, pool.lora_A, pool.lora_Bt])
    A = pool.lora_A.detach().double().requires_grad_()
    Bt = pool.lora_Bt.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ads = {pool.slot(n): (A[pool.slot(n), :pool.rank(n)], Bt[pool.slot(n), :pool.rank(n)].t(),
                          pool.scaling(n)) for n in pool.names()}
    yr = ref.multi_lora_linear(x64, w.double(), None, ads, ids)
    want = torch.autograd.grad(out.detach().double().mul(2).mul(yr).sum()
                               + 0 * (A.sum() + Bt.sum()), [x64, A, Bt])
    for name, g, gr in zip(["dx", "dA", "dBt"], grads, want):
        assert_close(g, gr, dtype, name)
    assert not calls.scatters, calls.scatters


def test_plan_argument_checked():
    pool = lk.AdapterPool(8, 6, 3, 2)
    pool.add("a", torch.randn(2, 8), torch.randn(6, 2))
    plan = lk.ops.multi_lora.plan_for(pool, torch.tensor([0, -1, 0]))
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="adapter_ids: the plan is for 3 tokens"):
        lk.multi_lora_linear(x, None, None, pool, plan)
    with pytest.raises(ValueError, match="path"):
        lk.multi_lora_linear(x[:3], None, None, pool, plan, path="decode")
    other = lk.AdapterPool(8, 6, 5, 2)
    with pytest.raises(ValueError, match="5 slots"):
        lk.multi_lora_linear(x[:3], None, None, other, plan)
    y = lk.multi_lora_linear(x[:3], None, None, pool, plan)
    assert_close(y, lk.multi_lora_linear(x[:3], None, None, pool, [0, -1, 0]).double(),
                 torch.float32)


def test_compile_served_model_fullgraph_no_recompiles(base):
    """``torch.compile(fullgraph=True)`` of the served model step (adapters selected outside
    with ``server.using``) traces once and replays for batches with 1, 2, 3 and 0 distinct
    adapters (the count reaches the ops as a CPU tensor, the path is resolved inside them); the
    whole server (names -> slots in Python) compiles without a graph break too."""
    from torch._dynamo.utils import counters

    server = _server(copy.deepcopy(base), ["q_proj", "v_proj", "down_proj"])
    ids = torch.randint(0, 64, (4, 6)).to(DEVICE)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(server.model, fullgraph=True, backend="eager")
    for names in (["a", "a", "a", "a"], ["a", "b", None, "a"], ["c", "b", "a", None],
                  [None] * 4, ["b", "c", "b", "c"]):
        with torch.no_grad():
            with server.using(names):
                got = step(ids).logits
            want = server(ids, adapters=names).logits
        assert torch.equal(got, want), names
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"] and not counters["graph_break"]
    torch._dynamo.reset()
    whole = torch.compile(server, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(whole(ids, adapters=["c", None, "a", "c"]).logits,
                           server(ids, adapters=["c", None, "a", "c"]).logits)
    torch._dynamo.reset()
