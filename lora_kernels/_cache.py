"""Keys for the package's host-side caches (plans, id checks, slot tables, norms).

A cache that skips a *check* (ids or indices in bounds) or builds from a caller's index tensor
(a batch plan) keys on the tensor's content (:func:`content`, CPU tensors): a version counter
is not bumped by writes through ``torch.from_numpy``'s numpy buffer or through ``.data``, so it
is never trusted for a bounds check. Caches of the package's own tensors (a pool's factors, a
frozen weight's norms) key on ``t._version`` (bumped by every in-place torch write).
An inference tensor (created under ``torch.inference_mode()``) has no version counter (reading
it raises), so a cache cannot see its in-place writes: :func:`version` returns None for it and
the callers then recompute instead of caching.
"""

from __future__ import annotations

import torch


def version(t: torch.Tensor) -> int | None:
    """``t._version``, or None for an inference tensor (then: do not cache on ``t``)."""
    return None if t.is_inference() else t._version


def content(t: torch.Tensor) -> tuple:
    """``(dtype, shape, bytes)`` of a CPU tensor: an exact cache key (compared byte for byte:
    ~1 us for a few thousand int32 ids on the 2-core CI box)."""
    return t.dtype, tuple(t.shape), t.numpy().tobytes()
