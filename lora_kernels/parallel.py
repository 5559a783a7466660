"""Tensor parallelism for adapter layers and serving pools, on torch's DTensor / TP API.

Two :class:`~torch.distributed.tensor.parallel.ParallelStyle` s for
:func:`torch.distributed.tensor.parallel.parallelize_module`, covering every adapter layer
(:class:`~lora_kernels.LoRALinear`, NoRA, CURLoRA, Deep LoRA, GLoRA) and plain ``nn.Linear``
(delegated to torch's own styles)::

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_kernels.parallel import ColwiseParallel, RowwiseParallel

    mesh = init_device_mesh("cuda", (2,))
    parallelize_module(mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})

Every parameter becomes a :class:`~torch.distributed.tensor.DTensor` (sharded or replicated), so
``state_dict()``, ``torch.distributed.checkpoint`` and optimizers see the usual DTensor layout.
The forward runs *our* fused op on the local shards (no DTensor dispatch on the custom op) and
uses DTensor redistributions for every collective.

Column-parallel (``ColwiseParallel``): the output features are split. The base ``weight``/``bias``
and the *output-side* low-rank factor (``lora_B``, NoRA's ``outer_B``, Deep LoRA's last factor,
CURLoRA's ``C = W0[:, col_idx]`` rows) are sharded by output rows; the input-side factor
(``lora_A`` ...) is replicated. Forward: no communication (``x A^T`` is computed on every rank,
an O(T r in) skinny GEMM, instead of communicating it). Output ``Shard(-1)``. Backward: ``dx`` is
partial and all-reduced (T x in, as for a plain column-parallel linear), and the gradients of the
replicated adapter factors are partial sums (each rank sees only its output columns' loss
gradient) and are all-reduced (r x in for ``lora_A``: tiny).

Row-parallel (``RowwiseParallel``): the input features are split. The base ``weight`` and the
*input-side* factor (``lora_A``, NoRA's ``outer_A``, Deep LoRA's first factor, CURLoRA's
``R = W0[row_idx]`` columns) are sharded by input columns; ``lora_B`` and the bias are replicated.
Each rank computes its partial base GEMM ``x_l W_l^T`` and its *partial* rank-r intermediate
``S_l = x_l A_l^T`` and adds ``s S_l B^T`` to the partial output in the fused kernel's epilogue
(the bias on mesh rank 0 only); then **one all-reduce of the output** ``(T, out)``.

Why reduce the output and not the rank-r partial ``S`` (T x r, r << out)? Because the base GEMM
is row-parallel too: its partial ``x_l W_l^T`` has to be all-reduced anyway, and by linearity
``sum_l S_l B^T = (sum_l S_l) B^T``, so the low-rank term rides in that same reduction for free.
All-reducing ``S`` first would add a second collective and ``T*r`` more bytes on the critical
path (``T*(out + r)`` in total instead of ``T*out``); it would only win if the base weight were
replicated, which is not row-parallel. The one price of keeping ``S`` partial is in backward:
``dB = s dy^T S`` is a partial sum, all-reduced as an ``(out, r)`` gradient -- ``out*r`` elements
instead of the ``T*r`` that reducing ``S`` in forward would cost, i.e. fewer bytes whenever a
training step has more tokens than the layer has output features, and off the forward path.

Constraints and checks (raised as ``ValueError`` on *every* rank, never a hang): the mesh must be
1-D; the sharded dimension (``out_features`` for column-, ``in_features`` for row-parallel, the
pool's ``out``/``in`` for serving) must be divisible by the mesh size; every rank must hold the
same layer (type, shapes, adapter ranks). Before any shard is cut, each rank's layer description
is exchanged with one ``all_gather_object`` on the mesh's group, so all ranks agree on the error.

Values follow mesh rank 0: parameters are scattered/broadcast from it (``distribute_tensor``)
and buffers (CURLoRA's ``col_idx``/``row_idx``) are broadcast from it.

Per layer type: LoRA, NoRA and Deep LoRA build their LoRA-equivalent ``(P, Q)`` with the layer's
own hook on the local shards (``lora_factors(view)``, see ``_factor_forward``) and run the fused
LoRA op;
CURLoRA takes ``C``'s rows (column-parallel) or ``R``'s columns (row-parallel) from the local
base shard and gathers the other, frozen, factor once (cached; see ``_cur_refresh``); GLoRA runs
its own op on the shards (split described at ``_glora_shard``). Each replicated trainable tensor
gets its gradient all-reduced in backward (one small collective per tensor: ``r x in`` for
``lora_A``, ``r_i x r_o`` for NoRA's inner factors, ``r x r`` for CURLoRA's ``U``).

Not supported: meshes of more than one dimension (slice the TP dimension), ``merged()`` /
``delta_weight()`` on a parallelized layer (gather a full state dict and load it into a
single-process layer), training a sharded serving pool.

Dropout (LoRA's ``dropout`` in training): column-parallel ranks share one mask on the replicated
``x`` (the seed is drawn on mesh rank 0 and broadcast: one tiny collective per training call);
row-parallel ranks draw independent masks for their own columns. Masks differ from a
single-process run's.

Serving: :func:`shard_adapter_pool` and :func:`parallelize_server` shard an
:class:`~lora_kernels.AdapterPool` and a :class:`~lora_kernels.MultiAdapterModel` the same way.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.parallel import style as _torch_style

from ._cache import version
from .serving import AdapterPool, MultiAdapterModel, ServingLinear

__all__ = [
    "ColwiseParallel",
    "RowwiseParallel",
    "TPPlan",
    "as_mesh",
    "ShardedAdapterPool",
    "parallelize",
    "parallelize_server",
    "shard_adapter_pool",
    "register_tp_plan",
]

COLWISE, ROWWISE = "colwise", "rowwise"


# ----------------------------------------------------------------------------- mesh helpers
def as_mesh(mesh_or_group, device_type: str | None = None) -> DeviceMesh:
    """A 1-D :class:`DeviceMesh` from a mesh or a ``ProcessGroup`` (``None``: the default group).

    ``device_type`` defaults to ``"cuda"`` for an NCCL group and ``"cpu"`` otherwise.
    """
    if isinstance(mesh_or_group, DeviceMesh):
        return mesh_or_group
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized (call init_process_group first)")
    group = mesh_or_group if mesh_or_group is not None else dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"mesh must be a DeviceMesh or a ProcessGroup, got {type(group).__name__}")
    if device_type is None:
        device_type = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    return DeviceMesh.from_group(group, device_type)


def parallelize(module: nn.Module, mesh_or_group, plan) -> nn.Module:
    """:func:`torch.distributed.tensor.parallel.parallelize_module` taking a ``DeviceMesh`` or a
    ``ProcessGroup`` (``None``: the default group); ``plan`` is a style or ``{fqn: style}``."""
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(module, as_mesh(mesh_or_group), plan)


def _check_mesh(mesh, who: str) -> DeviceMesh:
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"{who}: device_mesh must be a DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"{who}: needs a 1-D device mesh, got a {mesh.ndim}-D mesh "
                         f"{tuple(mesh.shape)} (slice the tensor-parallel dimension, e.g. "
                         f"mesh['tp'])")
    return mesh


def _agree(mesh: DeviceMesh, meta, local_error: str | None, who: str,
           local_exc: Exception | None = None) -> list:
    """All-gather ``(meta, local_error)`` over the mesh and raise on every rank if any rank failed
    its local checks (``local_exc`` itself where this rank failed, else a ``ValueError`` naming
    the failed ranks) or the metas differ. Returns the gathered metas."""
    if local_exc is not None and local_error is None:
        local_error = f"{type(local_exc).__name__}: {local_exc}"
    group = mesh.get_group()
    gathered: list = [None] * mesh.size()
    dist.all_gather_object(gathered, (meta, local_error), group=group)
    errors = [(r, e) for r, (_, e) in enumerate(gathered) if e is not None]
    if errors:
        if local_exc is not None:
            raise local_exc
        msg = "; ".join(f"mesh rank {r}: {e}" for r, e in errors)
        raise ValueError(f"{who}: {msg}")
    metas = [m for m, _ in gathered]
    bad = [r for r, m in enumerate(metas) if m != metas[0]]
    if bad:
        diff = "; ".join(f"mesh rank {r}: {metas[r]}" for r in [0, *bad])
        raise ValueError(f"{who}: the ranks hold different layers (every rank must build the "
                         f"same layer, with the same shapes and adapter ranks, before "
                         f"parallelizing it): {diff}")
    return metas


def _divisible(size: int, n: int, what: str) -> str | None:
    if size % n:
        return (f"{what}={size} is not divisible by the mesh size {n} (the sharded dimension "
                f"must split evenly across the tensor-parallel ranks)")
    return None


# ----------------------------------------------------------------------------- local views
class _Local:
    """Turns a module's DTensor parameters into the local tensors the fused ops run on, with the
    right gradient semantics:

    - sharded parameter -> its local shard (gradient: the local shard of the full gradient);
    - replicated parameter that requires grad -> its local copy whose gradient is a *partial sum*
      over the mesh, all-reduced by DTensor (``redistribute`` to ``Replicate`` on the way back), so
      ``param.grad`` is an exact ``Replicate`` DTensor on every rank;
    - anything else -> its local tensor.
    """

    def __init__(self, mesh: DeviceMesh, mode: str):
        self.mesh = mesh
        self.mode = mode
        self.rank = mesh.get_local_rank()
        self.size = mesh.size()

    def __call__(self, t):
        if not isinstance(t, DTensor):
            return t
        if (t.placements[0].is_replicate() and t.requires_grad and torch.is_grad_enabled()):
            return t.redistribute(self.mesh, (Replicate(),)).to_local(grad_placements=(Partial(),))
        return t.to_local()

    def once(self, t):
        """A replicated term that must enter a row-parallel partial sum exactly once: the tensor
        on mesh rank 0, ``None`` elsewhere (``0 * t`` when it requires grad, so every rank's
        backward runs the same collectives). Column-parallel: same as ``__call__``."""
        if t is None or self.mode == COLWISE or self.rank == 0:
            return self(t)
        if isinstance(t, DTensor) and t.requires_grad and torch.is_grad_enabled():
            return self(t) * 0
        return None

    def generator(self, generator: torch.Generator | None, device) -> torch.Generator:
        """Dropout generator: one seed drawn on mesh rank 0 and broadcast; column-parallel ranks
        use it as is (same mask on the replicated x), row-parallel ranks offset it by their rank
        (independent masks on their own columns)."""
        seed = torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64,
                             device=generator.device if generator is not None else "cpu")
        seed = seed.to(self.mesh.device_type)
        if self.size > 1:
            dist.broadcast(seed, group=self.mesh.get_group(), group_src=0)
        s = int(seed.item())
        if self.mode == ROWWISE:
            s = (s + 0x9E3779B97F4A7C15 * self.rank) % (2**63 - 1)
        return torch.Generator(device=device).manual_seed(s)


# ----------------------------------------------------------------------------- per-layer plans
@dataclass
class TPPlan:
    """How one layer type is split: ``shard(module, mode) -> {param name: shard dim}`` (the rest
    replicated), ``forward(module, x_local, L, *args, **kw) -> y_local`` (column-parallel: the local
    output columns; row-parallel: a partial sum), ``describe(module)`` (what must agree across
    ranks) and optional ``refresh(module, L)`` (rebuild gathered caches after load)."""

    shard: Callable
    forward: Callable
    describe: Callable
    refresh: Callable | None = None
    sharded_dims: Callable = field(default=lambda m, mode: {})
    setup: Callable | None = None


_PLANS: dict[type, TPPlan] = {}


def register_tp_plan(cls: type, plan: TPPlan) -> None:
    """Register how layer type ``cls`` is tensor-parallelized (used for every built-in layer)."""
    _PLANS[cls] = plan


def _plan_for(module: nn.Module) -> TPPlan | None:
    _register_builtin()
    _register_conv1d(module)
    for c in type(module).__mro__:
        if c in _PLANS:
            return _PLANS[c]
    return None


def _base_desc(m) -> dict:
    return {"type": type(m).__name__, "in": m.in_features, "out": m.out_features,
            "params": {n: (tuple(p.shape), str(p.dtype), p.requires_grad)
                       for n, p in m.named_parameters()},
            "buffers": {n: (tuple(b.shape), str(b.dtype)) for n, b in m.named_buffers()}}


def _base_dims(m, mode) -> dict:
    return ({"out_features": m.out_features} if mode == COLWISE else
            {"in_features": m.in_features})


def _base_shard(mode) -> dict:
    return {"weight": 0, "bias": 0} if mode == COLWISE else {"weight": 1}


# Methods with LoRA-equivalent factors (LoRA, NoRA, Deep LoRA): the layer's own hook builds the
# factors from the local shards (``lora_factors(view=L)``). The input-side factor (``lora_A``,
# NoRA's ``outer_A``, Deep LoRA's ``F_1``) is sharded by input columns in row-parallel, the
# output-side one (``lora_B``, ``outer_B``, ``F_k``) by output rows in column-parallel, and the
# inner r x r factors are replicated, so the collapsed ``P`` (r, in) and ``Q`` (out, r) come out
# as exactly the local column / row blocks of the full ones: the same fused LoRA op then runs on
# the local shards (column-parallel: this rank's output columns; row-parallel: a partial sum).
def _lora_shard(m, mode):
    return {**_base_shard(mode), **({"lora_B": 0} if mode == COLWISE else {"lora_A": 1})}


def _nora_shard(m, mode):  # outer factors are frozen buffers, distributed like parameters
    return {**_base_shard(mode), **({"outer_B": 0} if mode == COLWISE else {"outer_A": 1})}


def _deep_shard(m, mode):
    k = len(m.factors)
    return {**_base_shard(mode),
            **({f"factors.{k - 1}": 0} if mode == COLWISE else {"factors.0": 1})}


def _factor_forward(m, x, L, generator=None):
    P, Q, s = m.lora_factors(L)
    return _lowrank_forward(m, x, L, (P, Q, s), generator)


def _lowrank_forward(m, x, L, factors, generator=None):
    """The fused LoRA op on local ``x``, the local base shard and local ``factors`` (P, Q, s);
    the bias enters once (:meth:`_Local.once`), dropout masks follow :meth:`_Local.generator`."""
    from .ops.lora import lora_linear

    P, Q, s = factors
    p = m.dropout if m.training else 0.0
    if p > 0.0:
        generator = L.generator(generator, x.device)
    return lora_linear(x, L(m.weight), L.once(m.bias), P, Q, s, p, generator=generator,
                       backend=m.backend)


# CURLoRA ---------------------------------------------------------------------------------------
# C = W0[:, col_idx] and R = W0[row_idx] index the *unsharded* W0. Column-parallel: C's rows are
# local (col_idx picks input columns, all local) but R's rows live on the ranks owning them;
# row-parallel: the other way round. The non-local one (r x in, or out x r: small, frozen) is
# gathered once with a DTensor Partial -> Replicate all-reduce of the owners' rows/columns and
# cached; it is rebuilt when ``weight``/``row_idx``/``col_idx`` change (version counters: a
# load_state_dict or torch.distributed.checkpoint load on every rank).
def _cur_shard(m, mode):
    return _base_shard(mode)


@torch.no_grad()
def _cur_refresh(m, L):
    wl = m.weight.to_local()
    key = (id(m.weight), version(wl), id(m.row_idx), version(m.row_idx), id(m.col_idx),
           version(m.col_idx))
    cache = getattr(m, "_lk_tp_cur", None)
    if cache is not None and cache[0] == key and None not in key:   # None: inference tensors
        return
    if L.mode == COLWISE:
        n, idx = wl.shape[0], m.row_idx
        lo = L.rank * n
        mine = (idx >= lo) & (idx < lo + n)
        part = wl.new_zeros(idx.shape[0], wl.shape[1])
        part[mine] = wl.index_select(0, idx[mine] - lo)
    else:
        n, idx = wl.shape[1], m.col_idx
        lo = L.rank * n
        mine = (idx >= lo) & (idx < lo + n)
        part = wl.new_zeros(wl.shape[0], idx.shape[0])
        part[:, mine] = wl.index_select(1, idx[mine] - lo)
    # exactly one owner per element, the others add zeros: the sum is exact
    gathered = DTensor.from_local(part, L.mesh, (Partial(),), run_check=False).full_tensor()
    m._lk_tp_cur = (key, gathered)


def _cur_forward(m, x, L):
    w = L(m.weight)
    U = L(m.U)
    ct = torch.promote_types(U.dtype, torch.float32)
    gathered = m._lk_tp_cur[1]
    if L.mode == COLWISE:   # R = W0[row_idx] gathered (r, in); C = local rows of W0[:, col_idx]
        R, C = gathered, w.index_select(1, m.col_idx)
    else:                   # R = local columns of W0[row_idx]; C = W0[:, col_idx] gathered
        R, C = w.index_select(0, m.row_idx), gathered
    P = (U.to(ct) @ R.to(ct)).to(U.dtype)
    return _lowrank_forward(m, x, L, (P, C, m.scaling))


# GLoRA -----------------------------------------------------------------------------------------
# Column-parallel: every support indexed by an output row (A/B vectors and "down" factors, D, E
# vectors) is sharded with W's rows; the "up" factors, C and scalars are replicated. Each rank's
# y_l = x W_eff_l^T + b_eff_l is exact. Row-parallel: A/B "up" factors and C (vector, or its
# "down" factor) are sharded with W's columns; W_eff_l = W_l + W_l*A_l + B_l is the local column
# block and W@C = sum_l W_l C_l, so the output is a partial sum; b + b*D + E enters on mesh rank
# 0 only (the other ranks pass a zero bias and 0*E, so D and E are in every rank's graph).
def _glora_shard(m, mode):
    out = dict(_base_shard(mode))
    cfg = m.config
    if mode == COLWISE:
        for k in "AB":
            if cfg[k] == "lora":
                out[f"{k}_down"] = 0
            elif cfg[k] == "vector":
                out[k] = 0
        for k in "DE":
            if cfg[k] == "vector":
                out[k] = 0
    else:
        for k in "AB":
            if cfg[k] == "lora":
                out[f"{k}_up"] = 1
        if cfg["C"] == "lora":
            out["C_down"] = 0
        elif cfg["C"] == "vector":
            out["C"] = 0
    return out


def _glora_desc(m):
    return {**_base_desc(m), "config": dict(m.config)}


def _glora_forward(m, x, L):
    from .ops.glora import glora_linear

    sup = m.supports(L)
    bias = L.once(m.bias)
    if L.mode == ROWWISE and L.rank != 0:
        if bias is None and m.bias is not None:
            bias = torch.zeros(m.out_features, dtype=x.dtype, device=x.device)
        sup["E"] = L.once(getattr(m, "E", None)) if m.config["E"] != "none" else None
        if sup["E"] is not None and m.config["E"] == "scalar":
            sup["E"] = sup["E"].reshape(())
    return glora_linear(x, L(m.weight), bias, **sup, backend=m.backend)


_BUILTIN_DONE = False


def _register_builtin() -> None:
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    from .layers.cur import CURLoRALinear
    from .layers.deep import DeepLoRALinear
    from .layers.glora import GLoRALinear
    from .layers.lora import LoRALinear
    from .layers.nora import NoRALinear

    for cls, shard, fwd, desc, refresh in (
            (LoRALinear, _lora_shard, _factor_forward, _base_desc, None),
            (NoRALinear, _nora_shard, _factor_forward, _base_desc, None),
            (CURLoRALinear, _cur_shard, _cur_forward, _base_desc, _cur_refresh),
            (DeepLoRALinear, _deep_shard, _factor_forward, _base_desc, None),
            (GLoRALinear, _glora_shard, _glora_forward, _glora_desc, None)):
        if cls not in _PLANS:
            register_tp_plan(cls, TPPlan(shard=shard, forward=fwd, describe=desc,
                                         refresh=refresh, sharded_dims=_base_dims))
    if ServingLinear not in _PLANS:
        register_tp_plan(ServingLinear, TPPlan(
            shard=lambda m, mode: _base_shard(mode), forward=_serving_forward,
            describe=_serving_desc, sharded_dims=_base_dims, setup=_serving_setup))


# transformers Conv1D (GPT-2) ------------------------------------------------------------------
# weight (in, out): column-parallel shards its dim 1 (output columns) and the bias, row-parallel
# its dim 0 (input rows); the local product is x_loc @ W_loc (+ b once), read through the
# (out, in) view W_loc.t() by F.linear (no copy).
def _conv1d_shard(m, mode):
    return {"weight": 1, "bias": 0} if mode == COLWISE else {"weight": 0}


def _conv1d_dims(m, mode):
    return ({"out_features": m.weight.shape[1]} if mode == COLWISE else
            {"in_features": m.weight.shape[0]})


def _conv1d_desc(m):
    return {"type": type(m).__name__, "weight": tuple(m.weight.shape),
            "params": {n: (tuple(p.shape), str(p.dtype), p.requires_grad)
                       for n, p in m.named_parameters()}}


def _conv1d_forward(m, x, L):
    import torch.nn.functional as F

    return F.linear(x, L(m.weight).t(), L.once(m.bias))


def _register_conv1d(module) -> None:
    """Register the plan of transformers' ``Conv1D`` the first time one is parallelized (the
    class exists only once transformers is loaded; it is never imported here)."""
    from ._conv1d import conv1d_class, is_conv1d

    if is_conv1d(module) and conv1d_class() not in _PLANS:
        register_tp_plan(conv1d_class(), TPPlan(shard=_conv1d_shard, forward=_conv1d_forward,
                                                describe=_conv1d_desc,
                                                sharded_dims=_conv1d_dims))


# ----------------------------------------------------------------------------- the styles
@dataclass
class _TPState:
    mesh: DeviceMesh
    mode: str
    plan: TPPlan
    input_layouts: tuple[Placement, ...]
    output_layouts: tuple[Placement, ...]
    use_local_output: bool


def _get_parent(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    return module, leaf


def _tp_forward(self, x, *args, **kwargs):
    st: _TPState = self._lk_tp
    mesh = st.mesh
    X = x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, st.input_layouts,
                                                             run_check=False)
    L = _Local(mesh, st.mode)
    if st.mode == COLWISE:
        x_loc = X.redistribute(mesh, (Replicate(),)).to_local(grad_placements=(Partial(),))
    else:
        x_loc = X.redistribute(mesh, (Shard(X.ndim - 1),)).to_local()
    if st.plan.refresh is not None:
        st.plan.refresh(self, L)
    y = st.plan.forward(self, x_loc, L, *args, **kwargs)
    Y = DTensor.from_local(y, mesh, (Shard(y.ndim - 1),) if st.mode == COLWISE else (Partial(),),
                           run_check=False)
    out_layouts = tuple(Shard(p.dim % Y.ndim) if isinstance(p, Shard) else p
                        for p in st.output_layouts)
    if Y.placements != out_layouts:
        Y = Y.redistribute(mesh, out_layouts)
    return Y.to_local() if st.use_local_output else Y


class _AdapterParallel(ParallelStyle):
    mode: str = ""
    _torch_style: type = ParallelStyle

    def __init__(self, *, input_layouts: Placement | None = None,
                 output_layouts: Placement | None = None, use_local_output: bool = True):
        super().__init__()
        if self.mode == COLWISE:
            self.input_layouts = (input_layouts or Replicate(),)
            self.output_layouts = (output_layouts or Shard(-1),)
        else:
            self.input_layouts = (input_layouts or Shard(-1),)
            self.output_layouts = (output_layouts or Replicate(),)
        self.use_local_output = use_local_output

    def __repr__(self) -> str:
        return (f"lora_kernels.parallel.{type(self).__name__}(input_layouts={self.input_layouts}, "
                f"output_layouts={self.output_layouts}, "
                f"use_local_output={self.use_local_output})")

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        who = f"lora_kernels.parallel.{type(self).__name__}"
        mesh = _check_mesh(device_mesh, who)
        if type(module) in (nn.Linear, nn.Embedding):
            w = module.weight
            dim = (0 if self.mode == COLWISE else 1) if isinstance(module, nn.Linear) else (
                1 if self.mode == COLWISE else 0)
            what = f"{type(module).__name__} weight dim {dim}"
            _agree(mesh, {"type": type(module).__name__, "shape": tuple(w.shape)},
                   _divisible(w.shape[dim], mesh.size(), what), who)
            return self._torch_style(input_layouts=self.input_layouts[0],
                                     output_layouts=self.output_layouts[0],
                                     use_local_output=self.use_local_output)._apply(module, mesh)
        plan = _plan_for(module)
        err, meta = None, None
        if hasattr(module, "_lk_tp"):
            err = f"{type(module).__name__} is already tensor-parallel"
        elif plan is None:
            err = (f"{type(module).__name__} is not a supported layer (expected nn.Linear, "
                   "transformers Conv1D or a "
                   f"lora_kernels adapter layer: {', '.join(c.__name__ for c in _PLANS)})")
        else:
            meta = plan.describe(module)
            for what, size in plan.sharded_dims(module, self.mode).items():
                err = err or _divisible(size, mesh.size(), f"{type(module).__name__} {what}")
        _agree(mesh, (self.mode, meta), err, who)

        shard = plan.shard(module, self.mode)
        for name, p in list(module.named_parameters()):
            dim = shard.get(name)
            placement = Shard(dim) if dim is not None else Replicate()
            dt = distribute_tensor(p.detach(), mesh, (placement,))
            parent, leaf = _get_parent(module, name)
            parent.register_parameter(leaf, nn.Parameter(dt, requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers()):
            parent, leaf = _get_parent(module, name)
            if b.is_floating_point():   # e.g. NoRA's frozen outer factors: DTensors like params
                dim = shard.get(name)
                dt = distribute_tensor(b, mesh, (Shard(dim) if dim is not None else Replicate(),))
                persistent = leaf not in parent._non_persistent_buffers_set
                parent.register_buffer(leaf, dt, persistent=persistent)
            elif mesh.size() > 1:       # index buffers (CURLoRA): plain tensors, rank 0's values
                if name in shard:
                    raise AssertionError(f"integer buffer {name} cannot be sharded")
                dist.broadcast(b, group=mesh.get_group(), group_src=0)
        module._lk_tp = _TPState(mesh, self.mode, plan, self.input_layouts, self.output_layouts,
                                 self.use_local_output)
        module.forward = types.MethodType(_tp_forward, module)
        if plan.setup is not None:
            plan.setup(module, mesh, self.mode)
        if plan.refresh is not None:
            plan.refresh(module, _Local(mesh, self.mode))
        return module


class ColwiseParallel(_AdapterParallel):
    """Column-parallel adapter layer: ``weight``/``bias`` and the output-side low-rank factor
    sharded by output rows, the input-side factor replicated; input ``Replicate`` -> output
    ``Shard(-1)`` by default (same arguments as torch's ``ColwiseParallel``)."""

    mode = COLWISE
    _torch_style = _torch_style.ColwiseParallel


class RowwiseParallel(_AdapterParallel):
    """Row-parallel adapter layer: ``weight`` and the input-side low-rank factor sharded by input
    columns, the output-side factor and ``bias`` replicated; the rank-r intermediate stays partial
    and the output is all-reduced once. Input ``Shard(-1)`` -> output ``Replicate`` by default."""

    mode = ROWWISE
    _torch_style = _torch_style.RowwiseParallel


# ----------------------------------------------------------------------------- serving
def _mode_of(style) -> str:
    if style in (COLWISE, ROWWISE):
        return style
    if isinstance(style, ColwiseParallel):
        return COLWISE
    if isinstance(style, RowwiseParallel):
        return ROWWISE
    raise ValueError(f"style must be 'colwise', 'rowwise', ColwiseParallel() or "
                     f"RowwiseParallel(), got {style!r}")


def _pool_desc(pool) -> dict:
    return {"in": pool.in_features, "out": pool.out_features, "max_adapters": pool.max_adapters,
            "max_rank": pool.max_rank, "dtype": str(pool.dtype),
            "adapters": pool.occupancy()}


class ShardedAdapterPool(AdapterPool):
    """An :class:`~lora_kernels.AdapterPool` holding this rank's shard of a tensor-parallel
    pool (see :func:`shard_adapter_pool`): column-parallel keeps ``lora_A`` whole and the
    ``out_features / n`` columns of ``lora_Bt`` of this rank; row-parallel keeps the
    ``in_features / n`` columns of ``lora_A`` and ``lora_Bt`` whole. ``in_features`` /
    ``out_features`` are the local sizes (what :func:`lora_kernels.multi_lora_linear` sees with
    this rank's weight shard); ``full_in_features`` / ``full_out_features`` the unsharded ones.

    ``add(name, lora_A, lora_B, scaling)`` takes the *unsharded* factors (every rank passes
    the same ones) and keeps this rank's slice. It is a collective over the mesh: the ranks
    check they added the same adapter (name, slot, rank, scaling, checksum) into the same
    slot, and a refused add raises on every rank. ``remove`` is local (deterministic).
    Inference only (the replicated factor's gradient would be a partial sum).
    """

    mesh: DeviceMesh
    mode: str
    full_in_features: int
    full_out_features: int

    def _prepare(self, name, lora_A, lora_B, scaling, slot):
        from . import _validate as V

        who = "ShardedAdapterPool.add"
        exc, meta, prepared = None, None, None
        try:
            V.float_tensor("lora_A", lora_A, ndim=2)
            V.float_tensor("lora_B", lora_B, ndim=2)
            r = lora_A.shape[0]
            V.shape("lora_A", lora_A, (r, self.full_in_features),
                    "(r, in_features) of the unsharded pool")
            V.shape("lora_B", lora_B, (self.full_out_features, r),
                    f"(out_features, r) of the unsharded pool, r={r} from lora_A")
            k = self.mesh.get_local_rank()
            check = (float(lora_A.detach().double().sum()),
                     float(lora_B.detach().double().sum()))
            if self.mode == ROWWISE:
                n = self.in_features
                lora_A = lora_A[:, k * n:(k + 1) * n]
            else:
                n = self.out_features
                lora_B = lora_B[k * n:(k + 1) * n]
            prepared = super()._prepare(name, lora_A, lora_B, scaling, slot)
            meta = (name, prepared[0], prepared[1], prepared[2], check)
        except (TypeError, ValueError) as e:
            exc = e
        _agree(self.mesh, meta, None, f"{who}({name!r})", local_exc=exc)
        return prepared

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            raise NotImplementedError("a tensor-parallel AdapterPool is inference-only")
        return super().requires_grad_(False)



@torch.no_grad()
def shard_adapter_pool(pool, mesh_or_group, style, *, _checked: bool = False):
    """This rank's shard of ``pool`` (a :class:`ShardedAdapterPool`), split like the base weight
    of a ``style`` (``"colwise"`` / ``"rowwise"`` or the style objects) layer.

    Column-parallel: ``lora_Bt`` split along ``out_features``, ``lora_A`` replicated; with the
    matching weight shard ``W[k*out/n:(k+1)*out/n]``, :func:`lora_kernels.multi_lora_linear`
    gives this rank's output columns. Row-parallel: ``lora_A`` split along ``in_features``,
    ``lora_Bt`` replicated; with ``W[:, k*in/n:(k+1)*in/n]`` and this rank's input columns it gives
    a partial sum (add the bias on one rank, then all-reduce). Storage is scattered / broadcast
    from mesh rank 0; the ranks must hold the same adapters (checked: ``ValueError`` on every rank,
    like a size not divisible by the mesh).
    """
    mesh = _check_mesh(as_mesh(mesh_or_group), "shard_adapter_pool")
    mode = _mode_of(style)
    ws = mesh.size()
    if not _checked:
        err = None
        if not isinstance(pool, AdapterPool) or isinstance(pool, ShardedAdapterPool):
            err = f"pool must be an unsharded AdapterPool, got {type(pool).__name__}"
            meta = None
        else:
            what, size = (("AdapterPool out_features", pool.out_features) if mode == COLWISE
                          else ("AdapterPool in_features", pool.in_features))
            err, meta = _divisible(size, ws, what), _pool_desc(pool)
        _agree(mesh, (mode, meta), err, "shard_adapter_pool")
    in_l = pool.in_features // ws if mode == ROWWISE else pool.in_features
    out_l = pool.out_features // ws if mode == COLWISE else pool.out_features
    new = ShardedAdapterPool(in_l, out_l, pool.max_adapters, pool.max_rank, dtype=pool.dtype,
                             device=pool.device)
    new.mesh, new.mode = mesh, mode
    new.full_in_features, new.full_out_features = pool.in_features, pool.out_features
    a = distribute_tensor(pool.lora_A.detach(), mesh,
                          (Shard(2) if mode == ROWWISE else Replicate(),)).to_local()
    bt = distribute_tensor(pool.lora_Bt.detach(), mesh,
                           (Shard(2) if mode == COLWISE else Replicate(),)).to_local()
    new.lora_A.copy_(a)
    new.lora_Bt.copy_(bt)
    new.ranks.copy_(pool.ranks)
    new.scalings.copy_(pool.scalings)
    new.copy_host_state(pool)
    return new


def _serving_desc(m) -> dict:
    return {**_base_desc(m), "pool": _pool_desc(m.pool)}


def _serving_setup(m, mesh, mode) -> None:
    m.pool = shard_adapter_pool(m.pool, mesh, mode, _checked=True)
    shadow = types.SimpleNamespace(in_features=m.pool.in_features,
                                   out_features=m.pool.out_features, weight=None, bias=None)
    # the base ServingLinear logic on local tensors; kept out of the module tree
    object.__setattr__(m, "_lk_tp_local", ServingLinear(shadow, m.pool, m._state, m.backend))


def _serving_forward(m, x, L):
    if torch.is_grad_enabled() and (x.requires_grad or m.pool.lora_A.requires_grad):
        raise NotImplementedError("tensor-parallel ServingLinear is inference-only (run it "
                                  "under torch.no_grad() / torch.inference_mode())")
    inner = m._lk_tp_local
    inner.weight, inner.bias, inner.pool = L(m.weight), L.once(m.bias), m.pool
    return inner(x)


def parallelize_server(server, mesh_or_group, plan: dict) -> object:
    """Tensor-parallelize the served layers of a :class:`~lora_kernels.MultiAdapterModel`.

    ``plan`` maps module names to ``"colwise"`` / ``"rowwise"`` (or ``ColwiseParallel()`` /
    ``RowwiseParallel()``), with the ``target_modules`` rules: a key matches a served module whose
    full name equals it or ends with ``"." + key``. Each matched layer's base weight is sharded
    like the style and its :class:`~lora_kernels.AdapterPool` with it (:func:`shard_adapter_pool`);
    later ``server.add`` calls take unsharded factors. The usual pairing is column-parallel then
    row-parallel (``up`` / ``down``): the hidden activations stay sharded in between and each pair
    costs one all-reduce. Layers not in the plan (and the rest of the model) stay replicated.
    Returns ``server``.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    if not isinstance(server, MultiAdapterModel):
        raise TypeError(f"server must be a MultiAdapterModel, got {type(server).__name__}")
    if not isinstance(plan, dict) or not plan:
        raise TypeError("plan must be a non-empty dict {module name: 'colwise' | 'rowwise'}")
    mesh = as_mesh(mesh_or_group)
    chosen: dict[str, ParallelStyle] = {}
    for key, style in plan.items():
        mode = _mode_of(style)
        hits = [n for n in server.layers if n == key or n.endswith("." + key)]
        if not hits:
            raise ValueError(f"plan key {key!r} matches no served module "
                             f"(served: {list(server.layers)[:8]})")
        for n in hits:
            if n in chosen:
                raise ValueError(f"served module {n!r} is matched by several plan keys")
            chosen[n] = (style if isinstance(style, ParallelStyle) else
                         ColwiseParallel() if mode == COLWISE else RowwiseParallel())
    parallelize_module(server.model, mesh, chosen)
    store = getattr(server, "store", None)
    if store is not None:  # the store writes swapped-in adapters into the (now sharded) pools
        store.pools = {n: server.layers[n].pool for n in store.pools}
    return server
