"""torch.distributed: DDP, FSDP2 and tensor-parallel adapter layers and serving pools.

Each scenario below (``@scenario(world sizes)``) runs in spawned gloo processes on CPU through
:mod:`dist_harness` (the process harness: one spawn per world size, per-scenario process groups
with a collective timeout, a launcher deadline) and compares against a single-process reference
computed in the same process from the same seed.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lora_kernels

from dist_harness import pytest_entry, scenario

TOL = 1e-5  # fp32 rounding: different summation order only


# ----------------------------------------------------------------------------- layers
KINDS = ["lora", "nora", "curlora", "deep_lora", "glora", "glora_v"]


def make_layer(kind: str, in_f: int, out_f: int, seed: int = 0, bias: bool = True) -> nn.Module:
    """An adapter layer with every trainable parameter random (so no gradient is trivially 0)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    if kind == "lora":
        m = lora_kernels.LoRALinear.from_linear(lin, r=3, alpha=6.0)
    elif kind == "lora_conv1d":  # transformers Conv1D base: weight read as a transposed view
        from lora_kernels._conv1d import to_conv1d

        m = lora_kernels.LoRALinear.from_linear(to_conv1d(lin), r=3, alpha=6.0)
        assert m.fan_in_fan_out and m.weight.stride() == (1, out_f)
    elif kind == "nora":
        m = lora_kernels.NoRALinear.from_linear(lin, outer_rank=4, inner_rank=2, alpha=2.0)
    elif kind == "curlora":
        m = lora_kernels.CURLoRALinear.from_linear(lin, rank=3, alpha=0.5, generator=g)
    elif kind == "deep_lora":
        m = lora_kernels.DeepLoRALinear.from_linear(lin, rank=3, depth=4, generator=g,
                                                    scaling=0.7)
    elif kind == "glora":  # every support low-rank / vector
        m = lora_kernels.GLoRALinear.from_linear(lin, rank=2)
    elif kind == "glora_v":  # vector / scalar supports
        m = lora_kernels.GLoRALinear.from_linear(
            lin, rank=2, config={"A": "vector", "B": "scalar", "C": "vector", "D": "scalar",
                                 "E": "scalar"})
    else:
        raise AssertionError(kind)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    m.backend = "torch"
    return m


def mlp(kind: str, dims=(12, 8, 6), seed: int = 0, bias2: bool = True) -> nn.Sequential:
    return nn.Sequential(make_layer(kind, dims[0], dims[1], seed), nn.Tanh(),
                         make_layer(kind, dims[1], dims[2], seed + 1, bias=bias2))


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def rel(a, b) -> float:
    a, b = full(a).detach().double(), full(b).detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(a, b, what, tol=TOL):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if tol == 0:
        assert torch.equal(full(a), full(b)), f"{what}: not bitwise equal"
        return
    e = rel(a, b)
    assert e < tol, f"{what}: rel err {e:.3e} >= {tol:.0e}"


# ----------------------------------------------------------------------------- data parallel
STEPS, BATCH = 3, 4  # optimizer steps; samples per rank and step


def _data(ctx, dims, steps):
    g = torch.Generator().manual_seed(123)
    X = torch.randn(steps, ctx.world * BATCH, dims[0], generator=g)
    Y = torch.randn(steps, ctx.world * BATCH, dims[-1], generator=g)
    return X, Y


def _local(ctx, t):
    return t[ctx.rank * BATCH:(ctx.rank + 1) * BATCH]


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05,
                           momentum=0.9)


def _reference_training(ref, X, Y):
    """Single process, whole batch; the last step is two half-batch micro-steps accumulated."""
    opt = _sgd(ref)
    for s in range(len(X)):
        if s < len(X) - 1:
            F.mse_loss(ref(X[s]), Y[s]).backward()
        else:
            h = X.shape[1] // 2
            (F.mse_loss(ref(X[s][:h]), Y[s][:h]) / 2).backward()
            (F.mse_loss(ref(X[s][h:]), Y[s][h:]) / 2).backward()
        opt.step()
        opt.zero_grad()


def _frozen_and_trainable(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert names and frozen, (names, frozen)
    return names


def _fresh_forward_check(ctx, kind, dims, trained, load_into):
    """A model built from another seed (other indices / outer factors / params), loaded from the
    trained state, computes the trained model's outputs."""
    fresh = mlp(kind, dims, seed=11)
    x = torch.randn(5, dims[0])
    with torch.no_grad():
        want = trained(x)
        assert rel(fresh(x), want) > 1e-3, "fresh model must differ before loading"
        load_into(fresh)
        assert_close(fresh(x), want, "forward after reload")
    return fresh


def _ddp_scenario(kind):
    def run(ctx):
        from safetensors.torch import load_file, save_file
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel as DDP

        dims = (12, 8, 6)
        ref = mlp(kind, dims)
        names = _frozen_and_trainable(ref)
        ddp = DDP(copy.deepcopy(ref), process_group=ctx.pg)
        frozen0 = {n: p.detach().clone() for n, p in ddp.module.named_parameters()
                   if not p.requires_grad}
        # a tensor hook on an adapter parameter and a DDP comm hook wrapping torch's all-reduce
        seen, comms = [], []
        pname = names[0]
        dict(ddp.module.named_parameters())[pname].register_hook(lambda g: seen.append(1))

        def hook(state, bucket):
            comms.append(len(bucket.parameters()))
            return default_hooks.allreduce_hook(ctx.pg, bucket)

        ddp.register_comm_hook(None, hook)
        X, Y = _data(ctx, dims, STEPS)
        _reference_training(ref, X, Y)
        opt = _sgd(ddp)
        for s in range(STEPS):
            x, y = _local(ctx, X[s]), _local(ctx, Y[s])
            if s < STEPS - 1:
                F.mse_loss(ddp(x), y).backward()
            else:  # no_sync accumulation: two micro-batches, one all-reduce
                n_comm = len(comms)
                h = BATCH // 2
                with ddp.no_sync():
                    (F.mse_loss(ddp(x[:h]), y[:h]) / 2).backward()
                assert len(comms) == n_comm, "no_sync must not communicate"
                (F.mse_loss(ddp(x[h:]), y[h:]) / 2).backward()
                assert len(comms) > n_comm
            opt.step()
            opt.zero_grad()
        assert len(seen) == STEPS + 1, seen
        assert sum(comms) == len(names) * STEPS, (comms, names)  # only adapter params reduced
        got = dict(ddp.module.named_parameters())
        for n, p in ref.named_parameters():
            if p.requires_grad:
                assert_close(got[n], p, f"DDP {n} after {STEPS} steps")
            else:
                assert torch.equal(got[n], frozen0[n]), f"frozen {n} changed"
        # state dict: rank 0 writes (safetensors), every rank reloads into a fresh model
        path = os.path.join(ctx.tmp, "ddp.safetensors")
        if ctx.rank == 0:
            save_file({k: v.contiguous() for k, v in ddp.module.state_dict().items()}, path)
        dist.barrier(group=ctx.pg)
        fresh = _fresh_forward_check(ctx, kind, dims, ddp.module,
                                     lambda m: m.load_state_dict(load_file(path)))
        for k, v in ddp.module.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), k
    run.__name__ = f"ddp_{kind}"
    return run


def _fsdp_scenario(kind):
    def run(ctx):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            set_model_state_dict,
        )
        from torch.distributed.fsdp import fully_shard

        dims = (12, 8, 6)
        ref = mlp(kind, dims)
        _frozen_and_trainable(ref)

        def shard(model):
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=ctx.mesh)
            return fully_shard(model, mesh=ctx.mesh)

        model = shard(copy.deepcopy(ref))
        X, Y = _data(ctx, dims, STEPS)
        _reference_training(ref, X, Y)
        opt = _sgd(model)
        for s in range(STEPS):
            x, y = _local(ctx, X[s]), _local(ctx, Y[s])
            if s < STEPS - 1:
                F.mse_loss(model(x), y).backward()
            else:  # accumulation without reduce-scatter, then one synced backward
                h = BATCH // 2
                model.set_requires_gradient_sync(False)
                (F.mse_loss(model(x[:h]), y[:h]) / 2).backward()
                model.set_requires_gradient_sync(True)
                (F.mse_loss(model(x[h:]), y[h:]) / 2).backward()
            opt.step()
            opt.zero_grad()
        got = dict(model.named_parameters())
        for n, p in ref.named_parameters():
            assert_close(got[n].full_tensor(), p, f"FSDP2 {n} after {STEPS} steps",
                         tol=TOL if p.requires_grad else 0.0)
        # full state dict (gathered to rank 0) == the single-process one, buffers included
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        fsd = get_model_state_dict(model, options=opts)
        if ctx.rank == 0:
            rsd = ref.state_dict()
            assert fsd.keys() == rsd.keys(), (sorted(fsd), sorted(rsd))
            for k, v in rsd.items():
                if v.is_floating_point():
                    assert_close(fsd[k], v, f"full state_dict[{k}]")
                else:
                    assert torch.equal(fsd[k], v), k
        # sharded checkpoint with torch.distributed.checkpoint, reloaded into a fresh FSDP model
        ckpt = os.path.join(ctx.tmp, "fsdp_ckpt")
        dcp.save(get_model_state_dict(model), checkpoint_id=ckpt, process_group=ctx.pg)

        def load(fresh):
            shard(fresh)
            sd = get_model_state_dict(fresh)
            dcp.load(sd, checkpoint_id=ckpt, process_group=ctx.pg)
            set_model_state_dict(fresh, sd)

        _fresh_forward_check(ctx, kind, dims, model, load)
    run.__name__ = f"fsdp_{kind}"
    return run


for _k in KINDS:  # every kind on 2 processes, two of them on 4 too
    scenario(*((2, 4) if _k in ("lora", "curlora") else (2,)))(_ddp_scenario(_k))
    scenario(*((2, 4) if _k in ("nora", "deep_lora") else (2,)))(_fsdp_scenario(_k))


# ----------------------------------------------------------------------------- TP scenarios
def _tp_layers(ctx, kind, backend="torch"):
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

    dims = (12, 8, 6) if ctx.world == 2 else (12, 16, 6)
    ref = mlp(kind, dims, bias2=ctx.world == 2)  # 4 ranks: a row-parallel layer without bias
    ref[0].backend = ref[2].backend = backend
    tp = parallelize_module(copy.deepcopy(ref), ctx.mesh,
                            {"0": ColwiseParallel(), "2": RowwiseParallel()})
    # layouts: sharded per the style, everything a DTensor, replicated grads exact
    for (n, p), (_, q) in zip(ref.named_parameters(), tp.named_parameters()):
        assert isinstance(q, DTensor), n
        assert q.requires_grad == p.requires_grad, n
        assert torch.equal(q.full_tensor(), p), f"distributed {n} differs"
    assert tp[0].weight.placements == (Shard(0),) and tp[2].weight.placements == (Shard(1),)
    assert tp[0].weight.to_local().shape[0] == dims[1] // ctx.world

    x = torch.randn(2, 3, dims[0])
    w = torch.randn(2, 3, dims[2])
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yt = ref(xr), tp(xt)
    assert not isinstance(yt, DTensor)
    assert_close(yt, yr, "forward")
    (yr * w).sum().backward()
    (yt * w).sum().backward()
    assert_close(xt.grad, xr.grad, "x.grad")
    tparams = dict(tp.named_parameters())
    for n, p in ref.named_parameters():
        q = tparams[n]
        if not p.requires_grad:
            assert q.grad is None, n
            continue
        assert isinstance(q.grad, DTensor) and q.grad.placements == q.placements, \
            f"{n}: grad placements {q.grad.placements} != {q.placements}"
        if q.placements == (Replicate(),):  # every rank holds the same, exact, gradient
            got = [torch.empty_like(q.grad.to_local()) for _ in range(ctx.world)]
            dist.all_gather(got, q.grad.to_local().contiguous(), group=ctx.pg)
            assert all(torch.equal(g, got[0]) for g in got), f"{n}: replicated grads differ"
        assert_close(q.grad, p.grad, f"grad {n}")
    # one optimizer step on DTensors keeps shards and replicas consistent with the reference
    for model in (ref, tp):
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    x2 = torch.randn(5, dims[0])
    assert_close(tp(x2), ref(x2), "forward after a step")
    return ref, tp, dims


def _tp_state_dict(ctx, kind, ref, tp, dims):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

    sd, rsd = tp.state_dict(), ref.state_dict()
    assert sd.keys() == rsd.keys(), (sorted(sd), sorted(rsd))
    for k in rsd:
        if rsd[k].is_floating_point():
            assert_close(full(sd[k]), rsd[k], f"state_dict[{k}]")
        else:
            assert torch.equal(full(sd[k]), rsd[k]), k
    ckpt = os.path.join(ctx.tmp, "tp_ckpt")
    dcp.save(sd, checkpoint_id=ckpt, process_group=ctx.pg)
    fresh = parallelize_module(mlp(kind, dims, seed=7, bias2=ctx.world == 2), ctx.mesh,
                               {"0": ColwiseParallel(), "2": RowwiseParallel()})
    x = torch.randn(4, dims[0])
    assert rel(fresh(x), ref(x)) > 1e-3, "the fresh model must differ before loading"
    fsd = fresh.state_dict()
    dcp.load(fsd, checkpoint_id=ckpt, process_group=ctx.pg)
    fresh.load_state_dict(fsd)
    assert_close(fresh(x), ref(x), "forward after a DCP reload")


def _tp_scenario(kind):
    def run(ctx):
        ref, tp, dims = _tp_layers(ctx, kind)
        _tp_state_dict(ctx, kind, ref, tp, dims)
    run.__name__ = f"tp_{kind}"
    return run


for _k in KINDS:
    scenario(2, 4)(_tp_scenario(_k))
scenario(2)(_tp_scenario("lora_conv1d"))  # issue 13: GPT-2 layout under TP


@scenario(2)
def tp_plain_conv1d(ctx):
    """transformers' Conv1D itself (weight (in, out)) under our column / row-parallel styles:
    weight sharded on dim 1 / dim 0, forward, input and weight gradients equal the reference."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels._conv1d import to_conv1d
    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

    torch.manual_seed(0)
    ref = nn.Sequential(to_conv1d(nn.Linear(12, 8)), nn.Tanh(), to_conv1d(nn.Linear(8, 6)))
    tp = parallelize_module(copy.deepcopy(ref), ctx.mesh,
                            {"0": ColwiseParallel(), "2": RowwiseParallel()})
    assert tp[0].weight.placements == (Shard(1),) and tp[2].weight.placements == (Shard(0),)
    assert tp[0].weight.to_local().shape == (12, 8 // ctx.world)
    x = torch.randn(2, 3, 12)
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yt = ref(xr), tp(xt)
    assert_close(yt, yr, "forward")
    w = torch.randn_like(yr)
    (yr * w).sum().backward()
    (yt * w).sum().backward()
    assert_close(xt.grad, xr.grad, "x.grad")
    tparams = dict(tp.named_parameters())
    for n, p in ref.named_parameters():
        assert_close(tparams[n].grad, p.grad, f"grad {n}")


@scenario(2)
def tp_triton_interpreter(ctx):
    """The Triton kernels (interpreter on CPU) on local shards: LoRA's fused op and GLoRA's."""
    for kind in ("lora", "glora"):
        _tp_layers(ctx, kind, backend="triton")


@scenario(2)
def tp_input_layouts(ctx):
    """Row-parallel fed a replicated input, column-parallel returning a replicated output, and
    DTensor outputs (use_local_output=False)."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

    for style, name in ((RowwiseParallel(input_layouts=Replicate()), "row"),
                        (ColwiseParallel(output_layouts=Replicate()), "col"),
                        (ColwiseParallel(use_local_output=False), "col-dt")):
        ref = make_layer("lora", 10, 8)
        tp = parallelize_module(copy.deepcopy(ref), ctx.mesh, style)
        xr, xt = [torch.randn(3, 10).requires_grad_() for _ in range(2)]
        with torch.no_grad():
            xt.copy_(xr)
        yr, yt = ref(xr), tp(xt)
        if name == "col-dt":
            assert isinstance(yt, DTensor)
            yt = yt.full_tensor()
        assert_close(yt, yr, f"{name} forward")
        yr.square().sum().backward()
        yt.square().sum().backward()
        assert_close(xt.grad, xr.grad, f"{name} x.grad")
        assert_close(tp.lora_A.grad, ref.lora_A.grad, f"{name} lora_A.grad")
        assert_close(tp.lora_B.grad, ref.lora_B.grad, f"{name} lora_B.grad")


@scenario(2)
def tp_dropout_shared_mask(ctx):
    """Column-parallel LoRA dropout: one mask on the replicated x for all output shards."""
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

    n = 6
    torch.manual_seed(100 + ctx.rank)  # different RNG state on every rank on purpose
    m = lora_kernels.LoRALinear(torch.zeros(2 * n, n), None, r=n, alpha=n, dropout=0.5)
    with torch.no_grad():
        m.lora_A.copy_(torch.eye(n))
        m.lora_B.copy_(torch.cat([torch.eye(n), torch.eye(n)]))  # both halves read all of x
    tp = parallelize_module(m, ctx.mesh, ColwiseParallel(output_layouts=_replicate()))
    y = tp(torch.ones(4, n))
    kept = y[:, :n] != 0
    assert torch.equal(y[:, :n], y[:, n:]), "output shards saw different dropout masks"
    assert 0 < kept.sum() < kept.numel(), "dropout did nothing"
    assert torch.allclose(y[:, :n][kept], torch.full((int(kept.sum()),), 2.0))
    tp.eval()
    assert torch.equal(tp(torch.ones(4, n)), torch.ones(4, 2 * n))
    # row-parallel: every rank masks its own input columns, independently
    n = 8 * ctx.world
    m = lora_kernels.LoRALinear(torch.zeros(n, n), None, r=n, alpha=n, dropout=0.5)
    with torch.no_grad():
        m.lora_A.copy_(torch.eye(n))
        m.lora_B.copy_(torch.eye(n))
    tp = parallelize_module(m, ctx.mesh, RowwiseParallel(input_layouts=_replicate()))
    y = tp(torch.ones(8, n))  # y = dropout(x), replicated
    kept = y != 0
    assert torch.equal(y[kept], torch.full((int(kept.sum()),), 2.0))
    blocks = kept.reshape(8, ctx.world, 8).transpose(0, 1)
    assert all(0 < b.sum() < b.numel() for b in blocks)
    assert not torch.equal(blocks[0], blocks[1]), "row-parallel ranks drew the same mask"


def _replicate():
    from torch.distributed.tensor import Replicate

    return Replicate()


# ----------------------------------------------------------------------------- serving
class TinyLM(nn.Module):
    def __init__(self, vocab=11, d=8, h=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        return self.head(x + self.down(torch.tanh(self.up(x))))


def _adapter(g, d, h, r, modules=("up", "down")):
    shapes = {"up": (d, h), "down": (h, d)}
    return {m: (torch.randn(r, shapes[m][0], generator=g),
                torch.randn(shapes[m][1], r, generator=g), 0.5 * r) for m in modules}


@scenario(2, 4)
def serving_mixed_batch(ctx):
    """A MultiAdapterModel whose up/down projections are column/row-parallel serves a mixed batch
    (one adapter per sequence, different ranks, one adapter on `up` only, base-only rows) with the
    single-process outputs; adapters added or removed after sharding included."""
    from lora_kernels.parallel import ShardedAdapterPool, parallelize_server

    g = torch.Generator().manual_seed(5)
    d, h = 8, 12
    model = TinyLM(d=d, h=h)
    server = lora_kernels.MultiAdapterModel(model, ["up", "down"], max_adapters=4, max_rank=4,
                                            backend="torch")
    server.add("math", _adapter(g, d, h, 2))
    server.add("code", _adapter(g, d, h, 4, modules=("up",)))
    ref = copy.deepcopy(server)
    parallelize_server(server, ctx.pg, {"up": "colwise", "down": "rowwise"})
    up, down = server.layers["up"], server.layers["down"]
    assert isinstance(up.pool, ShardedAdapterPool) and isinstance(down.pool, ShardedAdapterPool)
    assert up.pool.lora_Bt.shape == (4, 4, h // ctx.world) and up.pool.lora_A.shape[-1] == d
    assert down.pool.lora_A.shape == (4, 4, h // ctx.world) and down.pool.lora_Bt.shape[-1] == d
    for srv in (server, ref):  # after sharding: unsharded factors in, slices kept
        g2 = torch.Generator().manual_seed(6)
        srv.add("law", _adapter(g2, d, h, 3))
        srv.remove("math")
        srv.add("bio", _adapter(g2, d, h, 1))  # reuses math's slot
    ids = torch.randint(0, 11, (5, 4))
    names = ["law", None, "code", "bio", "law"]
    with torch.no_grad():
        want = ref(ids, adapters=names)
        got = server(ids, adapters=names)
        base = ref(ids)
        assert rel(want, base) > 1e-2, "the adapters must change the output"
        assert_close(got, want, "mixed batch")
        assert_close(server(ids), base, "no adapters")
        assert_close(server(ids[:, :1], adapters=names), ref(ids[:, :1], adapters=names),
                     "decode step (one token per sequence)")
    with torch.inference_mode():
        assert_close(server(ids, adapters=names), want, "mixed batch, inference_mode")
    # inference only
    with pytest.raises(NotImplementedError):
        server(ids, adapters=names)
    # the ranks must add the same adapter
    g3 = torch.Generator().manual_seed(100 + ctx.rank)
    with pytest.raises(ValueError, match="different layers"):
        server.add("oops", _adapter(g3, d, h, 2))
    assert "oops" not in up.pool and "oops" not in down.pool
    with pytest.raises(ValueError, match="lora_A"):  # a bad shape: the same error everywhere
        server.add("bad", {"up": (torch.randn(2, d + 1), torch.randn(h, 2), 1.0)})
    t = torch.ones(1)
    dist.all_reduce(t, group=ctx.pg)
    assert t.item() == ctx.world


@scenario(2)
def serving_pool_functional(ctx):
    """shard_adapter_pool + multi_lora_linear on weight shards == the unsharded result."""
    from torch.distributed.tensor import DTensor, Partial

    from lora_kernels.parallel import shard_adapter_pool

    g = torch.Generator().manual_seed(9)
    fin, fout, T = 10, 6, 7
    pool = lora_kernels.AdapterPool(fin, fout, max_adapters=3, max_rank=4)
    for name, r in (("a", 1), ("b", 4), ("c", 2)):
        pool.add(name, torch.randn(r, fin, generator=g), torch.randn(fout, r, generator=g), 0.3 * r)
    W, b = torch.randn(fout, fin, generator=g), torch.randn(fout, generator=g)
    x = torch.randn(T, fin, generator=g)
    ids = torch.tensor([0, 2, -1, 1, 1, 0, 2], dtype=torch.int32)
    want = lora_kernels.multi_lora_linear(x, W, b, pool, ids, backend="torch")
    k, n = ctx.rank, ctx.world
    col = shard_adapter_pool(pool, ctx.mesh, "colwise")
    o = fout // n
    y = lora_kernels.multi_lora_linear(x, W[k * o:(k + 1) * o], b[k * o:(k + 1) * o], col, ids,
                                       backend="torch")
    assert_close(y, want[:, k * o:(k + 1) * o], "colwise shard")
    row = shard_adapter_pool(pool, ctx.mesh, "rowwise")
    i = fin // n
    part = lora_kernels.multi_lora_linear(x[:, k * i:(k + 1) * i], W[:, k * i:(k + 1) * i],
                                          b if k == 0 else None, row, ids, backend="torch")
    y = DTensor.from_local(part, ctx.mesh, (Partial(),)).full_tensor()
    assert_close(y, want, "rowwise partial sums")
    with pytest.raises(ValueError, match="not divisible"):
        shard_adapter_pool(lora_kernels.AdapterPool(fin, 2 * n + 1, 2, 2), ctx.mesh, "colwise")


@scenario(2, 4)
def tp_bad_mesh(ctx):
    """Non-dividing sizes and mismatched layers: the same clear ValueError on every rank, and the
    group still works afterwards (nobody hangs in a collective)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

    def expect(fn, *needles):
        with pytest.raises(ValueError) as ei:
            fn()
        for s in needles:
            assert s in str(ei.value), f"{s!r} not in {ei.value}"
        t = torch.ones(1)
        dist.all_reduce(t, group=ctx.pg)
        assert t.item() == ctx.world

    odd = 2 * ctx.world + 1
    expect(lambda: parallelize_module(make_layer("lora", 8, odd), ctx.mesh, ColwiseParallel()),
           "out_features=", "not divisible by the mesh size")
    expect(lambda: parallelize_module(make_layer("lora", odd, 8), ctx.mesh, RowwiseParallel()),
           "in_features=", "not divisible")
    expect(lambda: parallelize_module(nn.Linear(8, odd), ctx.mesh, ColwiseParallel()),
           "not divisible")
    # a process group instead of a mesh, every layer type
    from lora_kernels.parallel import parallelize

    for kind in KINDS:
        expect(lambda k=kind: parallelize(make_layer(k, odd, 8), ctx.pg, RowwiseParallel()),
               "in_features=", "not divisible")
    # NoRA outer rank (a buffer) differs on one process
    lin = nn.Linear(8, 8)
    ro = 3 if ctx.rank == 0 else 4
    expect(lambda: parallelize(lora_kernels.NoRALinear.from_linear(lin, ro, 2), ctx.pg,
                               ColwiseParallel()), "different layers", "outer_A")
    # adapter rank differs on one process
    r = 4 if ctx.rank == ctx.world - 1 else 3
    expect(lambda: parallelize_module(lora_kernels.LoRALinear.from_linear(lin, r=r), ctx.mesh,
                                      ColwiseParallel()), "different layers", "lora_A")
    # a different layer type on one process
    mod = nn.Linear(8, 8) if ctx.rank == 0 else lora_kernels.LoRALinear.from_linear(lin, r=3)
    expect(lambda: parallelize_module(mod, ctx.mesh, RowwiseParallel()), "different layers")
    if ctx.world == 4:  # 2-D mesh: a local error raised identically everywhere
        mesh2 = DeviceMesh("cpu", torch.arange(4).reshape(2, 2))
        expect(lambda: parallelize_module(make_layer("lora", 8, 8), mesh2, ColwiseParallel()),
               "1-D device mesh")


# ----------------------------------------------------------------------------- pytest entry


test_world2, test_world4, world2, world4 = pytest_entry(__name__, "dist")
