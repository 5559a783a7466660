"""Adapters with biases against PEFT (issue 23): ``lora_bias=True`` (a bias on lora_B) and
``bias="lora_only" | "all"`` (trained base biases) on tiny Qwen2 (biased q/k/v), Llama (no base
biases) and GPT-2 (Conv1D, LayerNorm biases): served per sequence in mixed batches equal to each
PEFT model, trained step for step like PEFT (inject_adapter and patch_peft), files both ways."""

import copy
import warnings

import pytest
import torch

import lora_kernels as lk

from conftest import DEVICE
from helpers import rel_err, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(1)
    return transformers.Qwen2ForCausalLM(cfg).to(DEVICE).eval()


def _base(kind):
    return {"qwen2": _qwen2, "llama": tiny_llama, "gpt2": tiny_gpt2}[kind]()


def _peft(base, seed, **cfg):
    """A PEFT adapter with every trainable tensor (factors and biases) random."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.2)
    return pm.eval()


def _save(pm, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(path))
    return str(path)


def _ids(n=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, length), generator=g).to(DEVICE)


CONFIGS = {
    "qwen2": [dict(target_modules=["q_proj", "v_proj"], lora_bias=True),
              dict(target_modules=["q_proj", "o_proj"], bias="lora_only"),
              dict(target_modules=["q_proj"], bias="all", lora_bias=True)],
    "llama": [dict(target_modules=["q_proj", "v_proj"], lora_bias=True),
              dict(target_modules=["down_proj"], lora_bias=True)],
}


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_biased_adapters_served_in_mixed_batch(kind, tmp_path):
    base = _base(kind)
    pms = {f"a{i}": _peft(base, 5 + i, **c) for i, c in enumerate(CONFIGS[kind])}
    srv = lk.MultiAdapterModel(copy.deepcopy(base), target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], max_rank=4)
    for n, pm in pms.items():
        srv.load_peft(n, _save(pm, tmp_path / n))
    names = [*pms, None, "a0"]
    ids = _ids(len(names))
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


def _train(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(steps):
        ids = _ids(4, 9, seed=step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("how", ["inject_adapter", "patch_peft"])
@pytest.mark.parametrize("kind,cfg", [
    ("qwen2", dict(target_modules=["q_proj", "v_proj"], bias="all", lora_bias=True)),
    ("gpt2", dict(target_modules=["c_attn"], bias="all", fan_in_fan_out=True)),
    ("llama", dict(target_modules=["q_proj"], lora_bias=True)),
])
def test_biased_adapter_trains_step_for_step_like_peft(kind, cfg, how, tmp_path):
    base = _base(kind)
    pm = _peft(base, 3, **cfg).train()
    if how == "patch_peft":
        ours = copy.deepcopy(pm)
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # nothing left to PEFT
            lk.patch_peft(ours)
    else:
        ours = copy.deepcopy(base).requires_grad_(False)
        lk.inject_adapter(ours, lk.load_peft_adapter(_save(pm, tmp_path / "a")))
        ours.train()
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert n_ours == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    l_ref, l_ours = _train(pm), _train(ours)
    assert max(abs(a - b) for a, b in zip(l_ref, l_ours)) < 1e-4, (l_ref, l_ours)
    ids = _ids()
    with torch.no_grad():
        assert rel_err(ours.eval()(ids).logits, pm.eval()(ids).logits) < 1e-4


@pytest.mark.parametrize("kind,cfg", [
    ("qwen2", dict(target_modules=["q_proj", "v_proj"], bias="all", lora_bias=True)),
    ("gpt2", dict(target_modules=["c_attn"], bias="lora_only", fan_in_fan_out=True)),
])
def test_biased_files_both_ways_and_merge(kind, cfg, tmp_path):
    base = _base(kind)
    pm = _peft(base, 4, **cfg)
    ours = lk.inject_adapter(copy.deepcopy(base).requires_grad_(False),
                             lk.load_peft_adapter(_save(pm, tmp_path / "a")))
    ids = _ids()
    with torch.no_grad():
        want = pm(ids).logits
        lk.save_peft_adapter(ours, tmp_path / "b")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "b"))
        assert rel_err(back.eval()(ids).logits, want) < 1e-5
        assert rel_err(lk.merge_and_unload(ours)(ids).logits, want) < 1e-5


def test_bias_of_an_unserved_module_refused(tmp_path):
    base = _base("gpt2")
    pm = _peft(base, 2, target_modules=["c_attn"], bias="all", fan_in_fan_out=True)
    srv = lk.MultiAdapterModel(copy.deepcopy(base), target_modules=["c_attn", "c_proj", "c_fc"])
    with pytest.raises(ValueError, match=r"trains the bias of 'transformer\.h\.0\.ln_1'"):
        srv.load_peft("a", _save(pm, tmp_path / "a"))
    assert srv.adapters() == []
