"""Reference of the CUDA backend's dropout mask: Philox4x32-10 in numpy (no GPU, no torch).

The CUDA kernels (csrc/common.cuh) key one Philox4x32-10 draw per 4 elements by the int64 seed;
``philox_keep_reference`` rebuilds that keep mask on the host so tests can compare it bit for bit
(``lora_kernels.ops.lora_cuda.keep_mask`` returns the kernels' own).
"""

from __future__ import annotations

import numpy as np


def philox4x32_10_np(c0, c1, c2, c3, k0, k1):
    """numpy Philox4x32-10 (Salmon et al. 2011) on uint64 arrays holding 32-bit words."""
    m32 = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = c0 * np.uint64(0xD2511F53)
        p1 = c2 * np.uint64(0xCD9E8D57)
        hi0, lo0 = p0 >> np.uint64(32), p0 & m32
        hi1, lo1 = p1 >> np.uint64(32), p1 & m32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + np.uint64(0x9E3779B9)) & m32
        k1 = (k1 + np.uint64(0xBB67AE85)) & m32
    return c0, c1, c2, c3


def philox_keep_reference(seed: int, T: int, K: int, p: float) -> np.ndarray:
    """The kernels' keep mask (csrc/common.cuh) in numpy: element idx = t * K + k uses word
    idx % 4 of Philox(counter = idx // 4, key = seed), kept if (its top 24 bits) / 2^24 >= p."""
    idx = np.arange(T * K, dtype=np.uint64)
    ctr = idx >> np.uint64(2)
    zero = np.zeros_like(ctr)
    words = np.stack(philox4x32_10_np(ctr & np.uint64(0xFFFFFFFF), ctr >> np.uint64(32), zero, zero,
                                      seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
    words = words[(idx & np.uint64(3)).astype(np.int64), np.arange(T * K)]
    u = (words >> np.uint64(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    return (u >= np.float32(p)).reshape(T, K)
