"""``CURLoRALinear``: CUR decomposition adapter, only the r x r core ``U`` trains."""

from __future__ import annotations

import torch
from torch import nn

from .. import _validate as V
from .._cache import content, version
from ..ops.cur import check_indices, cur_factors, sample_cur_indices
from .base import AdapterLinear, same


class CURLoRALinear(AdapterLinear):
    """``y = x W0^T + b + scaling * x (C U R)^T``, ``C = W0[:, col_idx]``, ``R = W0[row_idx, :]``.

    ``col_idx``/``row_idx`` (rank,) int64 are buffers (saved in the state dict, so a checkpoint
    reloads the same C and R), sampled with replacement from CURLoRA's *inverted* norm
    probabilities (:func:`lora_kernels.ops.cur.inverted_probabilities`: low-norm columns/rows are
    likely). C and R are gathered from the frozen ``weight`` (W0) on every call, never stored.
    ``U (rank, rank)`` is zero-initialised (the layer starts at the base model) and is the only
    trainable tensor (``rank^2`` parameters). ``scaling = alpha``.
    """

    def __init__(self, weight, bias, rank: int, alpha: float = 1.0,
                 generator: torch.Generator | None = None, backend: str | None = None):
        super().__init__(weight, bias, backend)
        V.rank("rank", rank, max_rank=min(self.in_features, self.out_features),
               what="min(in_features, out_features)")
        self.rank = rank
        self.alpha = V.scalar("alpha", alpha)
        self.scaling = self.alpha
        cols, rows = sample_cur_indices(self.weight, rank, generator)
        self.register_buffer("col_idx", cols)
        self.register_buffer("row_idx", rows)
        w = self.weight
        self.U = nn.Parameter(torch.zeros(rank, rank, dtype=w.dtype, device=w.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float = 1.0,
                    generator: torch.Generator | None = None, backend: str | None = None
                    ) -> CURLoRALinear:
        cls._check_linear(linear)
        return cls(linear.weight, linear.bias, rank, alpha, generator, backend)

    def _indices_key(self):
        """CPU indices: their content (exact, ``_cache.content``; a version counter misses writes
        through ``.data`` or a numpy buffer). Device indices (reading them would sync): the
        version counters (None, check every call, for inference tensors); torch's own indexing
        still bounds-checks them on the device."""
        c, r = self.col_idx, self.row_idx
        if c.device.type == "cpu" and r.device.type == "cpu":
            return content(c), content(r)
        v = (version(c), version(r))
        return None if None in v else (c.data_ptr(), *v, c.device, r.data_ptr(), r.device)

    def lora_factors(self, view=same):
        """Rank-``rank`` factors ``(U W0[row_idx], W0[:, col_idx], scaling)``
        (:func:`lora_kernels.ops.cur.cur_factors`, shared with :func:`cur_linear`).

        The indices are bounds-checked when they changed since the last check (CPU: their
        content; device: new tensors or an in-place edit, the version counter: one host sync);
        never while torch.compile traces. (The tensor-parallel forward builds
        C and R from its shards instead: ``lora_kernels.parallel``.)
        """
        if not torch.compiler.is_compiling():
            key = self._indices_key()
            if key is None or key != getattr(self, "_checked_key", None):
                check_indices(self.col_idx, self.row_idx, self.rank, self.in_features,
                              self.out_features, self.weight.device)
                self._checked_key = key
        P, Q = cur_factors(view(self.weight), self.col_idx, self.row_idx, view(self.U))
        return P, Q, self.scaling

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, scaling={self.scaling:g}"
