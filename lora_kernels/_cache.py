"""Version counters for the package's host-side caches (plans, id checks, slot tables, norms).

Every cache that skips work for an unchanged tensor keys on ``t._version`` (bumped by every
in-place write). An inference tensor (created under ``torch.inference_mode()``) has no version
counter -- reading it raises -- so a cache cannot see its in-place writes: :func:`version` returns
None for it and the callers then recompute instead of caching.
"""

from __future__ import annotations

import torch


def version(t: torch.Tensor) -> int | None:
    """``t._version``, or None for an inference tensor (then: do not cache on ``t``)."""
    return None if t.is_inference() else t._version
