"""Fused LoRA op and LoRALinear against float64 references (every backend runnable here)."""

import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels.reference import lora as ref

from conftest import DEVICE, DTYPES, TOL, backends
from helpers import assert_close, noncontig, randn

SHAPES = [  # (T, in, out, r)
    (1, 97, 75, 1),
    (3, 97, 75, 7),
    (130, 97, 75, 16),
    (33, 64, 129, 40),
]


def _inputs(T, i, o, r, dtype, bias=True, lead=None):
    shape = (T, i) if lead is None else (*lead, i)
    x = randn(*shape, dtype=dtype, requires_grad=True)
    w = randn(o, i, dtype=dtype, scale=1 / math.sqrt(i))
    b = randn(o, dtype=dtype) if bias else None
    a = randn(r, i, dtype=dtype, scale=1 / math.sqrt(i), requires_grad=True)
    bb = randn(o, r, dtype=dtype, scale=1 / math.sqrt(r), requires_grad=True)
    return x, w, b, a, bb


def _check(x, w, b, a, bb, s, backend, dtype, keep=None, p=0.0, y=None, grads=True):
    leaves = [t for t in (x, w, b, a, bb) if t is not None and t.requires_grad]
    d = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
         for t in (x, w, b, a, bb)]
    yr = ref.lora_linear(*d, s, keep=keep, dropout_p=p)
    if y is None:
        y = lk.lora_linear(x, w, b, a, bb, s, backend=backend)
    assert y.dtype == dtype and y.shape == yr.shape
    assert_close(y, yr, dtype, "y")
    if not grads:
        return
    gy = torch.randn_like(yr)
    got = torch.autograd.grad(y, leaves, gy.to(dtype))
    dleaves = [dt for t, dt in zip((x, w, b, a, bb), d) if t is not None and t.requires_grad]
    want = torch.autograd.grad(yr, dleaves, gy)
    for g, gr, t in zip(got, want, leaves):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert_close(g, gr, dtype, f"grad {tuple(t.shape)}")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward(backend, dtype, shape):
    T, i, o, r = shape
    x, w, b, a, bb = _inputs(T, i, o, r, dtype)
    _check(x, w, b, a, bb, 0.7, backend, dtype)


@pytest.mark.parametrize("backend", backends())
def test_no_bias_leading_dims_and_weight_grad(backend):
    dtype = torch.float32
    x, w, b, a, bb = _inputs(None, 37, 23, 5, dtype, bias=False, lead=(2, 3, 5))
    w.requires_grad_(True)
    _check(x, w, b, a, bb, 2.0, backend, dtype)


@pytest.mark.parametrize("backend", backends())
def test_bias_grad(backend):
    x, w, b, a, bb = _inputs(9, 31, 17, 3, torch.float32)
    b.requires_grad_(True)
    _check(x, w, b, a, bb, 1.0, backend, torch.float32)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_inputs(backend, dtype):
    x, w, b, a, bb = _inputs(29, 41, 19, 6, dtype)
    xn = noncontig(x.detach()).requires_grad_(True)
    wn = w.t().contiguous().t()  # same values, transposed storage
    an = noncontig(a.detach()).requires_grad_(True)
    assert not xn.is_contiguous() and not wn.is_contiguous()
    _check(xn, wn, b, an, bb, 0.5, backend, dtype)


@pytest.mark.parametrize("backend", backends())
def test_large_rank(backend):
    # r up to 256: the epilogue loops over the rank in BLOCK_R chunks
    x, w, b, a, bb = _inputs(5, 40, 24, 256, torch.float32)
    _check(x, w, b, a, bb, 1 / 16, backend, torch.float32)


@pytest.mark.parametrize("backend", backends())
def test_empty_tokens(backend):
    x, w, b, a, bb = _inputs(0, 16, 8, 2, torch.float32)
    y = lk.lora_linear(x, w, b, a, bb, backend=backend)
    assert y.shape == (0, 8)


def _mask_of(backend, T, i, p, seed, dtype=torch.float32):
    """Recover the dropout keep-mask: with W=0, A=B=I, s=1 the op returns keep*x/(1-p)."""
    x = randn(T, i, dtype=dtype)
    eye = torch.eye(i, dtype=dtype, device=DEVICE)
    g = torch.Generator(device="cpu").manual_seed(seed)
    y = lk.lora_linear(x, torch.zeros_like(eye), None, eye, eye, 1.0, p, generator=g,
                       backend=backend)
    return y != 0


@pytest.mark.parametrize("backend", backends())
def test_dropout_matches_reference_with_regenerated_mask(backend):
    T, i, o, r, p, seed = 37, 24, 24, 5, 0.3, 1234
    keep = _mask_of(backend, T, i, p, seed)
    x, w, b, a, bb = _inputs(T, i, o, r, torch.float32)
    g = torch.Generator(device="cpu").manual_seed(seed)
    y = lk.lora_linear(x, w, b, a, bb, 0.9, p, generator=g, backend=backend)
    # forward and every gradient use the same mask (regenerated in backward, never stored)
    _check(x, w, b, a, bb, 0.9, backend, torch.float32, keep=keep, p=p, y=y)


@pytest.mark.parametrize("backend", backends())
def test_dropout_reproducible_and_statistics(backend):
    T, i, p = 64, 48, 0.25
    m1 = _mask_of(backend, T, i, p, 7)
    m2 = _mask_of(backend, T, i, p, 7)
    m3 = _mask_of(backend, T, i, p, 8)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    n = m1.numel()
    frac = m1.float().mean().item()
    # binomial: 5 standard deviations
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), frac


def test_dropout_unseeded_varies():
    x, w, b, a, bb = _inputs(16, 16, 8, 4, torch.float32)
    y1 = lk.lora_linear(x, w, b, a, bb, 1.0, 0.5, backend="torch")
    y2 = lk.lora_linear(x, w, b, a, bb, 1.0, 0.5, backend="torch")
    assert not torch.equal(y1, y2)


# ---------------------------------------------------------------------------- bad input
def _ok():
    return _inputs(4, 8, 6, 2, torch.float32)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(x=a["x"][:, :7]), ValueError, "x must have last dim"),
        (lambda a: a.update(weight=a["weight"][None]), ValueError, "weight must be 2-D"),
        (lambda a: a.update(bias=a["bias"][:5]), ValueError, "bias must have shape"),
        (lambda a: a.update(lora_A=a["lora_A"][:, :7]), ValueError, "lora_A must have shape"),
        (lambda a: a.update(lora_B=a["lora_B"][:, :1]), ValueError, "lora_B must have shape"),
        (lambda a: a.update(lora_B=a["lora_B"].double()), TypeError, "lora_B must have dtype"),
        (lambda a: a.update(x=a["x"].int()), TypeError, "x must be float"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "weight must be on"),
        (lambda a: a.update(lora_A=[1.0]), TypeError, "lora_A must be a torch.Tensor"),
        (lambda a: a.update(dropout_p=1.0), ValueError, "dropout_p must be <"),
        (lambda a: a.update(dropout_p=-0.1), ValueError, "dropout_p must be >="),
        (lambda a: a.update(scaling="2"), TypeError, "scaling must be"),
        (lambda a: a.update(backend="cuda2"), ValueError, "backend must be"),
        (lambda a: a.update(generator=3), TypeError, "generator must be"),
    ],
)
def test_bad_input(mutate, exc, match):
    x, w, b, a, bb = _ok()
    args = dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scaling=1.0, dropout_p=0.0,
                generator=None, backend=None)
    mutate(args)
    with pytest.raises(exc, match=match):
        lk.lora_linear(**args)


def test_backend_errors(monkeypatch):
    x, w, b, a, bb = _ok()
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND"):
        lk.lora_linear(x, w, b, a, bb)
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            lk.lora_linear(x, w, b, a, bb, backend="triton")
        with pytest.raises(ValueError, match="backend='cuda'"):
            lk.lora_linear(x, w, b, a, bb, backend="cuda")


def test_default_backend_is_verified_only():
    # CPU -> torch; on CUDA, only (backend, op) pairs in VERIFIED_ON_GPU are picked implicitly
    from lora_kernels._backend import VERIFIED_ON_GPU, resolve_backend

    assert resolve_backend(None, torch.device("cpu"), "lora_linear") == "torch"
    picked = resolve_backend(None, torch.device("cuda"), "lora_linear")
    assert picked == "torch" or (picked, "lora_linear") in VERIFIED_ON_GPU


# ---------------------------------------------------------------------------- module
def test_lora_linear_module():
    lin = torch.nn.Linear(21, 13).to(DEVICE)
    m = lk.LoRALinear.from_linear(lin, r=4, alpha=8.0, dropout=0.1)
    assert m.scaling == 2.0
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B"}
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
    x = randn(5, 21)
    m.eval()
    assert torch.allclose(m(x), lin(x), atol=1e-6)  # starts at the base model
    with torch.no_grad():
        m.lora_B.normal_()
    merged = m.merged()
    assert isinstance(merged, torch.nn.Linear)
    assert_close(merged(x), m(x).double(), torch.float32, "merged")
    a, b, s = m.as_lora()
    assert_close(s * b @ a, m.delta_weight().double(), torch.float32, "as_lora")
    rs = lk.LoRALinear.from_linear(lin, r=16, alpha=8.0, use_rslora=True)
    assert rs.scaling == pytest.approx(8.0 / 4.0)
    sd = m.state_dict()
    assert {"weight", "bias", "lora_A", "lora_B"} <= set(sd)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        lk.LoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1), r=2)
    with pytest.raises(ValueError, match="r must be >= 1"):
        lk.LoRALinear.from_linear(lin, r=0)


def test_module_dropout_train_vs_eval():
    lin = torch.nn.Linear(16, 8).to(DEVICE)
    m = lk.LoRALinear.from_linear(lin, r=4, alpha=4.0, dropout=0.5)
    with torch.no_grad():
        m.lora_B.normal_()
    x = randn(6, 16)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    g1 = torch.Generator().manual_seed(1)
    g2 = torch.Generator().manual_seed(1)
    assert torch.equal(m(x, generator=g1), m(x, generator=g2))
    assert not torch.equal(m(x, generator=torch.Generator().manual_seed(2)), m.eval()(x))


def test_tolerances_table():
    assert set(TOL) == set(DTYPES)
