"""PEFT interoperability on a tiny randomly initialised transformers model (no downloads):
adapters made and saved by PEFT load here with PEFT's outputs, and adapters saved here load in
PEFT with our outputs. Bad files are refused clearly."""

import copy
import json
import math
import os

import pytest
import torch

import lora_kernels as lk

from conftest import DEVICE
from helpers import tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _ids(batch=3, length=7):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(2)).to(
        DEVICE)


@torch.no_grad()
def _merged(base, adapter):
    """The base model with ``W += s B A`` folded in (float64 math)."""
    m = copy.deepcopy(base)
    for name, (A, B, s) in adapter.items():
        lin = m.get_submodule(name)
        lin.weight.copy_((lin.weight.double() + s * (B.double() @ A.double()).to(DEVICE)).to(
            lin.weight.dtype))
    return m


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _peft_adapter(base, path, **cfg):
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=TARGETS, init_lora_weights=False, **cfg))
    pm.save_pretrained(path)
    return pm.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_load_adapter_saved_by_peft(base, tmp_path, use_rslora):
    pm = _peft_adapter(base, tmp_path, r=4, lora_alpha=8, use_rslora=use_rslora,
                       rank_pattern={"model.layers.1.self_attn.q_proj": 2},
                       alpha_pattern={"v_proj": 3})
    ad = lk.load_peft_adapter(tmp_path)
    peft_layers = {n[len("base_model.model."):]: m for n, m in pm.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(ad) == set(peft_layers) and len(ad) == 6
    for name, (A, B, s) in ad.items():
        layer = peft_layers[name]
        assert torch.equal(A, layer.lora_A["default"].weight.detach().cpu())
        assert torch.equal(B, layer.lora_B["default"].weight.detach().cpu())
        assert s == pytest.approx(layer.scaling["default"], rel=1e-12)
    r_q1 = ad["model.layers.1.self_attn.q_proj"][0].shape[0]
    assert r_q1 == 2
    s_v = ad["model.layers.0.self_attn.v_proj"][2]
    assert s_v == pytest.approx(3 / (math.sqrt(4) if use_rslora else 4))
    ids = _ids()
    with torch.no_grad():
        want = pm(ids).logits
        got = _merged(base, ad)(ids).logits
        plain = base(ids).logits
    assert _rel(got, want) < 1e-5
    assert _rel(plain, want) > 1e-3          # the adapter changes the outputs


def test_multi_adapter_model_serves_peft_files(base, tmp_path):
    pm = _peft_adapter(base, tmp_path / "a", r=4, lora_alpha=8)
    server = lk.MultiAdapterModel(copy.deepcopy(base), TARGETS, max_adapters=3, max_rank=8,
                                  backend="torch")
    server.load_peft("a", tmp_path / "a")
    ids = _ids(batch=2)
    with torch.no_grad():
        got = server(ids, adapters=["a", None]).logits
        want_a = pm(ids[:1]).logits
        want_base = base(ids[1:]).logits
    assert _rel(got[:1], want_a) < 1e-5
    assert _rel(got[1:], want_base) < 1e-6


def test_saved_here_loads_in_peft(base, tmp_path):
    model = copy.deepcopy(base)
    lk.inject(model, "lora", ["q_proj"], r=4, alpha=8)
    lk.inject(model, "lora", ["v_proj"], r=2, alpha=3)
    torch.manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lk.LoRALinear):
                m.lora_B.normal_(0, 0.5)
        model.get_submodule("model.layers.1.self_attn.q_proj").scaling = 0.37
    lk.save_peft_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] in (2, 4) and cfg["peft_type"] == "LORA"
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        got = pm(ids).logits
    assert _rel(got, want) < 1e-5
    assert _rel(base(ids).logits, want) > 1e-3
    for n, m in pm.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            ours = model.get_submodule(n[len("base_model.model."):])
            assert m.scaling["default"] == pytest.approx(ours.scaling, rel=1e-12)
    back = lk.load_peft_adapter(tmp_path)
    assert set(back) == {n for n, m in model.named_modules() if isinstance(m, lk.LoRALinear)}
    for name, (A, B, s) in back.items():
        layer = model.get_submodule(name)
        assert torch.equal(A, layer.lora_A.detach().cpu())
        assert torch.equal(B, layer.lora_B.detach().cpu())
        assert s == pytest.approx(layer.scaling, rel=1e-12)


def test_dict_roundtrip_dtype(tmp_path):
    # "a.q" overrides the default rank/alpha, and PEFT's pattern "a.q" also matches "b.a.q"
    ad = {"a.q": (torch.randn(3, 8), torch.randn(5, 3), 0.25),
          "b.a.q": (torch.randn(1, 8), torch.randn(5, 1), 2.0),
          "c.q": (torch.randn(1, 8), torch.randn(5, 1), 2.0)}
    lk.save_peft_adapter(ad, tmp_path, dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 1 and list(cfg["rank_pattern"]) == ["b.a.q", "a.q"]
    back = lk.load_peft_adapter(tmp_path)
    for k, (A, B, s) in ad.items():
        assert back[k][0].dtype == torch.bfloat16
        assert torch.equal(back[k][0], A.bfloat16()) and torch.equal(back[k][1], B.bfloat16())
        assert back[k][2] == pytest.approx(s)
    back32 = lk.load_peft_adapter(tmp_path, dtype=torch.float32)
    assert back32["a.q"][0].dtype == torch.float32


# ----------------------------------------------------------------------------- refusals
@pytest.fixture
def saved(tmp_path):
    ad = {"m.q": (torch.randn(2, 8), torch.randn(6, 2), 1.5)}
    lk.save_peft_adapter(ad, tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    fn = path / "adapter_config.json"
    cfg = json.loads(fn.read_text())
    cfg.update(changes)
    fn.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,match", [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"use_dora": True}, "use_dora"),
    ({"fan_in_fan_out": "yes"}, "fan_in_fan_out"),
    ({"bias": "some"}, "bias must be"),
    ({"lora_bias": "yes"}, "lora_bias must be"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"loftq_config": {"loftq_bits": 4}}, "loftq_config"),
    ({"brand_new_field": 1}, "brand_new_field"),
    ({"brand_new_field": "on", "other_new": None}, "brand_new_field"),
    ({"r": 0}, "r must"),
    ({"r": 3}, "rank 2 but the config says r=3"),
    ({"rank_pattern": {"q": 5}}, "rank 2 but the config says r=5"),
    ({"lora_alpha": "8"}, "lora_alpha"),
    ({"rank_pattern": [1]}, "rank_pattern"),
])
def test_bad_config_refused(saved, changes, match):
    _edit_config(saved, **changes)
    with pytest.raises(ValueError, match=match):
        lk.load_peft_adapter(saved)


def test_bad_files_refused(saved, tmp_path_factory, monkeypatch):
    from safetensors.torch import load_file, save_file

    # pickle weights are never opened
    d = tmp_path_factory.mktemp("pickle")
    (d / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(ValueError, match="pickle"):
        lk.load_peft_adapter(d)
    with pytest.raises(ValueError, match="adapter_config.json"):
        lk.load_peft_adapter(tmp_path_factory.mktemp("empty"))
    with pytest.raises(TypeError, match="path"):
        lk.load_peft_adapter(3)
    cfgfile = saved / "adapter_config.json"
    good_cfg = cfgfile.read_text()
    cfgfile.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        lk.load_peft_adapter(saved)
    cfgfile.write_text("[1, 2]")
    with pytest.raises(ValueError, match="object"):
        lk.load_peft_adapter(saved)
    cfgfile.write_text(good_cfg)
    wfile = saved / "adapter_model.safetensors"
    tensors = load_file(wfile)
    wfile.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="safetensors"):
        lk.load_peft_adapter(saved)
    for extra, match in [({"base_model.model.m.q.lora_magnitude_vector": torch.ones(6)}, "DoRA"),
                         ({"base_model.model.m.q.lora_B.bias": torch.ones(6)}, "bias"),
                         ({"base_model.model.emb.lora_embedding_A": torch.ones(2, 3)},
                          "embedding")]:
        save_file({**tensors, **extra}, wfile)
        with pytest.raises(ValueError, match=match):
            lk.load_peft_adapter(saved)
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, wfile)
    with pytest.raises(ValueError, match="lora_B"):
        lk.load_peft_adapter(saved)
    save_file({k: (v[:, :1].contiguous() if "lora_B" in k else v) for k, v in tensors.items()},
              wfile)
    with pytest.raises(ValueError, match="expected"):
        lk.load_peft_adapter(saved)
    os.remove(wfile)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        lk.load_peft_adapter(saved)


def test_save_refusals(tmp_path):
    with pytest.raises(TypeError, match="model_or_dict"):
        lk.save_peft_adapter(5, tmp_path)
    with pytest.raises(ValueError, match="empty"):
        lk.save_peft_adapter({}, tmp_path)
    with pytest.raises(ValueError, match="no adapter layers"):
        lk.save_peft_adapter(torch.nn.Linear(3, 4), tmp_path)
    with pytest.raises(ValueError, match="rank"):
        lk.save_peft_adapter({"q": (torch.randn(2, 4), torch.randn(3, 3), 1.0)}, tmp_path)
    with pytest.raises(TypeError, match="path"):
        lk.save_peft_adapter({"q": (torch.randn(2, 4), torch.randn(3, 2), 1.0)}, 7)
    assert not (tmp_path / "adapter_config.json").exists()


def test_unknown_unset_fields_accepted_with_one_warning(saved, recwarn):
    from lora_kernels import peft_io

    ref = lk.load_peft_adapter(saved)
    _edit_config(saved, fan_in_fan_out=True, future_a=None, future_b=[], future_c=False,
                 future_d={}, future_e="")
    peft_io._WARNED_UNKNOWN.clear()
    with pytest.warns(UserWarning, match="future_a") as w:
        got = lk.load_peft_adapter(saved)
    msg = str([str(x.message) for x in w])
    assert all(f"future_{c}" in msg for c in "abcde")
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k][0], ref[k][0]) and torch.equal(got[k][1], ref[k][1])
        assert got[k][2] == ref[k][2]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.load_peft_adapter(saved)  # named once per process: no second warning
