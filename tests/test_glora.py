"""GLoRA: op (every support form, every gradient), layer, compile, GPU compile, config search."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

import lora_kernels as lk
from lora_kernels import glora_search as gs
from lora_kernels.layers.glora import FORMS, check_config, support_params
from lora_kernels.reference import variants as ref

from conftest import DEVICE, backends
from helpers import assert_close, noncontig, perturb_, randn, rel_err, to64

IN, OUT = 97, 75

HERE = Path(__file__).parent
FULL = {"A": "lora", "B": "lora", "C": "lora", "D": "vector", "E": "vector"}
# every form of every support appears at least once
CONFIGS = {
    "full": FULL,
    "vec-scalar": {"A": "vector", "B": "scalar", "C": "vector", "D": "scalar", "E": "scalar"},
    "mixed": {"A": "scalar", "B": "vector", "C": "none", "D": "none", "E": "vector"},
    "c-lora-only": {"A": "none", "B": "none", "C": "lora", "D": "vector", "E": "none"},
    "none": {"A": "none", "B": "none", "C": "none", "D": "none", "E": "none"},
}


def _supports(cfg, r, dtype, grad=True):
    """Random, non-zero supports of ``cfg`` (every term visible in y)."""
    def t(*shape, scale):
        return randn(*shape, dtype=dtype, scale=scale, requires_grad=grad)

    out = {}
    for k, f in cfg.items():
        if f == "none":
            out[k] = None
        elif f == "lora":
            if k == "C":
                out[k] = (t(IN, r, scale=0.5), t(r, 1, scale=r ** -0.5))
            else:
                sc = 0.5 if k == "A" else 0.05
                out[k] = (t(OUT, r, scale=sc), t(r, IN, scale=r ** -0.5))
        elif f == "vector":
            out[k] = t(IN if k == "C" else OUT, scale=0.5)
        else:
            out[k] = t(scale=0.5)
    return out


def _leaves(sup):
    out = []
    for k in "ABCDE":
        v = sup[k]
        if v is not None:
            out.extend(v if isinstance(v, tuple) else [v])
    return out


def _check(backend, cfg, dtype, lead, r, bias=True, nc=False, wgrad=False):
    x = randn(*lead, IN, dtype=dtype)
    if nc:
        x = noncontig(x)
    x.requires_grad_(True)
    w = randn(OUT, IN, dtype=dtype, scale=IN ** -0.5, requires_grad=wgrad)
    b = randn(OUT, dtype=dtype, requires_grad=wgrad) if bias else None
    sup = _supports(cfg, r, dtype)
    y = lk.glora_linear(x, w, b, **sup, backend=backend)
    sup64 = {k: to64(v) for k, v in sup.items()}
    x64, w64, b64 = to64(x), to64(w), to64(b)
    yr = ref.glora_linear(x64, w64, b64, **sup64)
    assert y.shape == (*lead, OUT) and y.dtype == dtype
    assert_close(y, yr, dtype, "y")
    base = [t for t in ((w, b) if wgrad else ()) if t is not None]
    base64 = [t for t in ((w64, b64) if wgrad else ()) if t is not None]
    leaves, leaves64 = [x] + _leaves(sup) + base, [x64] + _leaves(sup64) + base64
    gy = torch.randn(yr.shape, dtype=torch.float64, device=DEVICE)
    got = torch.autograd.grad(y, leaves, gy.to(dtype))
    # D without a bias has no effect: the reference leaves it out of the graph (grad 0)
    want = torch.autograd.grad(yr, leaves64, gy, allow_unused=True)
    want = [torch.zeros_like(t) if g is None else g for g, t in zip(want, leaves64)]
    for i, (g, gr, t) in enumerate(zip(got, want, leaves)):
        assert g.shape == t.shape and g.dtype == t.dtype, i
        assert_close(g, gr, dtype, f"grad #{i} {tuple(t.shape)}")


# (config, dtype, leading dims, rank, bias, non-contiguous x)
CASES = [
    ("full", torch.float32, (130,), 7, True, False),
    ("vec-scalar", torch.float32, (3,), 1, True, True),
    ("mixed", torch.float32, (1,), 7, False, False),
    ("c-lora-only", torch.float32, (2, 3, 4), 1, True, True),
    ("none", torch.float32, (3,), 1, True, False),
    ("full", torch.float16, (33,), 7, True, True),
    ("vec-scalar", torch.float16, (5,), 1, False, False),
    ("full", torch.bfloat16, (2, 3, 5), 1, True, True),
    ("mixed", torch.bfloat16, (33,), 7, True, False),
]
IDS = [f"{c}-{str(d)[6:]}-{'x'.join(map(str, ld))}-r{r}{'' if b else '-nobias'}{'-nc' if n else ''}"
       for c, d, ld, r, b, n in CASES]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_op_every_form_and_gradient(case, backend):
    name, dtype, lead, r, bias, nc = case
    _check(backend, CONFIGS[name], dtype, lead, r, bias, nc)


@pytest.mark.parametrize("backend", backends())
def test_op_base_weight_and_bias_gradients(backend):
    _check(backend, FULL, torch.float32, (9,), 3, wgrad=True)
    _check(backend, CONFIGS["vec-scalar"], torch.float32, (4,), 1, wgrad=True)


@pytest.mark.parametrize("backend", backends())
def test_op_empty_tokens(backend):
    x = randn(0, IN)
    w = randn(OUT, IN)
    y = lk.glora_linear(x, w, None, A=randn(OUT), backend=backend)
    assert y.shape == (0, OUT)


def test_backend_none_is_torch_and_cuda_refused_without_kernel():
    x, w = randn(3, IN), randn(OUT, IN)
    sup = dict(A=randn(), B=randn(OUT), E=randn(OUT))
    assert torch.equal(lk.glora_linear(x, w, None, **sup),
                       lk.glora_linear(x, w, None, **sup, backend="torch"))
    with pytest.raises(ValueError, match="cuda"):
        lk.glora_linear(x, w, None, backend="cuda")


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    layer = lk.GLoRALinear.from_linear(nn.Linear(IN, OUT).to(DEVICE), 4)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    x = randn(5, IN, requires_grad=True)
    f = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = f(x)
    leaves = [x] + [p for p in layer.parameters() if p.requires_grad]
    g = torch.autograd.grad(y.sum(), leaves)
    y2 = layer(x)
    g2 = torch.autograd.grad(y2.sum(), leaves)
    assert rel_err(y, y2) < 1e-6
    for a, b in zip(g, g2):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("backend", backends())
def test_opcheck_registered_ops(backend):
    w = randn(OUT, IN)
    x = randn(4, IN, requires_grad=True)
    sup = (randn(OUT, 2, requires_grad=True), randn(2, IN, requires_grad=True),
           randn(OUT, requires_grad=True), None, randn(IN, requires_grad=True), None,
           randn(), randn(OUT))
    opcheck(torch.ops.lora_kernels.glora_fwd.default, (x, w, randn(OUT), *sup, backend))
    dy = randn(4, OUT)
    sup = tuple(t.detach() if t is not None else None for t in sup)
    for mask in (0b11111111111, 0b00000000001, 0b10100101000):
        opcheck(torch.ops.lora_kernels.glora_bwd.default,
                (dy, x.detach(), w, randn(OUT), *sup, backend, mask))


# ----------------------------------------------------------------------------- layer
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("bias", [True, False])
def test_layer_starts_at_base_and_merges(backend, bias):
    lin = nn.Linear(IN, OUT, bias=bias).to(DEVICE)
    x = randn(2, 7, IN)
    base = lin(x)
    for cfg in (FULL, CONFIGS["vec-scalar"]):
        layer = lk.GLoRALinear.from_linear(lin, 5, cfg, backend=backend)
        assert lk.METHODS["glora"] is lk.GLoRALinear
        assert rel_err(layer(x), base) < 1e-6
        assert not layer.delta_weight().any()
        db = layer.delta_bias()
        assert db is None or not db.any()
        perturb_(layer, 0.2)
        y = layer(x)
        assert rel_err(y, base) > 1e-2
        merged = layer.merged()
        assert type(merged) is nn.Linear
        assert (merged.bias is not None) == (bias or cfg["C"] != "none" or cfg["E"] != "none")
        assert rel_err(merged(x), y) < 1e-5
        with pytest.raises(NotImplementedError):
            layer.as_lora()


def test_layer_params_names_counts_and_state_dict():
    lin = nn.Linear(IN, OUT).to(DEVICE)
    layer = lk.GLoRALinear.from_linear(lin, 6)
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"A_down", "A_up", "B_down", "B_up", "C_down", "C_up", "D", "E"}
    assert not layer.A_down.any() and layer.A_up.any()          # "down" parts zero-initialised
    n = lk.count_trainable(layer)
    assert n == support_params(FULL, IN, OUT, 6) == lk.trainable_params("glora", IN, OUT, rank=6)
    assert n == 6 * (OUT + IN) * 2 + 6 * (IN + 1) + 2 * OUT
    small = {"A": "scalar", "E": "vector"}
    assert lk.count_trainable(lk.GLoRALinear.from_linear(lin, 6, small)) == 1 + OUT
    perturb_(layer, 0.2)
    other = lk.GLoRALinear.from_linear(lin, 6)
    other.load_state_dict(layer.state_dict())
    x = randn(3, IN)
    assert torch.equal(other(x), layer(x))


def test_config_validation():
    assert check_config(None) == FULL
    assert check_config({"A": "scalar"}) == {"A": "scalar", "B": "none", "C": "none",
                                             "D": "none", "E": "none"}
    with pytest.raises(ValueError, match="config"):
        check_config({"F": "lora"})
    with pytest.raises(ValueError, match="config\\['C'\\]"):
        check_config({"C": "scalar"})
    with pytest.raises(TypeError, match="config"):
        check_config(["A"])
    with pytest.raises(ValueError, match="rank"):
        lk.GLoRALinear.from_linear(nn.Linear(IN, OUT), min(IN, OUT) + 1)


def _bad_cases():
    x, w, b = randn(3, IN), randn(OUT, IN), randn(OUT)
    big = min(IN, OUT) + 1
    return [
        (dict(A=randn(OUT, IN)), ValueError, "A must be"),
        (dict(A=randn(IN)), ValueError, "A must be"),
        (dict(B=randn(OUT, 1)), ValueError, "B must be"),
        (dict(A=(randn(OUT, 3), randn(2, IN))), ValueError, r"A\[1\] \(up\)"),
        (dict(B=(randn(IN, 3), randn(3, IN))), ValueError, r"B\[0\] \(down\)"),
        (dict(A=(randn(OUT, 3), randn(3, IN), randn(3))), ValueError, "pair"),
        (dict(A=(randn(OUT, big), randn(big, IN))), ValueError, "A rank"),
        (dict(C=randn(OUT)), ValueError, "C must be"),
        (dict(C=randn()), ValueError, "C must be"),
        (dict(C=(randn(IN, 2), randn(2, 2))), ValueError, r"C\[1\] \(up\)"),
        (dict(D=(randn(OUT, 1), randn(1, IN))), TypeError, "D must be"),
        (dict(D=randn(IN)), ValueError, "D must be"),
        (dict(E=randn(OUT, dtype=torch.float16)), TypeError, "E"),
        (dict(A=(randn(OUT, 2), randn(2, IN, dtype=torch.bfloat16))), TypeError, r"A\[1\]"),
        (dict(A=0.5), TypeError, "A must be"),
        (dict(E=randn(OUT).long()), TypeError, "E"),
        (dict(x=randn(3, IN + 1)), ValueError, "x"),
        (dict(b=randn(OUT + 1)), ValueError, "bias"),
        (dict(backend="nope"), ValueError, "backend"),
    ], (x, w, b)


N_BAD = len(_bad_cases()[0])


@pytest.mark.parametrize("i", range(N_BAD))
def test_bad_inputs_raise_naming_the_argument(i):
    cases, (x, w, b) = _bad_cases()
    kw, exc, match = cases[i]
    x, b = kw.pop("x", x), kw.pop("b", b)
    with pytest.raises(exc, match=match):
        lk.glora_linear(x, w, b, **kw)


# The GLoRA kernel's ahead-of-time GPU compile (every support mode) is part of
# tests/cuda/test_triton_aot.py, which compiles every kernel's recorded launches in one process.


def _shrink(v):
    """Cut (OUT, IN)-sized supports down to the 20 x 24 AOT problem (tests/cuda/test_triton_aot)."""
    if v is None:
        return None
    if isinstance(v, tuple):
        d, u = v
        return (d[:20].detach().requires_grad_(), u[:, :24].detach().requires_grad_())
    if v.dim() == 1:
        return v[:20].detach().requires_grad_()
    return v


# ----------------------------------------------------------------------------- config search
def test_supernet_search_under_budget():
    torch.manual_seed(0)
    d_in, d_h, d_out = 12, 16, 6
    model = nn.Sequential(nn.Linear(d_in, d_h), nn.Tanh(), nn.Linear(d_h, d_out)).to(DEVICE)
    teacher = [m.weight.detach() * (1 + 0.3 * torch.randn_like(m.weight)) for m in model[::2]]
    xs = [randn(32, d_in) for _ in range(4)]

    def target(x):
        return F.linear(torch.tanh(F.linear(x, teacher[0], model[0].bias)), teacher[1],
                        model[2].bias)

    with torch.no_grad():
        batches = [(x, target(x)) for x in xs]

    def loss_fn(m, batch):
        return F.mse_loss(m(batch[0]), batch[1])

    names = gs.inject_supernet(model, rank=2)
    assert names == ["0", "2"]
    layers = gs.supernet_layers(model)
    # any sub-network starts at the base model
    gs.set_configs(model, {n: FULL for n in names})
    base_loss = loss_fn(model, batches[0]).item()
    gs.set_configs(model, {n: CONFIGS["none"] for n in names})
    assert loss_fn(model, batches[0]).item() == pytest.approx(base_loss, rel=1e-6)

    losses = gs.train_supernet(model, loss_fn, batches, steps=60, lr=2e-2, seed=0)
    assert sum(losses[-10:]) < sum(losses[:10])

    max_params = gs.config_params(model, {n: FULL for n in names})
    budget = max_params // 3

    def eval_fn(m):
        return sum(loss_fn(m, bt).item() for bt in batches)

    res = gs.evolutionary_search(model, eval_fn, budget, population=8, generations=4,
                                 parents=3, seed=1)
    assert res.params <= budget
    assert res.params == gs.config_params(model, res.configs)
    assert all(res.history[i + 1] <= res.history[i] for i in range(len(res.history) - 1))
    assert res.score <= eval_fn(model) + 1e-12
    # the search beats the base model (the all-"none" candidate is always in the population)
    gs.set_configs(model, {n: CONFIGS["none"] for n in names})
    assert res.score < eval_fn(model)
    # finalize: GLoRALinear layers with inherited tensors compute what the supernet computed
    gs.set_configs(model, res.configs)
    x = xs[0]
    y_super = model(x)
    new = gs.finalize(model)
    assert set(new) == set(names) and all(isinstance(m, lk.GLoRALinear) for m in new.values())
    assert rel_err(model(x), y_super) < 1e-6
    assert sum(lk.count_trainable(m) for m in new.values()) == res.params
    for n in names:
        assert new[n].config == res.configs[n]
    assert layers["0"].rank == 2
    # budget 0: only the base model fits
    model2 = nn.Sequential(nn.Linear(d_in, d_out)).to(DEVICE)
    gs.inject_supernet(model2, rank=2)
    r0 = gs.evolutionary_search(model2, lambda m: 0.0, 0, population=4, generations=2,
                                parents=2)
    assert r0.params == 0 and set(r0.configs["0"].values()) == {"none"}
    with pytest.raises(ValueError, match="budget"):
        gs.evolutionary_search(model2, lambda m: 0.0, -1)
    with pytest.raises(ValueError, match="target_modules"):
        gs.inject_supernet(nn.Sequential(nn.Linear(3, 3)), target_modules=["q_proj"])
    assert set(FORMS) == set("ABCDE")
