"""QLoRA on CPU: a tiny Llama whose Linears are bitsandbytes NF4 ``Linear4bit`` (what
``BitsAndBytesConfig(load_in_4bit=True)`` gives), LoRA injected with ``lora_kernels.inject`` on the
4-bit layers as they are, fine-tuned a few AdamW steps, side by side with PEFT + bitsandbytes from
the same initial factors.

    python -m lora_kernels.examples.qlora          # ~10 s on a 2-core CPU

Without bitsandbytes installed (the optional ``quant`` extra) it runs the same fine-tune with the
package's own NF4 (``inject(..., quantize="nf4")``) and says so; there is then no PEFT side.
"""

from __future__ import annotations

import copy
import importlib.util
import time

import torch
from torch import nn

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama(seed: int = 1):
    """A randomly initialised 2-layer Llama (hidden 64, MLP 128; no downloads)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def bnb_tiny_llama(seed: int = 1):
    """:func:`tiny_llama` with every decoder Linear replaced by a bitsandbytes NF4 ``Linear4bit``
    (double quantisation, blocksize 64, fp32 compute), quantised on CPU, the model flagged
    ``is_loaded_in_4bit`` as transformers does; all parameters frozen."""
    import bitsandbytes as bnb

    model = tiny_llama(seed)
    for name, mod in list(model.model.named_modules()):
        if isinstance(mod, nn.Linear):
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(mod.weight.data.clone(), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            q = q.to("cpu")                                 # bitsandbytes quantises here
            parent, _, child = name.rpartition(".")
            setattr(model.model.get_submodule(parent) if parent else model.model, child, q)
    model.is_loaded_in_4bit = True
    return model.requires_grad_(False)


def train(model: nn.Module, ids: torch.Tensor, steps: int = 5, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps of next-token loss on ``ids (B, T)`` over the trainable parameters;
    returns the loss before each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(steps: int = 8) -> dict:
    import lora_kernels as lk

    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    if importlib.util.find_spec("bitsandbytes") is None:
        print("bitsandbytes is not installed: our own NF4 base (inject(..., quantize='nf4'))")
        model = tiny_llama().requires_grad_(False)
        lk.inject(model, "lora", target_modules=TARGETS, r=4, alpha=8.0, quantize="nf4")
        t = time.perf_counter()
        out["lora_kernels"] = train(model, ids, steps)
        print(f"losses {[f'{v:.4f}' for v in out['lora_kernels']]} "
              f"({time.perf_counter() - t:.1f} s)")
        return out
    import peft

    base = bnb_tiny_llama()
    ours = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0,
                                                   target_modules=TARGETS))
    lk.inject(ours, "lora", target_modules=TARGETS, r=4, alpha=8.0)
    with torch.no_grad():  # PEFT's initial factors into ours
        for name, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and isinstance(mod.lora_A, nn.ModuleDict):
                mine = ours.get_submodule(name.removeprefix("base_model.model."))
                mine.lora_A.copy_(mod.lora_A["default"].weight)
                mine.lora_B.copy_(mod.lora_B["default"].weight)
    four = sum(type(m).__name__ == "NF4Weight" for m in ours.modules())
    print(f"tiny Llama, {four} bitsandbytes NF4 Linear4bit layers wrapped as they are "
          f"(no re-quantisation, no dense copy); LoRA r=4 on {TARGETS}")
    for label, model in (("PEFT + bitsandbytes", pm), ("lora_kernels", ours)):
        t = time.perf_counter()
        out[label] = train(model, ids, steps)
        print(f"{label:>20}: losses {[f'{v:.4f}' for v in out[label]]} "
              f"({time.perf_counter() - t:.2f} s)")
    gap = max(abs(a - b) / abs(b) for a, b in zip(out["lora_kernels"], out["PEFT + bitsandbytes"]))
    print(f"max relative loss difference over {steps} steps: {gap:.2e}")
    return out


if __name__ == "__main__":
    main()
