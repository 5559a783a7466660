"""Fused projections: per-slice adapters (own ranks, some slices absent) stacked into one LoRA of
the fused weight, served in one launch; a fused-QKV / gate-up model (Phi-3 layout) served with
adapters for the unfused modules equals the unfused (Llama) model with the same adapters."""

import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.fused import fuse_adapter, phi3_slices, stack_slices

from conftest import DEVICE, DTYPES, backends
from helpers import assert_close, noncontig, randn

transformers = pytest.importorskip("transformers")


def _slice(g, r, in_f, out_f, dtype):
    A = torch.randn(r, in_f, generator=g, dtype=torch.float64) / in_f ** 0.5
    B = torch.randn(out_f, r, generator=g, dtype=torch.float64) / r ** 0.5
    return A.to(dtype).to(DEVICE), B.to(dtype).to(DEVICE)


def _ref_slices(x, slices, outs):
    """float64 per-slice reference: column block i = s_i x A_i^T B_i^T (zero if absent)."""
    cols = []
    for sl, o in zip(slices, outs):
        if sl is None:
            cols.append(torch.zeros(x.shape[0], o, dtype=torch.float64))
        else:
            A, B, s = sl
            cols.append(s * (x.double().cpu() @ A.double().cpu().t()) @ B.double().cpu().t())
    return torch.cat(cols, dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scales", ["same", "different"])
def test_stack_slices_exact(dtype, scales):
    g = torch.Generator().manual_seed(0)
    in_f, outs, ranks = 37, [23, 11, 13], [3, None, 1]           # k absent, rank 1 on v
    slices = []
    for k, (o, r) in enumerate(zip(outs, ranks)):
        if r is None:
            slices.append(None)
            continue
        A, B = _slice(g, r, in_f, o, dtype)
        slices.append((A, B, 0.75 if scales == "same" else 0.5 + k))
    A_cat, B_cat, s = stack_slices(slices, outs)
    assert A_cat.shape == (4, in_f) and B_cat.shape == (sum(outs), 4)
    assert A_cat.dtype == dtype and s == (0.75 if scales == "same" else 1.0)
    assert (B_cat[23:34] == 0).all() and (B_cat[:23, 3:] == 0).all() and (B_cat[34:, :3] == 0).all()
    x = noncontig(randn(5, in_f, dtype=dtype))
    got = s * (x.double() @ A_cat.double().t()) @ B_cat.double().t()
    assert_close(got, _ref_slices(x, slices, outs), dtype, "stacked delta")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("T", [1, 3, 130])
def test_fused_layer_one_launch_mixed_adapters(backend, T):
    """One base GEMM over the fused weight + one multi-LoRA call over a pool of stacked adapters
    (each with its own per-slice ranks and missing slices) equals per-slice references."""
    dtype = torch.float32
    g = torch.Generator().manual_seed(1)
    in_f, outs = 29, [16, 8, 8]
    W = randn(sum(outs), in_f, scale=in_f ** -0.5)
    b = randn(sum(outs), scale=0.1)
    pool = lk.AdapterPool(in_f, sum(outs), 3, 12, device=DEVICE)
    per = {}
    for name, ranks in {"qkv": [4, 2, 5], "qv": [3, None, 1], "k": [None, 7, None]}.items():
        sl = [None if r is None else (*_slice(g, r, in_f, o, dtype), 0.5 + r / 4)
              for r, o in zip(ranks, outs)]
        per[pool.add(name, *stack_slices(sl, outs))] = sl
    ids = torch.randint(-1, 3, (T,), generator=g)
    x = randn(T, in_f)
    if T == 3:
        x = noncontig(x)
    y = lk.multi_lora_linear(x, W, b, pool, ids, backend=backend)
    want = x.double().cpu() @ W.double().cpu().t() + b.double().cpu()
    for t in range(T):
        i = int(ids[t])
        if i >= 0:
            want[t] += _ref_slices(x[t:t + 1], per[i], outs)[0]
    assert_close(y, want, dtype, f"fused layer {backend}")


def test_stack_and_fuse_refusals():
    g = torch.Generator().manual_seed(2)
    A, B = _slice(g, 2, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="at least one adapter"):
        stack_slices([None, None], [4, 4])
    with pytest.raises(ValueError, match=r"slices\[1\] lora_B"):
        stack_slices([(A, B, 1.0), (A, B, 1.0)], [4, 5])
    with pytest.raises(ValueError, match=r"slices\[1\] lora_A"):
        stack_slices([(A, B, 1.0), (torch.randn(2, 9), B, 1.0)], [4, 4])
    with pytest.raises(ValueError, match="same length"):
        stack_slices([(A, B, 1.0)], [4, 4])
    with pytest.raises(TypeError, match="slices"):
        stack_slices([(A, B)], [4])
    spec = {"qkv_proj": [("q_proj", 4), ("k_proj", 4), ("v_proj", 4)]}
    with pytest.raises(ValueError, match=r"'l\.qkv_proj'.*lora_B"):
        fuse_adapter({"l.q_proj": (A, torch.randn(5, 2), 1.0)}, spec)
    with pytest.raises(TypeError, match="fused"):
        fuse_adapter({}, {"qkv_proj": "q_proj"})
    out = fuse_adapter({"l.q_proj": (A, B, 1.0), "l.o_proj": (A, B, 2.0)}, spec)
    assert set(out) == {"l.qkv_proj", "l.o_proj"} and out["l.o_proj"][2] == 2.0


# ----------------------------------------------------------------------------- model level

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def models():
    """A tiny Llama (unfused q/k/v, gate/up) and the same weights as a Phi-3 (fused qkv_proj and
    gate_up_proj; the two architectures agree elsewhere at this config)."""
    torch.manual_seed(3)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    phi = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **CFG, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)).eval()
    sd, new = llama.state_dict(), {}
    for k, v in sd.items():
        if ".q_proj." in k:
            new[k.replace("q_proj", "qkv_proj")] = torch.cat(
                [v, sd[k.replace("q_proj", "k_proj")], sd[k.replace("q_proj", "v_proj")]])
        elif ".gate_proj." in k:
            new[k.replace("gate_proj", "gate_up_proj")] = torch.cat(
                [v, sd[k.replace("gate_proj", "up_proj")]])
        elif not any(f".{p}." in k for p in ("k_proj", "v_proj", "up_proj")):
            new[k] = v
    phi.load_state_dict(new, strict=True)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        e = (phi(ids).logits - llama(ids).logits).norm() / llama(ids).logits.norm()
    assert e < 1e-6, e                       # the premise: the same model, fused and unfused
    return llama.to(DEVICE), phi.to(DEVICE)


def _adapter(model, leaves, ranks, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    mods = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and n.split(".")[-1] in leaves]
    for k, n in enumerate(mods):
        lin = model.get_submodule(n)
        A, B = _slice(g, ranks[k % len(ranks)], lin.in_features, lin.out_features, torch.float32)
        out[n] = (A, B, 0.5 + k % 3 / 2)
    return out


@pytest.mark.parametrize("backend", backends())
def test_fused_model_serving_equals_unfused(models, backend):
    llama, phi = models
    unfused_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ads = {"all": _adapter(llama, unfused_targets, [2, 5, 3, 1], 10),
           "qv": _adapter(llama, ["q_proj", "v_proj"], [4, 1], 11),        # k slice absent
           "up": _adapter(llama, ["up_proj", "k_proj"], [3], 12)}
    s_unf = lk.MultiAdapterModel(copy.deepcopy(llama), unfused_targets, max_adapters=4,
                                 max_rank=8, backend=backend)
    s_fus = lk.MultiAdapterModel(copy.deepcopy(phi), ["qkv_proj", "o_proj", "gate_up_proj",
                                                      "down_proj"],
                                 max_adapters=4, max_rank=16, backend=backend)
    spec = phi3_slices(phi.config)
    for n, ad in ads.items():
        s_unf.add(n, ad)
        s_fus.add(n, fuse_adapter(ad, spec))
    # 5 fused layers' worth of modules fewer, the same adapters
    assert len(s_fus.module_names) == 8 and len(s_unf.module_names) == 14
    names = ["all", None, "qv", "up", "all"]
    ids = torch.randint(0, 64, (5, 6), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        want = s_unf(ids, adapters=names).logits
        got = s_fus(ids, adapters=names).logits
        base = llama(ids).logits
    for b, n in enumerate(names):
        assert_close(got[b], want[b], torch.float32, f"row {b} ({n})")
        if n is not None:
            assert (want[b] - base[b]).norm() > 1e-3 * base[b].norm()    # the adapter acts


def test_peft_adapter_for_unfused_qv_served_on_fused_model(models, tmp_path):
    """A PEFT LoRA trained on the unfused q_proj / v_proj, saved by PEFT, loaded with
    load_peft_adapter and served on the fused-QKV model, equals PEFT's own model."""
    peft = pytest.importorskip("peft")
    llama, phi = models
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          rank_pattern={"v_proj": 2}, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(llama).cpu(), cfg).eval()
    pm.save_pretrained(tmp_path / "qv")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = pm(ids).logits
    server = lk.MultiAdapterModel(copy.deepcopy(phi), ["qkv_proj"], max_adapters=2, max_rank=8)
    server.add("qv", fuse_adapter(lk.load_peft_adapter(tmp_path / "qv", device=DEVICE),
                                  phi3_slices(phi.config)))
    with torch.no_grad():
        got = server(ids.to(DEVICE), adapters=["qv", "qv"]).logits
    assert_close(got, want, torch.float32, "PEFT q/v adapter on fused qkv")
    with torch.no_grad():
        plain = copy.deepcopy(llama).cpu()(ids).logits
    assert (want - plain).norm() > 1e-3 * want.norm()
