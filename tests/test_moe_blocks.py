"""MoE blocks (lora_kernels.moe): LoRA on transformers 5 expert parameters against PEFT 0.21's
target_parameters (ParamWrapper) on tiny Qwen3-MoE, Mixtral and gpt-oss models, float64."""

import copy

import pytest
import torch

import lora_kernels as lk
from lora_kernels import moe, peft_moe

from helpers import rel_err

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ARCHS = ("qwen3_moe", "mixtral", "gpt_oss")
TARGETS = ["gate_up_proj", "down_proj"]


def tiny_moe(arch: str, seed: int = 0, dtype=torch.float64):
    """A randomly initialised 1-layer MoE causal LM (5 experts, top-2, odd sizes), float64, eval;
    experts and router drawn N(0, 0.3) so routing and expert terms are not trivially small."""
    common = dict(vocab_size=61, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, num_experts_per_tok=2)
    if arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=24, moe_intermediate_size=7,
                                          num_experts=5, norm_topk_prob=True)
        cls = transformers.Qwen3MoeForCausalLM
    elif arch == "qwen2_moe":     # with a shared expert (left as it is)
        cfg = transformers.Qwen2MoeConfig(**common, intermediate_size=24, moe_intermediate_size=7,
                                          shared_expert_intermediate_size=9, num_experts=5)
        cls = transformers.Qwen2MoeForCausalLM
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(**common, intermediate_size=7, num_local_experts=5)
        cls = transformers.MixtralForCausalLM
    else:
        cfg = transformers.GptOssConfig(**common, intermediate_size=7, num_local_experts=5,
                                        layer_types=["full_attention"])
        cls = transformers.GptOssForCausalLM
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"     # transformers grouped_mm takes no float64
    torch.manual_seed(seed)
    m = cls(cfg).to(dtype).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".mlp." in n:
                p.normal_(0, 0.3)
    return m


def _experts(model):
    return [m for m in model.modules() if moe.is_experts(m) or isinstance(m, moe.LoRAExperts)]


def _peft(base, **kw):
    cfg = peft.LoraConfig(target_modules=kw.pop("target_modules", []),
                          target_parameters=kw.pop("target_parameters", TARGETS), **kw)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def _perturb_lora(pm, scale=0.3):
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * scale)


def _ids(seed=1, shape=(2, 7)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 61, shape, generator=g)


def _peft_wrappers(pm):
    """{(experts module name, param): ParamWrapper} of a PEFT model (names as the base's)."""
    out = {}
    for n, m in pm.named_modules():
        if type(m).__name__ == "ParamWrapper":
            name = n.replace("base_model.model.", "", 1).replace(".base_layer", "")
            out[(name, m.parameter_name)] = m
    return out


@pytest.mark.parametrize("arch", (*ARCHS, "qwen2_moe"))
def test_loaded_peft_adapter_matches_peft_outputs_and_grads(arch, tmp_path):
    base = tiny_moe(arch)
    pm = _peft(base, r=3, lora_alpha=5)
    _perturb_lora(pm)
    pm.save_pretrained(tmp_path)
    ad = lk.load_peft_adapter(tmp_path)
    keys = sorted(k for k, v in ad.items() if isinstance(v, moe.ExpertFactors))
    assert keys == [f"model.layers.0.mlp.experts.{p}" for p in ("down_proj", "gate_up_proj")]
    ours = lk.inject_adapter(copy.deepcopy(base), ad)
    ours.requires_grad_(False)
    for m in ours.modules():
        if isinstance(m, moe.LoRAExperts):
            for p in (*m.lora_A.values(), *m.lora_B.values()):
                p.requires_grad_(True)
    ids = _ids()
    y_ref = pm(ids).logits
    y = ours(ids).logits
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(y_ref, base(ids).logits) > 1e-3        # the adapter changes the output
    (y_ref.square().mean()).backward()
    (y.square().mean()).backward()
    lx = [m for m in ours.modules() if isinstance(m, moe.LoRAExperts)][0]
    for (_, p), w in _peft_wrappers(pm).items():
        gA, gB = peft_moe.to_experts(w.lora_A["default"].weight.grad,
                                     w.lora_B["default"].weight.grad, 3)
        assert rel_err(lx.lora_A[p].grad, gA) < 1e-11, p
        assert rel_err(lx.lora_B[p].grad, gB) < 1e-11, p
        assert gA.abs().sum() > 0 and gB.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_inject_trains_step_for_step_like_peft(arch, tmp_path):
    base = tiny_moe(arch)
    pm = _peft(base, r=2, lora_alpha=4, target_modules=["q_proj"])
    ours = copy.deepcopy(base).requires_grad_(False)
    lk.inject(ours, "lora", target_modules=["q_proj"], target_parameters=TARGETS, r=2, alpha=4)
    lx = [m for m in ours.modules() if isinstance(m, moe.LoRAExperts)]
    assert len(lx) == 1 and sorted(lx[0].lora_A) == sorted(TARGETS)
    # same start: PEFT's A into ours (B = 0 in both)
    q = ours.model.layers[0].self_attn.q_proj
    pq = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_A.copy_(pq.lora_A["default"].weight)
        for (_, p), w in _peft_wrappers(pm).items():
            A, _ = peft_moe.to_experts(w.lora_A["default"].weight, w.lora_B["default"].weight, 2)
            lx[0].lora_A[p].copy_(A)
    train_p = [p for p in pm.parameters() if p.requires_grad]
    ours_p = [p for p in ours.parameters() if p.requires_grad]
    assert sum(p.numel() for p in train_p) == sum(p.numel() for p in ours_p)
    opt_p = torch.optim.AdamW(train_p, lr=1e-2)
    opt_o = torch.optim.AdamW(ours_p, lr=1e-2)
    for step in range(3):
        ids = _ids(seed=step)
        lp = pm(ids, labels=ids).loss
        lo = ours(ids, labels=ids).loss
        assert abs(lp.item() - lo.item()) < 1e-10 * abs(lp.item()), step
        for opt, loss in ((opt_p, lp), (opt_o, lo)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (_, p), w in _peft_wrappers(pm).items():
        A, B = peft_moe.to_experts(w.lora_A["default"].weight, w.lora_B["default"].weight, 2)
        # Adam's m / sqrt(v) of gradients that start at exactly 0 (B = 0) amplifies float64
        # rounding differences of the summation order; still 7+ digits after 3 steps
        assert rel_err(lx[0].lora_A[p], A) < 1e-7
        assert rel_err(lx[0].lora_B[p], B) < 1e-7
        assert B.abs().sum() > 0
    # saved by us, loaded by PEFT: the same model
    lk.save_peft_adapter(ours, tmp_path)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = _ids(seed=9)
    with torch.no_grad():
        y = ours(ids).logits
        assert rel_err(back(ids).logits, y) < 1e-12
        assert rel_err(pm(ids).logits, y) < 1e-6       # the trained models (above)
        # and merged: the experts folded in, plain transformers modules again
        merged = lk.merge_and_unload(ours)
        assert not any(isinstance(m, moe.LoRAExperts) for m in merged.modules())
        assert rel_err(merged(ids).logits, y) < 1e-12
        assert rel_err(pm.merge_and_unload()(ids).logits, y) < 1e-6


def test_block_skips_masked_choices_and_poisoned_rows():
    """Expert index E (transformers' expert-parallel mask) contributes nothing, as in the base
    module; the experts output equals the base module's loop with LoRA folded in."""
    base = tiny_moe("qwen3_moe")
    ex = base.model.layers[0].mlp.experts
    lx = moe.LoRAExperts(ex, TARGETS, r=2, alpha=3.0)
    _perturb_lora(lx)
    h = torch.randn(6, 16, dtype=torch.float64)
    idx = torch.tensor([[0, 4], [5, 1], [2, 5], [3, 3], [1, 0], [5, 5]])
    w = torch.rand(6, 2, dtype=torch.float64)
    y = lx(h, idx, w)
    ref = copy.deepcopy(lx).merged()(h, idx, w)
    assert rel_err(y, ref) < 1e-12
    assert torch.equal(y[5], torch.zeros(16, dtype=torch.float64))


def test_bad_adapters_refused_model_unchanged(tmp_path):
    base = tiny_moe("mixtral")
    pm = _peft(base, r=2, lora_alpha=4)
    _perturb_lora(pm)
    pm.save_pretrained(tmp_path / "ok")
    ad = lk.load_peft_adapter(tmp_path / "ok")
    before = copy.deepcopy(base.state_dict())

    def unchanged(m):
        assert not any(isinstance(x, moe.LoRAExperts) for x in m.modules())
        after = m.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)

    # another expert count
    other = tiny_moe("mixtral")
    other.model.layers[0].mlp.experts.gate_up_proj = torch.nn.Parameter(
        torch.zeros(4, 14, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"gate_up_proj.*4 experts|E=4"):
        lk.inject_adapter(other, ad)
    # another layout: a gpt-oss-transposed adapter on Mixtral's (E, out, in)
    bad = dict(ad)
    k = "model.layers.0.mlp.experts.down_proj"
    A, B, s = ad[k]
    bad[k] = moe.ExpertFactors(B.transpose(1, 2), A.transpose(1, 2), s)
    with pytest.raises(ValueError, match="down_proj"):
        lk.inject_adapter(base, bad)
    unchanged(base)
    # a file whose target_parameters name nothing in the model
    lk.save_peft_adapter({"model.layers.3.mlp.experts.down_proj": ad[k]}, tmp_path / "none")
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.experts\.down_proj"):
        lk.inject_adapter(base, lk.load_peft_adapter(tmp_path / "none"))
    with pytest.raises(ValueError, match="up_proj_x"):
        lk.inject(base, "lora", target_parameters=["up_proj_x"], r=2)
    with pytest.raises(ValueError, match="lora_dropout|dropout"):
        lk.inject(base, "lora", target_parameters=TARGETS, r=2, dropout=0.1)
    unchanged(base)
    twice = lk.inject(copy.deepcopy(base), "lora", target_parameters=TARGETS, r=2)
    with pytest.raises(TypeError, match="already carries a LoRA"):
        lk.inject(twice, "lora", target_parameters=TARGETS, r=2)


def test_bench_moe_block_case_runs_and_agrees():
    """The moe_block bench case (tiny shape): every implementation runs; ours and PEFT agree with
    the transformers loop + LoRA reference (output and dhidden)."""
    from lora_kernels.bench.cases_moe_block import block_case

    case = block_case(9, 2, 4, 16, 6, 3, torch.float32, torch.device("cpu"))
    sets = [case.make_inputs(torch.device("cpu"), 0)]
    out = {im.name: im.prepare(sets, torch.device("cpu"))(0) for im in case.impls}
    y_ref, dh_ref = out["hf_experts_lora"]
    for name in ("peft", "ours_default"):
        assert rel_err(out[name][0], y_ref) < 1e-5, name
        assert rel_err(out[name][1], dh_ref) < 1e-5, name
    assert rel_err(out["hf_experts_base"][0], y_ref) > 1e-3      # the LoRA term is not trivial


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_peft_runs_param_wrappers_on_the_moe_op(arch, monkeypatch):
    base = tiny_moe(arch)
    pm = _peft(base, r=3, lora_alpha=5)
    _perturb_lora(pm)
    ids = _ids(seed=4)
    y_ref = pm(ids).logits
    y_ref.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    lk.patch_peft(pm)
    calls = []
    real = moe.moe_lora_linear
    monkeypatch.setattr(moe, "moe_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = pm(ids).logits
    assert len(calls) == 2                        # gate_up and down of the one MoE layer
    assert rel_err(y, y_ref) < 1e-12
    y.square().mean().backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, ref[n]) < 1e-11, n
    with pm.disable_adapter():                    # falls back to PEFT's forward
        assert rel_err(pm(ids).logits, base(ids).logits) < 1e-12
    lk.unpatch_peft(pm)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_served_mixed_batch_equals_each_adapters_peft_model(arch, tmp_path):
    """MultiAdapterModel with target_parameters: each sequence its own PEFT adapter (real ranks
    2/3/4, one also on q_proj), more adapters than slots, -1 (None) rows = base, prefill and
    KV-cached decode (generate); a NaN adapter stays in its own rows."""
    base = tiny_moe(arch, dtype=torch.float32)
    peft_models = {}
    for i, (r, tm) in enumerate(((2, []), (3, ["q_proj"]), (4, []))):
        torch.manual_seed(10 + i)
        pm = _peft(base, r=r, lora_alpha=2 * r + 1, target_modules=tm)
        _perturb_lora(pm)
        pm.save_pretrained(tmp_path / f"a{i}")
        peft_models[f"a{i}"] = pm
    server = lk.MultiAdapterModel(copy.deepcopy(base), target_modules=["q_proj"],
                                  target_parameters=TARGETS, max_adapters=2, max_rank=4)
    for n in peft_models:
        server.load_peft(n, tmp_path / n)
    ids = _ids(seed=5, shape=(4, 6))

    def ref(name, row):
        m = base if name is None else peft_models[name]
        with torch.no_grad():
            return m(row[None]).logits[0]

    with torch.no_grad():
        for names in (["a0", None, "a1", "a0"], ["a2", "a1", None, "a2"]):
            y = server(ids, adapters=names).logits
            for b, n in enumerate(names):
                assert rel_err(y[b], ref(n, ids[b])) < 1e-5, (names, b)
        assert rel_err(server(ids[:1], adapters=["a2"]).logits[0], ref("a0", ids[0])) > 1e-3
        out = server.generate(ids[:2], adapters=["a1", "a2"], max_new_tokens=4, do_sample=False)
        for b, n in enumerate(["a1", "a2"]):
            want = peft_models[n].generate(input_ids=ids[b:b + 1], max_new_tokens=4,
                                           do_sample=False)
            assert torch.equal(out[b], want[0]), n
        # a NaN adapter on the experts stays in its rows
        ad = lk.load_peft_adapter(tmp_path / "a0")
        k = "model.layers.0.mlp.experts.down_proj"
        A, B, s = ad[k]
        ad[k] = moe.ExpertFactors(A, torch.full_like(B, float("nan")), s)
        server.add("nan", ad)
        y = server(ids[:2], adapters=["nan", "a2"]).logits
        assert not torch.isfinite(y[0]).any()
        assert rel_err(y[1], ref("a2", ids[1])) < 1e-5
    # bad input: another expert count / a parameter not served
    bad = {k: moe.ExpertFactors(A[:3], B[:3], s)}
    with pytest.raises(ValueError, match="down_proj"):
        server.add("bad", bad)
    with pytest.raises(ValueError, match="layers.2"):
        server.add("bad", {"model.layers.2.mlp.experts.down_proj": ad[k]})
    assert "bad" not in server


def test_bench_moe_decode_case_matches_per_adapter_blocks():
    """The moe_block_decode bench case: the served step equals each token's own adapter run
    through LoRAExperts."""
    from lora_kernels.bench.cases_moe_block import decode_case, experts_module

    cpu = torch.device("cpu")
    case = decode_case(5, 2, 4, 16, 6, 3, torch.float32, cpu, n_adapters=2)
    d = case.make_inputs(cpu, 0)
    served = {im.name: im for im in case.impls}["ours_served"].prepare([d], cpu)(0)
    ex = moe.LoRAExperts(experts_module(d, cpu), TARGETS, r=1)
    for t, name in enumerate(d["names"]):
        for p, f in d["adapters"][int(name[1:])].items():
            ex.set_factors(p, moe.ExpertFactors(*f))
        with torch.no_grad():
            want = ex(d["h"][t:t + 1], d["idx"][t:t + 1], d["w"][t:t + 1])
        assert rel_err(served[t], want[0]) < 1e-5, t


def test_per_parameter_ranks_round_trip_through_peft(tmp_path):
    """gate_up and down with different ranks and scalings: save_peft_adapter writes
    rank_pattern / alpha_pattern keyed '<module>.<param>'; PEFT and our loader read them back."""
    base = tiny_moe("qwen3_moe")
    m = copy.deepcopy(base)
    lx = moe.LoRAExperts(m.model.layers[0].mlp.experts, TARGETS, r=2, alpha=3.0)
    lx.set_factors("down_proj", moe.ExpertFactors(torch.randn(5, 3, 7, dtype=torch.float64),
                                                  torch.randn(5, 16, 3, dtype=torch.float64), 0.7))
    with torch.no_grad():
        lx.lora_B["gate_up_proj"].normal_()
    m.model.layers[0].mlp.experts = lx
    lk.save_peft_adapter(m, tmp_path)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert rel_err(back(ids).logits, m(ids).logits) < 1e-12
    ad = lk.load_peft_adapter(tmp_path)
    for p, (A, B, s) in lx.factors().items():
        got = ad[f"model.layers.0.mlp.experts.{p}"]
        assert torch.equal(got.lora_A, A.detach()) and torch.equal(got.lora_B, B.detach())
        assert got.scaling == pytest.approx(s, rel=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_block_dtypes_against_float64(arch, dtype):
    """LoRAExperts in float32 / bfloat16 against the same block in float64: output, dhidden and
    every LoRA gradient (non-contiguous hidden, a skipped choice)."""
    from helpers import assert_close

    ref = moe.LoRAExperts(tiny_moe(arch).model.layers[0].mlp.experts, TARGETS, r=3, alpha=4.0)
    _perturb_lora(ref)
    low = copy.deepcopy(ref).to(dtype)
    h64 = torch.randn(11, 32, dtype=torch.float64)[:, ::2]
    idx = torch.randint(0, 5, (11, 2))
    idx[3, 1] = 5                                     # transformers' mask id: skipped
    w64 = torch.rand(11, 2, dtype=torch.float64)
    outs = {}
    for name, m, dt in (("ref", ref, torch.float64), ("low", low, dtype)):
        h = h64.to(dt).requires_grad_(True)
        y = m(h, idx, w64.to(dt))
        dy = torch.ones_like(y)
        ps = [*m.lora_A.values(), *m.lora_B.values()]
        outs[name] = (y, *torch.autograd.grad(y, (h, *ps), dy))
    for i, (a, b) in enumerate(zip(outs["low"], outs["ref"])):
        assert_close(a, b, dtype, f"output {i}", factor=4.0)
