"""Test utilities: relative error against float64, poisoning, non-contiguous copies."""

import torch

from conftest import DEVICE, TOL


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN/inf in out -> inf)."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def assert_close(out, ref, dtype, name="", factor=1.0):
    err = rel_err(out, ref)
    tol = TOL[dtype] * factor
    assert err < tol, f"{name}: rel err {err:.3e} >= {tol:.1e} ({dtype})"


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous storage (every other column of a wider buffer)."""
    buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    out = buf[..., ::2]
    assert not out.is_contiguous() or t.shape[-1] <= 1
    return out


def randn(*shape, dtype=torch.float32, scale=1.0, requires_grad=False):
    """Standard normal (drawn in float64, then cast) on DEVICE; ``randn()`` is a 0-d tensor."""
    t = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)
    return t.requires_grad_(requires_grad)


def to64(v):
    """A float64 leaf copy of ``v`` keeping ``requires_grad`` (lists/tuples element by element;
    None and integer tensors as they are): the inputs of a float64 reference."""
    if isinstance(v, (list, tuple)):
        return type(v)(to64(t) for t in v)
    if v is None or not v.is_floating_point():
        return v
    return v.detach().double().requires_grad_(v.requires_grad)


def perturb_(module, scale=0.3):
    """Every trainable parameter of ``module`` set to ``scale * N(0, 1)`` (so no adapter term or
    gradient is trivially zero); returns ``module``."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * scale)
    return module


def poison_(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


def tiny_llama(seed: int = 1):
    """A randomly initialised 2-layer Llama (no downloads) on DEVICE, in eval mode."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE).eval()


def tiny_gpt2(seed: int = 1):
    """A randomly initialised 2-layer GPT-2 (transformers Conv1D projections, no dropout, no
    downloads) on DEVICE, in eval mode."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).to(DEVICE).eval()


CPU_STRATEGIES = ("dense_add_", "runs_add_", "sorted_add_", "gather_add_")


def spy_cpu_strategies(monkeypatch) -> list[str]:
    """Record (in the returned list, in call order) which strategies of the multi-LoRA torch
    backend run; each still does its work."""
    from lora_kernels.ops.multi_lora import torch_backend as MT

    seen: list[str] = []
    for name in CPU_STRATEGIES:
        fn = getattr(MT, name)
        monkeypatch.setattr(MT, name, lambda *a, _f=fn, _n=name, **k: (seen.append(_n),
                                                                       _f(*a, **k))[1])
    return seen
