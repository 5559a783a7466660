"""GLoRA (generalised LoRA): ``y = x W_eff^T + b_eff`` with

    W_eff = W + W * A + B                (``*`` elementwise, A broadcast to (out, in))
    b_eff = b + b * D + E + W @ C

and each support tensor in one of its forms (DESIGN.md):

    A, B:  None | scalar () | vector (out,) | low-rank pair (down (out, r), up (r, in))
    C:     None | vector (in,) | low-rank pair (down (in, r), up (r, 1))
    D, E:  None | scalar () | vector (out,)

A low-rank pair is passed as a tuple ``(down, up)`` and stands for ``down @ up``.

Layers: ``kernels.glora.glora_gemm_kernel`` (Triton) -> :func:`glora_gemm` (launcher) ->
``lora_kernels::glora_fwd`` / ``lora_kernels::glora_bwd`` (registered by
``ops._register.define_op``: fakes and autograd, so ``torch.compile(fullgraph=True)`` traces
through; eager calls take the equivalent :data:`GLoRAFunction`, skipping the dispatcher) ->
:func:`glora_linear` -> ``layers.GLoRALinear``.

Forward (Triton): ``W_eff`` is built tile by tile in registers inside the GEMM and never written to
HBM. ``b_eff`` (out,) is computed first in fp32; its ``W @ C`` term is a skinny GEMM on the shared
``gemm_lowrank`` kernel (``C^T W^T``, rank 1 or r rows), i.e. one extra read of W.

Backward (dy (T, out)); with ``G = dy^T x`` (out, in) and ``g = sum_t dy`` (out,):

    dx = dy W_eff                          same kernel, W^T as a strided view (no W_eff in HBM)
    dA = reduce(G * W)   (scalar: sum; vector: row sums; pair: (G*W) up^T, down^T (G*W))
    dB = reduce(G)       (likewise)
    dC = W^T g           (vector; pair: dC down/up through ``down @ up``)
    dD = reduce(b * g),  dE = reduce(g)
    dW = G + G * A + g C^T,  db = g (1 + D)      (only if the base requires grad)

**The backward materialises** ``G`` as an fp32 ``(out, in)`` matrix (Triton: the engine's split-K
``tn`` kernel, ``ops.lowrank``) when any of A, B, W needs a gradient, plus an fp32 copy of W (for
half inputs) when A, C or W needs one; the reductions above are plain torch ops on it. It is the
price of the Hadamard term: ``dA = G * W`` is not low-rank, so it cannot be folded into the fused
LoRA backward.

The ``"torch"`` backend is plain PyTorch (``W_eff`` materialised), computing ``W_eff``/``b_eff``
and every reduction in fp32 for half inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _validate as V
from .._backend import resolve_backend
from .._cpu_gemm import compact_rows_for_cpu_gemm
from . import _triton as TR
from ._register import define_op, pick
from .lowrank import gemm_lowrank, tn
from .weights import dense_weight

NONE, SCALAR, VEC_N, VEC_K, LOWRANK = 0, 1, 2, 3, 4
_FORMS = {
    "A": "None, a scalar () tensor, a vector (out,) or a low-rank pair (down (out, r), up (r, in))",
    "B": "None, a scalar () tensor, a vector (out,) or a low-rank pair (down (out, r), up (r, in))",
    "C": "None, a vector (in,) or a low-rank pair (down (in, r), up (r, 1))",
    "D": "None, a scalar () tensor or a vector (out,)",
    "E": "None, a scalar () tensor or a vector (out,)",
}


def _ct(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------- validation
def parse_support(name: str, v, x, in_f: int, out_f: int, ref: str = "x"):
    """Normalise one support to ``(t1, t2)``: (None, None) | (tensor, None) | (down, up);
    dtype and device must match ``x`` (called ``ref`` in messages)."""
    if v is None:
        return None, None
    if isinstance(v, (tuple, list)):
        if name in ("D", "E"):
            raise TypeError(f"{name} must be {_FORMS[name]}; low-rank pairs are not a form of "
                            f"{name}")
        if len(v) != 2:
            raise ValueError(f"{name} as a low-rank pair must be (down, up), got {len(v)} items")
        down, up = v
        dn, un = f"{name}[0] (down)", f"{name}[1] (up)"
        V.float_tensor(dn, down, ndim=2)
        V.float_tensor(un, up, ndim=2)
        r = down.shape[1]
        V.rank(f"{name} rank ({name}[0].shape[1])", r, max_rank=min(in_f, out_f),
               what="min(in_features, out_features)")
        rows, cols = (in_f, 1) if name == "C" else (out_f, in_f)
        V.shape(dn, down, (rows, r), "(in_features, r)" if name == "C" else "(out_features, r)")
        V.shape(un, up, (r, cols), "(r, 1)" if name == "C" else "(r, in_features)")
        V.same_dtype(ref, x, **{dn: down, un: up})
        V.same_device(ref, x, **{dn: down, un: up})
        return down, up
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be {_FORMS[name]}, got {type(v).__name__}")
    V.float_tensor(name, v)
    if name == "C":
        ok = v.dim() == 1 and v.shape[0] == in_f
    else:
        ok = v.dim() == 0 or (v.dim() == 1 and v.shape[0] == out_f)
    if not ok:
        raise ValueError(f"{name} must be {_FORMS[name]} with in={in_f}, out={out_f}; got a "
                         f"tensor of shape {tuple(v.shape)}")
    V.same_dtype(ref, x, **{name: v})
    V.same_device(ref, x, **{name: v})
    return v, None


# ----------------------------------------------------------------------------- dense helpers
def _full(t1, t2, ct):
    """A or B as a tensor broadcastable to (out, in), in ``ct`` (None when absent)."""
    if t1 is None:
        return None
    if t2 is not None:
        return t1.to(ct) @ t2.to(ct)
    return t1.to(ct) if t1.dim() == 0 else t1.to(ct)[:, None]


def _c_full(c1, c2, ct):
    if c1 is None:
        return None
    return (c1.to(ct) @ c2.to(ct))[:, 0] if c2 is not None else c1.to(ct)


def _weff(weight, a1, a2, b1, b2, ct):
    w = weight.to(ct)
    A, B = _full(a1, a2, ct), _full(b1, b2, ct)
    weff = w if A is None else w + w * A
    return weff if B is None else weff + B


def _beff(weight, bias, c1, c2, d, e, ct, wc):
    """``b + b*D + E + W@C`` in ``ct`` (None when every term is absent); ``wc()`` gives W@C."""
    out = None
    if bias is not None:
        b = bias.to(ct)
        out = b if d is None else b + b * d.to(ct)
    if e is not None:
        ev = e.to(ct)
        out = ev.expand(weight.shape[0]) if out is None else out + ev
    if c1 is not None:
        w_c = wc()
        out = w_c if out is None else out + w_c
    return out


# ----------------------------------------------------------------------------- Triton launcher
def _spec(t1, t2, transposed: bool):
    """(mode, P1, P2) of a support for the kernel (transposed=True: the dx GEMM on W^T)."""
    if t1 is None:
        return NONE, None, None
    if t2 is not None:
        return (LOWRANK, t2.t(), t1.t()) if transposed else (LOWRANK, t1, t2)
    if t1.dim() == 0:
        return SCALAR, t1, None
    return (VEC_K if transposed else VEC_N), t1, None


def _strides(t):
    if t is None:
        return 0, 0
    if t.dim() == 0:
        return 0, 0
    if t.dim() == 1:
        return t.stride(0), 0
    return t.stride(0), t.stride(1)


def glora_gemm(x, w, *, out_dtype, bias=None, A=(NONE, None, None), B=(NONE, None, None)):
    """Launch ``glora_gemm_kernel``: ``x @ (w + w*A + B)^T (+ bias fp32)``.

    x (M, K), w (N, K) (any strides; pass ``W.t()`` for the dx GEMM), A/B as ``(mode, P1, P2)``
    from :func:`_spec`. Returns (M, N) in ``out_dtype``.
    """
    from ..kernels.glora import glora_gemm_autotuned, glora_gemm_kernel

    M, K = x.shape
    N = w.shape[0]
    y = TR.empty((M, N), out_dtype, x.device)
    if M == 0 or N == 0:
        return y
    am, a1, a2 = A
    bm, b1, b2 = B
    ra = a1.shape[1] if am == LOWRANK else 1
    rb = b1.shape[1] if bm == LOWRANK else 1
    kernel, cfg, grid = TR.tile_launch(glora_gemm_kernel, glora_gemm_autotuned, M, N)
    dummy = y
    sa1, sa2, sb1, sb2 = _strides(a1), _strides(a2), _strides(b1), _strides(b2)
    dts = [x.dtype, w.dtype] + [t.dtype for t in (a1, a2, b1, b2) if t is not None]
    kernel[grid](
        x, w, y, bias.contiguous() if bias is not None else dummy,
        a1 if a1 is not None else dummy, a2 if a2 is not None else dummy,
        b1 if b1 is not None else dummy, b2 if b2 is not None else dummy,
        M, N, K, ra, rb, min(TR.next_pow2(M), 8192),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        *sa1, *sa2, *sb1, *sb2,
        A_MODE=am, B_MODE=bm, HAS_BIAS=bias is not None,
        BLOCK_RA=max(16, min(64, TR.next_pow2(ra))), BLOCK_RB=max(16, min(64, TR.next_pow2(rb))),
        PRECISION=TR.dot_precision(x.dtype), UPCAST=TR.upcast(*dts), **cfg,
    )
    return y


def _wc_triton(weight, c1, c2):
    """``W @ C`` (out,) fp32 on the shared skinny-GEMM kernel: C^T W^T with C's rows as tokens."""
    if c2 is None:
        return gemm_lowrank(c1[None, :], weight, out_dtype=torch.float32)[0]
    s = gemm_lowrank(c1.t(), weight, out_dtype=torch.float32)          # (r, out) = (W C_down)^T
    return (c2.to(torch.float32).t() @ s)[0]


# ----------------------------------------------------------------------------- implementations
class Supports(NamedTuple):
    """The normalised supports of one call (each as :func:`parse_support` returns it): A = (a1, a2),
    B = (b1, b2), C = (c1, c2) with the second item None unless a low-rank pair; D = d, E = e."""

    a1: torch.Tensor | None
    a2: torch.Tensor | None
    b1: torch.Tensor | None
    b2: torch.Tensor | None
    c1: torch.Tensor | None
    c2: torch.Tensor | None
    d: torch.Tensor | None
    e: torch.Tensor | None


class Needs(NamedTuple):
    """Which of the 11 gradients (the op's tensor inputs, in order) a backward computes; the
    registered ``glora_bwd`` carries it as an int bitmask (bit i = field i)."""

    x: bool
    weight: bool
    bias: bool
    a1: bool
    a2: bool
    b1: bool
    b2: bool
    c1: bool
    c2: bool
    d: bool
    e: bool

    @classmethod
    def from_mask(cls, mask: int) -> Needs:
        return cls(*(bool((mask >> i) & 1) for i in range(len(cls._fields))))

    def mask(self) -> int:
        return sum(1 << i for i, n in enumerate(self) if n)


def _torch_fwd(x2, weight, bias, sup: Supports):
    ct = _ct(x2.dtype)
    weff = _weff(weight, sup.a1, sup.a2, sup.b1, sup.b2, ct)
    beff = _beff(weight, bias, sup.c1, sup.c2, sup.d, sup.e, ct,
                 lambda: weight.to(ct) @ _c_full(sup.c1, sup.c2, ct))
    return F.linear(x2, weff.to(x2.dtype), None if beff is None else beff.to(x2.dtype))


def _triton_fwd(x2, weight, bias, sup: Supports):
    beff = _beff(weight, bias, sup.c1, sup.c2, sup.d, sup.e, torch.float32,
                 lambda: _wc_triton(weight, sup.c1, sup.c2))
    if beff is not None:
        beff = beff.contiguous()
    return glora_gemm(x2, weight, out_dtype=x2.dtype, bias=beff,
                      A=_spec(sup.a1, sup.a2, False), B=_spec(sup.b1, sup.b2, False))


def _reduce(g, t1, t2, ct):
    """Gradients of a support (scalar/vector/pair along (out, in)) from its dense grad ``g``."""
    if t2 is not None:
        return g @ t2.to(ct).t(), t1.to(ct).t() @ g
    if t1.dim() == 0:
        return g.sum(), None
    return g.sum(1), None


def _bwd(dy, x2, weight, bias, sup: Supports, backend: str, need: Needs) -> list:
    """The 11 gradients (x, weight, bias, a1, a2, b1, b2, c1, c2, d, e); None where unneeded."""
    a1, a2, b1, b2, c1, c2, d, e = sup
    ct = _ct(x2.dtype)
    triton = backend == "triton"
    g = dict.fromkeys(Needs._fields)
    if need.x:
        if triton:
            g["x"] = glora_gemm(dy, weight.t(), out_dtype=x2.dtype,
                                A=_spec(a1, a2, True), B=_spec(b1, b2, True))
        else:
            g["x"] = dy @ _weff(weight, a1, a2, b1, b2, ct).to(dy.dtype)
    need_A = a1 is not None and (need.a1 or need.a2)
    need_B = b1 is not None and (need.b1 or need.b2)
    need_C = c1 is not None and (need.c1 or need.c2)
    G = None
    if need.weight or need_A or need_B:                   # materialised (out, in)
        G = tn(dy, x2) if triton else dy.t().to(ct) @ x2.to(ct)
    w = weight.to(ct) if (need.weight or need_A or need_C) else None
    gs = dy.sum(0, dtype=ct)                              # dL/db_eff (out,)
    if need_A:
        g["a1"], g["a2"] = _reduce(G * w, a1, a2, ct)
    if need_B:
        g["b1"], g["b2"] = _reduce(G, b1, b2, ct)
    if need_C:
        gc = gs @ w                                       # dL/dC (in,)
        if c2 is not None:
            g["c1"], g["c2"] = gc[:, None] @ c2.to(ct).t(), c1.to(ct).t() @ gc[:, None]
        else:
            g["c1"] = gc
    if d is not None and need.d:
        bd = gs * bias.to(ct) if bias is not None else torch.zeros_like(gs)
        g["d"] = bd.sum() if d.dim() == 0 else bd
    if e is not None and need.e:
        g["e"] = gs.sum() if e.dim() == 0 else gs
    if need.weight:
        A = _full(a1, a2, ct)
        dW = G if A is None else G + G * A
        cf = _c_full(c1, c2, ct)
        g["weight"] = dW if cf is None else dW + gs[:, None] * cf[None, :]
    if need.bias and bias is not None:
        g["bias"] = gs if d is None else gs * (1 + d.to(ct))
    refs = (x2, weight, bias, *sup)
    return [None if t is None or not n else t.to(r.dtype)
            for t, r, n in zip(g.values(), refs, need)]


#: backend -> forward (the backward is one function, :func:`_bwd`, with a Triton / torch branch
#: per product); no CUDA kernel
BACKENDS = {"torch": _torch_fwd, "triton": _triton_fwd}


# ----------------------------------------------------------------------------- registered ops
def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         a1: torch.Tensor | None, a2: torch.Tensor | None, b1: torch.Tensor | None,
         b2: torch.Tensor | None, c1: torch.Tensor | None, c2: torch.Tensor | None,
         d: torch.Tensor | None, e: torch.Tensor | None, backend: str) -> torch.Tensor:
    """x (T, in) -> y (T, out); supports as normalised by :func:`parse_support`."""
    return pick(BACKENDS, backend, "glora_linear")(x, weight, bias,
                                                   Supports(a1, a2, b1, b2, c1, c2, d, e))


def _fwd_fake(x, weight, bias, a1, a2, b1, b2, c1, c2, d, e, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            a1: torch.Tensor | None, a2: torch.Tensor | None, b1: torch.Tensor | None,
            b2: torch.Tensor | None, c1: torch.Tensor | None, c2: torch.Tensor | None,
            d: torch.Tensor | None, e: torch.Tensor | None, backend: str,
            need_mask: int) -> list[torch.Tensor]:
    """Gradients of (x, weight, bias, a1, a2, b1, b2, c1, c2, d, e); bit i of ``need_mask``
    (:class:`Needs`) requests the i-th; an unrequested one is None (the op: empty)."""
    return _bwd(dy, x, weight, bias, Supports(a1, a2, b1, b2, c1, c2, d, e), backend,
                Needs.from_mask(need_mask))


def _bwd_fake(dy, x, weight, bias, a1, a2, b1, b2, c1, c2, d, e, backend, need_mask):
    refs = (x, weight, bias, a1, a2, b1, b2, c1, c2, d, e)
    return [r.new_empty(r.shape) if n and r is not None else None
            for r, n in zip(refs, Needs.from_mask(need_mask))]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:11])
    ctx.backend = inputs[11]


def _grads(ctx, bwd, dy):
    """Backward of the op; ``bwd`` is the registered ``glora_bwd`` or :func:`_bwd_op`."""
    saved = ctx.saved_tensors
    need = Needs(*(n and t is not None for n, t in zip(ctx.needs_input_grad[:11], saved)))
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    grads = bwd(dy, *saved, ctx.backend, need.mask())
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,)


GLORA_OP = define_op("lora_kernels::glora_fwd", _fwd, fake=_fwd_fake,
                     bwd_name="lora_kernels::glora_bwd", bwd=_bwd_op, bwd_fake=_bwd_fake,
                     setup_context=_setup_context, grads=_grads, function_name="GLoRAFunction")
glora_fwd = GLORA_OP.custom_op
#: Eager fast path of ``lora_kernels::glora_fwd`` (see :mod:`lora_kernels.ops._register`).
GLoRAFunction = GLORA_OP.Function


# ----------------------------------------------------------------------------- public API
def glora_linear(x, weight, bias, A=None, B=None, C=None, D=None, E=None, *, backend=None):
    """GLoRA linear: ``y = x (W + W*A + B)^T + (b + b*D + E + W@C)``.

    Args:
        x: ``(..., in)``, any strides.
        weight: ``(out, in)``; bias: ``(out,)`` or ``None`` (then ``b*D`` vanishes).
        A, B: ``None`` | scalar ``()`` | vector ``(out,)`` | pair ``(down (out, r), up (r, in))``.
        C: ``None`` | vector ``(in,)`` | pair ``(down (in, r), up (r, 1))``.
        D, E: ``None`` | scalar ``()`` | vector ``(out,)``.
        All tensors in x's dtype and on x's device; ranks ``1 <= r <= min(in, out)``.
        backend: ``None | "torch" | "triton" | "cuda"`` (no CUDA kernel: "cuda" is refused).
    Returns:
        ``(..., out)`` in x's dtype; gradients to every tensor that requires them.
    """
    weight = dense_weight(weight, x)  # a quantized base: deq(W) per call (ops.weights)
    in_f, out_f = V.linear_args(x, weight, bias)
    a1, a2 = parse_support("A", A, x, in_f, out_f)
    b1, b2 = parse_support("B", B, x, in_f, out_f)
    c1, c2 = parse_support("C", C, x, in_f, out_f)
    d, _ = parse_support("D", D, x, in_f, out_f)
    e, _ = parse_support("E", E, x, in_f, out_f)
    be = resolve_backend(backend, x.device, "glora_linear")
    if be != "torch" and x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16 for backend={be!r}, got {x.dtype}")
    pick(BACKENDS, be, "glora_linear")  # refuse a backend without a kernel before any work
    x2 = compact_rows_for_cpu_gemm(x.reshape(-1, in_f))  # row-padded bf16/fp16 on CPU
    y = GLORA_OP(x2, weight, bias, a1, a2, b1, b2, c1, c2, d, e, be)
    return y.reshape(*x.shape[:-1], out_f)


def glora_delta(weight, bias, A=None, B=None, C=None, D=None, E=None):
    """Dense ``(dW (out, in), db (out,) | None)`` of a GLoRA adapter (computed in fp32 for half
    weights, returned in weight's dtype): ``dW = W*A + B``, ``db = b*D + E + W@C``."""
    weight = dense_weight(weight)  # a quantized base: deq(W)
    V.float_tensor("weight", weight, ndim=2)
    out_f, in_f = weight.shape
    a1, a2 = parse_support("A", A, weight, in_f, out_f, "weight")
    b1, b2 = parse_support("B", B, weight, in_f, out_f, "weight")
    c1, c2 = parse_support("C", C, weight, in_f, out_f, "weight")
    d, _ = parse_support("D", D, weight, in_f, out_f, "weight")
    e, _ = parse_support("E", E, weight, in_f, out_f, "weight")
    ct = _ct(weight.dtype)
    w = weight.to(ct)
    dw = torch.zeros_like(w)
    Af, Bf = _full(a1, a2, ct), _full(b1, b2, ct)
    if Af is not None:
        dw = dw + w * Af
    if Bf is not None:
        dw = dw + Bf
    db = _beff(weight, None, c1, c2, None, e, ct, lambda: w @ _c_full(c1, c2, ct))
    if bias is not None and d is not None:
        bd = bias.to(ct) * d.to(ct)
        db = bd if db is None else db + bd
    return dw.to(weight.dtype), None if db is None else db.to(weight.dtype)
