"""Adapter composition against dense float64 formulas."""

import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels.reference import serving as ref

from conftest import DEVICE


def _lora(r, i=53, o=41, s=0.7, dtype=torch.float64):
    return (torch.randn(r, i, dtype=dtype, device=DEVICE),
            torch.randn(o, r, dtype=dtype, device=DEVICE), s)


def _dense(ad):
    A, B, s = ad
    return ref.delta(A.double().cpu(), B.double().cpu(), s)


def test_sum_loras_is_exact():
    ads = [_lora(1, s=0.5), _lora(7, s=-2.0), _lora(3, s=1.25)]
    A, B, s = lk.sum_loras(ads)
    assert A.shape == (11, 53) and B.shape == (41, 11) and s == 1.0
    dense = sum(_dense(a) for a in ads)
    err = ((_dense((A, B, s)) - dense).norm() / dense.norm()).item()
    assert err < 1e-14
    # single adapter: scaling folded into B
    A1, B1, s1 = lk.sum_loras([ads[1]])
    assert torch.allclose(_dense((A1, B1, s1)), _dense(ads[1]), rtol=1e-14, atol=0)


def test_sum_loras_low_precision_and_promotion():
    a = _lora(4, dtype=torch.bfloat16, s=0.5)
    b = _lora(2, dtype=torch.float32, s=3.0)
    A, B, s = lk.sum_loras([a, b])
    assert A.dtype == torch.float32 and B.dtype == torch.float32
    dense = _dense(a) + _dense(b)
    assert ((_dense((A, B, s)) - dense).norm() / dense.norm()).item() < 1e-6


@pytest.mark.parametrize("bad,exc,match", [
    ([], TypeError, "adapters"),
    ("ab", TypeError, "adapters"),
    ([(torch.randn(2, 5), torch.randn(4, 3), 1.0)], ValueError, "rank"),
    ([(torch.randn(2, 5), torch.randn(4, 2), 1.0), (torch.randn(2, 6), torch.randn(4, 2), 1.0)],
     ValueError, r"adapters\[1\]"),
    ([(torch.randn(2, 5), torch.randn(4, 2))], TypeError, r"adapters\[0\]"),
    ([(torch.randn(2, 5), torch.randn(4, 2), "x")], TypeError, "scaling"),
    ([(torch.randn(2, 5).long(), torch.randn(4, 2), 1.0)], TypeError, "lora_A"),
])
def test_sum_loras_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        lk.sum_loras(bad)


def test_lora_cosine_matches_dense():
    a, b = _lora(5, s=0.3), _lora(9, s=-1.7)
    c = ref.cosine(_dense(a), _dense(b))
    assert abs(lk.lora_cosine(a, b) - c) < 1e-12
    # correlated pair: a non-trivial cosine
    A, B, s = a
    b2 = (torch.cat([A, torch.randn(2, 53, dtype=A.dtype, device=DEVICE)]),
          torch.cat([B, 0.3 * torch.randn(41, 2, dtype=B.dtype, device=DEVICE)], 1), 0.9)
    c2 = ref.cosine(_dense(a), _dense(b2))
    assert c2 > 0.5
    assert abs(lk.lora_cosine(a, b2) - c2) < 1e-12
    assert abs(lk.lora_cosine(a, a) - 1.0) < 1e-12
    assert abs(lk.lora_cosine(a, (A, B, -s)) + 1.0) < 1e-12
    zero = (A, torch.zeros_like(B), 1.0)
    assert lk.lora_cosine(a, zero) == 0.0


def test_lora_cosine_never_forms_dense_delta():
    # 300k x 300k float64 would be 720 GB: only r x r products can answer this
    n = 300_000
    A1 = torch.randn(2, n, dtype=torch.float64, device=DEVICE)
    B1 = torch.randn(n, 2, dtype=torch.float64, device=DEVICE)
    A2 = torch.cat([A1[:1], torch.randn(1, n, dtype=torch.float64, device=DEVICE)])
    B2 = torch.cat([B1[:, :1], torch.randn(n, 1, dtype=torch.float64, device=DEVICE)], 1)
    c = lk.lora_cosine((A1, B1, 1.0), (A2, B2, 2.0))
    # the rank-1 components are shared, the others are nearly orthogonal random vectors
    x1, y1 = B1[:, 0].norm() * A1[0].norm(), B1[:, 1].norm() * A1[1].norm()
    y2 = B2[:, 1].norm() * A2[1].norm()
    expect = (x1 ** 2 / torch.sqrt((x1 ** 2 + y1 ** 2) * (x1 ** 2 + y2 ** 2))).item()
    assert abs(c - expect) < 0.02


def test_rms_cosine_over_shared_modules():
    m1 = {"q": _lora(3), "v": _lora(2), "only1": _lora(1)}
    m2 = {"q": _lora(4), "v": (m1["v"][0], m1["v"][1], 0.1), "only2": _lora(2)}
    cq = ref.cosine(_dense(m1["q"]), _dense(m2["q"]))
    expect = math.sqrt((cq ** 2 + 1.0) / 2)
    assert abs(lk.rms_cosine(m1, m2) - expect) < 1e-12
    with pytest.raises(ValueError, match="share no module"):
        lk.rms_cosine({"a": _lora(1)}, {"b": _lora(1)})
    with pytest.raises(TypeError, match="adapter2"):
        lk.rms_cosine(m1, [m2])
    with pytest.raises(ValueError, match="features"):
        lk.lora_cosine(_lora(2, i=5), _lora(2, i=6))


def test_sum_adapters_modulewise():
    m1 = {"q": _lora(3, s=0.5), "v": _lora(2)}
    m2 = {"q": _lora(1, s=2.0), "k": _lora(2)}
    out = lk.sum_adapters([m1, m2])
    assert set(out) == {"q", "v", "k"}
    assert torch.allclose(_dense(out["q"]), _dense(m1["q"]) + _dense(m2["q"]), rtol=1e-12)
    assert torch.allclose(_dense(out["k"]), _dense(m2["k"]), rtol=1e-12)
    assert out["q"][0].shape[0] == 4
