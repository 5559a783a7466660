"""Everything a server runs under ``torch.inference_mode()``: tensors created there have no version
counter, so the package's host-side caches (batch plans, id checks, slot tables, DoRA norms, CUR
index checks) must recompute instead of caching -- and still validate every call."""

import copy
import math

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.reference import serving as ref

from helpers import assert_close, tiny_llama

IN, OUT = 37, 29


def _pool_and_refs():
    pool = lk.AdapterPool(IN, OUT, 40, 8)
    ads = {}
    for j in range(40):
        r = j % 8 + 1
        a, b = torch.randn(r, IN) / math.sqrt(IN), torch.randn(OUT, r)
        ads[pool.add(f"a{j}", a, b, 0.5)] = (a.double(), b.double(), 0.5)
    return pool, ads


@pytest.mark.parametrize("T,order", [(5, "random"), (400, "sorted"), (90, "random")])
def test_multi_lora_under_inference_mode(T, order):
    """dense (decode), runs (sorted prefill) and sorted (fragmented over many slots) strategies,
    with the pool, ids and inputs all created under inference mode; ids edited in place between
    calls are re-checked (no cached answer)."""
    with torch.inference_mode():
        pool, ads = _pool_and_refs()
        ids = torch.randint(-1, 40, (T,), generator=torch.Generator().manual_seed(T))
        if order == "sorted":
            ids = ids.sort().values
        x, w = torch.randn(T, IN), torch.randn(OUT, IN)
        assert ids.is_inference() and pool.scalings.is_inference()
        for _ in range(2):
            y = lk.multi_lora_linear(x, w, None, pool, ids)
            assert_close(y, ref.multi_lora_linear(x.double(), w.double(), None, ads, ids),
                         torch.float32)
        ids[0] = 40                                   # out of range, written in place
        with pytest.raises(ValueError, match="adapter_ids"):
            lk.multi_lora_linear(x, w, None, pool, ids)
        ids[0] = -1
        pool.remove("a3")
        ids[1] = 3                                    # names the freed slot
        with pytest.raises(ValueError, match="adapter_ids"):
            lk.multi_lora_linear(x, w, None, pool, ids)


def test_served_model_under_inference_mode():
    base = tiny_llama()
    server = lk.MultiAdapterModel(copy.deepcopy(base), ["q_proj", "v_proj"], max_adapters=2,
                                  max_rank=4)
    g = torch.Generator().manual_seed(0)
    ad = {n: (torch.randn(4, m.in_features, generator=g) * 0.1,
              torch.randn(m.out_features, 4, generator=g) * 0.1, 1.0)
          for n, m in base.named_modules()
          if isinstance(m, nn.Linear) and n.split(".")[-1] in ("q_proj", "v_proj")}
    server.add("a", ad)
    ids = torch.randint(0, 64, (3, 5), generator=g)
    with torch.no_grad():
        want = server(ids, adapters=["a", None, "a"]).logits
    with torch.inference_mode():
        for _ in range(2):
            got = server(ids.clone(), adapters=["a", None, "a"]).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)


def test_layers_with_inference_weights():
    """DoRA's cached ||W||^2 and CURLoRA's index check on weights created in inference mode; a
    weight changed in place there is seen on the next call (no stale cache)."""
    with torch.inference_mode():
        lin = nn.Linear(IN, OUT)
        x = torch.randn(6, IN)
        dora = lk.DoRALinear.from_linear(lin, r=4)
        y0 = dora(x)
        dora.weight.copy_(torch.randn_like(dora.weight))    # a new direction and norm
        y1 = dora(x)
        fresh = lk.DoRALinear.from_linear(copy.deepcopy(lin), r=4)
        fresh.load_state_dict(dora.state_dict())
        assert torch.allclose(y1, fresh(x), atol=1e-6) and not torch.allclose(y0, y1)
        cur = lk.CURLoRALinear.from_linear(nn.Linear(IN, OUT), rank=3)
        cur(x)
        cur.col_idx[0] = IN + 5                       # out of range, written in place
        with pytest.raises(ValueError):
            cur(x)
