"""Test utilities: relative error against float64, poisoning, non-contiguous copies, tiny
transformers models, PEFT adapters and their files, a short AdamW run."""

import copy
import json
import warnings

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



def tiny_causal_lm(kind: str = "llama", vocab: int = 64, seed: int = 1):
    """A randomly initialised 2-layer causal LM on DEVICE, in eval mode: ``"gpt2"``
    (:func:`tiny_gpt2`, vocab 64 only), ``"llama"``, ``"llama_tied"`` (lm_head tied to the
    embedding) or ``"qwen2"`` (q/k/v biases)."""
    import transformers

    if kind == "gpt2":
        if vocab != 64:
            raise ValueError(f"tiny gpt2 has vocab 64, got {vocab}")
        return tiny_gpt2(seed)
    if kind not in ("llama", "llama_tied", "qwen2"):
        raise ValueError(f"kind must be gpt2/llama/llama_tied/qwen2, got {kind!r}")
    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}.get(
        kind, (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    cfg = cls[0](vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 tie_word_embeddings=kind == "llama_tied")
    torch.manual_seed(seed)
    return cls[1](cfg).to(DEVICE).eval()


def token_ids(n: int = 3, length: int = 7, seed: int = 0, vocab: int = 64) -> torch.Tensor:
    """``(n, length)`` random token ids in ``[0, vocab)`` on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).to(DEVICE)


def random_peft(base, config, seed: int, *, scale: float = 0.2, select=None, add=False):
    """``peft.get_peft_model`` of a copy of ``base`` (its warnings silenced), in eval mode, with
    every parameter that ``select(name, p)`` picks (default: the trainable ones) set to (or,
    with ``add``, moved by) ``scale * N(0, 1)`` from generator ``seed``, so that no adapter term
    is trivially zero."""
    import peft

    select = select or (lambda n, p: p.requires_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if select(n, p):
                d = torch.randn(p.shape, generator=g).to(p) * scale
                p.add_(d) if add else p.copy_(d)
    return pm.eval()


def save_peft(pm, path) -> str:
    """``pm.save_pretrained(path)`` with its warnings silenced; ``str(path)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(path))
    return str(path)


def train_adamw(model, params=None, steps: int = 3, batch=None) -> list[float]:
    """``steps`` AdamW steps (lr 1e-2) of the causal-LM loss on ``params`` (default: the
    trainable parameters of ``model``), step s on ids ``batch(s)`` (default
    ``token_ids(4, 9, seed=s)``); the losses."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    batch = batch or (lambda step: token_ids(4, 9, seed=step))
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(steps):
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def adapter_files(path):
    """A saved PEFT adapter folder: ``(adapter_config.json as a dict, its safetensors)``, the
    ``target_modules`` list sorted (PEFT keeps a set: its order is hash-seeded)."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return cfg, load_file(str(path / "adapter_model.safetensors"))


def assert_same_adapter_files(a, b, tol=1e-5):
    """Two saved adapter folders: equal configs, same tensor names, shapes and dtypes, values
    within ``tol`` relative error."""
    ca, ta = adapter_files(a)
    cb, tb = adapter_files(b)
    assert ca == cb
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].shape == tb[k].shape and ta[k].dtype == tb[k].dtype
        assert rel_err(ta[k], tb[k]) < tol, k

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


def snapshot(obj, _seen=None, _depth=0):
    """A comparable, bitwise picture of ``obj``'s whole state (tensors as dtype, shape, strides
    and raw bytes, so NaN payloads and -0.0 count; dicts, lists, nn.Modules and the package's
    objects recursively through their ``__dict__``): ``snapshot(x) == snapshot(x)`` after a
    call means the call changed nothing. See :func:`assert_refused`."""
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        raw = t.cpu().contiguous().reshape(-1)
        raw = raw.view(torch.uint8) if raw.numel() and raw.dtype != torch.bool else raw
        return ("T", str(t.dtype), tuple(t.shape), tuple(t.stride()), t.requires_grad,
                bytes(raw.numpy().tobytes()))
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype,
                                       torch.device)):
        return obj if not (isinstance(obj, float) and obj != obj) else ("nan",)
    if id(obj) in seen or _depth > 40:
        return ("seen", type(obj).__name__)
    seen.add(id(obj))
    rec = lambda v: snapshot(v, seen, _depth + 1)  # noqa: E731
    if isinstance(obj, dict):
        return ("D", type(obj).__name__, tuple((repr(k), rec(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return ("L", type(obj).__name__, tuple(rec(v) for v in obj))
    if isinstance(obj, (set, frozenset)):
        return ("S", tuple(sorted(repr(v) for v in obj)))
    mod = type(obj).__module__ or ""
    if isinstance(obj, torch.nn.Module) or mod.split(".")[0] in (
            "lora_kernels", "peft", "transformers", "tests", "helpers"):
        if hasattr(obj, "__dict__"):
            return ("O", type(obj).__qualname__,
                    tuple((k, rec(v)) for k, v in sorted(vars(obj).items())
                          if not callable(v) or isinstance(v, torch.nn.Module)))
    return ("X", type(obj).__qualname__)


def assert_refused(call, exc, *objs, match=None):
    """``call()`` raises ``exc`` (a ValueError / TypeError naming the argument: ``match``) and
    leaves every object in ``objs`` bitwise unchanged (:func:`snapshot`): a refused call
    changes nothing."""
    import pytest

    before = [snapshot(o) for o in objs]
    with pytest.raises(exc, match=match):
        call()
    after = [snapshot(o) for o in objs]
    for i, (b, a) in enumerate(zip(before, after)):
        assert b == a, f"object {i} ({type(objs[i]).__name__}) changed by a refused call"
