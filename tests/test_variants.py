"""NoRA, CURLoRA and Deep LoRA (ops and layers) against float64 dense references."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_kernels as lk
from lora_kernels.layers.deep import compressed_factors
from lora_kernels.layers.nora import svd_outer_factors
from lora_kernels.ops.cur import inverted_probabilities, sample_cur_indices
from lora_kernels.reference import variants as ref

from conftest import DEVICE, backends
from helpers import assert_close, noncontig, perturb_, randn, rel_err, to64

IN, OUT = 97, 75
# (dtype, leading dims of x, rank, bias, non-contiguous x, base weight/bias require grad)
CASES = [
    (torch.float32, (130,), 7, True, False, False),
    (torch.float16, (3,), 1, False, True, False),
    (torch.bfloat16, (2, 3, 5), 7, True, True, False),
    (torch.float32, (1,), 1, True, True, True),
]
CASE_IDS = ["fp32-T130-r7", "fp16-T3-r1-nobias-nc", "bf16-3d-r7-nc", "fp32-T1-r1-nc-wgrad"]


def _t(*shape, dtype, scale=1.0, grad=False):
    return randn(*shape, dtype=dtype, scale=scale, requires_grad=grad)


def _method_args(method, r, dtype, depth=3):
    """(adapter tensors tuple, trainable leaves) for ``method`` at rank r."""
    if method == "nora":
        ro = r + 3
        args = (_t(ro, IN, dtype=dtype, scale=IN ** -0.5), _t(r, ro, dtype=dtype, grad=True),
                _t(ro, r, dtype=dtype, scale=ro ** -0.5, grad=True),
                _t(OUT, ro, dtype=dtype, scale=ro ** -0.5))
        return args, [args[1], args[2]]
    if method == "cur":
        idt = torch.int32 if r == 1 else torch.int64
        cols = torch.randint(0, IN, (r,), device=DEVICE, dtype=idt)
        rows = torch.randint(0, OUT, (r,), device=DEVICE, dtype=idt)
        U = _t(r, r, dtype=dtype, scale=4.0, grad=True)
        return (cols, rows, U), [U]
    fs = [_t(r, IN, dtype=dtype, scale=IN ** -0.5, grad=True)]
    fs += [_t(r, r, dtype=dtype, scale=r ** -0.5, grad=True) for _ in range(depth - 2)]
    fs += [_t(OUT, r, dtype=dtype, scale=r ** -0.5, grad=True)]
    return (fs,), fs


OPS = {"nora": (lk.nora_linear, ref.nora_linear), "cur": (lk.cur_linear, ref.cur_linear),
       "deep": (lk.deep_lora_linear, ref.deep_lora_linear)}


def _run(method, backend, dtype, lead, r, bias, nc, wgrad, depth=3):
    op, rop = OPS[method]
    x = _t(*lead, IN, dtype=dtype)
    if nc:
        x = noncontig(x)
        assert not x.is_contiguous()
    x.requires_grad_(True)
    w = _t(OUT, IN, dtype=dtype, scale=IN ** -0.5, grad=wgrad)
    b = _t(OUT, dtype=dtype, grad=wgrad) if bias else None
    args, leaves = _method_args(method, r, dtype, depth)
    y = op(x, w, b, *args, 0.7, backend=backend)
    x64, w64, b64, args64 = to64(x), to64(w), to64(b), [to64(a) for a in args]
    yr = rop(x64, w64, b64, *args64, 0.7)
    assert y.shape == (*lead, OUT) and y.dtype == dtype
    assert_close(y, yr, dtype, f"{method} y")
    # x, every trainable adapter tensor, and the base when it requires grad
    flat, flat64 = _flat(args), _flat(args64)
    idx = [i for i, t in enumerate(flat) if t.requires_grad]
    assert len(idx) == len(leaves) and all(flat[i] is t for i, t in zip(idx, leaves))
    base, base64 = ([w, b], [w64, b64]) if wgrad else ([], [])
    got_leaves = [x] + leaves + [t for t in base if t is not None]
    ref_leaves = [x64] + [flat64[i] for i in idx] + [t for t in base64 if t is not None]
    gy = torch.randn(yr.shape, dtype=torch.float64, device=DEVICE)
    got = torch.autograd.grad(y, got_leaves, gy.to(dtype))
    want = torch.autograd.grad(yr, ref_leaves, gy)
    for i, (g, gr, t) in enumerate(zip(got, want, got_leaves)):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert_close(g, gr, dtype, f"{method} grad #{i} {tuple(t.shape)}")


def _flat(args):
    """Tensors of an args tuple, a factor list expanded in place."""
    out = []
    for a in args:
        out.extend(a if isinstance(a, list) else [a])
    return out


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", ["nora", "cur", "deep"])
def test_op_forward_and_every_grad(method, case, backend):
    _run(method, backend, *case)


@pytest.mark.parametrize("backend", backends())
def test_deep_depth5(backend):
    _run("deep", backend, torch.float32, (33,), 7, True, False, False, depth=5)


def test_backend_none_is_torch_on_cpu_and_bad_backend():
    x = _t(4, IN, dtype=torch.float32)
    w = _t(OUT, IN, dtype=torch.float32)
    (fs,), _ = _method_args("deep", 2, torch.float32)
    y = lk.deep_lora_linear(x, w, None, fs)
    assert_close(y, ref.deep_lora_linear(x.double(), w.double(), None, to64(fs)), torch.float32)
    with pytest.raises(ValueError, match="backend"):
        lk.deep_lora_linear(x, w, None, fs, backend="bogus")


# ----------------------------------------------------------------------------- layers
def _linear(dtype=torch.float32, bias=True):
    lin = nn.Linear(IN, OUT, bias=bias)
    return lin.to(device=DEVICE, dtype=dtype)


def _layers(lin, backend=None):
    g = torch.Generator().manual_seed(3)
    return {
        "nora": lk.NoRALinear.from_linear(lin, 12, 5, alpha=2.0, backend=backend),
        "curlora": lk.CURLoRALinear.from_linear(lin, 6, alpha=0.5, generator=g, backend=backend),
        "deep_lora": lk.DeepLoRALinear.from_linear(lin, 5, depth=4, generator=g, backend=backend),
    }


def test_methods_registered():
    assert lk.METHODS["nora"] is lk.NoRALinear
    assert lk.METHODS["curlora"] is lk.CURLoRALinear
    assert lk.METHODS["deep_lora"] is lk.DeepLoRALinear


@pytest.mark.parametrize("backend", backends())
def test_layers_start_at_base_merge_and_as_lora(backend):
    lin = _linear()
    x = _t(2, 9, IN, dtype=torch.float32)
    base = F.linear(x, lin.weight, lin.bias)
    for name, layer in _layers(lin, backend).items():
        y0 = layer(x)
        # NoRA / CURLoRA start exactly at the base (zero delta); Deep LoRA ~eps^k (1e-12) off it
        assert rel_err(y0, base) < 1e-6, name
        dw = layer.delta_weight()
        if name == "deep_lora":
            assert 0 < dw.abs().max() < 1e-10
        else:
            assert not dw.any(), name
        assert not layer.weight.requires_grad
        perturb_(layer, 0.3)
        y = layer(x)
        assert rel_err(y, base) > 1e-2, name          # the perturbation is visible
        merged = layer.merged()
        assert type(merged) is nn.Linear
        assert rel_err(merged(x), y) < 1e-5, name
        A, B, s = layer.as_lora()
        assert rel_err(s * (B.double() @ A.double()), layer.delta_weight()) < 1e-6, name
        y_lora = lk.lora_linear(x, layer.weight, layer.bias, A, B, s, backend=backend)
        assert rel_err(y_lora, y) < 1e-5, name


def test_layer_trainable_params_match_paper_counts():
    lin = _linear()
    layers = _layers(lin)
    assert lk.count_trainable(layers["nora"]) == lk.trainable_params(
        "nora", IN, OUT, outer_rank=12, inner_rank=5) == 2 * 12 * 5
    assert lk.count_trainable(layers["curlora"]) == lk.trainable_params(
        "curlora", IN, OUT, rank=6) == 36
    assert lk.count_trainable(layers["deep_lora"]) == lk.trainable_params(
        "deep_lora", IN, OUT, rank=5, depth=4) == 5 * (IN + OUT) + 2 * 25
    assert lk.count_trainable(lk.LoRALinear.from_linear(lin, 4)) == lk.trainable_params(
        "lora", IN, OUT, r=4)
    table = lk.param_table([(IN, OUT), (OUT, IN)])
    for m in ("lora", "nora", "curlora", "deep_lora", "glora"):
        assert m in table
    with pytest.raises(ValueError, match="method"):
        lk.trainable_params("dora", IN, OUT, r=4)


def test_layer_training_step_reduces_loss():
    """Gradients reach the trainable tensors (and only them) through the layers."""
    lin = _linear()
    x = _t(16, IN, dtype=torch.float32)
    target = _t(16, OUT, dtype=torch.float32)
    for name, layer in _layers(lin).items():
        if name == "deep_lora":
            with torch.no_grad():
                for f in layer.factors:
                    f.mul_(300.0)             # eps^3 init has vanishing gradients: wake it up
        opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.05)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = F.mse_loss(layer(x), target)
            loss.backward()
            assert layer.weight.grad is None
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (name, losses)


# ----------------------------------------------------------------------------- NoRA specifics
def test_nora_outer_factors_svd():
    w = _t(OUT, IN, dtype=torch.float64)
    oa, ob = svd_outer_factors(w, min(IN, OUT))
    assert rel_err(ob @ oa, w) < 1e-12                          # full rank reconstructs W
    r = 10
    oa, ob = svd_outer_factors(w, r)
    S = torch.linalg.svdvals(w)
    err = (w - ob @ oa).norm() ** 2
    assert abs(err - (S[r:] ** 2).sum()) / err < 1e-10          # Eckart-Young optimum
    # singular values folded in, split evenly: both factors carry S_r^(1/2)
    assert torch.allclose(oa.norm(dim=1), S[:r].sqrt(), rtol=1e-10)
    assert torch.allclose(ob.norm(dim=0), S[:r].sqrt(), rtol=1e-10)
    # activation-aware: full rank still reconstructs W; truncated favours high-activation columns
    scale = torch.logspace(-2, 1, IN, dtype=torch.float64, device=DEVICE)
    calib = _t(64, IN, dtype=torch.float64) * scale
    oa2, ob2 = svd_outer_factors(w, min(IN, OUT), calib)
    assert rel_err(ob2 @ oa2, w) < 1e-10
    oa2, ob2 = svd_outer_factors(w, r, calib)
    out_err_plain = (calib @ (w - ob @ oa).t()).norm()
    out_err_aware = (calib @ (w - ob2 @ oa2).t()).norm()
    assert out_err_aware < 0.7 * out_err_plain


def test_nora_layer_buffers_and_state_dict():
    lin = _linear()
    calib = _t(8, IN, dtype=torch.float32)
    layer = lk.NoRALinear.from_linear(lin, 12, 5, calib_x=calib)
    names = dict(layer.named_parameters())
    assert set(n for n, p in names.items() if p.requires_grad) == {"inner_A", "inner_B"}
    assert not layer.inner_B.any()
    sd = layer.state_dict()
    assert {"outer_A", "outer_B", "inner_A", "inner_B", "weight", "bias"} <= set(sd)
    perturb_(layer, 0.3)
    other = lk.NoRALinear.from_linear(lin, 12, 5)            # different (plain) outer factors
    other.load_state_dict(layer.state_dict())
    x = _t(3, IN, dtype=torch.float32)
    assert torch.equal(other(x), layer(x))


# ----------------------------------------------------------------------------- CURLoRA specifics
def test_cur_inverted_probabilities_and_sampling_statistics():
    norms = torch.tensor([0.1, 0.2, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    w = (torch.randn(20, 6, dtype=torch.float64) * 1e-3 + 1.0) * norms   # column j ~ norm_j
    w = w.to(DEVICE)
    p = inverted_probabilities(w, 1)
    sq = (w.double() ** 2).sum(0).cpu()
    expect = (sq.sum() / sq) / (sq.sum() / sq).sum()
    assert torch.allclose(p, expect, rtol=1e-12)
    assert p.argmax() == 0 and p.argmin() == 5
    g = torch.Generator().manual_seed(0)
    cols, rows = sample_cur_indices(w, 6, g)
    assert cols.device == w.device and cols.dtype == torch.int64
    assert 0 <= int(cols.min()) and int(cols.max()) < 6 and int(rows.max()) < 20
    draws = torch.cat([sample_cur_indices(w, 6, g)[0].cpu() for _ in range(2000)])
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    # 12000 draws: standard error <= 0.005; inverted sampling puts ~80% on the 0.1-norm column
    assert (freq - expect).abs().max() < 0.02, (freq, expect)
    assert freq[0] > 0.7 and freq[5] < 0.01
    # rows too: scale row 3 way down -> it dominates the row draws
    w2 = torch.randn(20, 6, dtype=torch.float64, device=DEVICE)
    w2[3] *= 1e-2
    assert inverted_probabilities(w2, 0).argmax() == 3


def test_curlora_layer_indices_state_dict_and_merge_uses_w0():
    lin = _linear()
    g = torch.Generator().manual_seed(1)
    layer = lk.CURLoRALinear.from_linear(lin, 6, alpha=0.5, generator=g)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["U"]
    assert not layer.U.any()
    bufs = dict(layer.named_buffers())
    assert set(bufs) == {"col_idx", "row_idx"}                 # C, R never stored
    perturb_(layer, 0.3)
    sd = layer.state_dict()
    assert torch.equal(sd["col_idx"], layer.col_idx) and torch.equal(sd["row_idx"], layer.row_idx)
    other = lk.CURLoRALinear.from_linear(lin, 6, alpha=0.5,
                                         generator=torch.Generator().manual_seed(99))
    assert not (torch.equal(other.col_idx, layer.col_idx) and torch.equal(other.row_idx,
                                                                          layer.row_idx))
    other.load_state_dict(sd)
    assert torch.equal(other.col_idx, layer.col_idx) and torch.equal(other.row_idx, layer.row_idx)
    x = _t(4, IN, dtype=torch.float32)
    assert torch.equal(other(x), layer(x))
    # the layer re-checks indices whenever they change (in place or through load_state_dict)
    bad = dict(sd)
    bad["row_idx"] = sd["row_idx"].clone()
    bad["row_idx"][0] = OUT
    other.load_state_dict(bad)
    with pytest.raises(ValueError, match="row_idx"):
        other(x)
    with torch.no_grad():
        other.row_idx.copy_(sd["row_idx"])
    other(x)
    with torch.no_grad():
        other.col_idx[1] = -1
    with pytest.raises(ValueError, match="col_idx"):
        other(x)
    # merge takes C and R from the original base W0
    w0 = lin.weight.detach().double()
    c, r_ = w0[:, layer.col_idx], w0[layer.row_idx]
    want = w0 + 0.5 * c @ layer.U.detach().double() @ r_
    assert rel_err(layer.merged().weight, want) < 1e-6


# ----------------------------------------------------------------------------- Deep LoRA specifics
def test_deep_lora_init_orthogonal_and_compressed_variant():
    lin = _linear()
    eps = 1e-2
    layer = lk.DeepLoRALinear.from_linear(lin, 6, depth=3, eps=eps,
                                          generator=torch.Generator().manual_seed(0))
    f1, f2, f3 = [f.detach().double() for f in layer.factors]
    assert f1.shape == (6, IN) and f2.shape == (6, 6) and f3.shape == (OUT, 6)
    eye = torch.eye(6, dtype=torch.float64, device=DEVICE)
    assert torch.allclose(f1 @ f1.t(), eps ** 2 * eye, atol=1e-9)        # orthogonal * eps
    assert torch.allclose(f2 @ f2.t(), eps ** 2 * eye, atol=1e-9)
    assert torch.allclose(f3.t() @ f3, eps ** 2 * eye, atol=1e-9)
    # compressed: outer factors span the top-r singular subspaces of the gradient, inner eps * I
    u = torch.linalg.qr(torch.randn(OUT, 3, dtype=torch.float64, device=DEVICE))[0]
    v = torch.linalg.qr(torch.randn(IN, 3, dtype=torch.float64, device=DEVICE))[0]
    grad = (u * torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64, device=DEVICE)) @ v.t()
    grad = grad + 1e-5 * torch.randn_like(grad)
    cl = lk.DeepLoRALinear.from_linear(lin, 3, depth=4, eps=eps, grad=grad.float())
    fs = [f.detach().double() for f in cl.factors]
    assert cl.compressed and len(fs) == 4
    assert torch.allclose(fs[1], eps * torch.eye(3, dtype=torch.float64, device=DEVICE))
    proj_out = fs[-1] @ torch.linalg.pinv(fs[-1])          # projector onto span(F_k)
    proj_in = torch.linalg.pinv(fs[0]) @ fs[0]             # onto span(F_1^T)
    assert (proj_out @ u - u).norm() < 1e-3 and (proj_in @ v - v).norm() < 1e-3
    cf = compressed_factors(grad, 3, 3, eps)
    assert len(cf) == 3 and cf[1].shape == (3, 3)


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    f32 = torch.float32
    x = _t(3, IN, dtype=f32)
    w = _t(OUT, IN, dtype=f32)
    b = _t(OUT, dtype=f32)
    (oa, ia, ib, ob), _ = _method_args("nora", 4, f32)      # r_o = 7, r_i = 4
    (cols, rows, U), _ = _method_args("cur", 4, f32)
    (fs,), _ = _method_args("deep", 4, f32)
    big = min(IN, OUT) + 1
    lin = _linear()
    return [
        # NoRA
        (lambda: lk.nora_linear(x, w, b, oa, ia, ib.t(), ob), ValueError, "inner_B"),
        (lambda: lk.nora_linear(x, w, b, oa[:, :-1], ia, ib, ob), ValueError, "outer_A"),
        (lambda: lk.nora_linear(x, w, b, oa, ia, ib, ob[:-1]), ValueError, "outer_B"),
        (lambda: lk.nora_linear(x, w, b, _t(big, IN, dtype=f32), _t(4, big, dtype=f32),
                                _t(big, 4, dtype=f32), _t(OUT, big, dtype=f32)),
         ValueError, "outer rank"),
        (lambda: lk.nora_linear(x, w, b, oa, _t(9, 7, dtype=f32), _t(7, 9, dtype=f32), ob),
         ValueError, "inner rank"),
        (lambda: lk.nora_linear(x, w, b, oa, ia.half(), ib, ob), TypeError, "inner_A"),
        (lambda: lk.nora_linear(x, w, b, oa, ia, ib, ob, scaling="2"), TypeError, "scaling"),
        (lambda: lk.NoRALinear.from_linear(lin, big, 2), ValueError, "outer_rank"),
        (lambda: lk.NoRALinear.from_linear(lin, 4, 5), ValueError, "inner_rank"),
        (lambda: lk.NoRALinear.from_linear(lin, 4, 2, calib_x=_t(3, IN + 1, dtype=f32)),
         ValueError, "calib_x"),
        (lambda: lk.NoRALinear.from_linear(nn.Conv1d(3, 3, 1), 4, 2), TypeError, "linear"),
        # CURLoRA
        (lambda: lk.cur_linear(x, w, b, cols + IN, rows, U), ValueError, "col_idx"),
        (lambda: lk.cur_linear(x, w, b, cols, rows - 100, U), ValueError, "row_idx"),
        (lambda: lk.cur_linear(x, w, b, cols.float(), rows, U), TypeError, "col_idx"),
        (lambda: lk.cur_linear(x, w, b, cols[:-1], rows, U), ValueError, "col_idx"),
        (lambda: lk.cur_linear(x, w, b, cols, rows, U[:, :-1]), ValueError, "U"),
        (lambda: lk.cur_linear(x, w, b, cols, rows, U.double()), TypeError, "U"),
        (lambda: lk.cur_linear(x, w, b, cols, rows, _t(big, big, dtype=f32)), ValueError,
         "rank"),
        (lambda: lk.CURLoRALinear.from_linear(lin, big), ValueError, "rank"),
        (lambda: lk.CURLoRALinear.from_linear(lin, 0), ValueError, "rank"),
        (lambda: sample_cur_indices(torch.zeros(4, 4, device=DEVICE), 2), ValueError, "weight"),
        # Deep LoRA
        (lambda: lk.deep_lora_linear(x, w, b, [fs[0], fs[-1]]), ValueError, "depth"),
        (lambda: lk.deep_lora_linear(x, w, b, fs[0]), TypeError, "factors"),
        (lambda: lk.deep_lora_linear(x, w, b, [fs[0], fs[1][:, :-1], fs[2]]), ValueError,
         r"factors\[1\]"),
        (lambda: lk.deep_lora_linear(x, w, b, [fs[0], fs[1], fs[2][:-1]]), ValueError,
         r"factors\[2\]"),
        (lambda: lk.deep_lora_linear(x, w, b, [fs[0], fs[1].half(), fs[2]]), TypeError,
         r"factors\[1\]"),
        (lambda: lk.DeepLoRALinear.from_linear(lin, 4, depth=2), ValueError, "depth"),
        (lambda: lk.DeepLoRALinear.from_linear(lin, big), ValueError, "rank"),
        (lambda: lk.DeepLoRALinear.from_linear(lin, 4, grad=_t(OUT, IN - 1, dtype=f32)),
         ValueError, "grad"),
        # shared: x / weight mismatch
        (lambda: lk.cur_linear(_t(3, IN - 1, dtype=f32), w, b, cols, rows, U), ValueError, "x"),
        (lambda: lk.deep_lora_linear(x.half(), w, b, fs), TypeError, "weight"),
    ]


N_BAD = len(_bad_cases())


@pytest.mark.parametrize("i", range(N_BAD))
def test_bad_inputs_raise_naming_the_argument(i):
    fn, exc, match = _bad_cases()[i]
    with pytest.raises(exc, match=match):
        fn()


def test_layers_compile_fullgraph():
    torch._dynamo.reset()
    lin = _linear()
    x = _t(5, IN, dtype=torch.float32)
    for name, layer in _layers(lin).items():
        perturb_(layer, 0.3)
        y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        params = [p for p in layer.parameters() if p.requires_grad]
        g = torch.autograd.grad(y.sum(), params)
        y2 = layer(x)
        g2 = torch.autograd.grad(y2.sum(), params)
        assert rel_err(y, y2) < 1e-6, name
        for a, b in zip(g, g2):
            assert rel_err(a, b) < 1e-6, name
