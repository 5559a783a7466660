"""Fused projections (vLLM's ``num_slices``): per-slice adapters on one fused weight.

A fused layer (Phi-3's ``qkv_proj`` / ``gate_up_proj``) computes ``y = x W^T + b`` with
``W = [W_1; W_2; ...]`` (``W_i (o_i, in)``, output columns ``y[:, off_i : off_i + o_i]``). An
adapter may carry its own LoRA on each slice, with its own rank and scaling, or none on some
slices (e.g. q and v but not k).

How it is served here: the slices are *stacked* into one LoRA-equivalent factor pair, exactly::

    A_cat = [A_1; A_2; ...]                       (sum_i r_i, in)     present slices only
    B_cat = blockdiag(s_1 B_1, s_2 B_2, ...)      (sum_i o_i, sum_i r_i)
            rows of slice i are s_i B_i in the columns of slice i's rank, zero elsewhere
            (a slice without an adapter is a block of zero rows)
    x A_cat^T B_cat^T = [s_1 x A_1^T B_1^T | s_2 x A_2^T B_2^T | ...]

(when every present slice has the same scaling it is kept as the pair's scaling instead of being
folded into ``B``). The stacked pair is an ordinary adapter of the fused layer, so it is served
by the existing multi-LoRA kernels of every backend in ONE launch next to ONE base GEMM over the
fused weight, and composes with the store, CUDA graphs and ``torch.compile`` unchanged.

Cost against a per-slice kernel (vLLM's, which loops over slices inside the launch), for ``T``
tokens, ``K = in``, ``N = sum_i o_i``, ``R = sum_i r_i`` over present slices:

* shrink ``x A_cat^T``: ``2 T K R`` FLOPs and ``K R`` elements of A: the same as per slice;
* expand: ``2 T N R`` FLOPs and ``N R`` elements of ``Bt`` (stored in the pool, read by the
  kernel, moved host -> device by the store) against ``2 T sum_i o_i r_i`` / ``sum_i o_i r_i``
  per slice: the off-diagonal zero blocks. E.g. Llama-3-8B qkv (q 4096, k = v 1024, r = 16 on
  all three): Bt 295k elements instead of 98k (3x), adapter bytes A + Bt 492k instead of 295k
  (1.67x); with q and v only (R = 32) 1.5x on Bt. In decode (memory bound on adapter bytes)
  that is the price of one launch; the pool's ``max_rank`` must be at least ``R``.

:func:`fuse_adapter` converts an adapter for the unfused modules (e.g. PEFT's ``q_proj`` /
``k_proj`` / ``v_proj``) into one for the fused model; :func:`stack_slices` is the per-layer step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from . import _validate as V

Factors = tuple[torch.Tensor, torch.Tensor, float]


def stack_slices(slices: Sequence[Factors | None], out_sizes: Sequence[int]) -> Factors:
    """One LoRA ``(A_cat (R, in), B_cat (sum o_i, R), scaling)`` equal to per-slice adapters.

    ``slices[i]`` is ``(lora_A (r_i, in), lora_B (o_i, r_i), s_i)`` or ``None`` (no adapter on
    slice ``i``); ``out_sizes[i] = o_i``. ``R = sum r_i`` over present slices. Factors keep the
    dtype/device of the first present slice (the scaled ``B`` blocks are formed in float64 and
    rounded once). Raises ``ValueError``/``TypeError`` naming the slice."""
    if isinstance(slices, (str, bytes)) or not isinstance(slices, Sequence):
        raise TypeError("slices must be a list of (lora_A, lora_B, scaling) tuples or None")
    if isinstance(out_sizes, (str, bytes)) or not isinstance(out_sizes, Sequence):
        raise TypeError("out_sizes must be a list of ints")
    if len(slices) != len(out_sizes):
        raise ValueError(f"slices and out_sizes must have the same length, got {len(slices)} "
                         f"and {len(out_sizes)}")
    outs = [V.rank(f"out_sizes[{i}]", o) for i, o in enumerate(out_sizes)]
    present = []
    in_f = None
    for i, sl in enumerate(slices):
        if sl is None:
            continue
        if not (isinstance(sl, (tuple, list)) and len(sl) == 3):
            raise TypeError(f"slices[{i}] must be a (lora_A, lora_B, scaling) tuple or None")
        A, B, s = sl
        V.float_tensor(f"slices[{i}] lora_A", A, ndim=2)
        V.float_tensor(f"slices[{i}] lora_B", B, ndim=2)
        r = A.shape[0]
        if in_f is None:
            in_f = A.shape[1]
        V.shape(f"slices[{i}] lora_A", A, (r, in_f), "(r_i, in) with in from the first slice")
        V.shape(f"slices[{i}] lora_B", B, (outs[i], r), f"(out_sizes[{i}], r_i)")
        present.append((i, A, B, V.scalar(f"slices[{i}] scaling", s)))
    if not present:
        raise ValueError("slices must hold at least one adapter (all are None)")
    ref = present[0][1]
    R, N = sum(A.shape[0] for _, A, _, _ in present), sum(outs)
    scales = {s for *_, s in present}
    common = scales.pop() if len(scales) == 1 else None
    offs = [sum(outs[:i]) for i in range(len(outs))]
    A_cat = torch.cat([A.to(ref.dtype) for _, A, _, _ in present]).to(ref.device)
    B64 = torch.zeros(N, R, dtype=torch.float64, device=ref.device)
    c = 0
    for i, A, B, s in present:
        r = A.shape[0]
        blk = B.detach().to(device=ref.device, dtype=torch.float64)
        B64[offs[i]:offs[i] + outs[i], c:c + r] = blk if common is not None else s * blk
        c += r
    return A_cat, B64.to(ref.dtype), (common if common is not None else 1.0)


def _check_spec(fused: Mapping) -> dict[str, list[tuple[str, int]]]:
    if not isinstance(fused, Mapping) or not fused:
        raise TypeError("fused must be a non-empty dict {fused leaf name: [(slice leaf name, "
                        "out size), ...]}, e.g. {'qkv_proj': [('q_proj', 4096), ...]}")
    spec = {}
    for k, v in fused.items():
        if not isinstance(k, str) or isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
            raise TypeError(f"fused[{k!r}] must be a list of (slice leaf name, out size)")
        items = []
        for j, it in enumerate(v):
            if not (isinstance(it, (tuple, list)) and len(it) == 2 and isinstance(it[0], str)):
                raise TypeError(f"fused[{k!r}][{j}] must be a (slice leaf name, out size) pair")
            items.append((it[0], V.rank(f"fused[{k!r}][{j}] out size", it[1])))
        spec[k] = items
    return spec


def fuse_adapter(adapter: Mapping[str, Factors],
                 fused: Mapping[str, Sequence[tuple[str, int]]]) -> dict[str, Factors]:
    """An adapter for unfused modules, as one for the fused-weight model.

    ``adapter``: ``{module name: (lora_A, lora_B, scaling)}`` (e.g. from
    :func:`lora_kernels.load_peft_adapter`); ``fused``: ``{fused leaf: [(slice leaf, out size),
    ...]}`` in output-column order, e.g. Phi-3's ``{"qkv_proj": [("q_proj", n_q), ("k_proj",
    n_kv), ("v_proj", n_kv)], "gate_up_proj": [("gate_proj", I), ("up_proj", I)]}``.
    ``prefix.q_proj`` + ``prefix.v_proj`` become ``prefix.qkv_proj`` (:func:`stack_slices`, k
    absent); modules that are no slice pass through unchanged."""
    spec = _check_spec(fused)
    if not isinstance(adapter, Mapping):
        raise TypeError(f"adapter must be a dict {{module name: (lora_A, lora_B, scaling)}}, got "
                        f"{type(adapter).__name__}")
    slice_of = {}
    for fl, items in spec.items():
        for j, (leaf, _) in enumerate(items):
            if leaf in slice_of:
                raise ValueError(f"fused: slice {leaf!r} appears in two fused layers")
            slice_of[leaf] = (fl, j)
    groups: dict[str, list] = {}
    out: dict[str, Factors] = {}
    for name, entry in adapter.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf not in slice_of:
            out[name] = entry
            continue
        fl, j = slice_of[leaf]
        key = f"{prefix}.{fl}" if prefix else fl
        groups.setdefault(key, [None] * len(spec[fl]))[j] = entry
    for key, slices in groups.items():
        fl = key.rpartition(".")[2]
        if key in out:
            raise ValueError(f"adapter names both {key!r} and its slices")
        try:
            out[key] = stack_slices(slices, [o for _, o in spec[fl]])
        except (TypeError, ValueError) as e:
            raise type(e)(f"adapter slices of {key!r} ({[n for n, _ in spec[fl]]}): {e}") from None
    return out


def phi3_slices(config) -> dict[str, list[tuple[str, int]]]:
    """The ``fused`` spec of a transformers Phi-3 style config (fused ``qkv_proj`` and
    ``gate_up_proj``), for adapters trained on the Llama-style unfused names."""
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    nq, nkv = config.num_attention_heads * d, config.num_key_value_heads * d
    inter = config.intermediate_size
    return {"qkv_proj": [("q_proj", nq), ("k_proj", nkv), ("v_proj", nkv)],
            "gate_up_proj": [("gate_proj", inter), ("up_proj", inter)]}
