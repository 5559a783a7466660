"""Adapters for :meth:`MultiAdapterModel.generate`: one name per input row, repeated for the rows
transformers' ``generate`` expands each input into (``num_beams`` for beam search, else
``num_return_sequences``), the way PEFT repeats ``adapter_names`` under beam search."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _validate as V


def expansion(model, kwargs: dict) -> tuple[int, int, int]:
    """``(rows per input, num_beams, num_return_sequences)`` as ``model.generate(**kwargs)`` will
    run them: kwargs first, then ``kwargs["generation_config"]``, then the model's own config
    (transformers' precedence)."""
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(gc, "num_beams", None) or 1)
    nrs = kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", None) or 1)
    beams, nrs = V.positive_int("num_beams", beams), V.positive_int("num_return_sequences", nrs)
    if beams > 1 and nrs > beams:
        raise ValueError(f"num_return_sequences={nrs} must be <= num_beams={beams} for beam "
                         "search (each input returns its best beams)")
    return (beams if beams > 1 else nrs), beams, nrs


def expand_adapters(model, input_ids, adapters: Sequence[str | None], kwargs: dict) -> list:
    """The per-row adapter list for ``model.generate(input_ids, **kwargs)``: ``adapters[b]``
    repeated ``rows per input`` times, in transformers' row order (``repeat_interleave``)."""
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters must be a list (one name or None per input row), got "
                        f"{type(adapters).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
        raise ValueError(f"input_ids must be a (batch, length) tensor, got "
                         f"{shape or type(input_ids).__name__}")
    k, beams, nrs = expansion(model, kwargs)
    if len(adapters) != input_ids.shape[0]:
        raise ValueError(f"adapters must have one entry per input row: input_ids has batch "
                         f"{input_ids.shape[0]}, got {len(adapters)} adapters (do not repeat "
                         f"them per beam / returned sequence: with num_beams={beams}, "
                         f"num_return_sequences={nrs} each is repeated {k}x here)")
    return [a for a in adapters for _ in range(k)]
