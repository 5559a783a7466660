"""MultiAdapterModel.generate with num_beams / num_return_sequences equals PEFT's generate (tiny
Llama built locally, two PEFT adapters saved by PEFT and loaded with load_peft)."""

import copy

import pytest
import torch

import lora_kernels as lk

from conftest import DEVICE
from helpers import tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_llama(seed=7).cpu()
    torch.manual_seed(8)
    cfg_a = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    cfg_b = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg_a, adapter_name="a")
    pm.add_adapter("b", cfg_b)
    with torch.no_grad():   # larger deltas, so the adapters change what is generated
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(8.0)
    pm.eval().to(DEVICE)
    root = tmp_path_factory.mktemp("peft")
    pm.save_pretrained(root)
    dirs = {p.parent.name: p.parent for p in root.rglob("adapter_config.json")}
    dirs = {("a" if k == root.name else k): v for k, v in dirs.items()}
    server = lk.MultiAdapterModel(copy.deepcopy(base).to(DEVICE), TARGETS, max_adapters=2,
                                  max_rank=4)
    for n in ("a", "b"):
        server.load_peft(n, dirs[n], device=DEVICE)
    ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    return base.to(DEVICE), pm, server, ids


GEN = dict(max_new_tokens=4, pad_token_id=0, eos_token_id=None)


def _ours(server, ids, names, **kw):
    with torch.no_grad():
        return server.generate(ids, names, **GEN, **kw)


@pytest.mark.parametrize("beams,nrs", [(3, 2)])
def test_beam_search_equals_peft_mixed_batch(setup, beams, nrs):
    base, pm, server, ids = setup
    names = ["a", "b", None]
    got = _ours(server, ids, names, num_beams=beams, num_return_sequences=nrs, do_sample=False)
    with torch.no_grad():
        want = pm.generate(input_ids=ids, adapter_names=["a", "b", "__base__"], num_beams=beams,
                           num_return_sequences=nrs, do_sample=False, **GEN)
    assert got.shape == (3 * nrs, 5 + 4)
    assert torch.equal(got, want)
    # and row by row against PEFT with a single active adapter (the adapters act)
    for b, n in enumerate(["a", "b"]):
        pm.set_adapter(n)
        with torch.no_grad():
            one = pm.generate(input_ids=ids[b:b + 1], num_beams=beams, num_return_sequences=nrs,
                              do_sample=False, **GEN)
        assert torch.equal(got[b * nrs:(b + 1) * nrs], one), n
    pm.set_adapter("a")
    with torch.no_grad():
        plain = base.generate(ids, num_beams=beams, num_return_sequences=nrs, do_sample=False,
                              **GEN)
    assert torch.equal(got[2 * nrs:], plain[2 * nrs:])
    assert not torch.equal(got[:nrs], plain[:nrs])                 # adapter "a" changes the text


def test_num_return_sequences_without_beams_and_generation_config(setup):
    """Sampling with num_return_sequences=2 (top_k=1: every sample is the greedy token) repeats
    each adapter per returned row; num_beams from a GenerationConfig is honoured too."""
    base, pm, server, ids = setup
    names = ["b", "a", None]
    got = _ours(server, ids, names, do_sample=True, top_k=1, num_return_sequences=2)
    greedy = _ours(server, ids, names, do_sample=False)
    assert torch.equal(got, greedy.repeat_interleave(2, dim=0))
    # (eos given explicitly: a config's eos_token_id=None is filled from the model's defaults)
    kw = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=63, do_sample=False)
    gc = transformers.GenerationConfig(num_beams=2, **kw)
    with torch.no_grad():
        via_cfg = server.generate(ids, names, generation_config=gc)
        want = pm.generate(input_ids=ids, adapter_names=["b", "a", "__base__"], num_beams=2,
                           **kw)
    assert torch.equal(via_cfg, want)


def test_generate_errors_name_the_cause(setup):
    _, _, server, ids = setup
    with pytest.raises(ValueError, match=r"batch 3, got 9 adapters .*num_beams=3"):
        server.generate(ids, ["a", "b", None] * 3, num_beams=3, **GEN)
    with pytest.raises(ValueError, match="num_return_sequences=3 must be <= num_beams=2"):
        server.generate(ids, ["a", "b", None], num_beams=2, num_return_sequences=3, **GEN)
    with pytest.raises(TypeError, match="num_beams must be an int"):
        server.generate(ids, ["a", "b", None], num_beams=2.0, **GEN)
    with pytest.raises(ValueError, match="input_ids must be a"):
        server.generate(ids[0], ["a"], **GEN)
    assert server._state.seq_ids is None and all(h == 0 for h in server.store._held)
