"""The fused LoRA op: ``y = x W^T + b + scaling * dropout(x) A^T B^T``, on a dense or a quantized
base weight.

Layers: ``kernels.lora`` (Triton) / ``ops.lora_cuda`` -> the engine ``ops.lowrank`` (launchers,
forward / backward per backend) -> two torch.library ops, one per weight kind (``ops._register.
define_op``: fakes, autograd, eager fast path):

* ``lora_kernels::lora_fwd`` / ``lora_bwd``: a dense ``weight`` (out, in); dW and db here, only
  when the base requires grad (plain torch GEMM / reduction).
* ``lora_kernels::qlora_fwd`` / ``qlora_bwd`` (QLoRA): a frozen
  :class:`lora_kernels.quant.QuantizedWeight`, travelling through the schema as its tensors plus a
  few ints (``ops.weights.flatten`` / ``rebuild``), so ``torch.compile`` sees one fake-tensor-aware
  op per direction; W never receives a gradient. The engine chooses the base GEMM from the
  weight: torch dequantises W in x's dtype per call (nothing dense saved), Triton dequantises each
  tile in registers (``kernels.quant``; W dense never exists), cuda dequantises into a reused
  per-(device, dtype, shape) workspace.

-> :func:`lora_linear` (functional) -> ``layers.LoRALinear``. Shapes and gradient formulas: the
engine's docstring (:mod:`lora_kernels.ops.lowrank`).
"""

from __future__ import annotations

import torch

from .. import _validate as V
from .._backend import resolve_backend
from .._cpu_gemm import compact_rows_for_cpu_gemm
from ..quant import QuantizedWeight
from . import _triton as TR
from . import lowrank as E
from . import weights as QW
from ._register import define_op, pick

#: backend name -> (fwd, bwd) of the engine (one table for both weight kinds)
BACKENDS = E.BACKENDS


# ----------------------------------------------------------------------------- registered ops
def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
         lora_B: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor | None,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, in) -> (y (T, out), S = drop(x) A^T (T, r) fp32)."""
    return pick(BACKENDS, backend, "lora_linear")[0](x, weight, bias, lora_A, lora_B, scaling,
                                                      dropout_p, seed)


def _fwd_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


def _bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
         lora_B: torch.Tensor, s: torch.Tensor, scaling: float, dropout_p: float,
         seed: torch.Tensor | None, backend: str, need_dx: bool, need_dA: bool,
         need_dB: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx (T, in), dA (r, in), dB (out, r)); None (the op: empty) where unneeded."""
    return pick(BACKENDS, backend, "lora_linear")[1](
        dy, E.Saved(x, weight, lora_A, lora_B, s, scaling, dropout_p, seed),
        E.Needs(need_dx, need_dA, need_dB))


def _bwd_fake(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, backend, need_dx,
              need_dA, need_dB):
    return (x.new_empty(x.shape) if need_dx else None,
            lora_A.new_empty(lora_A.shape) if need_dA else None,
            lora_B.new_empty(lora_B.shape) if need_dB else None)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, scaling, p, seed, backend = inputs
    ctx.save_for_backward(x, weight, A, B, output[1], seed)
    ctx.scaling, ctx.p, ctx.backend = scaling, p, backend
    ctx.has_bias = bias is not None


def _grads(ctx, bwd, dy, _ds=None):
    """Backward of the op (``bwd``: the registered ``lora_bwd`` or :func:`_bwd`); dW and db
    are plain torch GEMM / reduction, only when the base requires grad."""
    x, weight, A, B, s, seed = ctx.saved_tensors
    nx, nw, nb, na, nB = ctx.needs_input_grad[:5]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx, dA, dB = bwd(dy, x, weight, A, B, s, ctx.scaling, ctx.p, seed, ctx.backend, nx, na, nB)
    dW = dy.t() @ x if nw else None
    db = dy.sum(0) if (nb and ctx.has_bias) else None
    return (dx if nx else None, dW, db, dA if na else None, dB if nB else None,
            None, None, None, None)


LORA_OP = define_op("lora_kernels::lora_fwd", _fwd, fake=_fwd_fake,
                    bwd_name="lora_kernels::lora_bwd", bwd=_bwd, bwd_fake=_bwd_fake,
                    setup_context=_setup_context, grads=_grads, nondiff_outputs=(1,),
                    function_name="LoRAFunction")
lora_fwd = LORA_OP.custom_op
#: Eager fast path of ``lora_kernels::lora_fwd`` (see :mod:`lora_kernels.ops._register`).
LoRAFunction = LORA_OP.Function


# ----------------------------------------------------------------------------- quantized weight
def _qfwd(x: torch.Tensor, qtensors: list[torch.Tensor], qmeta: list[int], fmt: str,
          bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
          dropout_p: float, seed: torch.Tensor | None,
          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, in) -> (y (T, out), S = drop(x) A^T (T, r) fp32); W = rebuild(fmt, qtensors, qmeta)."""
    return pick(BACKENDS, backend, "lora_linear")[0](
        x, QW.rebuild(fmt, qtensors, qmeta), bias, lora_A, lora_B, scaling, dropout_p, seed)


def _qfwd_fake(x, qtensors, qmeta, fmt, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return (x.new_empty((x.shape[0], qmeta[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


def _qbwd(dy: torch.Tensor, x: torch.Tensor, qtensors: list[torch.Tensor], qmeta: list[int],
          fmt: str, lora_A: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, scaling: float,
          dropout_p: float, seed: torch.Tensor | None, backend: str, need_dx: bool,
          need_dA: bool, need_dB: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (T, in), dA (r, in), dB (out, r)); None (the op: empty) where unneeded."""
    saved = E.Saved(x, QW.rebuild(fmt, qtensors, qmeta), lora_A, lora_B, s, scaling, dropout_p,
                    seed)
    return pick(BACKENDS, backend, "lora_linear")[1](dy, saved,
                                                      E.Needs(need_dx, need_dA, need_dB))


def _qbwd_fake(dy, x, qtensors, qmeta, fmt, lora_A, lora_B, s, scaling, dropout_p, seed, backend,
               need_dx, need_dA, need_dB):
    return (x.new_empty(x.shape) if need_dx else None,
            lora_A.new_empty(lora_A.shape) if need_dA else None,
            lora_B.new_empty(lora_B.shape) if need_dB else None)


def _qsetup_context(ctx, inputs, output):
    x, qts, qmeta, fmt, bias, A, B, scaling, p, seed, backend = inputs
    ctx.save_for_backward(x, A, B, output[1], seed, *qts)
    ctx.qmeta, ctx.fmt, ctx.scaling, ctx.p, ctx.backend = qmeta, fmt, scaling, p, backend
    ctx.has_bias = bias is not None


def _qgrads(ctx, bwd, dy, _ds=None):
    x, A, B, s, seed, *qts = ctx.saved_tensors
    nx, _, _, _, nb, na, nB = ctx.needs_input_grad[:7]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx, dA, dB = bwd(dy, x, qts, ctx.qmeta, ctx.fmt, A, B, s, ctx.scaling, ctx.p, seed,
                     ctx.backend, nx, na, nB)
    db = dy.sum(0) if (nb and ctx.has_bias) else None
    # the registered op's autograd wants the list input's structure back (one None per tensor);
    # the eager autograd.Function (called with _qbwd itself) one None for the list
    dq = None if bwd is _qbwd else [None] * len(qts)
    return (dx if nx else None, dq, None, None, db, dA if na else None,
            dB if nB else None, None, None, None, None)


QLORA_OP = define_op("lora_kernels::qlora_fwd", _qfwd, fake=_qfwd_fake,
                     bwd_name="lora_kernels::qlora_bwd", bwd=_qbwd, bwd_fake=_qbwd_fake,
                     setup_context=_qsetup_context, grads=_qgrads, nondiff_outputs=(1,),
                     function_name="QLoRAFunction")


def _quantized_lora(x, qweight, bias, lora_A, lora_B, *, scaling, p, seed, backend):
    """:func:`lora_linear` on a quantized ``qweight`` (the other arguments already validated)."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"weight must be a torch.Tensor or a lora_kernels.quant QuantizedWeight, "
                        f"got {type(qweight).__name__}")
    QW.check_quantized("weight", qweight, x)
    out_f, in_f = qweight.shape
    if bias is not None:
        V.float_tensor("bias", bias, ndim=1)
        V.shape("bias", bias, (out_f,), "out_features")
        V.same_dtype("x", x, bias=bias)
        V.same_device("x", x, bias=bias)
    V.lora_factors(lora_A, lora_B, x, in_f, out_f)
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
    ts, meta, fmt = QW.flatten(qweight)
    y, _ = QLORA_OP(x2, ts, meta, fmt, bias, lora_A, lora_B, scaling, p, seed, backend)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)


# ----------------------------------------------------------------------------- public API
def lora_linear(x, weight, bias, lora_A, lora_B, scaling=1.0, dropout_p=0.0, *,
                generator=None, backend=None):
    """Fused LoRA linear: ``y = x W^T + b + scaling * dropout(x) A^T B^T``.

    Args:
        x: ``(..., in)``; any strides.
        weight: ``(out, in)`` base weight (frozen unless it requires grad), or a frozen
            ``lora_kernels.quant`` NF4Weight / Int8Weight / FP8Weight (dequantised in x's dtype;
            see the module docstring).
        bias: ``(out,)`` or ``None``.
        lora_A: ``(r, in)``; lora_B: ``(out, r)`` (PEFT layout).
        scaling: float multiplier of the low-rank branch (PEFT: ``alpha / r``).
        dropout_p: dropout on the low-rank branch's input, in ``[0, 1)``; the mask is
            regenerated from a seed drawn from ``generator`` (reproducible when seeded).
        backend: ``None | "torch" | "triton" | "cuda"`` (see ``lora_kernels._backend``).
    Returns:
        ``(..., out)`` in x's dtype; gradients flow to every input that requires them.
    """
    quantized = QW.is_quantized(weight)  # a quant.QuantizedWeight: the qlora_fwd op
    if not quantized:
        in_f, out_f = V.lora_args(x, weight, bias, lora_A, lora_B)
    scaling = V.scalar("scaling", scaling)
    p = V.scalar("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_open=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    be = resolve_backend(backend, x.device, "lora_linear")
    if be != "torch" and x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16 for backend={be!r}, got {x.dtype}")
    seed = TR.draw_seed(generator, x.device) if p > 0.0 else None
    if quantized:
        return _quantized_lora(x, weight, bias, lora_A, lora_B, scaling=scaling, p=p, seed=seed,
                               backend=be)
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)  # 2-D: no view node in the autograd graph
    x2 = compact_rows_for_cpu_gemm(x2)  # row-padded bf16/fp16 on CPU: see its docstring
    y, _ = LORA_OP(x2, weight, bias, lora_A, lora_B, scaling, p, seed, be)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)
