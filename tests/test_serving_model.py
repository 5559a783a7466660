"""MultiAdapterModel and inject on a tiny randomly initialised transformers model: one forward of
a mixed batch equals each sequence run through its own adapter's merged model."""

import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk

from conftest import DEVICE, backends
from helpers import tiny_llama

transformers = pytest.importorskip("transformers")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = ATTN + ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _adapter(model, targets, ranks, scale, seed):
    """Random LoRA over ``targets`` (rank cycling through ``ranks``)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    for k, n in enumerate(names):
        lin = model.get_submodule(n)
        r = ranks[k % len(ranks)]
        A = torch.randn(r, lin.in_features, generator=g) / lin.in_features ** 0.5
        B = torch.randn(lin.out_features, r, generator=g) / r ** 0.5
        out[n] = (A.to(DEVICE), B.to(DEVICE), scale)
    return out


@torch.no_grad()
def _merged(base, *adapters):
    m = copy.deepcopy(base)
    for ad in adapters:
        for name, (A, B, s) in ad.items():
            lin = m.get_submodule(name)
            lin.weight.copy_((lin.weight.double() + s * (B.double() @ A.double())).float())
    return m


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ids(batch, length, seed=5):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed)).to(
        DEVICE)


@pytest.fixture(scope="module")
def adapters(base):
    return {"a": _adapter(base, TARGETS, [2, 8, 5], 0.5, 10),
            "b": _adapter(base, ["q_proj", "v_proj"], [1, 4], 2.0, 11),   # covers fewer modules
            "c": _adapter(base, TARGETS, [8], 1.0, 12)}


def _server(base, adapters, backend, names=("a", "b", "c"), max_rank=8):
    server = lk.MultiAdapterModel(copy.deepcopy(base), TARGETS, max_adapters=4,
                                  max_rank=max_rank, backend=backend)
    for n in names:
        server.add(n, adapters[n])
    return server


def _check_batch(server, base, adapters, ids, names, sums=None, tol=1e-5):
    sums = sums or {}
    with torch.no_grad():
        got = server(ids, adapters=names).logits
        for b, n in enumerate(names):
            parts = [] if n is None else [adapters[p] for p in sums.get(n, [n])]
            want = _merged(base, *parts)(ids[b:b + 1]).logits
            assert _rel(got[b:b + 1], want) < tol, (b, n)
            if n is not None:  # the adapter really changes this sequence
                assert _rel(base(ids[b:b + 1]).logits, want) > 1e-3


@pytest.mark.parametrize("backend", backends())
def test_mixed_batch_equals_merged_models(base, adapters, backend):
    server = _server(base, adapters, backend)
    assert all(isinstance(server.model.get_submodule(n), lk.serving.ServingLinear)
               for n in server.module_names)
    assert len(server.module_names) == 14
    names = ["a", None, "b", "c", "a"]
    _check_batch(server, base, adapters, _ids(5, 6), names)       # prefill-sized (T = 30)
    _check_batch(server, base, adapters, _ids(5, 1, seed=6), names)  # decode-sized (T = 5)
    # outside a call, or with adapters=None, the served model is the base model
    ids = _ids(2, 4)
    with torch.no_grad():
        assert _rel(server(ids).logits, base(ids).logits) < 1e-6


def test_generate_with_kv_cache(base, adapters):
    server = _server(base, adapters, "torch")
    ids = _ids(3, 5, seed=7)
    names = ["c", None, "a"]
    with torch.no_grad():
        out = server.generate(ids, names, max_new_tokens=4, do_sample=False, pad_token_id=0)
        for b, n in enumerate(names):
            m = _merged(base, *([adapters[n]] if n else []))
            want = m.generate(ids[b:b + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(out[b:b + 1], want), (b, n)


@pytest.mark.parametrize("backend", backends())
def test_sum_served_without_copy(base, adapters, backend):
    server = _server(base, adapters, backend, max_rank=12)   # the copied sum has rank 12
    slots = [layer.pool._occupied.clone() for layer in server.layers.values()]
    server.add_sum("a+b", ["a", "b"])
    server.add_sum("a+b+c", ["a+b", "c"])                         # nested sums flatten
    assert all(torch.equal(s, layer.pool._occupied)                # no weights copied
               for s, layer in zip(slots, server.layers.values()))
    server.add("ab_copy", lk.sum_adapters([adapters["a"], adapters["b"]]))  # the copying form
    sums = {"a+b": ["a", "b"], "a+b+c": ["a", "b", "c"], "ab_copy": ["a", "b"]}
    _check_batch(server, base, adapters, _ids(4, 3), ["a+b", "b", "a+b+c", "ab_copy"], sums)
    with pytest.raises(ValueError, match="part of the summed"):
        server.remove("b")
    server.remove("a+b+c")
    server.remove("a+b")
    server.remove("b")
    assert "b" not in server and "a+b" not in server


@pytest.mark.parametrize("backend", backends())
def test_remove_and_slot_reuse(base, adapters, backend):
    server = _server(base, adapters, backend)
    slot_a = server._slots["a"]
    server.remove("a")
    layer = server.layers["model.layers.0.self_attn.q_proj"]
    assert "a" not in layer.pool and (layer.pool.lora_A[slot_a] == 0).all()
    with pytest.raises(ValueError, match="not loaded"):
        server(_ids(1, 3), adapters=["a"])
    d = _adapter(base, ["o_proj", "down_proj"], [3], 1.5, 13)   # different modules than "a"
    assert server.add("d", d) == slot_a
    # q_proj does not get "d": its reused slot must be empty, not "a"'s stale weights
    assert int(layer.pool.ranks[slot_a]) == 0 and (layer.pool.lora_A[slot_a] == 0).all()
    _check_batch(server, base, {**adapters, "d": d}, _ids(3, 4), ["d", "b", None])


def test_bad_requests_leave_server_unchanged(base, adapters):
    server = _server(base, adapters, "torch", names=("a",))

    def snapshot():
        return [(layer.pool.lora_A.clone(), layer.pool.ranks.clone(), dict(layer.pool._slot_of))
                for layer in server.layers.values()]

    def same(s1, s2):
        return all(torch.equal(a1, a2) and torch.equal(r1, r2) and m1 == m2
                   for (a1, r1, m1), (a2, r2, m2) in zip(s1, s2))

    snap = snapshot()
    ids = _ids(2, 3)
    big = dict(adapters["c"])
    last = list(big)[-1]
    A, B, s = big[last]
    big[last] = (torch.randn(9, A.shape[1]), torch.randn(B.shape[0], 9), s)  # rank 9 > 8
    bad = [
        (lambda: server(ids, adapters=["a"]), ValueError, "one entry per sequence"),
        (lambda: server(ids, adapters=["a", "zzz"]), ValueError, "not loaded"),
        (lambda: server(ids, adapters=["a", 3]), TypeError, "names or None"),
        (lambda: server(ids, adapters="ab"), TypeError, "adapters"),
        (lambda: server.add("a", adapters["b"]), ValueError, "already"),
        (lambda: server.add("n", {"model.nope": adapters["b"]["model.layers.0.self_attn.q_proj"]}),
         ValueError, "not served"),
        (lambda: server.add("n", big), ValueError, "max_rank"),
        (lambda: server.add("n", {}), ValueError, "at least one"),
        (lambda: server.add("n", [1]), TypeError, "adapter"),
        (lambda: server.add("n", {last: (A, B)}), TypeError, "tuple"),
        (lambda: server.remove("zzz"), ValueError, "not loaded"),
        (lambda: server.add_sum("s", ["a", "zzz"]), ValueError, "parts"),
        (lambda: server.add_sum("s", "a"), TypeError, "parts"),
    ]
    for k, (call, exc, match) in enumerate(bad):
        with pytest.raises(exc, match=match):
            call()
        assert same(snap, snapshot()), k
        assert server._state.seq_ids is None
    assert server.adapters() == ["a"]
    for _ in range(3):
        server.add(f"x{_}", adapters["b"])
    # any number of adapters may be stored (DESIGN v2); a batch naming more distinct adapters
    # than the 4 device slots is what is refused
    assert server.add("more", adapters["b"]) is None
    with pytest.raises(ValueError, match="5 distinct stored adapters .* max_adapters=4"):
        server(_ids(5, 2), adapters=["a", "x0", "x1", "x2", "more"])
    assert server._state.seq_ids is None


def test_refuses_non_linear_targets():
    """Non-linear targets are refused; a transformers Conv1D (GPT-2) is served like an
    nn.Linear (DESIGN: Conv1D is accepted wherever nn.Linear is)."""
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    gpt2 = transformers.GPT2LMHeadModel(cfg).eval()        # eval: no dropout
    with pytest.raises(TypeError, match="GPT2Attention"):
        lk.MultiAdapterModel(copy.deepcopy(gpt2), ["attn"])
    with pytest.raises(TypeError, match="GPT2Attention"):
        lk.inject(copy.deepcopy(gpt2), "lora", ["attn"], r=2)
    server = lk.MultiAdapterModel(copy.deepcopy(gpt2), ["c_attn"], max_adapters=2, max_rank=2)
    A, B = torch.randn(2, 32), torch.randn(96, 2)
    server.add("a", {"transformer.h.0.attn.c_attn": (A, B, 1.0)})
    ids = torch.randint(0, 64, (2, 3))
    with torch.no_grad():
        got = server(ids, adapters=["a", None]).logits
        ref = copy.deepcopy(gpt2)
        ref.transformer.h[0].attn.c_attn.weight += (B @ A).t()      # Conv1D weight is (in, out)
        assert _rel(got[:1], ref(ids[:1]).logits) < 1e-5
        assert _rel(got[1:], gpt2(ids[1:]).logits) < 1e-6


# ----------------------------------------------------------------------------- inject
def test_inject_lora(base):
    model = copy.deepcopy(base)
    out = lk.inject(model, "lora", ["q_proj", "v_proj"], r=4, alpha=8)
    assert out is model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lk.LoRALinear)}
    assert sorted(layers) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                    for p in ("q_proj", "v_proj"))
    assert all(m.r == 4 and m.scaling == 2.0 for m in layers.values())
    ids = _ids(2, 5)
    with torch.no_grad():
        assert _rel(model(ids).logits, base(ids).logits) < 1e-6   # B = 0 at init
        for m in layers.values():
            m.lora_B.normal_()
        ad = {n: m.as_lora() for n, m in layers.items()}
        assert _rel(model(ids).logits, _merged(base, ad)(ids).logits) < 1e-5
    # regex form: full-name match
    m2 = lk.inject(copy.deepcopy(base), "lora", r"model\.layers\.1\.mlp\.(up|down)_proj", r=2)
    assert sorted(n for n, m in m2.named_modules() if isinstance(m, lk.LoRALinear)) == [
        "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]


def test_inject_uses_methods_registry(base, monkeypatch):
    class Scaled(lk.AdapterLinear):
        @classmethod
        def from_linear(cls, linear, factor):
            layer = cls(linear.weight, linear.bias)
            layer.factor = factor
            return layer

        def forward(self, x):
            return self.factor * nn.functional.linear(x, self.weight, self.bias)

    monkeypatch.setitem(lk.METHODS, "scaled", Scaled)
    model = lk.inject(copy.deepcopy(base), "scaled", ["o_proj"], factor=3.0)
    got = [m.factor for m in model.modules() if isinstance(m, Scaled)]
    assert got == [3.0, 3.0]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(method="nope", target_modules=["q_proj"]), ValueError, "method"),
    (dict(method="lora", target_modules=["nothing_here"], r=2), ValueError, "matched no"),
    (dict(method="lora", target_modules=["self_attn"], r=2), TypeError, "LlamaAttention"),
    (dict(method="lora", target_modules=[], r=2), ValueError, "empty"),
    (dict(method="lora", target_modules=[3], r=2), TypeError, "target_modules"),
    (dict(method="lora", target_modules="(", r=2), ValueError, "regex"),
    (dict(method="lora", r=2), ValueError, "target_modules"),
    (dict(method="lora", target_modules=["q_proj"], r=0), ValueError, "r"),
])
def test_inject_refusals_leave_model_unchanged(base, kwargs, exc, match):
    model = copy.deepcopy(base)
    before = [type(m) for m in model.modules()]
    with pytest.raises(exc, match=match):
        lk.inject(model, **kwargs)
    assert [type(m) for m in model.modules()] == before
