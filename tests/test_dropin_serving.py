"""Serving drop-in (issue 13): GPT-2 (transformers Conv1D) adapters made by PEFT served by
MultiAdapterModel, summed adapters served, and ``server.unload()`` giving the plain model back."""

import copy

import pytest
import torch

import lora_kernels as lk

from conftest import DEVICE
from helpers import rel_err, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

GPT2_T = ["c_attn", "c_proj"]


def _ids(batch=3, length=7):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(2)).to(
        DEVICE)


def _peft_gpt2(base, path, seed, **cfg):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=GPT2_T, fan_in_fan_out=True, init_lora_weights=False, **cfg))
    pm.save_pretrained(path)
    return pm.eval()


def test_gpt2_peft_adapters_served_mixed_batch_and_summed(tmp_path):
    base = tiny_gpt2()
    pa = _peft_gpt2(base, tmp_path / "a", 3, r=4, lora_alpha=64)
    pb = _peft_gpt2(base, tmp_path / "b", 4, r=2, lora_alpha=8, use_rslora=True)
    ids = _ids()
    with torch.no_grad():
        want = [pa(ids).logits, base(ids).logits, pb(ids).logits]
    server = lk.MultiAdapterModel(copy.deepcopy(base), GPT2_T, max_adapters=4, max_rank=8)
    server.load_peft("a", tmp_path / "a")
    server.load_peft("b", tmp_path / "b")
    with torch.no_grad():
        got = server(ids, adapters=["a", None, "b"]).logits
    for i in range(3):
        assert rel_err(got[i], want[i][i]) < 1e-5, i
    # a served sum equals the exact sum injected as one LoRA
    server.add_sum("a+b", ["a", "b"])
    summed = lk.sum_adapters([lk.load_peft_adapter(tmp_path / "a"),
                              lk.load_peft_adapter(tmp_path / "b")])
    ref = lk.inject_adapter(copy.deepcopy(base), summed)
    with torch.no_grad():
        assert rel_err(server(ids, adapters=["a+b"] * 3).logits, ref(ids).logits) < 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_unload_gives_back_the_original_model(kind):
    model = tiny_gpt2() if kind == "gpt2" else tiny_llama()
    targets = GPT2_T if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    original = copy.deepcopy(model)
    modules = dict(model.named_modules())
    ids = _ids()
    server = lk.MultiAdapterModel(model, targets, max_adapters=2, max_rank=4)
    names = server.module_names
    g = torch.Generator().manual_seed(0)
    ad = {}
    for n in names:
        w = modules[n].weight
        in_f, out_f = (w.shape[0], w.shape[1]) if isinstance(modules[n], Conv1D) else (
            w.shape[1], w.shape[0])
        ad[n] = (torch.randn(3, in_f, generator=g), torch.randn(out_f, 3, generator=g), 0.5)
    server.add("x", ad)
    with torch.no_grad():
        assert rel_err(server(ids, adapters=["x"] * 3).logits, original(ids).logits) > 1e-3
    plain = server.unload()
    assert plain is model
    # the very modules it replaced, untouched: same objects, same state, same outputs
    for n in names:
        assert plain.get_submodule(n) is modules[n]
    assert not any(type(m).__name__ == "ServingLinear" for m in plain.modules())
    sd, ref_sd = plain.state_dict(), original.state_dict()
    assert sd.keys() == ref_sd.keys()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, original(ids).logits)
    with pytest.raises(ValueError, match="unload"):
        server(ids, adapters=["x"] * 3)
    with pytest.raises(ValueError, match="unload"):
        server.add("y", ad)
    with pytest.raises(ValueError, match="unload"):
        server.unload()
    with pytest.raises(ValueError, match="unload"):
        "x" in server  # noqa: B015
    with pytest.raises(ValueError, match="unload"):
        server.adapters()
