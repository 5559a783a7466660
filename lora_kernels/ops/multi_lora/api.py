"""Public functions of multi-adapter LoRA: :func:`multi_lora_linear`, :func:`multi_lora_add_`.

Each validates its arguments (the pool's :meth:`~lora_kernels.AdapterPool.check_ids` is the id
check), builds a :class:`~.plan.BatchPlan` for the ids (or takes the caller's), and runs the op
(:mod:`.registered`) on the pool's :meth:`~lora_kernels.AdapterPool.view`.
"""

from __future__ import annotations

import threading

import torch

from ... import _validate as V
from ..._backend import resolve_backend
from ..._cache import content
from ..._cpu_gemm import compact_rows_for_cpu_gemm
from ...pool import AdapterPool
from ..qlora import quant_linear
from . import plan as P
from .registered import add_, apply


def _check_plan(plan, pool: AdapterPool, T: int, backend: str, path) -> P.BatchPlan:
    if not isinstance(plan, P.BatchPlan):
        raise TypeError(f"adapter_ids must be ids or a BatchPlan, got {type(plan).__name__}")
    if plan.num_tokens != T or plan.max_adapters != pool.max_adapters:
        raise ValueError(f"adapter_ids: the plan is for {plan.num_tokens} tokens and "
                         f"{plan.max_adapters} slots, x has {T} tokens and the pool "
                         f"{pool.max_adapters} slots")
    if plan.ids.device != pool.device:
        raise ValueError(f"adapter_ids: the plan is on {plan.ids.device}, the pool on "
                         f"{pool.device}")
    if P.needs_tiles(backend) and plan.tiles is None:
        raise ValueError(f"adapter_ids: the plan was built without the tile tables that "
                         f"backend={backend!r} needs (build it with that backend)")
    if path is not None and path != plan.path:
        raise ValueError(f"path={path!r} differs from the plan's path {plan.path!r}")
    return plan


def _check_common(x, pool, adapter_ids, backend, path):
    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be a lora_kernels.AdapterPool, got {type(pool).__name__}")
    V.float_tensor("x", x, min_ndim=1)
    in_f = pool.in_features
    if x.shape[-1] != in_f:
        raise ValueError(f"x must have last dim in_features={in_f} (the pool's), got shape "
                         f"{tuple(x.shape)}")
    if x.dtype != pool.dtype:
        raise TypeError(f"x must have the pool's dtype {pool.dtype}, got {x.dtype}")
    if x.device != pool.device:
        raise ValueError(f"x must be on the pool's device {pool.device}, got {x.device}")
    T = x.numel() // in_f if in_f > 0 else 0
    if path is not None and path not in P.PATHS:
        raise ValueError(f"path must be None or one of {P.PATHS}, got {path!r}")
    be = resolve_backend(backend, x.device, "multi_lora_linear")
    if be != "torch" and x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16 for backend={be!r}, got {x.dtype}")
    if isinstance(adapter_ids, P.BatchPlan):
        plan = _check_plan(adapter_ids, pool, T, be, path)
    else:
        ids = pool.check_ids(adapter_ids, T)
        plan = _plan_cached(ids, pool, be, path or "auto")
    # a row-padded bf16/fp16 CPU x goes to torch's GEMMs compact (AMX reads row padding:
    # lora_kernels._cpu_gemm.compact_rows_for_cpu_gemm); the saved x for backward is that copy
    return compact_rows_for_cpu_gemm(x.reshape(T, in_f)), plan, be


# the last plans built from CPU ids: (ids content, key) -> plan without ids (a few entries: the
# layers of one forward share one ids tensor; a new batch evicts the oldest)
_PLANS: dict[tuple, P.BatchPlan] = {}
_PLANS_MAX = 8
_PLANS_LOCK = threading.Lock()


def _plan_cached(ids: torch.Tensor, pool: AdapterPool, backend: str, path: str) -> P.BatchPlan:
    """:func:`~.plan.build`, reusing the plan last built from ids of the same content (dtype,
    shape and bytes: :func:`~lora_kernels.pool.ids_content`) for the same slot count, backend
    and path: the layers of a model called with one ids tensor share one plan, as a served
    model's do. Keyed on the bytes, never on the tensor's version counter (a
    ``torch.from_numpy`` buffer or a ``.data`` write changes ids without bumping it). The ids are
    still checked against each pool (:meth:`AdapterPool.check_ids`) on every call. Ids on a GPU
    are not cached (reading their content would sync): pass a
    :func:`~lora_kernels.ops.multi_lora.plan_for` plan to share one there."""
    key = (pool.max_adapters, len(pool), backend, path)
    if torch.compiler.is_compiling() or ids.device.type != "cpu":
        return P.build(ids, *key[:2], backend=backend, path=path)
    ck = (content(ids), key)
    hit = _PLANS.get(ck)
    if hit is not None:
        return hit._replace(ids=ids)
    plan = P.build(ids, *key[:2], backend=backend, path=path)
    with _PLANS_LOCK:                   # (request threads share the cache)
        if len(_PLANS) >= _PLANS_MAX:
            del _PLANS[next(iter(_PLANS))]
        _PLANS[ck] = plan._replace(ids=None)
    return plan


def multi_lora_linear(x, weight, bias, pool, adapter_ids, *, backend=None, path=None,
                      row_scale=None):
    """Many adapters in one batch: ``y[t] = x[t] W^T + b + s_i x[t] A_i^T B_i^T``,
    ``i = adapter_ids[t]``.

    Args:
        x: ``(..., in)`` in the pool's dtype and device; any strides. ``T`` = number of rows.
        weight: ``(out, in)`` base weight (or a ``lora_kernels.quant`` quantized one), or
            ``None`` to return the adapter delta alone
            (``y[t] = s_i x[t] A_i^T B_i^T``, autograd-aware; ``bias`` must then be None).
        bias: ``(out,)`` or ``None``.
        pool: the :class:`lora_kernels.AdapterPool` holding the adapters.
        adapter_ids: ``(T,)`` int32/int64 (or a list of ints), any order; ``-1`` = base only.
            Checked before any kernel runs: an id outside ``[-1, max_adapters)`` or naming a
            freed slot raises ``ValueError``. CPU ids are checked against the pool's host-side
            mirror of occupied slots (no device sync) and then copied to the device; ids already
            on the GPU cost one fused device check (one sync), skipped while a CUDA graph is being
            captured (the kernels then treat an invalid id as -1: still no out-of-bounds read).
            Or a :class:`~lora_kernels.ops.multi_lora.BatchPlan` built for these tokens (e.g. by
            :func:`~lora_kernels.ops.multi_lora.plan_for`), shared by several layers.
        backend: ``None | "torch" | "triton" | "cuda"``.
        path: ``None`` (automatic, :func:`~lora_kernels.ops.multi_lora.choose_path`) |
            ``"decode"`` | ``"prefill"`` | ``"prefill_fused"`` (the Triton and CUDA kernels; see
            :mod:`.triton_backend`; the torch path ignores it).
        row_scale: ``None`` or a per-slot output row scale ``g`` (max_adapters, out) fp32 on the
            pool's device (DoRA: ``magnitude / ||W + s_i B_i A_i||_row``, e.g.
            ``DoRALinear.row_scale()``; 1 for a LoRA slot): ``y[t] = g_i * (x[t] W^T +
            s_i x[t] A_i^T B_i^T) + b``, tokens with id -1 unscaled, so DoRA and LoRA adapters mix
            in one batch. Needs ``weight``. Applied to the op's output by torch (one pass over y,
            not fused into the kernels); scale-1 rows go through ``(y - b) * 1 + b`` (exact in
            fp32, one rounding in fp16/bf16).
    Returns:
        ``(..., out)`` in x's dtype. Gradients flow to ``x``, ``weight``/``bias`` when they
        require grad, and to ``pool.lora_A`` / ``pool.lora_Bt`` (dense, per slot) when the pool was
        made trainable with ``pool.requires_grad_()``.
    """
    if row_scale is not None:
        return _row_scaled(x, weight, bias, pool, adapter_ids, backend, path, row_scale)
    if weight is not None and not isinstance(weight, torch.Tensor):
        # a quantized base (lora_kernels.quant): its GEMM dequantises in the kernel (ops.qlora),
        # the adapters' delta is this op's delta-only form
        delta = multi_lora_linear(x, None, None, pool, adapter_ids, backend=backend, path=path)
        be = resolve_backend(backend, x.device, "multi_lora_linear")
        return quant_linear(x, weight, bias, backend=be) + delta
    x2, plan, be = _check_common(x, pool, adapter_ids, backend, path)
    out_f = pool.out_features
    if weight is not None:
        V.linear_args(x, weight, bias)
        V.shape("weight", weight, (out_f, pool.in_features),
                "(out_features, in_features) of the pool")
    elif bias is not None:
        raise ValueError("bias must be None when weight is None (the delta-only form)")
    y = apply(x2, weight, bias, pool.view(), plan, be)
    return y.reshape(*x.shape[:-1], out_f)


def _row_scaled(x, weight, bias, pool, adapter_ids, backend, path, row_scale):
    """:func:`multi_lora_linear` with a per-slot output row scale (see its ``row_scale``)."""
    if weight is None:
        raise ValueError("row_scale needs weight: it rescales the base output x W^T too "
                         "(the delta-only form has none)")
    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be a lora_kernels.AdapterPool, got {type(pool).__name__}")
    V.tensor("row_scale", row_scale, ndim=2)
    V.shape("row_scale", row_scale, (pool.max_adapters, pool.out_features),
            "(max_adapters, out_features) of the pool")
    if row_scale.dtype != torch.float32:
        raise TypeError(f"row_scale must be float32, got {row_scale.dtype}")
    if row_scale.device != pool.device:
        raise ValueError(f"row_scale must be on the pool's device {pool.device}, got "
                         f"{row_scale.device}")
    y = multi_lora_linear(x, weight, bias, pool, adapter_ids, backend=backend, path=path)
    out_f = pool.out_features
    y2 = y.reshape(-1, out_f)
    ids = (adapter_ids.ids if isinstance(adapter_ids, P.BatchPlan)
           else pool.check_ids(adapter_ids, y2.shape[0]))
    g = torch.where((ids >= 0)[:, None], row_scale.index_select(0, ids.clamp_min(0).long()),
                    1.0).to(y.dtype)                                            # (T, out)
    y2 = torch.addcmul(bias, y2 - bias, g) if bias is not None else y2 * g
    return y2.reshape(y.shape)


def multi_lora_add_(y, x, pool, adapter_ids, *, backend=None, path=None):
    """In place ``y[t] += s_i x[t] A_i^T B_i^T`` for users who bring their own base GEMM.

    ``y (..., out)`` (same leading dims as ``x``, the pool's dtype and device, any strides) is
    modified and returned. Inference only: raises ``ValueError`` when autograd would need to see
    the update (grad mode on and ``x``, ``y`` or the pool requiring grad); use
    ``multi_lora_linear(x, None, None, pool, ids)`` (the delta, autograd-aware) for training.
    Ids (or a plan) are validated as in :func:`multi_lora_linear`.
    """
    # y first: a refused call must not even leave the pool's id-check cache touched
    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be a lora_kernels.AdapterPool, got {type(pool).__name__}")
    V.float_tensor("y", y, min_ndim=1)
    V.float_tensor("x", x, min_ndim=1)
    expect = (*x.shape[:-1], pool.out_features)
    V.shape("y", y, expect, "x's leading dims, out_features")
    if y.dtype != pool.dtype:
        raise TypeError(f"y must have the pool's dtype {pool.dtype}, got {y.dtype}")
    if y.device != pool.device:
        raise ValueError(f"y must be on the pool's device {pool.device}, got {y.device}")
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad
                                    or pool.lora_A.requires_grad or pool.lora_Bt.requires_grad):
        raise ValueError("multi_lora_add_ is inference-only (y is updated in place without "
                         "autograd): use multi_lora_linear(x, None, None, pool, adapter_ids) "
                         "for the differentiable delta, or run under torch.no_grad()")
    V.no_overlap("y", y)
    x2, plan, be = _check_common(x, pool, adapter_ids, backend, path)
    if y.dim() == 2:
        y2 = y
    else:
        try:
            y2 = y.view(x2.shape[0], pool.out_features)
        except RuntimeError as e:
            raise ValueError(f"y must be viewable as (T, out_features) to be updated in place "
                             f"(got strides {y.stride()}): {e}") from None
    add_(y2, P.separate_input(x2, y2), pool.view(), plan, be)
    return y


def apply_plans(x2, weight, bias, pool: AdapterPool, plans, backend: str) -> torch.Tensor:
    """``y (T, out) = x2 W^T + b + sum over plans of the per-token adapter delta`` for callers
    that built the plans themselves from ids they own (``MultiAdapterModel``: one plan per
    summed-adapter part, each a :class:`~.plan.BatchPlan` for these T tokens over ``pool``'s
    slots) and checked ``x2`` (T, in) (pool's dtype and device) and ``backend`` (resolved).
    Nothing is validated again here (:func:`multi_lora_linear` would check every argument per
    call, ~10 us, once per served layer). ``weight``: dense, quantized (its own GEMM plus the
    delta, as in :func:`multi_lora_linear`) or None (the delta alone, ``bias`` None)."""
    view = pool.view()
    if weight is None or isinstance(weight, torch.Tensor):
        y = apply(x2, weight, bias, view, plans[0], backend)
    else:
        y = quant_linear(x2, weight, bias, backend=backend) + apply(x2, None, None, view,
                                                                    plans[0], backend)
    for plan in plans[1:]:      # summed adapters: one more pass per extra part
        if torch.is_grad_enabled() and (y.requires_grad or view.lora_A.requires_grad):
            y = y + apply(x2, None, None, view, plan, backend)
        else:
            add_(y, x2, view, plan, backend)
    return y


def plan_for(pool: AdapterPool, adapter_ids, *, backend=None, path=None) -> P.BatchPlan:
    """A validated :class:`~.plan.BatchPlan` for ``adapter_ids`` (T,) on ``pool``'s device, to
    pass as ``adapter_ids`` to several :func:`multi_lora_linear` calls over pools with the same
    number of slots (the plan is built once)."""
    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be a lora_kernels.AdapterPool, got {type(pool).__name__}")
    ids = V.adapter_ids("adapter_ids", adapter_ids, len(adapter_ids))
    ids = pool.check_ids(ids, ids.shape[0])
    if path is not None and path not in P.PATHS:
        raise ValueError(f"path must be None or one of {P.PATHS}, got {path!r}")
    be = resolve_backend(backend, pool.device, "multi_lora_linear")
    return P.build(ids, pool.max_adapters, len(pool), backend=be, path=path or "auto")
