"""DoRA: the fused op against float64 (every backend runnable here), PEFT's DoRA layer, the layer,
inject and PEFT DoRA adapter files both ways."""

import math

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.ops import dora as D
from lora_kernels.ops._triton import draw_seed
from lora_kernels.ops.lowrank import torch_keep_mask
from lora_kernels.reference import dora as ref

from conftest import DEVICE, DTYPES, backends
from helpers import assert_close, noncontig, randn, rel_err

SHAPES = [  # (T, in, out, r)
    (1, 97, 75, 1),
    (3, 37, 23, 7),
    (67, 41, 53, 16),
]


def _inputs(T, i, o, r, dtype, bias=True, lead=None):
    shape = (T, i) if lead is None else (*lead, i)
    x = randn(*shape, dtype=dtype, requires_grad=True)
    w = randn(o, i, dtype=dtype, scale=1 / math.sqrt(i))
    b = randn(o, dtype=dtype) if bias else None
    a = randn(r, i, dtype=dtype, scale=1 / math.sqrt(i), requires_grad=True)
    bb = randn(o, r, dtype=dtype, scale=1 / math.sqrt(r), requires_grad=True)
    m = (torch.rand(o, dtype=torch.float64) + 0.5).to(dtype=dtype, device=DEVICE)
    return x, w, b, a, bb, m.requires_grad_(True)


def _keep(backend, seed, x, p):
    x2 = x.reshape(-1, x.shape[-1])
    if backend == "torch":
        return torch_keep_mask(seed, x2.shape, p, x2.device).reshape(x.shape)
    return D._triton_keep(seed, x2.shape[0], x2.shape[1], p, x2.device).reshape(x.shape)


def _check(args, s, backend, dtype, p=0.0, grads=True, factor=1.0):
    x, w, b, a, bb, m = args
    seed = keep = None
    gen = None
    if p > 0:
        gen = torch.Generator().manual_seed(11)
        seed = draw_seed(torch.Generator().manual_seed(11), x.device)
        keep = _keep(backend, seed, x, p)
    d = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
         for t in args]
    yr = ref.dora_linear(*d, s, keep=keep, dropout_p=p)
    y = lk.dora_linear(x, w, b, a, bb, m, s, p, generator=gen, backend=backend)
    assert y.dtype == dtype and y.shape == yr.shape
    assert_close(y, yr, dtype, "y", factor)
    if not grads:
        return
    leaves = [(t, dt) for t, dt in zip(args, d) if t is not None and t.requires_grad]
    gy = torch.randn_like(yr)
    got = torch.autograd.grad(y, [t for t, _ in leaves], gy.to(dtype))
    want = torch.autograd.grad(yr, [dt for _, dt in leaves], gy)
    for g, gr, (t, _) in zip(got, want, leaves):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert_close(g, gr, dtype, f"grad {tuple(t.shape)}", factor)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward(backend, dtype, shape):
    _check(_inputs(*shape, dtype), 0.7, backend, dtype)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_dropout_peft_semantics(backend, dtype, bias):
    """p > 0: y = x W^T + b + (g-1) (xd W^T) + g s xd A^T B^T, the mask regenerated in backward."""
    _check(_inputs(29, 37, 19, 5, dtype, bias=bias), 1.5, backend, dtype, p=0.3)


@pytest.mark.parametrize("backend", backends())
def test_no_bias_leading_dims_weight_and_bias_grads(backend):
    args = _inputs(None, 31, 17, 3, torch.float32, bias=False, lead=(2, 3, 5))
    args[1].requires_grad_(True)
    _check(args, 2.0, backend, torch.float32)
    args = _inputs(9, 31, 17, 3, torch.float32)
    args[1].requires_grad_(True)
    args[2].requires_grad_(True)
    _check(args, 0.5, backend, torch.float32)
    _check(args, 0.5, backend, torch.float32, p=0.2)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_noncontiguous_inputs(backend, dtype):
    x, w, b, a, bb, m = _inputs(13, 41, 19, 6, dtype)
    xn = noncontig(x.detach()).requires_grad_(True)
    wn = noncontig(w)
    an = noncontig(a.detach()).requires_grad_(True)
    bn = bb.detach().t().contiguous().t().requires_grad_(True)        # column-major lora_B
    _check((xn, wn, b, an, bn, m), 0.9, backend, dtype)


@pytest.mark.parametrize("backend", backends())
def test_zero_magnitude_rows_and_no_grad_path(backend):
    """m_j = 0 (y - b carries nothing there): dm is recomputed for those rows; the inference path
    (nothing requires grad) gives the same y."""
    x, w, b, a, bb, m = _inputs(11, 23, 13, 4, torch.float32)
    with torch.no_grad():
        m[[0, 5]] = 0.0
    _check((x, w, b, a, bb, m), 0.8, backend, torch.float32)
    with torch.no_grad():
        y0 = lk.dora_linear(x, w, b, a, bb, m, 0.8, backend=backend)
    y1 = lk.dora_linear(x, w, b, a, bb, m, 0.8, backend=backend)
    assert not y0.requires_grad and y1.requires_grad
    assert rel_err(y0, y1.detach()) < 1e-6


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_low_rank_norm_matches_dense(backend, dtype):
    _, w, _, a, bb, _ = _inputs(1, 97, 75, 16, dtype)
    n = D.dora_norm(w, a, bb, 1.3, backend=backend)
    nr = ref.dora_weight_norm(w.double(), a.double(), bb.double(), 1.3)
    assert n.dtype == torch.float32
    assert_close(n, nr, dtype, "norm")
    wsq = D.weight_sq_norm(w)
    assert_close(D.dora_norm(w, a, bb, 1.3, wsq, backend=backend), nr, dtype, "norm (cached)")


def test_bad_inputs_raise():
    x, w, b, a, bb, m = _inputs(3, 8, 5, 2, torch.float32)
    with pytest.raises(ValueError, match="magnitude"):
        lk.dora_linear(x, w, b, a, bb, m[:4], 1.0)
    with pytest.raises(TypeError, match="magnitude"):
        lk.dora_linear(x, w, b, a, bb, m.double(), 1.0)
    with pytest.raises(TypeError, match="magnitude"):
        lk.dora_linear(x, w, b, a, bb, None, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lk.dora_linear(x, w, b, a, bb[:, :1], m, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lk.dora_linear(x, w, b, a, bb, m, 1.0, 1.0)
    with pytest.raises(TypeError, match="weight_sq_norm"):
        lk.dora_linear(x, w, b, a, bb, m, 1.0, weight_sq_norm=torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight_sq_norm"):
        lk.dora_linear(x, w, b, a, bb, m, 1.0, weight_sq_norm=torch.ones(4))
    with pytest.raises(ValueError, match="backend"):
        lk.dora_linear(x, w, b, a, bb, m, 1.0, backend="nope")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_and_compile(backend, p):
    """torch.library.opcheck on both registered ops; a fullgraph torch.compile of the layer
    matches eager (outputs and gradients)."""
    from torch.library import opcheck

    x, w, b, a, bb, m = _inputs(5, 12, 7, 3, torch.float32)
    seed = torch.tensor([5], device=DEVICE) if p > 0 else None
    args = (x.detach(), w, b, a, bb, m, D.weight_sq_norm(w), 0.5, p, seed, backend)
    opcheck(torch.ops.lora_kernels.dora_fwd.default, args)
    with torch.no_grad():
        y, s, n, g, u = torch.ops.lora_kernels.dora_fwd(*args)
    yu = u if p > 0 else y
    dy = randn(5, 7)
    needs_list = [(True,) * 6, (False, False, False, True, False, True),
                  (True, False, False, False, True, False)]
    for needs in needs_list if backend == "torch" else needs_list[:1]:   # interpreter: slow
        opcheck(torch.ops.lora_kernels.dora_bwd.default,
                (dy, x.detach(), w, b, a.detach(), bb.detach(), m.detach(), s, n, g, seed, yu,
                 0.5, p, backend, *needs))
    if p > 0:
        return
    torch._dynamo.reset()
    layer = lk.DoRALinear.from_linear(nn.Linear(12, 7).to(DEVICE), r=4, alpha=8, backend=backend)
    with torch.no_grad():
        layer.lora_B.normal_()
    xx = randn(2, 3, 12)
    cm = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = cm(xx)
    y.square().sum().backward()
    grads = [layer.lora_A.grad.clone(), layer.magnitude.grad.clone()]
    layer.zero_grad()
    y0 = layer(xx)
    y0.square().sum().backward()
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(grads, [layer.lora_A.grad, layer.magnitude.grad])


# ----------------------------------------------------------------------------- the layer
def test_layer_starts_at_base_merges_and_injects():
    torch.manual_seed(1)
    lin = nn.Linear(29, 17).to(DEVICE)
    layer = lk.DoRALinear.from_linear(lin, r=4, alpha=8)
    assert layer.scaling == 2.0
    x = torch.randn(5, 29, device=DEVICE)
    assert rel_err(layer(x), lin(x)) < 1e-6                       # B = 0, m = ||W||: the base
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude.mul_(torch.rand(17, device=DEVICE) + 0.5)
    y = layer(x)
    merged = layer.merged()
    assert type(merged) is nn.Linear
    assert_close(merged(x), y, torch.float32, "merged")
    assert_close(layer.delta_weight(), merged.weight - lin.weight, torch.float32, "delta")
    assert_close(layer.row_scale(), (layer.magnitude / ref.dora_weight_norm(
        lin.weight, layer.lora_A, layer.lora_B, 2.0)), torch.float32, "g")
    with pytest.raises(NotImplementedError, match="as_dora"):
        layer.as_lora()
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "lora_A", "lora_B", "magnitude"}
    # the cached ||W||^2 follows an in-place change of the base weight
    with torch.no_grad():
        layer.weight.mul_(2.0)
    assert_close(layer.weight_sq_norm(), layer.weight.double().pow(2).sum(1), torch.float32, "wsq")

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(DEVICE)
    x = torch.randn(3, 8, device=DEVICE)
    y0 = model(x)
    lk.inject(model, "dora", target_modules=["0", "2"], r=2, alpha=4, dropout=0.1)
    assert isinstance(model[0], lk.DoRALinear) and isinstance(model[2], lk.DoRALinear)
    model.eval()
    assert rel_err(model(x), y0) < 1e-6
    model.train()
    model(x).sum().backward()
    assert model[2].magnitude.grad is not None and model[0].lora_A.grad is not None


# ----------------------------------------------------------------------------- PEFT
peft = pytest.importorskip("peft")


class _Fixed(nn.Module):
    """Dropout with a given keep mask (so PEFT's dropout path sees our mask)."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.to(x.dtype) / (1 - self.p)


def _peft_dora(lin, r, alpha, dropout):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], use_dora=True,
                          lora_dropout=dropout)
    pm = peft.get_peft_model(M(), cfg)
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(
            torch.rand(lin.out_features, device=lin.weight.device) + 0.5)
    return pm, layer


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_matches_peft_dora_layer(p):
    """Outputs and gradients (x, A, B, m) equal PEFT's DoRA layer on the same weights; with
    dropout, PEFT's dropout module is replaced by our torch-path mask."""
    torch.manual_seed(2)
    lin = nn.Linear(37, 23).to(DEVICE)
    pm, pl = _peft_dora(lin, 4, 8, p)
    ours = lk.DoRALinear.from_linear(lin, 4, 8, dropout=p, backend="torch")
    with torch.no_grad():
        ours.lora_A.copy_(pl.lora_A["default"].weight)
        ours.lora_B.copy_(pl.lora_B["default"].weight)
        ours.magnitude.copy_(pl.lora_magnitude_vector["default"].weight)
    x = torch.randn(2, 7, 37, device=DEVICE)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    pm.train()
    ours.train()
    gen = None
    if p > 0:
        gen = torch.Generator().manual_seed(5)
        seed = draw_seed(torch.Generator().manual_seed(5), x.device)
        keep = torch_keep_mask(seed, (14, 37), p, x.device).reshape(2, 7, 37)
        pl.lora_dropout["default"] = _Fixed(keep, p)
    yp = pm(x1)
    yo = ours(x2, generator=gen)
    assert_close(yo, yp, torch.float32, "y vs PEFT")
    gy = torch.randn_like(yp)
    pleaves = [x1, pl.lora_A["default"].weight, pl.lora_B["default"].weight,
               pl.lora_magnitude_vector["default"].weight]
    gp = torch.autograd.grad(yp, pleaves, gy)
    go = torch.autograd.grad(yo, [x2, ours.lora_A, ours.lora_B, ours.magnitude], gy)
    for a, b, name in zip(go, gp, ["x", "A", "B", "m"]):
        assert_close(a, b, torch.float32, f"grad {name} vs PEFT", factor=10)
    # PEFT's merge equals ours
    pm.eval()
    with torch.no_grad():
        merged = pm.merge_and_unload().lin
    assert_close(ours.merged().weight, merged.weight, torch.float32, "merge vs PEFT", factor=10)


def test_peft_dora_adapter_round_trip(tmp_path):
    """PEFT save -> load_peft_adapter -> our layers == PEFT; ours -> save -> PEFT loads it."""
    torch.manual_seed(3)

    def base():
        torch.manual_seed(4)
        return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8, bias=False))

    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], use_dora=True)
    pm = peft.get_peft_model(base(), cfg)
    with torch.no_grad():
        for n, prm in pm.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                prm.add_(torch.randn_like(prm) * 0.3)
    pm.eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        yp = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    ad = lk.load_peft_adapter(tmp_path / "peft")
    assert set(ad) == {"0", "2"}
    assert isinstance(ad["0"], lk.peft_io.DoRAFactors) and ad["0"].magnitude.shape == (12,)
    model = base()
    lk.inject(model, "dora", target_modules=["0", "2"], r=3, alpha=6)
    with torch.no_grad():
        for name, (A, B, s, mag) in ad.items():
            layer = model.get_submodule(name)
            assert layer.scaling == s
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            layer.magnitude.copy_(mag)
    model.eval()
    with torch.no_grad():
        assert_close(model(x), yp, torch.float32, "loaded vs PEFT")
    # the PEFT DoRA file served next to the base model (MultiAdapterModel.load_peft)
    server = lk.MultiAdapterModel(base(), ["0", "2"], max_adapters=2, max_rank=4)
    server.load_peft("d", tmp_path / "peft")
    with torch.no_grad():
        ys = server(x, adapters=["d", None, "d", "d", None])
    assert_close(ys[[0, 2, 3]], yp[[0, 2, 3]], torch.float32, "served vs PEFT")
    assert_close(ys[[1, 4]], base()(x)[[1, 4]].detach(), torch.float32, "served base rows")
    # ours -> disk -> PEFT
    lk.save_peft_adapter(model, tmp_path / "ours")
    pm2 = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(pm2(x), yp, torch.float32, "PEFT on our file")
    # a DoRA magnitude without use_dora, or a missing magnitude, is refused
    with pytest.raises(ValueError, match="mixes DoRA"):
        lk.save_peft_adapter({"a": ad["0"], "b": tuple(ad["2"][:3])}, tmp_path / "bad")


def test_peft_dora_file_missing_magnitude_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"], use_dora=True)
    pm = peft.get_peft_model(nn.Sequential(nn.Linear(6, 4)), cfg)
    pm.save_pretrained(tmp_path)
    fn = tmp_path / "adapter_model.safetensors"
    t = load_file(fn)
    save_file({k: v for k, v in t.items() if "magnitude" not in k}, fn)
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        lk.load_peft_adapter(tmp_path)
    save_file(t, fn)
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    c["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="use_dora is not set"):
        lk.load_peft_adapter(tmp_path)


def test_bench_case_and_headline():
    """The ``dora`` bench case runs (ours agrees with PEFT's DoRA, CPU peak memory recorded) and
    the two DoRA headline ratios come from its rows (synthetic times, no timing asserted)."""
    from lora_kernels.bench import cases_dora as CD
    from lora_kernels.bench import report
    from lora_kernels.bench.cases import HEAD_TRAIN, train_key
    from lora_kernels.bench.harness import Budget, Peaks, run_cases

    cpu = torch.device("cpu")
    tiny = Budget(warmup_ms=0.0, rep_ms=1.0, min_reps=2, max_reps=3)
    rows = run_cases([CD.dora_case(8, 32, 24, 4, torch.float32, cpu)], cpu, Peaks(cpu, True),
                     tiny, show_progress=False)
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"peft_dora", "ours_default", "lora_default"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["peak_mem_mb"] > 0
    assert by["ours_default"]["rel_err_vs_ref"] < 1e-5
    cc = CD.dora_cpu_checks(rows)["dora_layer_fwd_bwd"]
    assert cc[train_key(8, 32, 24, 4, torch.float32)]["ours_over_peft_time"] > 0
    key = train_key(*HEAD_TRAIN)
    ok = dict(group="dora", case=key, status="ok")
    vals, det = report.headline([dict(impl="ours_triton", time_ms=1.2, **ok),
                                 dict(impl="lora_triton", time_ms=1.0, **ok),
                                 dict(impl="peft_dora", time_ms=3.0, **ok)])
    assert abs(vals["dora_train_overhead_vs_lora"] - 1.2) < 1e-12
    assert det["dora_train_overhead_vs_lora"]["met"] is False
    assert abs(vals["dora_train_speedup_vs_peft"] - 2.5) < 1e-12
    assert det["dora_train_speedup_vs_peft"]["met"] is True


def test_patch_peft_dora_and_inject_adapter(monkeypatch):
    """patch_peft runs a PEFT DoRA adapter on dora_linear (same output and gradients as PEFT,
    training mode); inject_adapter builds DoRALinear layers from a loaded DoRA adapter."""
    import copy

    torch.manual_seed(6)
    lin = nn.Linear(21, 13).to(DEVICE)
    pm, pl = _peft_dora(lin, 3, 6, 0.0)
    ref_m = copy.deepcopy(pm)
    lk.patch_peft(pm, backend="torch")
    calls = []
    orig = D.dora_linear
    monkeypatch.setattr(D, "dora_linear", lambda *a, **k: calls.append(1) or orig(*a, **k))
    x = torch.randn(4, 21, device=DEVICE, requires_grad=True)
    pm.train()
    ref_m.train()
    y, yr = pm(x), ref_m(x)
    assert calls, "patch_peft did not route the DoRA adapter to dora_linear"
    assert_close(y, yr, torch.float32, "patched y")
    rl = ref_m.base_model.model.lin
    ga = torch.autograd.grad(y.square().sum(), [pl.lora_A["default"].weight,
                                                pl.lora_magnitude_vector["default"].weight])
    gr = torch.autograd.grad(yr.square().sum(), [rl.lora_A["default"].weight,
                                                 rl.lora_magnitude_vector["default"].weight])
    for a, b in zip(ga, gr):
        assert_close(a, b, torch.float32, "patched grad", factor=10)
    # inject_adapter with a DoRA entry
    A, B = pl.lora_A["default"].weight.detach(), pl.lora_B["default"].weight.detach()
    mag = pl.lora_magnitude_vector["default"].weight.detach()
    holder = nn.Sequential(copy.deepcopy(lin))
    lk.inject_adapter(holder, {"0": lk.peft_io.DoRAFactors(A, B, 2.0, mag)})
    assert isinstance(holder[0], lk.DoRALinear)
    with torch.no_grad():
        assert_close(holder(x), yr, torch.float32, "inject_adapter DoRA")
    with pytest.raises(ValueError, match="magnitude"):
        lk.inject_adapter(nn.Sequential(copy.deepcopy(lin)), {"0": (A, B, 2.0, mag[:3])})



@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cuda_backend_under_emulation(monkeypatch, p):
    """The CUDA backend's DoRA path (LoRA CUDA kernels + torch row scale, the kernels' own Philox
    mask for dropout) through the CPU emulation of csrc/ (tests/cuda/test_cuda_build.py): forward
    and every gradient vs float64. Says nothing about GPU execution."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "cuda"))
    from test_cuda_build import use_emulation

    from lora_kernels.ops import lora_cuda
    from lora_kernels.ops.lowrank import Needs, Saved

    dev = use_emulation(monkeypatch)
    x, w, b, a, bb, m = _inputs(7, 29, 17, 3, torch.float32)
    seed = torch.tensor([987654321], dtype=torch.int64, device=dev)
    n = D.dora_norm(w, a, bb, 0.6)
    g = m.detach() / n
    y, s, u = D._cuda_fwd(x.detach(), w, b, a.detach(), bb.detach(), 0.6, p, seed, g=g)
    dy = randn(7, 17)
    dx, dA, dB = D._cuda_bwd(dy, Saved(x.detach(), w, a.detach(), bb.detach(), s, 0.6, p, seed),
                             Needs(True, True, True), g=g)
    keep = lora_cuda.keep_mask(seed, 7, 29, p) if p > 0 else None
    d = [t.detach().double().requires_grad_(True) for t in (x, a, bb)]
    yr = ref.dora_linear(d[0], w.double(), b.double(), d[1], d[2], m.detach().double(), 0.6,
                         keep=keep, dropout_p=p)
    yr.backward(dy.double())
    for got, want, name in ((y, yr, "y"), (dx, d[0].grad, "dx"), (dA, d[1].grad, "dA"),
                            (dB, d[2].grad, "dB")):
        assert_close(got, want, torch.float32, name)


def test_serving_mixed_dora_and_lora_batch_equals_merged_models():
    """One mixed batch (DoRA, LoRA, base, DoRA) through MultiAdapterModel equals, row by row, the
    model with that adapter merged (DoRA: g * (W + s B A)); removing the DoRA adapter drops its
    row scales; a sum with a DoRA part is refused."""
    import copy

    from helpers import tiny_llama

    base = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(8)
    dora, lora = {}, {}
    for name, mod in base.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            o, i = mod.weight.shape
            A, B = torch.randn(3, i) / i ** 0.5, torch.randn(o, 3) * 0.3
            m = torch.linalg.vector_norm(mod.weight.detach(), dim=1) * (1 + 0.3 * torch.rand(o))
            dora[name] = lk.peft_io.DoRAFactors(A.to(DEVICE), B.to(DEVICE), 0.7, m.to(DEVICE))
            lora[name] = (torch.randn(2, i, device=DEVICE) * 0.2,
                          torch.randn(o, 2, device=DEVICE) * 0.2, 1.5)

    def merged(ad):
        m = lk.inject_adapter(copy.deepcopy(base), ad)
        return lk.merge_and_unload(m).eval()

    ref = {"d": merged(dora), "l": merged(lora), None: base}
    server = lk.MultiAdapterModel(copy.deepcopy(base), targets, max_adapters=3, max_rank=4)
    server.add("d", dora)
    server.add("l", lora)
    ids = torch.randint(0, 64, (4, 6), device=DEVICE)
    names = ["d", "l", None, "d"]
    with torch.no_grad():
        out = server(ids, adapters=names).logits
        for k, n in enumerate(names):
            want = ref[n](ids[k:k + 1]).logits
            assert_close(out[k:k + 1], want, torch.float32, f"row {k} ({n})", factor=10)
    with pytest.raises(ValueError, match="DoRA"):
        server.add_sum("dl", ["d", "l"])
    server.remove("d")
    assert not any(lay.dora_g for lay in server.layers.values())
    with pytest.raises(ValueError, match="magnitude"):
        bad = {k: (A, B, s, m[:-1]) for k, (A, B, s, m) in dora.items()}
        server.add("bad", bad)
    assert "bad" not in server


@pytest.mark.parametrize("backend", backends())
def test_multi_lora_linear_row_scale_mixes_dora_and_lora(backend):
    """multi_lora_linear(..., row_scale=) with a DoRA slot (g) and a LoRA slot (1) in one batch:
    each token equals its own adapter's formula in float64; -1 tokens are the base."""
    T, i, o = 9, 23, 13
    x, w, b, a, bb, m = _inputs(T, i, o, 3, torch.float32)
    a2, b2 = randn(2, i, scale=0.2), randn(o, 2, scale=0.2)
    pool = lk.AdapterPool(i, o, 3, 4, device=DEVICE)
    pool.add("dora", a.detach(), bb.detach(), 0.8)
    pool.add("lora", a2, b2, 1.5)
    g = (m.detach() / D.dora_norm(w, a.detach(), bb.detach(), 0.8))
    table = torch.ones(3, o, device=DEVICE)
    table[pool.slot("dora")] = g
    ids = torch.tensor([0, 1, -1, 0, 0, 1, -1, 1, 0], device=DEVICE)
    y = lk.multi_lora_linear(x.detach(), w, b, pool, ids, backend=backend, row_scale=table)
    d = lambda t: t.detach().double()  # noqa: E731
    yd = ref.dora_linear(d(x), d(w), d(b), d(a), d(bb), d(m), 0.8)
    yl = d(x) @ d(w).t() + 1.5 * d(x) @ d(a2).t() @ d(b2).t() + d(b)
    yb = d(x) @ d(w).t() + d(b)
    want = torch.stack([(yd, yl, yb)[{0: 0, 1: 1, -1: 2}[int(k)]][t] for t, k in enumerate(ids)])
    assert_close(y, want, torch.float32, "row-scaled mixed batch")
    with pytest.raises(ValueError, match="row_scale"):
        lk.multi_lora_linear(x.detach(), None, None, pool, ids, row_scale=table)
    with pytest.raises(ValueError, match="row_scale"):
        lk.multi_lora_linear(x.detach(), w, b, pool, ids, row_scale=table[:2])
    with pytest.raises(TypeError, match="row_scale"):
        lk.multi_lora_linear(x.detach(), w, b, pool, ids, row_scale=table.double())
