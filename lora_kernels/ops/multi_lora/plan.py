"""The batch plan of multi-adapter LoRA: how one batch's tokens map to adapters, built ONCE per
forward and shared by every served layer and every backend (vLLM's ``LoRAKernelMeta`` idea).

What only depends on the per-token adapter ids (not on a layer's weights) lives here:

* the path (:func:`choose_path`: the one decode/prefill threshold),
* the adapter-sorted token order and segment offsets (``perm``, ``seg_off``: the CUDA prefill
  kernels, the Triton tile tables and the CPU gradient segments read them),
* the Triton tile tables (:func:`tile_table`, ``BLOCK_M`` from :mod:`.tiles`),
* a small host table (CPU tensor): the batch's distinct-adapter count, the resolved path and, for
  CPU batches, the runs of equal ids in token order (row slices for the CPU path).

Device work is sync-free (sort + searchsorted + cumsum, no ``.item()``), so a plan can be built
while a CUDA graph is captured. A plan is independent of the pool's contents: a layer whose pool
leaves a slot empty sees rank 0 there, which every backend treats as "no adapter".

Layout of ``host`` (int64, always on the CPU, shape ``(1 + cdiv(T, RUN_MIN_ROWS), 3)``, which
depends on T only, so a compiled graph does not specialise on the batch's adapter mix):
  ``host[0] = (num_adapters, path code, n_runs)``; path code indexes :data:`PATHS`;
  ``host[1 + j] = (key, start, end)`` for run ``j < n_runs``: tokens ``[start, end)`` all have
  adapter ``key`` (``key == max_adapters`` for base-only tokens). ``n_runs = -1`` when the runs
  are not recorded: ids on a GPU (reading them would sync) or a fragmented batch (average run
  shorter than ``RUN_MIN_ROWS`` tokens, where per-run GEMMs lose to the gather).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..._backend import triton_available
from .._register import define_op
from .._triton import cdiv
from . import tiles as _tiles

PATHS = ("decode", "prefill", "prefill_fused")
# decode when the batch has at most this many tokens per adapter on average, or at most
# DECODE_MAX_TOKENS tokens: gathering each token's adapter is then the memory-optimal schedule
DECODE_TOKENS_PER_ADAPTER = 4
DECODE_MAX_TOKENS = 16
# the CPU path slices runs of equal ids only when they average at least this many tokens
RUN_MIN_ROWS = 8

_BUILDS = [0]   # plans built so far (a plain list: readable by the benchmark and the tests)


def choose_path(num_tokens: int, num_adapters: int) -> str:
    """``"decode"`` when tokens per adapter are few (gathering each token's adapter is then the
    memory-optimal schedule), else ``"prefill"`` (segments amortise each adapter's bytes over a
    tile of tokens). Host-known sizes only: no device read. The one threshold of the package."""
    if (num_tokens <= DECODE_MAX_TOKENS
            or num_tokens <= DECODE_TOKENS_PER_ADAPTER * max(1, num_adapters)):
        return "decode"
    return "prefill"


def builds() -> int:
    """How many batch plans have been built in this process (for the once-per-forward check)."""
    return _BUILDS[0]


def separate_input(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The one aliasing rule: ``x``, or a contiguous copy of it when ``y`` (updated in place)
    shares its storage. The kernels split a token's output columns over programs that each
    re-read the whole row ``x[t]``, so one program's writes to ``y[t]`` would reach another's
    reads. No sync: a storage pointer compare (capturable)."""
    if x.numel() and y.numel() and x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr():
        return x.clone(memory_format=torch.contiguous_format)
    return x


# ----------------------------------------------------------------------------- device metadata
def sort_tokens(ids: torch.Tensor, max_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, seg_off)``: ``perm`` (T,) int64 = token indices sorted by adapter (stable; ids
    -1 / out of range last, as key ``max_adapters``) and ``seg_off`` (max_adapters + 2,) int64:
    adapter ``a``'s tokens are ``perm[seg_off[a]:seg_off[a + 1]]``, base-only tokens
    ``perm[seg_off[max_adapters]:]`` (``seg_off[max_adapters + 1] = T``). No host sync."""
    ids64 = ids.long()
    key = ids64.masked_fill((ids64 < 0) | (ids64 >= max_adapters), max_adapters)
    sorted_key, perm = torch.sort(key, stable=True)
    bounds = torch.arange(max_adapters + 2, device=ids.device, dtype=torch.int64)
    return perm, torch.searchsorted(sorted_key, bounds)


def tile_table(seg_off: torch.Tensor, num_tokens: int, block_m: int,
               include_base: bool = False) -> torch.Tensor:
    """Tile table (3, G) int64 over the sorted tokens: tile g covers sorted rows
    ``[table[1, g], table[2, g])`` of adapter ``table[0, g]``. G = cdiv(T, block_m) +
    min(n_seg, T) (n_seg = max_adapters, + 1 with ``include_base``): a bound on the tiles needed,
    known from shapes only, so the grid is fixed. Adapter -1 marks a tile no adapter applies to:
    unused (then empty, start == end, with ``include_base``) or, with ``include_base``, a tile of
    base-only rows, which the fused prefill GEMM still computes."""
    maxa = seg_off.shape[0] - 2
    n_seg = maxa + 1 if include_base else maxa
    dev = seg_off.device
    seg_start = seg_off[:n_seg]
    seg_end = seg_off[1:n_seg + 1]
    tiles = (seg_end - seg_start + block_m - 1) // block_m
    tile_cum = torch.cumsum(tiles, 0)
    G = cdiv(num_tokens, block_m) + min(n_seg, num_tokens)
    g = torch.arange(G, device=dev, dtype=torch.int64)
    a = torch.searchsorted(tile_cum, g, right=True)
    used = a < n_seg
    ac = a.clamp(max=n_seg - 1)
    start = seg_start[ac] + (g - (tile_cum - tiles)[ac]) * block_m
    end = torch.minimum(start + block_m, seg_end[ac])
    if include_base:
        end = torch.where(used, end, start)
    adapter = torch.where(used & (ac < maxa), ac, torch.full_like(ac, -1))
    return torch.stack([adapter, start, end])


class Segments(NamedTuple):
    """:func:`segments`' result (tile table split into its rows, plus per-adapter segments)."""

    perm: torch.Tensor
    tile_adapter: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    seg_start: torch.Tensor
    seg_count: torch.Tensor


def segments(ids: torch.Tensor, max_adapters: int, block_m: int,
             include_base: bool = False) -> Segments:
    """Tokens grouped by adapter, on device, without a host sync (see :func:`sort_tokens` and
    :func:`tile_table`); ``seg_start``, ``seg_count`` (max_adapters,) int64 per adapter."""
    perm, seg_off = sort_tokens(ids, max_adapters)
    t = tile_table(seg_off, ids.shape[0], block_m, include_base)
    return Segments(perm, t[0], t[1], t[2], seg_off[:max_adapters],
                    seg_off[1:max_adapters + 1] - seg_off[:max_adapters])


# ----------------------------------------------------------------------------- the plan
class BatchPlan(NamedTuple):
    """One batch's token -> adapter mapping and everything derived from it (module doc).

    ``ids`` (T,) int on the pool device (validated, or built by the server); ``path`` the
    requested path (``"auto"`` = resolved from the host table inside the op, which keeps the
    adapter count out of compiled graphs); ``perm``, ``seg_off`` (:func:`sort_tokens`);
    ``tiles`` (3, G) prefill tile table for the Triton kernels or None; ``fused_tiles`` the
    ``include_base`` table of the fused prefill GEMM or None; ``host`` the CPU table.
    """

    ids: torch.Tensor
    path: str
    perm: torch.Tensor
    seg_off: torch.Tensor
    tiles: torch.Tensor | None
    fused_tiles: torch.Tensor | None
    host: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def max_adapters(self) -> int:
        return self.seg_off.shape[0] - 2

    def tensors(self) -> tuple:
        """The plan's tensors in the order of the ops' trailing arguments."""
        return (self.perm, self.seg_off, self.tiles, self.fused_tiles, self.host)

    # host reads below: only inside op implementations (eager), never in traced code
    # (through numpy: indexing a tensor element costs ~5 us, a numpy view of it ~0.3 us)
    def resolved_path(self) -> str:
        return self.path if self.path != "auto" else PATHS[self.host.numpy()[0, 1]]

    def runs(self) -> list[list[int]] | None:
        """``[[key, start, end], ...]`` (CPU batches with few runs) or None."""
        h = self.host.numpy()
        n = h[0, 2]
        return h[1:1 + n].tolist() if n >= 0 else None

    def counts(self) -> list[int]:
        """Tokens per adapter (max_adapters + 1 entries, the last = base-only); CPU plans."""
        so = self.seg_off.tolist()
        return [so[a + 1] - so[a] for a in range(len(so) - 1)]


def needs_tiles(backend: str) -> bool:
    # the CUDA backend's backward runs the Triton kernels when triton is installed
    return backend == "triton" or (backend == "cuda" and triton_available())


def build_eager(ids: torch.Tensor, max_adapters: int, num_adapters: int, *, backend: str,
                path: str = "auto", tiles: bool | None = None) -> BatchPlan:
    """Build a :class:`BatchPlan` (eager; :func:`build` picks this or the registered op).

    ``num_adapters``: distinct adapters in the batch (host-known; a bound is fine), for
    :func:`choose_path`. ``tiles``: build the Triton tile tables (default: when ``backend`` runs
    Triton kernels)."""
    _BUILDS[0] += 1
    T = ids.shape[0]
    resolved = path if path != "auto" else choose_path(T, num_adapters)
    tiles = needs_tiles(backend) if tiles is None else tiles
    if ids.device.type == "cpu":
        perm, seg_off, host = _host_build(ids, max_adapters)
    else:
        perm, seg_off = sort_tokens(ids, max_adapters)
        host = torch.zeros((1 + cdiv(T, RUN_MIN_ROWS), 3), dtype=torch.int64)
        host[0, 2] = -1                    # runs of GPU ids are not read (that would sync)
    tt = tile_table(seg_off, T, _tiles.block_m("prefill")) if tiles else None
    ft = (tile_table(seg_off, T, _tiles.block_m("fused"), include_base=True)
          if tiles and resolved == "prefill_fused" else None)
    host[0, 0], host[0, 1] = num_adapters, PATHS.index(resolved)
    return BatchPlan(ids, path, perm, seg_off, tt, ft, host)


def _host_build(ids: torch.Tensor, max_adapters: int):
    """CPU ids: :func:`sort_tokens` and the run table with numpy on the host (~10 numpy calls,
    a few microseconds each, where the same tensor ops cost ~10x more on a busy CPU)."""
    T = ids.shape[0]
    k = ids.numpy().astype(np.int64)
    key = np.where((k >= 0) & (k < max_adapters), k, max_adapters)
    perm = np.argsort(key, kind="stable")
    off = np.zeros(max_adapters + 2, dtype=np.int64)
    np.cumsum(np.bincount(key, minlength=max_adapters + 1), out=off[1:])
    host = np.zeros((1 + cdiv(T, RUN_MIN_ROWS), 3), dtype=np.int64)
    starts = np.flatnonzero(np.diff(key)) + 1 if T else np.zeros(0, dtype=np.int64)
    n_runs = starts.shape[0] + 1 if T else 0
    if n_runs * RUN_MIN_ROWS <= T:
        host[1:1 + n_runs, 0] = key[np.concatenate(([0], starts))] if T else 0
        host[1:1 + n_runs, 1] = np.concatenate(([0], starts))
        host[1:1 + n_runs, 2] = np.concatenate((starts, [T]))
    else:
        n_runs = -1
    host[0, 2] = n_runs
    return torch.from_numpy(perm), torch.from_numpy(off), torch.from_numpy(host)


def _tile_counts(T: int, max_adapters: int) -> tuple[int, int]:
    """Lengths G of the prefill and fused tile tables (:func:`tile_table`) for T tokens."""
    return (cdiv(T, _tiles.block_m("prefill")) + min(max_adapters, T),
            cdiv(T, _tiles.block_m("fused")) + min(max_adapters + 1, T))


def _plan_op(ids: torch.Tensor, num_adapters: torch.Tensor, max_adapters: int, backend: str,
             path: str) -> list[torch.Tensor]:
    """:func:`build_eager` as one opaque op (under ``torch.compile``): returns ``[perm, seg_off,
    tiles, fused_tiles, host]`` with fixed shapes (a table not built is returned as zeros;
    :func:`build` drops it)."""
    p = build_eager(ids, max_adapters, int(num_adapters.reshape(-1)[0]), backend=backend,
                    path=path)
    g_p, g_f = _tile_counts(ids.shape[0], max_adapters)
    e = lambda g: torch.zeros((3, g), dtype=torch.int64, device=ids.device)  # noqa: E731
    return [p.perm, p.seg_off, p.tiles if p.tiles is not None else e(g_p),
            p.fused_tiles if p.fused_tiles is not None else e(g_f), p.host]


def _plan_fake(ids, num_adapters, max_adapters, backend, path):
    T = ids.shape[0]
    g_p, g_f = _tile_counts(T, max_adapters)
    e = lambda *s: torch.empty(s, dtype=torch.int64, device=ids.device)  # noqa: E731
    return [e(T), e(max_adapters + 2), e(3, g_p), e(3, g_f),
            torch.empty((1 + cdiv(T, RUN_MIN_ROWS), 3), dtype=torch.int64)]


PLAN_OP = define_op("lora_kernels::multi_lora_plan", _plan_op, fake=_plan_fake)


def build(ids: torch.Tensor, max_adapters: int, num_adapters, *, backend: str,
          path: str = "auto") -> BatchPlan:
    """The one plan builder. ``num_adapters``: an int, or a CPU int64 tensor of one element (so a
    compiled caller does not specialise on it). Eager: :func:`build_eager`; under
    ``torch.compile``: the opaque ``lora_kernels::multi_lora_plan`` op (its host reads stay out
    of the graph)."""
    if not torch.compiler.is_compiling():
        n = num_adapters if isinstance(num_adapters, int) else int(num_adapters.reshape(-1)[0])
        return build_eager(ids, max_adapters, n, backend=backend, path=path)
    if isinstance(num_adapters, int):
        num_adapters = torch.tensor([num_adapters], dtype=torch.int64)
    perm, seg_off, tt, ft, host = PLAN_OP(ids, num_adapters, max_adapters, backend, path)
    tiles = needs_tiles(backend)
    return BatchPlan(ids, path, perm, seg_off, tt if tiles else None,
                     ft if tiles and path == "prefill_fused" else None, host)


def from_op_args(ids, path, tensors, *, max_adapters: int, backend: str) -> BatchPlan:
    """Inside an op: the plan its trailing arguments ``tensors`` (:meth:`BatchPlan.tensors`)
    carry, or, for a raw op call without them, one built here for ``path`` with the pool's slot
    count as the adapter-count bound."""
    if tensors[0] is not None:
        return BatchPlan(ids, path, *tensors)
    return build_eager(ids, max_adapters, max_adapters, backend=backend, path=path)
