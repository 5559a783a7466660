"""The main job, end to end on a tiny model: ``python -m lora_kernels.demo`` (``make demo``).

1. Build a tiny randomly initialised Hugging Face causal LM from a config (no downloads).
2. Fine-tune it on a small synthetic task (next token = (5 * token + 3) mod vocab) with LoRA and
   each variant (NoRA, CURLoRA, Deep LoRA, GLoRA) injected through ``lora_kernels.inject``; the
   same data, steps and optimiser for every method.
3. Merge each fine-tuned model (``merged()`` per layer) and check it against the unmerged one.
4. Serve one mixed batch through ``MultiAdapterModel``: every method's LoRA-equivalent adapter
   (``as_lora()``), their ``sum_loras`` and the base model (``None``), one adapter per sequence;
   check every served row against the corresponding merged model.
5. Print a table (method, trainable params, loss start -> end, merged-check error, served-check
   error, time) and save a PNG of loss curves and timings plus a JSON under ``runs/``
   (untracked; ``--out bench/results`` writes the committed reference deliberately).

CPU by default when no GPU is present (a few minutes at most on 2 cores); ``--device cuda`` /
``--backend triton`` on a GPU. Each method is one entry of :data:`METHODS`. A method whose pieces
are missing or fail is reported in the table with its error and the demo exits non-zero.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class MethodSpec:
    """One method of the demo: its layer class (looked up in ``lora_kernels.METHODS`` to find
    the ``inject`` name), ``inject`` keyword arguments, learning rate, and whether it has a
    LoRA-equivalent form that the server can hold (all but GLoRA)."""

    name: str
    layer_class: str
    kwargs: dict = field(default_factory=dict)
    lr: float = 1e-2
    servable: bool = True


METHODS = [
    MethodSpec("LoRA", "LoRALinear", dict(r=8, alpha=16)),
    MethodSpec("NoRA", "NoRALinear", dict(outer_rank=16, inner_rank=8, alpha=16.0), lr=3e-2),
    MethodSpec("CURLoRA", "CURLoRALinear", dict(rank=8, alpha=8.0), lr=5e-2),
    MethodSpec("Deep LoRA", "DeepLoRALinear", dict(rank=8, depth=3)),
    MethodSpec("GLoRA", "GLoRALinear", dict(rank=4), servable=False),
]


# ----------------------------------------------------------------------------- model and data
def tiny_model(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def batch(n: int, length: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """Sequences of the synthetic task: t[i+1] = (5 t[i] + 3) mod vocab from a random start."""
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for i in range(1, length):
        x[:, i] = (5 * x[:, i - 1] + 3) % vocab
    return x


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    from lora_kernels import AdapterLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def replace_modules(model: nn.Module, new: dict[str, nn.Module]) -> None:
    for name, mod in new.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mod)


def merged_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    replace_modules(m, {n: layer.merged() for n, layer in adapter_layers(m).items()})
    return m


def dense_lora_model(base: nn.Module, adapter: dict) -> nn.Module:
    """base + scaling * B @ A folded densely into each named linear (reference for served sums)."""
    m = copy.deepcopy(base)
    with torch.no_grad():
        for name, (A, B, s) in adapter.items():
            lin = m.get_submodule(name)
            lin.weight.copy_((lin.weight.double() + s * (B.double() @ A.double()))
                             .to(lin.weight.dtype))
    return m


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- one method
def inject_name(spec: MethodSpec) -> str:
    import lora_kernels

    for key, cls in lora_kernels.METHODS.items():
        if cls.__name__ == spec.layer_class:
            return key
    raise LookupError(f"{spec.layer_class} is not registered in lora_kernels.METHODS "
                      f"(registered: {sorted(lora_kernels.METHODS)})")


def train_method(spec: MethodSpec, base: nn.Module, args, device) -> dict:
    import lora_kernels

    res = {"method": spec.name, "status": "ok"}
    model = copy.deepcopy(base).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    lora_kernels.inject(model, method=inject_name(spec), target_modules=TARGETS, **spec.kwargs)
    layers = adapter_layers(model)
    if not layers:
        raise RuntimeError("inject replaced no module")
    for layer in layers.values():
        layer.backend = args.backend
    params = [p for p in model.parameters() if p.requires_grad]
    res["trainable_params"] = sum(p.numel() for p in params)
    res["adapted_modules"] = len(layers)
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1234)            # the same data for every method
    losses = []
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        ids = batch(args.batch, args.seq, 128, g).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, args.steps // 4) == 0 or step == 0:
            print(f"  [{spec.name}] step {step + 1:>3}/{args.steps}  loss {losses[-1]:.3f}",
                  flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    res["train_s"] = time.perf_counter() - t0
    res["ms_per_step"] = 1e3 * res["train_s"] / args.steps
    res["losses"] = losses
    res["loss_start"] = losses[0]
    res["loss_end"] = sum(losses[-5:]) / len(losses[-5:])
    model.eval()

    # merge and compare with the unmerged model on held-out sequences
    t0 = time.perf_counter()
    merged = merged_copy(model)
    ids = batch(8, args.seq, 128, torch.Generator().manual_seed(99)).to(device)
    with torch.no_grad():
        ref = logits_of(model(input_ids=ids))
        out = logits_of(merged(input_ids=ids))
    res["merge_max_abs_err"] = (out - ref).abs().max().item()
    res["merge_rel_err"] = rel(out, ref)
    res["merge_s"] = time.perf_counter() - t0
    res["_model"], res["_merged"] = model, merged
    if spec.servable:
        res["_adapter"] = {n: tuple(t.detach() if isinstance(t, torch.Tensor) else t
                                    for t in layer.as_lora()) for n, layer in layers.items()}
    return res


# ----------------------------------------------------------------------------- serving
def serve_and_check(results: list[dict], base: nn.Module, args, device) -> dict:
    import lora_kernels

    served = [r for r in results if r.get("status") == "ok" and "_adapter" in r]
    if not served:
        raise RuntimeError("no trained LoRA-equivalent adapter to serve")
    names = [r["method"] for r in served]
    t0 = time.perf_counter()
    server = lora_kernels.MultiAdapterModel(copy.deepcopy(base).to(device),
                                            target_modules=TARGETS)
    for r in served:
        server.add(r["method"], r["_adapter"])
    modules = list(served[0]["_adapter"])
    summed = {m: lora_kernels.sum_loras([r["_adapter"][m] for r in served]) for m in modules}
    server.add("sum", summed)
    setup_s = time.perf_counter() - t0

    # one mixed batch: every adapter, the sum and the base model, twice, interleaved
    per_seq = (names + ["sum", None]) * 2
    ids = batch(len(per_seq), args.seq, 128, torch.Generator().manual_seed(7)).to(device)
    with torch.no_grad():
        out = logits_of(server(ids, adapters=per_seq))
        serve_s = []
        for _ in range(3):                     # the first call above warmed up; time three more
            t0 = time.perf_counter()
            again = logits_of(server(ids, adapters=per_seq))
            if device.type == "cuda":
                torch.cuda.synchronize()
            serve_s.append(time.perf_counter() - t0)
        serve_s = sorted(serve_s)[1]
        if not torch.equal(again, out):
            raise RuntimeError("serving the same batch twice gave different outputs")
        refs = {r["method"]: logits_of(r["_merged"](input_ids=ids)) for r in served}
        refs["sum"] = logits_of(dense_lora_model(base.to(device), summed)(input_ids=ids))
        refs[None] = logits_of(base.to(device)(input_ids=ids))
    checks: dict[str, float] = {}
    for i, name in enumerate(per_seq):
        e = rel(out[i], refs[name][i])
        key = "base (None)" if name is None else name
        checks[key] = max(checks.get(key, 0.0), e)
    return {"adapters": per_seq, "rel_err": checks, "setup_s": setup_s, "serve_s": serve_s,
            "batch": list(ids.shape)}


# ----------------------------------------------------------------------------- report
def print_table(results, serving, tol) -> None:
    print("\n" + "-" * 100)
    print(f"{'method':<10} {'trainable':>10} {'loss start -> end':>19} {'merged err':>11} "
          f"{'served err':>17} {'train s':>8} {'ms/step':>8}  status")
    for r in results:
        if r["status"] != "ok":
            print(f"{r['method']:<10} {'-':>10} {'-':>19} {'-':>11} {'-':>17} {'-':>8} {'-':>8}"
                  f"  {r['status']}: {r.get('error', '')[:80]}")
            continue
        srv = "n/a" if serving is None else (
            f"{serving['rel_err'][r['method']]:.1e}" if r["method"] in serving["rel_err"]
            else "n/a: not low-rank")
        ok = r["merge_rel_err"] < tol
        print(f"{r['method']:<10} {r['trainable_params']:>10,} "
              f"{r['loss_start']:>8.3f} -> {r['loss_end']:<7.3f} {r['merge_rel_err']:>11.1e} "
              f"{srv:>17} {r['train_s']:>8.2f} {r['ms_per_step']:>8.1f}  "
              f"{'ok' if ok else 'MERGE MISMATCH'}")
    if serving is not None:
        for k in ("sum", "base (None)"):
            if k in serving["rel_err"]:
                print(f"{k:<10} {'':>10} {'':>19} {'':>11} {serving['rel_err'][k]:>17.1e}")
        print(f"mixed batch of {serving['batch'][0]} sequences x {serving['batch'][1]} tokens "
              f"served in one call: {1e3 * serving['serve_s']:.1f} ms (median of 3) "
              f"(adapters per sequence: {serving['adapters']})")
    print("errors are ||out - ref|| / ||ref|| of the logits (merged: merged vs unmerged model; "
          f"served: each row vs its merged model); pass below {tol:g}")
    print("-" * 100)


def plot(results, serving, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in ok:
        a1.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["method"])
    a1.set_xlabel("step")
    a1.set_ylabel("training loss")
    a1.set_title("loss curves (same data, same steps)")
    a1.legend(fontsize=8)
    labels = [r["method"] for r in ok]
    a2.bar(labels, [r["ms_per_step"] for r in ok], label="train ms/step")
    a2.set_ylabel("ms per training step")
    a2.set_title("timings" + (f" (served mixed batch: {1e3 * serving['serve_s']:.1f} ms)"
                              if serving else ""))
    for i, r in enumerate(ok):
        a2.text(i, r["ms_per_step"], f"{r['trainable_params']:,} params", ha="center",
                va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_kernels.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--backend", default=None, help="lora_kernels backend (default: None)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--out", default="runs",
                    help="output folder (default runs/, untracked; --out bench/results refreshes "
                         "the committed reference)")
    ap.add_argument("--only", default=None, help="comma-separated method names")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # the tiny model gains nothing from more CPU threads, and one thread avoids OpenMP's
    # slow-down when the cores are shared with other work
    torch.set_num_threads(args.threads or (1 if device.type == "cpu" else torch.get_num_threads()))
    tol = 1e-4
    t_all = time.perf_counter()
    print(f"lora_kernels demo on {device} (backend={args.backend!r}): tiny Llama, hidden 64, "
          f"2 layers, vocab 128; {args.steps} steps x batch {args.batch} x {args.seq} tokens",
          flush=True)
    base = tiny_model()
    specs = [s for s in METHODS if not args.only or s.name in args.only.split(",")]
    results = []
    for spec in specs:
        print(f"\n== {spec.name}: inject({spec.layer_class}, {spec.kwargs})", flush=True)
        try:
            results.append(train_method(spec, base, args, device))
        except Exception as e:  # noqa: BLE001 - reported in the table, exit code 1
            traceback.print_exc(limit=3)
            results.append({"method": spec.name, "status": "error",
                            "error": f"{type(e).__name__}: {e}"})
    serving, serve_err = None, None
    print("\n== serving one mixed batch through MultiAdapterModel", flush=True)
    try:
        serving = serve_and_check(results, base, args, device)
    except Exception as e:  # noqa: BLE001 - reported below, exit code 1
        traceback.print_exc(limit=3)
        serve_err = f"{type(e).__name__}: {e}"
        print(f"serving failed: {serve_err}")
    print_table(results, serving, tol)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"demo_{device.type}"
    record = {"device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
              "backend": args.backend, "steps": args.steps, "torch": torch.__version__,
              "methods": [{k: v for k, v in r.items() if not k.startswith("_")}
                          for r in results],
              "serving": serving, "serving_error": serve_err,
              "wall_s": time.perf_counter() - t_all}
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str))
    if not args.no_plot:
        png = plot(results, serving, out_dir / f"{stem}.png",
                   f"lora_kernels demo on {record['device']}")
        print(f"plot: {png}")
    print(f"results: {out_dir / f'{stem}.json'}  ({record['wall_s']:.0f} s)")
    failed = [r["method"] for r in results if r["status"] != "ok" or r["merge_rel_err"] >= tol]
    if serving is not None:
        failed += [f"served {k}" for k, v in serving["rel_err"].items() if v >= tol]
    if failed or serve_err:
        print(f"FAILED: {failed + ([serve_err] if serve_err else [])}")
        return 1
    print("all merged and served outputs match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
