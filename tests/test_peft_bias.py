"""Adapters with biases against PEFT (issue 23): ``lora_bias=True`` (a bias on lora_B) and
``bias="lora_only" | "all"`` (trained base biases) on tiny Qwen2 (biased q/k/v), Llama (no base
biases) and GPT-2 (Conv1D, LayerNorm biases): served per sequence in mixed batches equal to each
PEFT model, trained step for step like PEFT (inject_adapter and patch_peft), files both ways."""

import copy
import warnings

import pytest
import torch

import lora_kernels as lk

from helpers import random_peft, rel_err, save_peft, tiny_causal_lm, token_ids, train_adamw

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _peft(base, seed, **cfg):
    """A PEFT adapter with every trainable tensor (factors and biases) random."""
    return random_peft(base, peft.LoraConfig(r=4, lora_alpha=8, **cfg), seed)


CONFIGS = {
    "qwen2": [dict(target_modules=["q_proj", "v_proj"], lora_bias=True),
              dict(target_modules=["q_proj", "o_proj"], bias="lora_only"),
              dict(target_modules=["q_proj"], bias="all", lora_bias=True)],
    "llama": [dict(target_modules=["q_proj", "v_proj"], lora_bias=True),
              dict(target_modules=["down_proj"], lora_bias=True)],
}


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_biased_adapters_served_in_mixed_batch(kind, tmp_path):
    base = tiny_causal_lm(kind)
    pms = {f"a{i}": _peft(base, 5 + i, **c) for i, c in enumerate(CONFIGS[kind])}
    srv = lk.MultiAdapterModel(copy.deepcopy(base), target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], max_rank=4)
    for n, pm in pms.items():
        srv.load_peft(n, save_peft(pm, tmp_path / n))
    names = [*pms, None, "a0"]
    ids = token_ids(len(names))
    with torch.no_grad():
        out = srv(ids, adapters=names).logits
        for b, n in enumerate(names):
            ref = (pms[n] if n else base)(ids[b:b + 1]).logits
            assert rel_err(out[b:b + 1], ref) < 1e-5, (kind, n)
        gen = srv.generate(ids, adapters=names, max_new_tokens=3, do_sample=False,
                           pad_token_id=0)
        for b, n in enumerate(names):
            ref = (pms[n] if n else base).generate(input_ids=ids[b:b + 1], max_new_tokens=3,
                                                   do_sample=False, pad_token_id=0)
            assert torch.equal(gen[b:b + 1], ref), (kind, n)
    with pytest.raises(ValueError, match="biases"):
        srv.add_sum("s", ["a0", "a1"])
    srv.remove("a0")
    assert all("a0" not in lay.bias_delta for lay in srv.layers.values()
               if hasattr(lay, "bias_delta"))


@pytest.mark.parametrize("how", ["inject_adapter", "patch_peft"])
@pytest.mark.parametrize("kind,cfg", [
    ("qwen2", dict(target_modules=["q_proj", "v_proj"], bias="all", lora_bias=True)),
    ("gpt2", dict(target_modules=["c_attn"], bias="all", fan_in_fan_out=True)),
    ("llama", dict(target_modules=["q_proj"], lora_bias=True)),
])
def test_biased_adapter_trains_step_for_step_like_peft(kind, cfg, how, tmp_path):
    base = tiny_causal_lm(kind)
    pm = _peft(base, 3, **cfg).train()
    if how == "patch_peft":
        ours = copy.deepcopy(pm)
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # nothing left to PEFT
            lk.patch_peft(ours)
    else:
        ours = copy.deepcopy(base).requires_grad_(False)
        lk.inject_adapter(ours, lk.load_peft_adapter(save_peft(pm, tmp_path / "a")))
        ours.train()
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert n_ours == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    l_ref, l_ours = train_adamw(pm), train_adamw(ours)
    assert max(abs(a - b) for a, b in zip(l_ref, l_ours)) < 1e-4, (l_ref, l_ours)
    ids = token_ids()
    with torch.no_grad():
        assert rel_err(ours.eval()(ids).logits, pm.eval()(ids).logits) < 1e-4


@pytest.mark.parametrize("kind,cfg", [
    ("qwen2", dict(target_modules=["q_proj", "v_proj"], bias="all", lora_bias=True)),
    ("gpt2", dict(target_modules=["c_attn"], bias="lora_only", fan_in_fan_out=True)),
])
def test_biased_files_both_ways_and_merge(kind, cfg, tmp_path):
    base = tiny_causal_lm(kind)
    pm = _peft(base, 4, **cfg)
    ours = lk.inject_adapter(copy.deepcopy(base).requires_grad_(False),
                             lk.load_peft_adapter(save_peft(pm, tmp_path / "a")))
    ids = token_ids()
    with torch.no_grad():
        want = pm(ids).logits
        lk.save_peft_adapter(ours, tmp_path / "b")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "b"))
        assert rel_err(back.eval()(ids).logits, want) < 1e-5
        assert rel_err(lk.merge_and_unload(ours)(ids).logits, want) < 1e-5


def test_bias_of_an_unserved_module_refused(tmp_path):
    base = tiny_causal_lm("gpt2")
    pm = _peft(base, 2, target_modules=["c_attn"], bias="all", fan_in_fan_out=True)
    srv = lk.MultiAdapterModel(copy.deepcopy(base), target_modules=["c_attn", "c_proj", "c_fc"])
    with pytest.raises(ValueError, match=r"trains the bias of 'transformer\.h\.0\.ln_1'"):
        srv.load_peft("a", save_peft(pm, tmp_path / "a"))
    assert srv.adapters() == []
