"""Reference formulas for the DoRA op (dense, autograd-differentiable, any dtype; run in float64).

PEFT's ``use_dora=True`` (``tuners/lora/variants.py: DoraLinearVariant.forward`` and
``tuners/lora/dora.py: DoraLinearLayer``), written out:

* ``n = ||W + s B A||_row`` (2-norm over ``in``, one per output feature), **detached**;
  ``g = m / n``.
* no dropout (``p == 0`` or eval): ``y = g * (x W^T) + g * s * x A^T B^T + b``;
* dropout active: PEFT adds to the base output ``x W^T + b`` (un-dropped ``x``) the DoRA term
  computed on the dropped ``xd``: ``(g - 1) * (xd W^T) + g * s * xd A^T B^T``, i.e.
  ``y = x W^T + b + (g - 1) * (xd W^T) + g * s * xd A^T B^T``.
"""

from __future__ import annotations

import torch


def dora_weight_norm(weight, lora_A, lora_B, scaling):
    """``||W + s B A||`` per output row, dense (out,), detached."""
    w = weight + scaling * (lora_B @ lora_A)
    return torch.linalg.vector_norm(w, dim=1).detach()


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling=1.0, *, keep=None,
                dropout_p=0.0):
    """PEFT's DoRA output with an explicit keep-mask (bool, like ``x``) or None (no dropout)."""
    g = magnitude / dora_weight_norm(weight, lora_A, lora_B, scaling)
    lowrank = scaling * (x if keep is None else x * keep.to(x.dtype) / (1.0 - dropout_p)) \
        @ lora_A.t() @ lora_B.t()
    if keep is None:
        y = g * (x @ weight.t()) + g * lowrank
    else:
        xd = x * keep.to(x.dtype) / (1.0 - dropout_p)
        y = x @ weight.t() + (g - 1) * (xd @ weight.t()) + g * lowrank
    return y if bias is None else y + bias
