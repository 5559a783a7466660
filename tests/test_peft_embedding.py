"""Embedding and lm_head LoRA against PEFT (issue 23) on tiny Llama (tied and untied), Qwen2 and
GPT-2 models: PEFT-made adapters load and serve in mixed batches equal to each adapter's PEFT
model (logits and greedy generate); train step for step like PEFT (inject_adapter and
patch_peft); files PEFT loads and back; an adapter for another vocabulary is refused."""

import copy
import warnings

import pytest
import torch

import lora_kernels as lk

from helpers import random_peft, rel_err, save_peft, tiny_causal_lm, token_ids, train_adamw

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

KINDS = ["llama", "llama_tied", "qwen2", "gpt2"]


def _targets(kind, i):
    emb, lin = ("wte", "c_attn") if kind == "gpt2" else ("embed_tokens", ["q_proj", "v_proj"][i])
    return [emb, lin] + (["lm_head"] if i == 1 else [])


def _peft(base, kind, i, seed):
    """PEFT adapter ``i`` (0: embedding + one linear, rank 4; 1: + lm_head, rank 6) with random
    factors (so no term is trivially zero)."""
    cfg = peft.LoraConfig(r=4 + 2 * i, lora_alpha=8, target_modules=_targets(kind, i),
                          fan_in_fan_out=kind == "gpt2")
    return random_peft(base, cfg, seed, select=lambda n, p: "lora_" in n)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapters_served_in_mixed_batch(kind, tmp_path):
    base = tiny_causal_lm(kind)
    pms = {f"a{i}": _peft(base, kind, i, seed=10 + i) for i in range(2)}
    srv = lk.MultiAdapterModel(copy.deepcopy(base), target_modules=sorted(
        set(_targets(kind, 0) + _targets(kind, 1))), max_rank=8)
    for n, pm in pms.items():
        srv.load_peft(n, save_peft(pm, tmp_path / n))
    assert type(srv.layers[[n for n in srv.layers if n.endswith(("embed_tokens", "wte"))][0]]) \
        is lk.serving.ServingEmbedding
    names = ["a1", None, "a0", "a1"]
    ids = token_ids(len(names))
    with torch.no_grad():
        out = srv(ids, adapters=names).logits
        for b, n in enumerate(names):
            ref = (pms[n] if n else base)(ids[b:b + 1]).logits
            assert rel_err(out[b:b + 1], ref) < 1e-5, (kind, n)
            if n:
                assert rel_err(base(ids[b:b + 1]).logits, ref) > 1e-2   # the adapter matters
        gen = srv.generate(ids, adapters=names, max_new_tokens=4, do_sample=False,
                           pad_token_id=0)
        for b, n in enumerate(names):
            ref = (pms[n] if n else base).generate(input_ids=ids[b:b + 1], max_new_tokens=4,
                                                   do_sample=False, pad_token_id=0)
            assert torch.equal(gen[b:b + 1], ref), (kind, n)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("how", ["inject_adapter", "patch_peft"])
def test_trains_step_for_step_like_peft(kind, how, tmp_path):
    base = tiny_causal_lm(kind)
    pm = _peft(base, kind, 1, seed=3).train()
    path = save_peft(pm, tmp_path / "a")
    if how == "patch_peft":
        ours = copy.deepcopy(pm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lk.patch_peft(ours)
        emb = [m for m in ours.modules() if type(m).__name__ == "Embedding"
               and hasattr(m, "lora_embedding_A")][0]
        assert lk.peft_patch.is_patched(emb)
        params = [p for p in ours.parameters() if p.requires_grad]
    else:
        ours = copy.deepcopy(base).requires_grad_(False)
        lk.inject_adapter(ours, lk.load_peft_adapter(path))
        ours.train()
        params = [p for p in ours.parameters() if p.requires_grad]
    ref_params = [p for p in pm.parameters() if p.requires_grad]
    assert len(params) == len(ref_params)
    l_ref, l_ours = train_adamw(pm, ref_params), train_adamw(ours, params)
    assert max(abs(a - b) for a, b in zip(l_ref, l_ours)) < 1e-4, (l_ref, l_ours)
    # the trained factors, compared through the files each side writes
    save_peft(pm, tmp_path / "ref")
    if how == "patch_peft":
        save_peft(ours, tmp_path / "ours")
    else:
        lk.save_peft_adapter(ours, tmp_path / "ours")
    a, b = (lk.load_peft_adapter(tmp_path / d) for d in ("ref", "ours"))
    assert set(a) == set(b)
    for mod in a:
        assert rel_err(b[mod][0], a[mod][0]) < 1e-4 and rel_err(b[mod][1], a[mod][1]) < 1e-4


@pytest.mark.parametrize("kind", ["llama_tied", "gpt2"])
def test_files_both_ways_and_merge(kind, tmp_path):
    base = tiny_causal_lm(kind)
    ours = lk.inject(copy.deepcopy(base), "lora", target_modules=_targets(kind, 1), r=5,
                     alpha=10)
    assert isinstance(ours.get_submodule(
        "transformer.wte" if kind == "gpt2" else "model.embed_tokens"), lk.LoRAEmbedding)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    ids = token_ids()
    with torch.no_grad():
        want = ours(ids).logits
    lk.save_peft_adapter(ours, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    with torch.no_grad():
        assert rel_err(pm(ids).logits, want) < 1e-5
        back = lk.inject_adapter(copy.deepcopy(base),
                                 lk.load_peft_adapter(save_peft(pm, tmp_path / "b")))
        assert rel_err(back(ids).logits, want) < 1e-5
        merged = lk.merge_and_unload(ours)
        assert not any(isinstance(m, lk.AdapterLinear) for m in merged.modules())
        assert rel_err(merged(ids).logits, want) < 1e-5


def test_adapter_for_another_vocabulary_refused(tmp_path):
    path = save_peft(_peft(tiny_causal_lm("llama_tied"), "llama_tied", 0, seed=1), tmp_path / "a")
    ad = lk.load_peft_adapter(path)
    assert isinstance(ad["model.embed_tokens"], lk.peft_io.EmbeddingFactors)
    other = tiny_causal_lm("llama_tied", vocab=70)
    before = {n: type(m) for n, m in other.named_modules()}
    with pytest.raises(ValueError, match="base weight for 'model.embed_tokens'"):
        lk.inject_adapter(other, ad)
    with pytest.raises(ValueError, match="vocabulary of 64 tokens.*num_embeddings=70"):
        lk.inject_adapter(other, dict(ad))
    assert {n: type(m) for n, m in other.named_modules()} == before
    srv = lk.MultiAdapterModel(other, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(ValueError, match="model.embed_tokens.*vocabulary of 64 tokens.*=70"):
        srv.add("a", dict(ad))
    assert srv.adapters() == []
    # the same vocabulary but a different base table (PEFT saved its embed_tokens table)
    moved = tiny_causal_lm("llama_tied")
    with torch.no_grad():
        moved.model.embed_tokens.weight[3] += 1
    with pytest.raises(ValueError, match="differs from the model's"):
        lk.inject_adapter(moved, ad)


@pytest.mark.parametrize("how", ["inject_adapter", "patch_peft"])
def test_tied_lm_head_lora_trains_like_peft(how, tmp_path):
    """PEFT's ensure_weight_tying on a tied model: lm_head's LoRA is the embedding LoRA
    transposed (one storage, two parameters); ours ties them the same way."""
    base = tiny_causal_lm("llama_tied")

    def make():   # (a PEFT model with tied LoRA parameters cannot be deep-copied: built twice)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"],
                ensure_weight_tying=True))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n and "lm_head" not in n:   # lm_head's factors alias these
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        return pm.train()

    pm = make()
    path = save_peft(pm.train(), tmp_path / "a")
    ad = lk.load_peft_adapter(path)
    assert ad.tied == {"lm_head": "model.embed_tokens"}
    if how == "patch_peft":
        ours = make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lk.patch_peft(ours)
    else:
        ours = lk.inject_adapter(copy.deepcopy(base).requires_grad_(False), ad).train()
        assert ours.lm_head.lora_A.data_ptr() == ours.model.embed_tokens.lora_B.data_ptr()
    params = [p for p in ours.parameters() if p.requires_grad]
    ref_params = [p for p in pm.parameters() if p.requires_grad]
    assert len(params) == len(ref_params) == 8
    l_ref, l_ours = train_adamw(pm, ref_params), train_adamw(ours, params)
    assert max(abs(a - b) for a, b in zip(l_ref, l_ours)) < 1e-4, (l_ref, l_ours)
    if how == "inject_adapter":
        lk.save_peft_adapter(ours, tmp_path / "b")
        back = lk.load_peft_adapter(tmp_path / "b")
        assert back.tied == {"lm_head": "model.embed_tokens"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pb = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "b")).eval()
        ids = token_ids()
        with torch.no_grad():
            assert rel_err(pb(ids).logits, ours.eval()(ids).logits) < 1e-5
            assert rel_err(pb(ids).logits, pm.eval()(ids).logits) < 1e-4


def test_served_embedding_on_triton_kernels(tmp_path):
    from conftest import backends

    if "triton" not in backends():
        pytest.skip("Triton needs TRITON_INTERPRET=1 on CPU")
    base = tiny_causal_lm("llama")
    pms = {}
    for i in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                r=3 + i, lora_alpha=8, target_modules=["embed_tokens"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.3)
        pms[f"e{i}"] = pm.eval()
    srv = lk.MultiAdapterModel(copy.deepcopy(base), target_modules=["embed_tokens"], max_rank=4,
                               backend="triton")
    for n, pm in pms.items():
        srv.load_peft(n, save_peft(pm, tmp_path / n))
    names = ["e1", None, "e0"]
    ids = token_ids(3)
    with torch.no_grad():
        out = srv(ids, adapters=names).logits
        for b, n in enumerate(names):
            assert rel_err(out[b:b + 1], (pms[n] if n else base)(ids[b:b + 1]).logits) < 1e-5
