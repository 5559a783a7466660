"""Backend dispatch and the registered ops of multi-adapter LoRA.

``lora_kernels::multi_lora_fwd`` / ``multi_lora_bwd`` (autograd) and ``multi_lora_add_`` (in
place, inference). Their schemas take plain tensors: the pool (``lora_A, lora_Bt, ranks,
scalings, adapter_ids, rank_bound``: a :class:`~lora_kernels.pool.PoolView` plus the ids) and,
as optional trailing arguments, the batch plan's tensors (``perm, seg_off, tiles, fused_tiles,
host``: :meth:`~.plan.BatchPlan.tensors`). A raw call without the plan builds one inside the op;
:func:`apply` / :func:`add_` always pass it. Both ops are defined by ``ops._register.define_op``
(fake, backward op, autograd, eager Function, inference fast path, compile dispatch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._backend import triton_available
from ...pool import PoolView
from .._register import define_op, pick
from . import cuda_backend, torch_backend, triton_backend
from . import plan as P


def _cuda_bwd(dy, x, weight, view, plan, need):
    """The CUDA backend's backward: the Triton kernels when Triton is available, else torch."""
    impl = triton_backend.bwd if triton_available() else torch_backend.bwd
    return impl(dy, x, weight, view, plan, need)


#: backend -> (add_, bwd): ``add_(y, x, view, plan)`` adds the per-token delta into y in place;
#: ``bwd(dy, x, weight, view, plan, need) -> (dx, dA, dBt)``
BACKENDS = {"torch": (torch_backend.add_, torch_backend.bwd),
            "triton": (triton_backend.add_, triton_backend.bwd),
            "cuda": (cuda_backend.add_, _cuda_bwd)}


def fwd(x, weight, bias, view: PoolView, plan: P.BatchPlan, backend: str) -> torch.Tensor:
    """``y = x W^T + b (or 0 when weight is None) + per-token adapter delta``; x (T, in)."""
    T = x.shape[0]
    if (plan.path == "prefill_fused" and backend == "triton" and weight is not None
            and view.rank_bound > 0 and T > 0):
        return triton_backend.prefill_fused(x, weight, bias, view, plan)
    if weight is not None:
        y = F.linear(x, weight, bias)
    else:
        y = torch.zeros((T, view.lora_Bt.shape[2]), dtype=x.dtype, device=x.device)
    if view.rank_bound > 0 and T > 0:
        pick(BACKENDS, backend, "multi_lora_linear")[0](y, x, view, plan)
    return y


def bwd(dy, x, weight, view: PoolView, plan: P.BatchPlan, backend: str, need):
    """``(dx, dA, dBt)`` for ``need = (need_dx, need_dA, need_dBt)``."""
    if view.rank_bound <= 0 or x.shape[0] == 0:
        dx = ((dy @ weight).to(x.dtype) if weight is not None else torch.zeros_like(x)) \
            if need[0] else None
        return (dx, torch.zeros_like(view.lora_A) if need[1] else None,
                torch.zeros_like(view.lora_Bt) if need[2] else None)
    return pick(BACKENDS, backend, "multi_lora_linear")[1](dy, x, weight, view, plan, need)


# ----------------------------------------------------------------------------- the op schema
# The pool view and the batch plan reach the ops as plain arguments, made by _flatten and read
# back by _unpack (nowhere else):
#   pool_args = (lora_A, lora_Bt, ranks, scalings, adapter_ids, rank_bound)  after (x, w, b)
#   plan_args = (path, perm, seg_off, tiles, fused_tiles, host)              after ``backend``
# (the backward op has no ``path``: its plan_args start at perm). A raw op call may leave the plan
# tensors None: the op then builds its plan itself.
def _flatten(view: PoolView, plan: P.BatchPlan) -> tuple[tuple, tuple]:
    """``(pool_args, plan_args)`` of ``view`` and ``plan`` (see above)."""
    return (*view[:4], plan.ids, view.rank_bound), (plan.path, *plan.tensors())


def _unpack(pool_args, plan_args, backend):
    """``(PoolView, BatchPlan)`` from the arguments :func:`_flatten` made."""
    A, Bt, ranks, scalings, ids, rank_bound = pool_args
    path, *tensors = plan_args
    view = PoolView(A, Bt, ranks, scalings, rank_bound)
    plan = P.from_op_args(ids, path, tensors, max_adapters=A.shape[0], backend=backend)
    return view, plan


# ----------------------------------------------------------------------------- registered ops
# (schemas inferred from the annotations by ops._register.define_op; the trailing plan tensors
# default to None: a raw op call without them builds its plan inside the op)
def _fwd_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            lora_A: torch.Tensor, lora_Bt: torch.Tensor, ranks: torch.Tensor,
            scalings: torch.Tensor, adapter_ids: torch.Tensor, rank_bound: int, backend: str,
            path: str, perm: torch.Tensor | None = None, seg_off: torch.Tensor | None = None,
            tiles: torch.Tensor | None = None, fused_tiles: torch.Tensor | None = None,
            host: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, in) -> y (T, out) = base (or 0 when weight is None) + per-token adapter delta."""
    view, plan = _unpack((lora_A, lora_Bt, ranks, scalings, adapter_ids, rank_bound),
                         (path, perm, seg_off, tiles, fused_tiles, host), backend)
    return fwd(x, weight, bias, view, plan, backend)


def _fwd_fake(x, weight, bias, lora_A, lora_Bt, ranks, scalings, adapter_ids, rank_bound,
              backend, path, perm=None, seg_off=None, tiles=None, fused_tiles=None, host=None):
    return x.new_empty((x.shape[0], lora_Bt.shape[2]))


def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
            lora_A: torch.Tensor, lora_Bt: torch.Tensor, ranks: torch.Tensor,
            scalings: torch.Tensor, adapter_ids: torch.Tensor, rank_bound: int, backend: str,
            need_dx: bool, need_dA: bool, need_dBt: bool, perm: torch.Tensor | None = None,
            seg_off: torch.Tensor | None = None, tiles: torch.Tensor | None = None,
            fused_tiles: torch.Tensor | None = None, host: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (T, in), dA (MAXA, MAXR, in), dBt (MAXA, MAXR, out)); None where not needed."""
    view, plan = _unpack((lora_A, lora_Bt, ranks, scalings, adapter_ids, rank_bound),
                         ("auto", perm, seg_off, tiles, fused_tiles, host), backend)
    return bwd(dy, x, weight, view, plan, backend, (need_dx, need_dA, need_dBt))


def _bwd_fake(dy, x, weight, lora_A, lora_Bt, ranks, scalings, adapter_ids, rank_bound, backend,
              need_dx, need_dA, need_dBt, perm=None, seg_off=None, tiles=None, fused_tiles=None,
              host=None):
    return (x.new_empty(x.shape) if need_dx else None,
            lora_A.new_empty(lora_A.shape) if need_dA else None,
            lora_Bt.new_empty(lora_Bt.shape) if need_dBt else None)


_N_FWD_ARGS = 16  # inputs of multi_lora_fwd (one gradient slot each)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, Bt, ranks, scalings, ids, rank_bound, backend = inputs[:10]
    ctx.save_for_backward(x, weight, A, Bt, ranks, scalings, ids, *inputs[11:])
    ctx.rank_bound, ctx.backend = rank_bound, backend
    ctx.has_bias = bias is not None


def _grads(ctx, bwd_fn, dy):
    """One gradient per forward input; ``bwd_fn`` is the backward op or :func:`_bwd_op`."""
    x, weight, A, Bt, ranks, scalings, ids, *plan_tensors = ctx.saved_tensors
    nx, nw, nb, na, nB = ctx.needs_input_grad[:5]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx = dA = dBt = None
    if nx or na or nB:
        dx, dA, dBt = bwd_fn(dy, x, weight, A, Bt, ranks, scalings, ids, ctx.rank_bound,
                             ctx.backend, nx, na, nB, *plan_tensors)
    dW = dy.t() @ x if nw else None
    db = dy.sum(0) if (nb and ctx.has_bias) else None
    return (dx if nx else None, dW, db, dA if na else None, dBt if nB else None,
            *([None] * (_N_FWD_ARGS - 5)))


MULTI_LORA_OP = define_op("lora_kernels::multi_lora_fwd", _fwd_op, fake=_fwd_fake,
                          bwd_name="lora_kernels::multi_lora_bwd", bwd=_bwd_op,
                          bwd_fake=_bwd_fake, setup_context=_setup_context, grads=_grads,
                          function_name="MultiLoRAFunction")
multi_lora_fwd = MULTI_LORA_OP.custom_op
multi_lora_bwd = MULTI_LORA_OP.bwd_op
#: Eager fast path of ``lora_kernels::multi_lora_fwd`` (see :mod:`lora_kernels.ops._register`).
MultiLoRAFunction = MULTI_LORA_OP.Function


def _add_op(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_Bt: torch.Tensor,
            ranks: torch.Tensor, scalings: torch.Tensor, adapter_ids: torch.Tensor,
            rank_bound: int, backend: str, path: str, perm: torch.Tensor | None = None,
            seg_off: torch.Tensor | None = None, tiles: torch.Tensor | None = None,
            fused_tiles: torch.Tensor | None = None, host: torch.Tensor | None = None) -> None:
    """In place: ``y[t] += s_i x[t] A_i^T B_i^T`` (inference; no autograd)."""
    if rank_bound > 0 and x.shape[0] > 0:
        view, plan = _unpack((lora_A, lora_Bt, ranks, scalings, adapter_ids, rank_bound),
                             (path, perm, seg_off, tiles, fused_tiles, host), backend)
        pick(BACKENDS, backend, "multi_lora_linear")[0](y, x, view, plan)


MULTI_LORA_ADD_OP = define_op("lora_kernels::multi_lora_add_", _add_op,
                              fake=lambda *args: None, mutates_args=("y",))
multi_lora_add_op = MULTI_LORA_ADD_OP.custom_op


# ----------------------------------------------------------------------------- entry points
def apply(x2, weight, bias, view: PoolView, plan: P.BatchPlan, backend: str) -> torch.Tensor:
    """``y (T, out)`` on validated arguments (x2 (T, in), a plan for these tokens, a resolved
    backend), through :data:`MULTI_LORA_OP` (the registered op under torch.compile, the eager
    Function when autograd records, the implementation alone for inference)."""
    pool_args, plan_args = _flatten(view, plan)
    return MULTI_LORA_OP(x2, weight, bias, *pool_args, backend, *plan_args)


def add_(y2, x2, view: PoolView, plan: P.BatchPlan, backend: str) -> None:
    """In place ``y2 += delta`` on validated arguments (inference)."""
    pool_args, plan_args = _flatten(view, plan)
    MULTI_LORA_ADD_OP(y2, x2, *pool_args, backend, *plan_args)
