"""Multi-adapter LoRA: ``y[t] = x[t] W^T + b + s_i x[t] A_i^T B_i^T`` with ``i = adapter_ids[t]``.

From API to kernel, one module per job:

  :mod:`.api`         :func:`multi_lora_linear`, :func:`multi_lora_add_`, :func:`plan_for`:
                      validate, build the batch plan (or take one), call the op;
                      :func:`apply_plans`: the served layers' entry (their own plans)
  :mod:`.plan`        :class:`BatchPlan`, the one builder, the one decode/prefill threshold
                      (:func:`choose_path`), the aliasing rule; built once per forward by
                      ``MultiAdapterModel`` and shared by every served layer and backend
  :mod:`.registered`  the ``torch.library`` ops ``lora_kernels::multi_lora_fwd`` / ``_bwd`` /
                      ``_add_`` (plain tensors: the :class:`~lora_kernels.pool.PoolView` and the
                      plan are flattened and read back only here) and the eager autograd Function
  :mod:`.torch_backend`, :mod:`.triton_backend`, :mod:`.cuda_backend`: the implementations
  :mod:`.tiles`       the Triton tile sizes (launchers, plan, ahead-of-time compile)

The adapters live in an :class:`lora_kernels.AdapterPool` (``lora_A (MAXA, MAXR, in)``,
``lora_Bt (MAXA, MAXR, out)``, ``ranks`` int32, ``scalings`` fp32, all on the pool's device).
Pool factor gradients are dense ``(MAXA, MAXR, in|out)`` tensors (zero for unused slots and
rows >= rank), accumulated into ``pool.lora_A.grad`` / ``pool.lora_Bt.grad`` when the pool was
made trainable with ``pool.requires_grad_()``. ``scalings`` and ``ranks`` get no gradient.
"""

from .api import apply_plans, multi_lora_add_, multi_lora_linear, plan_for
from .plan import (
    DECODE_MAX_TOKENS,
    DECODE_TOKENS_PER_ADAPTER,
    PATHS,
    BatchPlan,
    choose_path,
    segments,
)
from .registered import MultiLoRAFunction, multi_lora_add_op, multi_lora_bwd, multi_lora_fwd

__all__ = [
    "DECODE_MAX_TOKENS", "DECODE_TOKENS_PER_ADAPTER", "PATHS", "BatchPlan", "MultiLoRAFunction",
    "apply_plans", "choose_path", "multi_lora_add_", "multi_lora_add_op", "multi_lora_bwd",
    "multi_lora_fwd", "multi_lora_linear", "plan_for", "segments",
]
