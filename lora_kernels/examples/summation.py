"""Naive LoRA summation at toy scale on CPU: ``python -m lora_kernels.examples.summation``.

The study this package's composition tools come from trains GPT-2 LoRA adapters (r=4, alpha=64 on
``c_attn``) on disjoint domains, adds them (``W + sum_k s_k B_k A_k``) and asks when the sum does
as well as one adapter trained on the merged data; its central measurement is the RMS cosine
between the adapters' deltas against the loss change of the sum. Here:

1. a tiny GPT-2 (transformers ``GPT2LMHeadModel``, ``Conv1D`` projections) is trained from scratch
   on a *generic* process: a random sparse Markov chain over the whole vocabulary;
2. ``n_domains`` synthetic domains: ``d0, d1, ...``, each its own sparse Markov chain over a
   disjoint slice of the vocabulary, then ``twin`` (``d0``'s chain again, fresh samples: the same
   task) and ``clash`` (``d0``'s tokens, another chain: a conflicting task), so the adapters'
   cosines span disjoint, conflicting and identical tasks;
3. one LoRA adapter per domain (``lora_kernels.inject(model, "lora", ["c_attn"], r=4, alpha=64)``,
   our fused layer reading GPT-2's ``Conv1D`` weight through its transposed view), and one on the
   merged data of every pair and triple (``k`` domains: ``k`` times the steps, the same examples
   per domain);
4. every pair and triple summed exactly with :func:`lora_kernels.sum_adapters` (one LoRA of rank
   ``4k``, injected with :func:`lora_kernels.inject_adapter`) and also served as a sum by
   :class:`lora_kernels.MultiAdapterModel` (``add_sum``: the stored adapters, no weights copied;
   ``loss_sum_served``, equal up to rounding), evaluated on the union of the domains' held-out
   data against the merged-data adapter on the same data.

Output (``--out``, default ``bench/results/summation``): ``summation.json`` (every row, the
settings, the Pearson correlation of RMS cosine with the relative loss change) and, when
matplotlib is installed, ``summation.png``. ``--small`` is the fast size the test uses.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F


@dataclass
class Settings:
    n_domains: int = 4          # d0, d1, ..., then "twin" and "clash" (see make_domains)
    tokens_per_domain: int = 10
    generic_tokens: int = 10    # extra vocabulary only the generic pretraining process uses
    successors: int = 3         # out-degree of every chain
    n_embd: int = 48
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 20
    batch: int = 16
    pretrain_steps: int = 150
    pretrain_lr: float = 3e-3
    lora_steps: int = 40        # per domain (k domains merged: k * lora_steps)
    lora_lr: float = 2e-3
    r: int = 4
    alpha: float = 64.0
    eval_seqs: int = 48         # held-out sequences per domain
    max_k: int = 3              # pairs and triples
    seed: int = 0


SMALL = Settings(n_domains=4, max_k=2, tokens_per_domain=6, generic_tokens=6, n_embd=32, n_layer=1,
                 n_head=2, seq_len=12, batch=8, pretrain_steps=30, lora_steps=8, eval_seqs=8)


class Chain:
    """A sparse first-order Markov chain over ``tokens``: every token has ``successors`` next
    tokens with random probabilities."""

    def __init__(self, tokens: torch.Tensor, successors: int, g: torch.Generator):
        n = len(tokens)
        self.tokens = tokens
        self.next = torch.stack([tokens[torch.randperm(n, generator=g)[:successors]]
                                 for _ in range(n)])                     # (n, successors)
        self.prob = torch.rand(n, successors, generator=g) + 0.2
        self.prob /= self.prob.sum(1, keepdim=True)
        self.index = {int(t): i for i, t in enumerate(tokens)}

    def sample(self, n_seq: int, length: int, g: torch.Generator) -> torch.Tensor:
        out = torch.empty(n_seq, length, dtype=torch.long)
        cur = torch.randint(0, len(self.tokens), (n_seq,), generator=g)
        out[:, 0] = self.tokens[cur]
        for t in range(1, length):
            j = torch.multinomial(self.prob[cur], 1, generator=g)[:, 0]
            nxt = self.next[cur, j]
            out[:, t] = nxt
            cur = torch.tensor([self.index[int(v)] for v in nxt])
        return out


def make_domains(st: Settings, g: torch.Generator):
    """(vocab, generic chain, [(name, chain)]): ``n_domains - 2`` domains ``d0, d1, ...`` on
    disjoint token slices, then ``twin`` (``d0``'s very chain: the same task, fresh samples) and
    ``clash`` (``d0``'s tokens, a different chain): the three relations (disjoint, identical,
    conflicting) span the cosine axis."""
    n_plain = max(1, st.n_domains - 2)
    vocab = n_plain * st.tokens_per_domain + st.generic_tokens
    generic = Chain(torch.arange(vocab), 2 * st.successors, g)
    doms = []
    for d in range(n_plain):
        toks = torch.arange(d * st.tokens_per_domain, (d + 1) * st.tokens_per_domain)
        doms.append((f"d{d}", Chain(toks, st.successors, g)))
    doms.append(("twin", doms[0][1]))
    doms.append(("clash", Chain(doms[0][1].tokens.clone(), st.successors, g)))
    return vocab, generic, doms


def tiny_gpt2(st: Settings, vocab: int):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=st.seq_len, n_embd=st.n_embd,
                                  n_layer=st.n_layer, n_head=st.n_head, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(model, params, sampler, steps: int, lr: float, batch: int) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        loss = lm_loss(model, sampler(step, batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def evaluate(model, ids: torch.Tensor) -> float:
    return float(lm_loss(model.eval(), ids))


def train_adapter(base, st: Settings, chains, seed: int) -> dict:
    """A LoRA (r, alpha on c_attn) trained on the merged data of ``chains`` (round-robin batches,
    ``len(chains) * lora_steps`` steps); returns its adapter dict."""
    import lora_kernels as lk
    from lora_kernels.peft_io import adapter_dict

    torch.manual_seed(seed)
    model = copy.deepcopy(base).requires_grad_(False)
    lk.inject(model, "lora", ["c_attn"], r=st.r, alpha=st.alpha)
    g = torch.Generator().manual_seed(seed)

    def sampler(step, batch):
        return chains[step % len(chains)].sample(batch, st.seq_len, g)

    params = [p for p in model.parameters() if p.requires_grad]
    train(model, params, sampler, len(chains) * st.lora_steps, st.lora_lr, st.batch)
    return {k: (A.detach().clone(), B.detach().clone(), s)
            for k, (A, B, s) in adapter_dict(model).items()}


def pearson(xs, ys) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def run(st: Settings, out_dir: str | None, *, log=print, threads: int | None = 1) -> dict:
    """Run the study at size ``st``; write ``out_dir/summation.json`` (+ ``.png``) unless None.
    ``threads``: torch intra-op threads while it runs (1 by default: at these sizes every op is
    microseconds and a second thread only adds synchronisation; measured on the 2-core CPU box,
    30 pretraining steps of the ``--small`` model took 0.5 s on 1 thread and 17.6 s on 2 threads
    with the other cores busy). Restored afterwards."""
    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(st, out_dir, log)
    finally:
        torch.set_num_threads(prev)


def _run(st: Settings, out_dir: str | None, log) -> dict:
    import lora_kernels as lk

    t0, c0 = time.perf_counter(), time.process_time()
    g = torch.Generator().manual_seed(st.seed)
    vocab, generic, doms = make_domains(st, g)
    torch.manual_seed(st.seed)
    base = tiny_gpt2(st, vocab)
    train(base, list(base.parameters()), lambda step, b: generic.sample(b, st.seq_len, g),
          st.pretrain_steps, st.pretrain_lr, st.batch)
    base.requires_grad_(False)
    eval_ids = {n: c.sample(st.eval_seqs, st.seq_len, torch.Generator().manual_seed(99 + i))
                for i, (n, c) in enumerate(doms)}
    chains = dict(doms)
    names = [n for n, _ in doms]
    log(f"pretrained base in {time.perf_counter() - t0:.1f} s; generic loss "
        f"{evaluate(base, generic.sample(64, st.seq_len, g)):.3f}")
    single = {n: train_adapter(base, st, [chains[n]], st.seed + 1 + i)
              for i, n in enumerate(names)}
    # the sums served: one MultiAdapterModel over GPT-2's Conv1D c_attn, each single adapter
    # stored once, every pair / triple an add_sum of them (no weights copied)
    server = lk.MultiAdapterModel(copy.deepcopy(base), ["c_attn"], max_adapters=len(names),
                                  max_rank=st.r)
    for n in names:
        server.add(n, single[n])
    rows = []
    for k in range(2, min(st.max_k, len(names)) + 1):
        for combo in itertools.combinations(names, k):
            ids = torch.cat([eval_ids[n] for n in combo])
            merged = train_adapter(base, st, [chains[n] for n in combo],
                                   st.seed + 100 + len(rows))
            summed = lk.sum_adapters([single[n] for n in combo])
            loss_sum = evaluate(lk.inject_adapter(copy.deepcopy(base), summed), ids)
            server.add_sum("+".join(combo), list(combo))
            with torch.no_grad(), server.using(["+".join(combo)] * len(ids)):
                loss_served = float(lm_loss(server.model.eval(), ids))
            loss_merged = evaluate(lk.inject_adapter(copy.deepcopy(base), merged), ids)
            cos = [lk.rms_cosine(single[a], single[b]) for a, b in itertools.combinations(combo, 2)]
            rows.append(dict(
                domains=list(combo), k=k, rms_cosine=sum(cos) / len(cos), pairwise_rms_cosine=cos,
                loss_base=evaluate(base, ids), loss_merged=loss_merged, loss_sum=loss_sum,
                loss_sum_served=loss_served,
                rel_loss_change=(loss_sum - loss_merged) / loss_merged,
                summed_rank=int(next(iter(summed.values()))[0].shape[0])))
            r = rows[-1]
            log(f"{'+'.join(combo):>16}  rms_cos {r['rms_cosine']:.3f}  base {r['loss_base']:.3f}  "
                f"merged {loss_merged:.3f}  sum {loss_sum:.3f}  change {r['rel_loss_change']:+.1%}")
    own = {n: evaluate(lk.inject_adapter(copy.deepcopy(base), single[n]), eval_ids[n])
           for n in names}
    xs = [r["rms_cosine"] for r in rows]
    ys = [r["rel_loss_change"] for r in rows]
    result = dict(
        what="naive LoRA summation on a tiny GPT-2 (CPU): RMS cosine of the adapters vs the "
             "loss change of their exact sum relative to one adapter trained on the merged data, "
             "on the union of the domains' held-out data",
        settings=asdict(st), vocab=vocab, domains=names,
        own_domain_loss=own, rows=rows, pearson_rms_cosine_vs_rel_change=pearson(xs, ys),
        seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
        torch=torch.__version__, python=platform.python_version(),
        threads=torch.get_num_threads())
    log(f"pearson(rms_cosine, rel_loss_change) = {result['pearson_rms_cosine_vs_rel_change']:.3f}"
        f"; {result['seconds']:.1f} s")
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "summation.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out_dir, "summation.md"), "w", encoding="utf-8") as f:
            f.write(table(result))
        if importlib.util.find_spec("matplotlib") is not None:
            plot(result, os.path.join(out_dir, "summation.png"))
        else:
            log("matplotlib is not installed: no plot written (summation.json has every row)")
    return result


def table(result: dict) -> str:
    """The rows as a markdown table (``summation.md``)."""
    st = result["settings"]
    lines = [f"# Naive LoRA summation, tiny GPT-2 (r={st['r']}, alpha={st['alpha']:g}, c_attn)",
             "", result["what"] + ".", "",
             "| domains | RMS cosine | loss base | loss merged-data | loss sum | sum vs merged |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {' + '.join(r['domains'])} | {r['rms_cosine']:.3f} | "
                     f"{r['loss_base']:.3f} | {r['loss_merged']:.3f} | {r['loss_sum']:.3f} | "
                     f"{100 * r['rel_loss_change']:+.1f} % |")
    lines += ["", f"Pearson correlation (RMS cosine, sum vs merged): "
              f"{result['pearson_rms_cosine_vs_rel_change']:.3f}; "
              f"{result['seconds']:.0f} s on {result['threads']} thread(s).", ""]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, marker in ((2, "o"), (3, "^")):
        rs = [r for r in result["rows"] if r["k"] == k]
        if not rs:
            continue
        ax.scatter([r["rms_cosine"] for r in rs], [100 * r["rel_loss_change"] for r in rs],
                   marker=marker, label=f"{'pairs' if k == 2 else 'triples'}")
        for r in rs:
            ax.annotate("+".join(r["domains"]), (r["rms_cosine"], 100 * r["rel_loss_change"]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("RMS cosine between the summed adapters (mean over pairs)")
    ax.set_ylabel("loss of the sum vs merged-data adapter (%)")
    ax.set_title(f"naive LoRA summation, tiny GPT-2 (r={result['settings']['r']}, "
                 f"alpha={result['settings']['alpha']:g}, c_attn); pearson "
                 f"{result['pearson_rms_cosine_vs_rel_change']:.2f}", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="the fast size the test uses")
    ap.add_argument("--out", default=os.path.join("bench", "results", "summation"),
                    help="output folder ('' writes nothing)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    st = replace(SMALL if a.small else Settings(), seed=a.seed)
    return run(st, a.out or None)


if __name__ == "__main__":
    main()
