"""Quantized bases (lora_kernels.quant) and LoRA on them (ops.lora, ops.weights): formats against
float64 references of the dequantised weight and bit-exact against bitsandbytes; every backend
runnable here, forward and every gradient."""

import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels.quant import FP8Weight, Int8Weight, NF4Weight, quantize
from lora_kernels.reference import lora as ref
from lora_kernels.reference.quant import dequantize_ref

from conftest import DEVICE, DTYPES, backends
from helpers import assert_close, noncontig, randn, rel_err

FORMATS = {  # name -> builder from a dense (out, in) weight
    "nf4": lambda w: NF4Weight.from_float(w, 64),
    "nf4-dq32": lambda w: NF4Weight.from_float(w, 32, compress_statistics=True),
    "int8": Int8Weight.from_float,
    "fp8": FP8Weight.from_float,
    "fp8-block": lambda w: FP8Weight.from_float(w, block_size=128),
}
SHAPES = [(1, 97, 75, 1), (3, 61, 29, 7), (19, 130, 33, 16)]  # (T, in, out, r): in % 64 != 0


def _qinputs(T, i, o, r, dtype, fmt, bias=True):
    x = randn(T, i, dtype=dtype, requires_grad=True)
    qw = FORMATS[fmt](randn(o, i, scale=1 / math.sqrt(i)))
    b = randn(o, dtype=dtype) if bias else None
    a = randn(r, i, dtype=dtype, scale=1 / math.sqrt(i), requires_grad=True)
    bb = randn(o, r, dtype=dtype, scale=1 / math.sqrt(r), requires_grad=True)
    return x, qw, b, a, bb


def _check(x, qw, b, a, bb, s, backend, dtype, keep=None, p=0.0, y=None):
    """y and dx, dA, dB (and db) against float64 on the exact dequantised weight."""
    leaves = [t for t in (x, b, a, bb) if t is not None and t.requires_grad]
    d = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
         for t in (x, b, a, bb)]
    yr = ref.lora_linear(d[0], dequantize_ref(qw).to(DEVICE), d[1], d[2], d[3], s, keep=keep,
                         dropout_p=p)
    if y is None:
        y = lk.lora_linear(x, qw, b, a, bb, s, backend=backend)
    assert y.dtype == dtype and y.shape == yr.shape
    assert_close(y, yr, dtype, "y")
    gy = torch.randn_like(yr)
    got = torch.autograd.grad(y, leaves, gy.to(dtype))
    want = torch.autograd.grad(yr, [t for t in d if t is not None and t.requires_grad], gy)
    for g, gr, t in zip(got, want, leaves):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert_close(g, gr, dtype, f"grad {tuple(t.shape)}")


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", [(75, 97), (3, 5), (130, 257)])
def test_dequantize_matches_float64_reference(fmt, shape):
    w = randn(*shape)
    qw = FORMATS[fmt](w)
    assert qw.shape == shape and qw.device == DEVICE
    ref_w = dequantize_ref(qw)
    for dtype in DTYPES:
        d = qw.dequantize(dtype)
        assert d.dtype == dtype and d.shape == shape
        # fp32 dequantisation (code * scale in fp32) vs the exact float64 products
        assert_close(d, ref_w, dtype, f"{fmt} dequantize")
    # quantisation error is what the format promises (relative Frobenius error)
    err = rel_err(ref_w, w)
    assert err < {"nf4": 0.12, "nf4-dq32": 0.12, "int8": 0.01, "fp8": 0.05,
                  "fp8-block": 0.05}[fmt], err


def test_nbytes_and_layout():
    w = randn(64, 256)
    nf4 = NF4Weight.from_float(w, 64)
    assert nf4.packed.shape == (64 * 256 // 2, 1) and nf4.packed.dtype == torch.uint8
    assert nf4.nbytes == 64 * 256 // 2 + 4 * (64 * 256 // 64) + 16 * 4
    big = randn(256, 1024)  # large enough for the 256-entry code2 table to pay off
    dq = NF4Weight.from_float(big, 64, compress_statistics=True)
    assert dq.absmax.dtype == torch.uint8
    assert dq.nbytes < NF4Weight.from_float(big, 64).nbytes
    assert Int8Weight.from_float(w).nbytes == 64 * 256 + 64 * 4
    assert FP8Weight.from_float(w, 128).scale.shape == (1, 2)
    # element 2j in the high nibble, 2j+1 in the low one (bnb's order)
    q0 = nf4.packed[0, 0].item()
    d = nf4.dequantize()
    a0 = nf4.absmax[0].item()
    code = torch.tensor(lk.quant.NF4_CODE)
    assert d[0, 0].item() == pytest.approx(code[q0 >> 4].item() * a0)
    assert d[0, 1].item() == pytest.approx(code[q0 & 15].item() * a0)


def test_to_and_dtype_keep_codes():
    qw = NF4Weight.from_float(randn(8, 64), 64, compress_statistics=True)
    absmax2 = qw.absmax2.clone()
    m = torch.nn.Sequential()
    m.add_module("w", qw)
    m.to(torch.bfloat16)
    assert qw.dtype == torch.bfloat16 and qw.absmax2.dtype == torch.float32
    assert torch.equal(qw.absmax2, absmax2) and qw.dequantize().dtype == torch.bfloat16
    assert qw.to("cpu") is qw
    sd = m.state_dict()
    assert {"w.packed", "w.absmax", "w.absmax2", "w.code2", "w.offset"} <= set(sd)


@pytest.mark.parametrize("call, exc, match", [
    (lambda w: NF4Weight.from_float(w, 48), ValueError, "blocksize must be one of"),
    (lambda w: NF4Weight.from_float(w[0], 64), ValueError, "2-D"),
    (lambda w: NF4Weight.from_float(w.to(torch.int32), 64), TypeError, "float32"),
    (lambda w: FP8Weight.from_float(w, block_size=64), ValueError, "block_size must be"),
    (lambda w: quantize(w, "nf3"), ValueError, "quantize must be one of"),
    (lambda w: NF4Weight(torch.zeros(10, dtype=torch.uint8), torch.zeros(1), (4, 6), 64),
     ValueError, "packed must be uint8 with"),
    (lambda w: NF4Weight(torch.zeros(12, dtype=torch.uint8), torch.zeros(2), (4, 6), 64),
     ValueError, "absmax must be"),
    (lambda w: Int8Weight(torch.zeros(4, 6, dtype=torch.int8), torch.zeros(3)), ValueError,
     "scale must be float32 of shape"),
])
def test_bad_formats(call, exc, match):
    with pytest.raises(exc, match=match):
        call(randn(8, 64))


def test_fp8_needs_sm89(monkeypatch):
    """Checked when used on a CUDA device, never at import (capability faked here)."""
    from lora_kernels import quant

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        quant.check_fp8_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    quant.check_fp8_device(torch.device("cuda", 0))


# ----------------------------------------------------------------------------- bitsandbytes
@pytest.fixture
def _no_bnb_compile():
    """bitsandbytes wraps its portable kernels in torch.compile (seconds per new shape on CPU);
    eager gives the same values."""
    with torch._dynamo.config.patch(disable=True):
        yield


def _bnb():
    bnb = pytest.importorskip("bitsandbytes")  # the optional `quant` extra
    if DEVICE.type != "cpu":
        pytest.skip("bit-exactness is checked against bitsandbytes on CPU")
    return bnb


@pytest.mark.usefixtures("_no_bnb_compile")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 128), (37, 61), (3, 5)])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_bit_exact_with_bitsandbytes(dtype, shape, blocksize, nested):
    """Our quantisation gives bnb's packed bytes, absmax (fp32, or offset + absmax2 when nested)
    and our dequantisation of bnb's state gives bnb's dense weight, bit for bit."""
    bnb = _bnb()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    # bnb's portable dequantiser without its torch.compile wrapper (it recompiles per shape)
    _dequantize_4bit_compute = getattr(_dequantize_4bit_compute, "__wrapped__",
                                       _dequantize_4bit_compute)

    F = bnb.functional
    w = (torch.randn(shape) * 0.1).to(dtype)
    q, st = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                            compress_statistics=nested)
    ours = NF4Weight.from_float(w, blocksize, compress_statistics=nested)
    assert torch.equal(ours.packed, q)
    if not nested:
        assert torch.equal(ours.absmax, st.absmax)
    else:
        assert torch.equal(ours.offset, st.offset) and torch.equal(ours.code2, st.state2.code)
        assert torch.equal(ours.absmax2, st.state2.absmax)
        # the 8-bit absmax codes: bnb's native CPU kernel rounds some near-midpoint values to the
        # other neighbour (see quant._quantize_blockwise8); never more than one code step
        diff = (ours.absmax.int() - st.absmax.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.05
    # dequantisation of bnb's own state: exact
    theirs = NF4Weight.from_bnb(_params4bit(bnb, q, st))
    got = theirs.dequantize(dtype)
    absmax = (F.dequantize_blockwise(st.absmax, st.state2) + st.offset) if nested else st.absmax
    want = _dequantize_4bit_compute(q.reshape(-1), absmax, st.code, blocksize, st.shape, dtype)
    assert torch.equal(got, want)
    if blocksize <= shape[1]:
        # bnb's AVX512 CPU dequantiser is itself wrong when a block spans rows (blocksize > in;
        # it disagrees with bnb's portable implementation above), so compared where it is right
        assert torch.equal(got, F.dequantize_4bit(q, st))
    assert theirs.packed.data_ptr() == q.data_ptr()    # referenced, not copied


def _params4bit(bnb, q, st):
    return bnb.nn.Params4bit(q, requires_grad=False, quant_state=st, blocksize=st.blocksize,
                             compress_statistics=st.nested, quant_type="nf4",
                             bnb_quantized=True)


@pytest.mark.usefixtures("_no_bnb_compile")
def test_from_bnb_linear4bit_and_refusals():
    bnb = _bnb()
    lin = bnb.nn.Linear4bit(128, 20, bias=True, quant_type="nf4", compress_statistics=True)
    with pytest.raises(ValueError, match="never quantised"):
        NF4Weight.from_bnb(lin)
    lin = lin.to("cpu")
    qw = NF4Weight.from_bnb(lin)
    assert qw.shape == (20, 128) and qw.nested and qw.packed.data_ptr() == lin.weight.data_ptr()
    x = torch.randn(5, 128)
    assert torch.equal(torch.nn.functional.linear(x, qw.dequantize(), lin.bias),
                       torch.nn.functional.linear(
                           x, bnb.functional.dequantize_4bit(lin.weight, lin.weight.quant_state),
                           lin.bias))
    with pytest.raises(TypeError, match="Params4bit or Linear4bit"):
        NF4Weight.from_bnb(torch.nn.Linear(4, 4))
    fp4 = bnb.nn.Linear4bit(48, 20, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="quant_type='nf4'"):
        NF4Weight.from_bnb(fp4)


# ----------------------------------------------------------------------------- ops
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_qlora_forward_backward(backend, fmt, dtype):
    # every shape in fp32 for the two layouts with K tails inside blocks; one odd shape otherwise
    full = dtype == torch.float32 and fmt in ("nf4-dq32", "int8")
    for T, i, o, r in SHAPES if full else SHAPES[1:2]:
        x, qw, b, a, bb = _qinputs(T, i, o, r, dtype, fmt)
        b.requires_grad_()
        _check(x, qw, b, a, bb, 0.7, backend, dtype)


@pytest.mark.parametrize("backend", backends())
def test_qlora_noncontiguous_leading_dims_no_bias(backend):
    x, qw, _, a, bb = _qinputs(6, 61, 29, 4, torch.float32, "nf4-dq32", bias=False)
    xn = noncontig(x.detach()).requires_grad_()
    y = lk.lora_linear(xn.reshape(2, 3, 61), qw, None, a, bb, 0.5, backend=backend)
    assert y.shape == (2, 3, 29)
    _check(xn, qw, None, a, bb, 0.5, backend, torch.float32, y=y.reshape(6, 29))


@pytest.mark.parametrize("backend", backends())
def test_qlora_dropout(backend):
    from test_lora import _mask_of

    T, i, o, r, p, seed = 21, 24, 19, 3, 0.3, 99
    keep = _mask_of(backend, T, i, p, seed)   # the dense op's mask: the same counter and seed
    x, qw, b, a, bb = _qinputs(T, i, o, r, torch.float32, "int8")
    g = torch.Generator(device="cpu").manual_seed(seed)
    y = lk.lora_linear(x, qw, b, a, bb, 0.9, p, generator=g, backend=backend)
    _check(x, qw, b, a, bb, 0.9, backend, torch.float32, keep=keep, p=p, y=y)


@pytest.mark.skipif("triton" not in backends(), reason="needs Triton (interpreter on CPU)")
@pytest.mark.parametrize("fmt", ["nf4-dq32", "fp8-block"])
def test_split_k_decode_path(fmt):
    """The decode grid (K split over programs, partials summed by the epilogue kernel) on T=3,
    forward (x W^T with the low-rank epilogue) and the dX direction (dy W, dropout epilogue)."""
    from lora_kernels.ops.weights import qgemm

    T, i, o, r = 3, 200, 45, 5
    x, qw, b, a, bb = _qinputs(T, i, o, r, torch.float32, fmt)
    W = dequantize_ref(qw)
    s = torch.randn(T, r)
    for splits in (2, 3):
        y = qgemm(x.detach(), qw, trans_w=False, out_dtype=torch.float32, bias=b, s=s, bm=bb,
                  scale=0.5, splits=splits)
        yr = x.double() @ W.T + b.double() + 0.5 * s.double() @ bb.double().T
        assert_close(y, yr, torch.float32, f"split {splits}")
        dy = torch.randn(T, o)
        dx = qgemm(dy, qw, trans_w=True, out_dtype=torch.float32, splits=splits)
        assert_close(dx, dy.double() @ W, torch.float32, f"dx split {splits}")


def test_qlora_bad_input():
    x, qw, b, a, bb = _qinputs(3, 64, 20, 2, torch.float32, "nf4")
    with pytest.raises(ValueError, match="last dim in_features=64"):
        lk.lora_linear(torch.randn(3, 63), qw, b, a, bb)
    with pytest.raises(ValueError, match="bias must have shape"):
        lk.lora_linear(x, qw, torch.randn(21), a, bb)
    with pytest.raises(TypeError, match="torch.Tensor or a lora_kernels.quant"):
        lk.lora_linear(x, "w", b, a, bb)
    with pytest.raises(ValueError, match="lora_B must have shape"):
        lk.lora_linear(x, qw, b, a, bb[:5])
    qw_meta = Int8Weight(torch.zeros(20, 64, dtype=torch.int8, device="meta"),
                         torch.zeros(20, device="meta"))
    with pytest.raises(ValueError, match="must be on cpu"):
        lk.lora_linear(x, qw_meta, b, a, bb)


def aot_calls():
    """Representative Triton launches of the quantized-base kernels for the ahead-of-time compile
    (tests/cuda/test_triton_aot.py): every format, forward + backward (dX with the dropout
    epilogue), and the split-K decode grid with its epilogue kernel. FP8 launches are fp32 only
    (compiled for sm_90: sm_80 has no FP8 conversions)."""
    from lora_kernels.ops.weights import qgemm

    for fmt, dtype, split in (("nf4-dq32", torch.bfloat16, True), ("int8", torch.float32, False),
                              ("fp8-block", torch.float32, False)):
        x = torch.randn(5, 40, dtype=dtype, requires_grad=True)
        qw = FORMATS[fmt](torch.randn(24, 40))
        a = torch.randn(4, 40, dtype=dtype, requires_grad=True)
        bb = torch.randn(24, 4, dtype=dtype, requires_grad=True)
        g = torch.Generator().manual_seed(0)
        y = lk.lora_linear(x, qw, torch.randn(24, dtype=dtype), a, bb, 0.5, 0.1, generator=g,
                           backend="triton")
        y.sum().backward()
        if split:
            qgemm(x.detach(), qw, trans_w=False, out_dtype=dtype, s=torch.randn(5, 4),
                  bm=bb.detach(), splits=2)


def test_qlora_registered_op_and_compile():
    """The registered op (quantized weight passed as its tensors) passes opcheck, and a
    fullgraph torch.compile of lora_linear on an NF4 base gives the eager values and gradients."""
    from lora_kernels.ops.lora import QLORA_OP
    from lora_kernels.ops.weights import flatten

    x, qw, b, a, bb = _qinputs(3, 64, 20, 4, torch.float32, "nf4-dq32")
    ts, meta, fmt = flatten(qw)
    torch.library.opcheck(QLORA_OP.custom_op, (x, ts, meta, fmt, b, a, bb, 0.5, 0.0, None,
                                               "torch"))
    f = torch.compile(lambda x, a, bb: lk.lora_linear(x, qw, b, a, bb, 0.5, backend="torch"),
                      fullgraph=True)
    y = f(x, a, bb)
    ref = lk.lora_linear(x, qw, b, a, bb, 0.5, backend="torch")
    assert torch.equal(y, ref)
    g1 = torch.autograd.grad(y.sum(), (x, a, bb))
    g2 = torch.autograd.grad(ref.sum(), (x, a, bb))
    for u, v in zip(g1, g2):
        assert_close(u, v.double(), torch.float32)


@pytest.mark.parametrize("backend", backends())
def test_multi_lora_on_a_quantized_base(backend):
    """multi_lora_linear with an NF4 base: the quantized base GEMM plus the per-token adapter
    delta, forward and dx, against float64 on deq(W)."""
    pool = lk.AdapterPool(64, 40, 3, 8, device=DEVICE)
    pool.add("a", randn(3, 64), randn(40, 3), 0.5)
    pool.add("b", randn(5, 64), randn(40, 5), 2.0)
    qw = FORMATS["nf4-dq32"](randn(40, 64, scale=0.1))
    b = randn(40)
    x = randn(6, 64, requires_grad=True)
    ids = torch.tensor([0, 1, -1, 1, 0, -1], device=DEVICE)
    y = lk.multi_lora_linear(x, qw, b, pool, ids, backend=backend)
    W = dequantize_ref(qw).to(DEVICE)
    xd = x.detach().double().requires_grad_()
    yr = lk.multi_lora_linear(xd.float(), None, None, pool, ids, backend="torch").double()
    yr = yr + xd @ W.T + b.double()
    assert_close(y, yr.detach(), torch.float32, "y")
    gy = torch.randn_like(yr)
    (dx,) = torch.autograd.grad(y, (x,), gy.float())
    assert_close(dx, torch.autograd.grad(yr, (xd,), gy)[0], torch.float32, "dx")
