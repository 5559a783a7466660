"""PEFT trainable tokens, modules_to_save and aLoRA (issue 23) on tiny Llama (tied lm_head),
Qwen2 and GPT-2 models: PEFT-made adapters load and serve in mixed batches (mixed with plain
LoRA adapters and the base model, which PEFT's own mixed batch refuses) equal to each adapter's
PEFT model (logits and greedy generate); files both ways; training step for step like PEFT
(inject_adapter and patch_peft); bad ids / invocation sequences refused, nothing changed."""

import copy
import json
import warnings

import pytest
import torch

import lora_kernels as lk

from conftest import DEVICE
from helpers import random_peft, rel_err, save_peft, snapshot, tiny_causal_lm, train_adamw

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

INV = [7, 8]


def _config(kind, what):
    q, v = ("c_attn", "c_proj") if kind == "gpt2" else ("q_proj", "v_proj")
    kw = {"tt": dict(target_modules=[q], trainable_token_indices=[3, 5, 60]),
          "mts": dict(target_modules=[v], modules_to_save=[
              "lm_head", "ln_f" if kind == "gpt2" else "norm"]),
          "alora": dict(target_modules=[q, v], alora_invocation_tokens=INV,
                        task_type="CAUSAL_LM"),
          "plain": dict(target_modules=[v])}[what]
    return peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=kind == "gpt2", **kw)


def _peft(base, kind, what, seed):
    return random_peft(base, _config(kind, what), seed, scale=0.3, add=True, select=lambda n, p: (
        "lora_" in n or "trainable_tokens_delta" in n or "modules_to_save" in n))


def _ids():
    """Rows: tokens 3 / 5 / 60 (trainable) present; row 3 holds the invocation twice (the
    last one counts), row 5 none (its aLoRA stays off), row 0 once."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(9, 64, (6, 9), generator=g)
    ids[:, 1], ids[0, 4], ids[2, 0] = 3, 60, 5
    ids[0, 6:8] = torch.tensor(INV)
    ids[3, 2:4] = torch.tensor(INV)
    ids[3, 5:7] = torch.tensor(INV)
    return ids.to(DEVICE)


KINDS = ["llama_tied", "qwen2", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_served_in_mixed_batch_like_each_peft_model(kind, tmp_path):
    base = tiny_causal_lm(kind)
    whats = ["tt", "mts", "alora", "plain"]
    pms = {w: _peft(base, kind, w, seed=10 + i) for i, w in enumerate(whats)}
    q, v = ("c_attn", "c_proj") if kind == "gpt2" else ("q_proj", "v_proj")
    srv = lk.MultiAdapterModel(copy.deepcopy(base), target_modules=[q, v], max_rank=8)
    for w, pm in pms.items():
        srv.load_peft(w, save_peft(pm, tmp_path / w))
    assert srv.store.extra_bytes("mts") > 64 * 32 * 4 and srv.store.extra_bytes("plain") == 0
    names = ["alora", "tt", None, "alora", "mts", "alora"]
    ids = _ids()
    with torch.no_grad():
        out = srv(ids, adapters=names).logits
        for b, n in enumerate(names):
            ref = (pms[n] if n else base)(ids[b:b + 1]).logits
            assert rel_err(out[b:b + 1], ref) < 1e-5, (kind, b, n)
            if n and b != 5:
                assert rel_err(base(ids[b:b + 1]).logits, ref) > 1e-3, (b, n)  # it matters
        # aLoRA: row 3's adapter starts at its last invocation (position 5), row 5 has none
        ref3 = pms["alora"](ids[3:4]).logits
        assert rel_err(base(ids[3:4]).logits[:, :5], ref3[:, :5]) < 1e-5
        assert rel_err(out[5:6], base(ids[5:6]).logits) < 1e-6
        gen = srv.generate(ids, adapters=names, max_new_tokens=4, do_sample=False,
                           pad_token_id=0)
        for b, n in enumerate(names):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = (pms[n] if n else base).generate(input_ids=ids[b:b + 1], max_new_tokens=4,
                                                       do_sample=False, pad_token_id=0)
            assert torch.equal(gen[b:b + 1], ref), (kind, b, n)
    with pytest.raises(ValueError, match="input_ids"):    # aLoRA needs the tokens
        with srv.using(names):
            pass
    srv.remove("mts")
    assert srv.store.extra_bytes() == srv.store.extra_bytes("tt") > 0
    model = srv.unload()
    assert type(model.lm_head) is torch.nn.Linear and not any(
        "Serving" in type(m).__name__ for m in model.modules())


def test_files_both_ways(tmp_path):
    base = tiny_causal_lm("llama_tied")
    ids = _ids()
    for what in ("tt", "mts", "alora"):
        pm = _peft(base, "llama_tied", what, seed=4)
        ad = lk.load_peft_adapter(save_peft(pm, tmp_path / what))
        lk.save_peft_adapter(ad, tmp_path / f"{what}_ours")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = peft.PeftModel.from_pretrained(copy.deepcopy(base),
                                                  str(tmp_path / f"{what}_ours")).eval()
        with torch.no_grad():
            assert rel_err(back(ids).logits, pm(ids).logits) < 1e-6, what
        again = lk.load_peft_adapter(tmp_path / f"{what}_ours")
        assert again.alora_invocation_tokens == ad.alora_invocation_tokens
        assert set(again.trainable_tokens) == set(ad.trainable_tokens)
        assert set(again.modules_to_save) == set(ad.modules_to_save)


def test_memory_limit_and_bad_input_refused(tmp_path):
    base = tiny_causal_lm("llama_tied")
    path = save_peft(_peft(base, "llama_tied", "mts", seed=1), tmp_path / "m")
    srv = lk.MultiAdapterModel(copy.deepcopy(base), target_modules=["v_proj"],
                               max_extra_bytes=1000)
    before = snapshot(srv)
    with pytest.raises(ValueError, match="max_extra_bytes=1000"):
        srv.load_peft("m", path)
    assert snapshot(srv) == before and srv.adapters() == []
    # token ids out of the vocabulary; an invocation sequence longer than the context
    for what, field, value, msg in (
            ("tt", "trainable_token_indices", [3, 5, 99], "out of range"),
            ("alora", "alora_invocation_tokens", [7] * 65, "longer than the model's context")):
        p = save_peft(_peft(base, "llama_tied", what, seed=2), tmp_path / what)
        cfg = json.load(open(f"{p}/adapter_config.json"))
        cfg[field] = value
        json.dump(cfg, open(f"{p}/adapter_config.json", "w"))
        ad = lk.load_peft_adapter(p)
        model = copy.deepcopy(base)
        before = snapshot(model)
        with pytest.raises(ValueError, match=f"{field}.*{msg}|{msg}"):
            lk.inject_adapter(model, ad)
        assert snapshot(model) == before
        srv = lk.MultiAdapterModel(model, target_modules=["q_proj", "v_proj"])
        before = snapshot(srv)
        with pytest.raises(ValueError, match=field):
            srv.add(what, ad)
        assert snapshot(srv) == before and srv.adapters() == []
    # still refused: fields we do not implement
    p = tmp_path / "tt"
    cfg = json.load(open(p / "adapter_config.json"))
    cfg["layer_replication"] = [[0, 1]]
    json.dump(cfg, open(p / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="layer_replication"):
        lk.load_peft_adapter(p)


def _train_batch(step):
    """Training ids of step ``step``: token 3 (trainable) in every row, the invocation in one."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 64, (3, 9), generator=g)
    ids[:, 1] = 3
    ids[step % 3, 4:6] = torch.tensor(INV)
    return ids.to(DEVICE)


@pytest.mark.parametrize("kind,what", [("llama_tied", "tt"), ("gpt2", "tt"), ("gpt2", "mts"),
                                       ("llama_tied", "alora"), ("gpt2", "alora")])
@pytest.mark.parametrize("how", ["inject_adapter", "patch_peft"])
def test_trains_step_for_step_like_peft(kind, what, how, tmp_path, monkeypatch):
    base = tiny_causal_lm(kind)
    fused = []
    real = lk.peft_extras.patched_alora
    monkeypatch.setattr(lk.peft_extras, "patched_alora",
                        lambda *a, **k: (lambda y: (fused.append(y is not None), y)[1])(
                            real(*a, **k)))
    pm = _peft(base, kind, what, seed=3).train()
    path = save_peft(pm, tmp_path / "a")
    if how == "patch_peft":
        ours = copy.deepcopy(pm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lk.patch_peft(ours)
    else:
        ours = copy.deepcopy(base).requires_grad_(False)
        lk.inject_adapter(ours, lk.load_peft_adapter(path))
        ours.train()
    params = [p for p in ours.parameters() if p.requires_grad]
    ref_params = [p for p in pm.parameters() if p.requires_grad]
    assert len(params) == len(ref_params)
    l_ref = train_adamw(pm, ref_params, batch=_train_batch)
    l_ours = train_adamw(ours, params, batch=_train_batch)
    assert max(abs(a - b) for a, b in zip(l_ref, l_ours)) < 1e-4, (l_ref, l_ours)
    if how == "patch_peft" and what == "alora":     # aLoRA layers ran on the fused op
        assert fused and all(fused)
    if how == "patch_peft" and what == "tt":        # both token layers (tied lm_head) patched
        tl = [m for m in ours.modules() if type(m).__name__ == "TrainableTokensLayer"]
        assert len(tl) == 2 and all(lk.peft_patch.is_patched(m) for m in tl)
    if how == "inject_adapter" and what == "alora":  # generate: the prompt's offsets each step
        ids = _ids()[[0, 3, 5]]
        pm.eval(), ours.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            for m in (ours, copy.deepcopy(ours)):
                assert torch.equal(m.generate(input_ids=ids, max_new_tokens=4, do_sample=False,
                                              pad_token_id=0), want)
    save_peft(pm, tmp_path / "ref")
    if how == "patch_peft":
        save_peft(ours, tmp_path / "ours")
    else:
        lk.save_peft_adapter(ours, tmp_path / "ours")
    a, b = (lk.load_peft_adapter(tmp_path / d) for d in ("ref", "ours"))
    assert set(a) == set(b) and a.alora_invocation_tokens == b.alora_invocation_tokens
    cfgs = [json.load(open(tmp_path / d / "adapter_config.json")) for d in ("ref", "ours")]
    assert cfgs[0]["bias"] == cfgs[1]["bias"] == "none"   # a saved copy's bias: not bias="all"
    for mod in a:
        assert rel_err(b[mod][0], a[mod][0]) < 1e-4 and rel_err(b[mod][1], a[mod][1]) < 1e-4
    for mod, (idx, rows) in a.trainable_tokens.items():
        assert torch.equal(b.trainable_tokens[mod].indices, idx)
        assert rel_err(b.trainable_tokens[mod].rows, rows) < 1e-4
    assert set(a.modules_to_save) == set(b.modules_to_save)
    for mod, sd in a.modules_to_save.items():
        for k, t in sd.items():
            assert rel_err(b.modules_to_save[mod][k], t) < 1e-4, (mod, k)


def test_classifier_head_modules_to_save_served(tmp_path):
    """task_type="SEQ_CLS": PEFT saves the classifier ``score`` head whole (modules_to_save);
    two such adapters, a plain one and the base model share one batch."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(1)
    base = transformers.LlamaForSequenceClassification(cfg).to(DEVICE).eval()
    srv = lk.MultiAdapterModel(copy.deepcopy(base), target_modules=["q_proj"])
    pms = {}
    for i, task in enumerate(["SEQ_CLS", "SEQ_CLS", None]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                r=4, target_modules=["q_proj"], task_type=task))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.add_(torch.randn_like(p) * 0.3)
        pms[f"c{i}"] = pm.eval()
        srv.load_peft(f"c{i}", save_peft(pm, tmp_path / f"c{i}"))
    assert set(lk.load_peft_adapter(tmp_path / "c0").modules_to_save) == {"score"}
    names = ["c1", None, "c0", "c2"]
    ids = _ids()[:4]
    with torch.no_grad():
        out = srv(ids, adapters=names).logits
        for b, n in enumerate(names):
            ref = (pms[n] if n else base)(ids[b:b + 1]).logits
            assert rel_err(out[b:b + 1], ref) < 1e-5, (b, n)
