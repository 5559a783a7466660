"""Trainable-parameter counts per adapter method, as the papers state, and a side-by-side table.

Per adapted ``nn.Linear(in, out)``:

=========  ==========================================  ========================================
method     trainable parameters                        source
=========  ==========================================  ========================================
lora       ``r (in + out)``                            Hu et al. 2021 (LoRA)
nora       ``2 r_o r_i``                               Lin et al. 2024 (NoRA): the inner pair
curlora    ``r^2``                                     Fawi 2024 (CURLoRA): U only
deep_lora  ``r (in + out) + (k - 2) r^2``              Yaras et al. 2024 (Deep LoRA), depth k
glora      sum over supports A..E of the chosen form   Chavan et al. 2023 (GLoRA):
           (pair ``r (out + in)``, C pair ``r (in+1)``,
           vector ``out`` (C: ``in``), scalar 1)
=========  ==========================================  ========================================

:func:`count_trainable` counts what a module really trains; the tests check both agree.
"""

from __future__ import annotations

from torch import nn

from .layers.glora import support_params

METHOD_KWARGS = {
    "lora": ("r",),
    "nora": ("outer_rank", "inner_rank"),
    "curlora": ("rank",),
    "deep_lora": ("rank", "depth"),
    "glora": ("rank", "config"),
}


def trainable_params(method: str, in_features: int, out_features: int, **kw) -> int:
    """Trainable parameters of one ``method`` layer on an ``in -> out`` linear (paper formulas).

    kwargs: lora ``r``; nora ``outer_rank``, ``inner_rank``; curlora ``rank``;
    deep_lora ``rank``, ``depth=3``; glora ``rank``, ``config=None`` (default config).
    """
    if method not in METHOD_KWARGS:
        raise ValueError(f"method must be one of {list(METHOD_KWARGS)}, got {method!r}")
    bad = set(kw) - set(METHOD_KWARGS[method])
    if bad:
        raise TypeError(f"{method} takes {METHOD_KWARGS[method]}, got unexpected {sorted(bad)}")
    i, o = in_features, out_features
    if method == "lora":
        return kw["r"] * (i + o)
    if method == "nora":
        return 2 * kw["outer_rank"] * kw["inner_rank"]
    if method == "curlora":
        return kw["rank"] ** 2
    if method == "deep_lora":
        r, k = kw["rank"], kw.get("depth", 3)
        return r * (i + o) + (k - 2) * r * r
    return support_params(kw.get("config"), i, o, kw["rank"])


def count_trainable(module: nn.Module) -> int:
    """Parameters of ``module`` with ``requires_grad`` (what an optimiser would update)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def default_specs(rank: int = 8) -> dict[str, tuple[str, dict]]:
    """One comparable configuration per method at LoRA rank ``rank`` (NoRA: ``r_o = 4 rank``,
    ``r_i = rank``; Deep LoRA depth 3; GLoRA default config)."""
    return {
        f"lora r={rank}": ("lora", {"r": rank}),
        f"nora r_o={4 * rank} r_i={rank}": ("nora", {"outer_rank": 4 * rank, "inner_rank": rank}),
        f"curlora r={rank}": ("curlora", {"rank": rank}),
        f"deep_lora r={rank} k=3": ("deep_lora", {"rank": rank, "depth": 3}),
        f"glora r={rank}": ("glora", {"rank": rank}),
    }


def param_table(shapes: list[tuple[int, int]] | tuple[int, int],
                specs: dict[str, tuple[str, dict]] | None = None) -> str:
    """Side-by-side table of trainable parameters summed over the adapted linears ``shapes``
    (``[(in, out), ...]``, or one ``(in, out)``), with the share of the frozen base weights."""
    if isinstance(shapes, tuple):
        shapes = [shapes]
    specs = default_specs() if specs is None else specs
    base = sum(i * o + o for i, o in shapes)
    rows = [("method", "trainable", "% of base")]
    for name, (method, kw) in specs.items():
        n = sum(trainable_params(method, i, o, **kw) for i, o in shapes)
        rows.append((name, f"{n:,}", f"{100.0 * n / base:.4f}"))
    w = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"(base: {len(shapes)} linear(s), {base:,} frozen parameters)")
    return "\n".join(lines)


def print_param_table(shapes, specs=None) -> None:
    """Print :func:`param_table`."""
    print(param_table(shapes, specs))
