"""patch_peft / unpatch_peft (issue 13): PEFT's LoRA layers run on the fused op, in place, sharing
PEFT's parameters; a patched PEFT model trains step for step like the unpatched one (plain loop and
transformers' Trainer), for Llama- and GPT-2-shaped tiny models (no downloads)."""

import copy
import warnings

import pytest
import torch

import lora_kernels as lk
import lora_kernels.ops.lora as lora_ops

from conftest import DEVICE
from helpers import (
    assert_same_adapter_files,
    rel_err,
    tiny_gpt2,
    tiny_llama,
    token_ids,
    train_adamw,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA_T = ["q_proj", "v_proj", "down_proj"]
GPT2_T = ["c_attn", "c_proj"]


def _model(kind, **cfg):
    base = tiny_llama() if kind == "llama" else tiny_gpt2()
    t = LLAMA_T if kind == "llama" else GPT2_T
    torch.manual_seed(7)
    pm = peft.get_peft_model(base, peft.LoraConfig(target_modules=t, r=4, lora_alpha=8,
                                                   fan_in_fan_out=kind == "gpt2", **cfg))
    return pm


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the fused op made by patched layers."""
    n = {"fused": 0}
    real = lora_ops.lora_linear

    def counting(*a, **k):
        n["fused"] += 1
        return real(*a, **k)

    monkeypatch.setattr(lora_ops, "lora_linear", counting)
    return n


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_patched_trains_like_unpatched(kind, tmp_path, calls):
    ref = _model(kind, lora_dropout=0.0, use_rslora=kind == "gpt2").train()
    pat = copy.deepcopy(ref)
    assert lk.patch_peft(pat) is pat
    n_layers = sum(lk.peft_patch.is_patched(m) for m in pat.modules())
    assert n_layers == 6
    losses = {}
    for name, m in (("ref", ref), ("pat", pat)):
        losses[name] = train_adamw(m, steps=4)
        m.save_pretrained(tmp_path / name)
    assert calls["fused"] == 4 * n_layers  # every patched layer ran fused in every step
    for a, b in zip(losses["ref"], losses["pat"]):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert losses["pat"][2] < losses["pat"][0]  # same batch, two steps later: it learns
    sa, sb = ref.state_dict(), pat.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if "lora_" in k:
            assert rel_err(sb[k], sa[k]) < 1e-5, k
    assert_same_adapter_files(tmp_path / "ref", tmp_path / "pat")


def test_patched_trains_like_unpatched_with_trainer(tmp_path, calls):
    from torch.utils.data import Dataset

    class Toy(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = token_ids(1, 9, seed=100 + i)[0].cpu()
            return {"input_ids": ids, "labels": ids}

    logs, models = {}, {}
    for name in ("ref", "pat"):
        m = _model("gpt2", lora_dropout=0.0)
        if name == "pat":
            lk.patch_peft(m)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"out_{name}"), max_steps=3, per_device_train_batch_size=4,
            learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
            seed=11, data_seed=11, dataloader_num_workers=0, disable_tqdm=True)
        tr = transformers.Trainer(model=m, args=args, train_dataset=Toy())
        tr.train()
        logs[name] = [h["loss"] for h in tr.state.log_history if "loss" in h]
        m.save_pretrained(tmp_path / name)
        models[name] = m
    assert len(logs["ref"]) == 3 and calls["fused"] > 0
    for a, b in zip(logs["ref"], logs["pat"]):
        assert abs(a - b) <= 1e-5 * abs(a), (logs["ref"], logs["pat"])
    assert_same_adapter_files(tmp_path / "ref", tmp_path / "pat")


def test_adapter_state_respected(calls):
    pm = _model("llama", init_lora_weights=False).eval()
    pm.add_adapter("second", peft.LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=3,
                                             use_rslora=True, init_lora_weights=False))
    ref = copy.deepcopy(pm)
    lk.patch_peft(pm)
    ids = token_ids(4, 9)

    def both(fn):
        with torch.no_grad():
            return fn(pm), fn(ref)

    a, b = both(lambda m: m(ids).logits)
    assert rel_err(a, b) < 1e-5 and calls["fused"] > 0
    with pm.disable_adapter(), ref.disable_adapter():
        a, b = both(lambda m: m(ids).logits)
        base = tiny_llama()
        with torch.no_grad():
            assert torch.equal(a, base(ids).logits)
    for adapter in ("second", "default"):
        pm.set_adapter(adapter)
        ref.set_adapter(adapter)
        a, b = both(lambda m: m(ids).logits)
        assert rel_err(a, b) < 1e-5, adapter
    # two adapters active at once (PEFT's base_model.set_adapter with a list)
    pm.base_model.set_adapter(["default", "second"])
    ref.base_model.set_adapter(["default", "second"])
    a, b = both(lambda m: m(ids).logits)
    assert rel_err(a, b) < 1e-5
    # merged state and PEFT's merge_and_unload on a patched model
    pm.set_adapter("default")
    ref.set_adapter("default")
    pm.merge_adapter()
    ref.merge_adapter()
    a, b = both(lambda m: m(ids).logits)
    assert rel_err(a, b) < 1e-5
    pm.unmerge_adapter()
    ref.unmerge_adapter()
    a, b = both(lambda m: m.merge_and_unload()(ids).logits)
    assert rel_err(a, b) < 1e-5


def test_dropout_fused_in_training_only(calls, monkeypatch):
    pm = _model("gpt2", lora_dropout=0.3, init_lora_weights=False)
    ref = copy.deepcopy(pm).eval()
    lk.patch_peft(pm)
    seen = []
    real = lora_ops.lora_linear
    monkeypatch.setattr(lora_ops, "lora_linear",
                        lambda *a, **k: seen.append(a[6]) or real(*a, **k))
    ids = token_ids(4, 9)
    pm.train()
    with torch.no_grad():
        y_train = pm(ids).logits
    assert set(seen) == {0.3}
    pm.eval()
    seen.clear()
    with torch.no_grad():
        y_eval = pm(ids).logits
        assert set(seen) == {0.0}
        assert rel_err(y_eval, ref(ids).logits) < 1e-5
    assert rel_err(y_train, y_eval) > 1e-3  # the dropout acted


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dora_patched_trains_like_unpatched(kind, calls, monkeypatch):
    import lora_kernels.ops.dora as dora_ops

    n = {"dora": 0}
    real = dora_ops.dora_linear
    monkeypatch.setattr(dora_ops, "dora_linear",
                        lambda *a, **k: n.__setitem__("dora", n["dora"] + 1) or real(*a, **k))
    ref = _model(kind, use_dora=True, lora_dropout=0.0, init_lora_weights=False).train()
    pat = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DoRA is fused: nothing left to PEFT, no warning
        lk.patch_peft(pat)
    losses = {}
    for name, m in (("ref", ref), ("pat", pat)):
        losses[name] = train_adamw(m, steps=3)
    assert n["dora"] == 3 * 6 and calls["fused"] == 0
    for a, b in zip(losses["ref"], losses["pat"]):
        assert abs(a - b) <= 1e-5 * abs(a), (losses["ref"], losses["pat"])
    sa, sb = ref.state_dict(), pat.state_dict()
    for k in sa:
        # lora_A, lora_B and the DoRA magnitudes all trained alike. AdamW normalises each
        # element's step, so fp32 rounding in near-zero gradient elements becomes a step-sized
        # difference: 1.47e-5 measured on GPT-2's c_proj lora_A on an Intel Xeon (AMX box; the
        # same code on AMD stays under 1e-5, so CPU GEMM summation order); losses stay at 1e-5.
        if "lora_" in k:
            assert rel_err(sb[k], sa[k]) < 5e-5, k
    assert any("lora_magnitude_vector" in k for k in sa)


def test_dora_with_dropout_eval_and_multi_adapter_fallback():
    pm = _model("llama", use_dora=True, lora_dropout=0.2, init_lora_weights=False)
    pm.add_adapter("plain", peft.LoraConfig(target_modules=["q_proj"], r=2,
                                            init_lora_weights=False))
    ref = copy.deepcopy(pm).eval()
    lk.patch_peft(pm)
    pm.eval()
    ids = token_ids(4, 9)
    with torch.no_grad():
        assert rel_err(pm(ids).logits, ref(ids).logits) < 1e-5
        # DoRA together with another active adapter: PEFT's own forward (same result)
        pm.base_model.set_adapter(["default", "plain"])
        ref.base_model.set_adapter(["default", "plain"])
        assert rel_err(pm(ids).logits, ref(ids).logits) < 1e-5


def test_unfusable_left_to_peft_with_one_warning():
    base = tiny_llama()
    torch.manual_seed(1)
    pm = peft.get_peft_model(base, peft.LoraConfig(
        target_modules=["q_proj", "embed_tokens"], r=2, use_dora=False,
        init_lora_weights=False)).eval()
    pm.add_adapter("d", peft.LoraConfig(target_modules=["q_proj"], r=2,
                                        init_lora_weights="mica"))
    ref = copy.deepcopy(pm)
    with pytest.warns(UserWarning, match="patch_peft") as w:
        lk.patch_peft(pm)
    assert len(w) == 1
    msg = str(w[0].message)
    assert "'d'" in msg and "embed_tokens" not in msg  # MiCA variant: PEFT's; embeddings fused
    assert lk.peft_patch.is_patched(pm.base_model.model.model.embed_tokens)
    ids = token_ids(4, 9)
    for adapter in ("default", "d"):
        pm.set_adapter(adapter)
        ref.set_adapter(adapter)
        with torch.no_grad():
            assert rel_err(pm(ids).logits, ref(ids).logits) < 1e-5, adapter


def test_unpatch_restores_and_refusals():
    pm = _model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: every LoRA layer fusable
        lk.patch_peft(pm)
        lk.patch_peft(pm, backend="torch")  # twice: harmless
    layers = [m for m in pm.modules() if lk.peft_patch.is_patched(m)]
    assert len(layers) == 6 and all(m._lora_kernels_backend == "torch" for m in layers)
    assert lk.unpatch_peft(pm) is pm
    assert not any("forward" in m.__dict__ for m in pm.modules())
    with pytest.raises(ValueError, match="no layer patched"):
        lk.unpatch_peft(pm)
    with pytest.raises(ValueError, match="no PEFT LoRA Linear"):
        lk.patch_peft(tiny_llama())
    with pytest.raises(TypeError, match="peft_model"):
        lk.patch_peft("model")
    with pytest.raises(ValueError, match="backend"):
        lk.patch_peft(pm, backend="tpu")
    assert not any(lk.peft_patch.is_patched(m) for m in pm.modules())


def test_patched_triton_backend_interpreter():
    if not lk.triton_available():
        pytest.skip("triton backend unavailable on this device (CPU without TRITON_INTERPRET=1)")
    pm = _model("gpt2", init_lora_weights=False).eval()
    ref = copy.deepcopy(pm)
    lk.patch_peft(pm, backend="triton")
    ids = token_ids(2, 5)
    with torch.no_grad():
        assert rel_err(pm(ids).logits, ref(ids).logits) < 1e-5


def test_qlora_bnb_nf4_base_patched_trains_like_unpatched(calls):
    """PEFT LoRA over a bitsandbytes NF4 Linear4bit (CPU): the patched layer reads the packed
    codes through NF4Weight.from_bnb and trains like PEFT's own QLoRA forward."""
    bnb = pytest.importorskip("bitsandbytes")
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q = bnb.nn.Linear4bit(64, 48, bias=True, quant_type="nf4",
                                       compute_dtype=torch.float32)
            self.q.load_state_dict(nn.Linear(64, 48).state_dict())
            self.q = self.q.to(DEVICE)  # bitsandbytes quantises on the move to a device
            self.o = nn.Linear(48, 8).to(DEVICE)

        def forward(self, x):
            return self.o(torch.tanh(self.q(x)))

    torch.manual_seed(1)
    ref = peft.get_peft_model(Tiny(), peft.LoraConfig(target_modules=["q"], r=4, lora_alpha=8,
                                                      init_lora_weights=False)).train()
    pat = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the 4-bit layer is fused: nothing left to PEFT
        lk.patch_peft(pat)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(5, 64, generator=g).to(DEVICE), torch.randn(5, 8, generator=g).to(DEVICE))
            for _ in range(3)]
    losses = {}
    for name, m in (("ref", ref), ("pat", pat)):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for x, t in data:
            loss = ((m(x) - t) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert calls["fused"] == 3
    for a, b in zip(losses["ref"], losses["pat"]):
        assert abs(a - b) <= 1e-5 * abs(a), (losses["ref"], losses["pat"])
    for k, v in ref.state_dict().items():
        if "lora_" in k:
            assert rel_err(pat.state_dict()[k], v) < 1e-5, k
