"""One helper for every op: a registered ``torch.library`` op with its fake, its backward op, and
the eager / inference fast paths, from a few plain functions (:func:`define_op`).

Usage (a complete op, ``y = s * x W^T``; ``impl(backend)`` stands for the chosen launchers)::

    from ._register import define_op

    def _fwd(x: torch.Tensor, w: torch.Tensor, s: float, backend: str) -> torch.Tensor:
        return impl(backend).fwd(x, w, s)                 # fresh outputs only (no aliasing)

    def _bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, s: float, backend: str,
             need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return impl(backend).bwd(dy, x, w, s, need_dx, need_dw)    # None = not computed

    def _save(ctx, inputs, output):                       # torch's setup_context
        x, w, ctx.s, ctx.backend = inputs
        ctx.save_for_backward(x, w)

    def _grads(ctx, bwd, dy):                             # bwd: the backward op or _bwd itself
        (x, w), (nx, nw) = ctx.saved_tensors, ctx.needs_input_grad[:2]
        dx, dw = bwd(dy, x, w, ctx.s, ctx.backend, nx, nw)
        return (dx if nx else None), (dw if nw else None), None, None   # one per input

    MY_OP = define_op(
        "lora_kernels::my_fwd", _fwd, fake=lambda x, w, s, be: x.new_empty(x.shape[0], w.shape[0]),
        bwd_name="lora_kernels::my_bwd", bwd=_bwd, setup_context=_save, grads=_grads,
        bwd_fake=lambda dy, x, w, s, be, nx, nw: (x.new_empty(x.shape) if nx else None,
                                                   w.new_empty(w.shape) if nw else None))
    y = MY_OP(x, w, 0.5, "torch")      # what the public function (validation first) calls

Real uses: ``ops/lora.py`` (two outputs, one non-differentiable), ``ops/glora.py`` (optional
tensor inputs, a list of gradients).

What you get (``my`` is a :class:`RegisteredOp`):

* ``torch.ops.lora_kernels.my_fwd`` / ``my_bwd``: registered custom ops (schemas inferred from the
  annotations of ``_fwd`` / ``_bwd``), their fakes, and ``register_autograd`` wiring
  ``setup_context`` and ``grads`` (called with the registered backward op), so
  ``torch.compile(fullgraph=True)`` traces one fake-tensor-aware op per direction and
  ``torch.library.opcheck`` applies to both.
* ``my.Function``: an equivalent ``torch.autograd.Function`` that skips the dispatcher (the eager
  fast path): its forward calls ``_fwd`` and ``setup_context``; its backward calls ``grads`` with
  ``_bwd`` itself.
* ``my(*args)``: the dispatch every public function uses: under ``torch.compiler.is_compiling()``
  the registered op; in eager mode with grad enabled and some tensor argument requiring grad,
  ``my.Function.apply``; otherwise (inference) ``_fwd`` directly, with no autograd node.

Rules the functions follow:

* ``_bwd`` returns ``None`` for a gradient it did not compute; the registered backward op returns
  a fresh empty tensor there (ops cannot return None; outputs may not alias), so ``grads`` must
  map unrequested gradients to None itself (``dx if nx else None``), as above. ``bwd_fake`` follows
  the same rule (return None where ``_bwd`` would), the helper fills in the same empties.
* ``grads(ctx, bwd, *grad_outputs)`` returns one entry per forward input (None for non-tensors,
  and None for a whole ``list[Tensor]`` input without gradients).
* ``nondiff_outputs``: indices of forward outputs that carry no gradient (e.g. a saved fp32
  intermediate returned for the backward); the eager Function marks them non-differentiable.
* An op without ``bwd`` (inference-only, or mutating: ``mutates_args=("y",)``) gets no autograd;
  ``my(*args)`` is then the registered op under compile and ``_fwd`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def needs_grad(*tensors) -> bool:
    """Whether autograd must record a call on ``tensors`` (grad mode on and some tensor among
    them requires grad; non-tensors and None are ignored)."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def pick(table: dict, backend: str, op: str):
    """``table[backend]``: every op's backend table is a dict from backend name to its
    implementation(s); a backend without one is refused naming the op and what it offers."""
    try:
        return table[backend]
    except KeyError:
        raise ValueError(f"{op} has no {backend!r} implementation; use one of "
                         f"{', '.join(repr(b) for b in table)}") from None


def _fill_empties(fn: Callable) -> Callable:
    """``fn`` with every None in its returned tuple/list replaced by a fresh empty tensor like the
    first tensor argument (the registered-op form of "gradient not computed")."""

    def filled(*args):
        out = fn(*args)
        ref = next(a for a in args if isinstance(a, torch.Tensor))
        vals = [ref.new_empty(0) if t is None else t for t in out]
        return vals if isinstance(out, list) else tuple(vals)

    return filled


def _op_handle(name: str) -> torch._ops.OpOverload:
    ns, op = name.split("::")
    return getattr(getattr(torch.ops, ns), op).default


@dataclass(frozen=True)
class RegisteredOp:
    """A registered op and its fast paths (built by :func:`define_op`; call it like ``fwd``).

    Attributes: ``name``; ``custom_op`` (torch's CustomOpDef of the forward); ``op`` (the
    forward's OpOverload, ``torch.ops.<name>.default``); ``bwd_op`` (the backward's, or None);
    ``fwd`` (the plain implementation); ``Function`` (the eager autograd.Function, or None).
    """

    name: str
    custom_op: object
    op: torch._ops.OpOverload
    bwd_op: torch._ops.OpOverload | None
    fwd: Callable
    Function: type | None

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        if self.Function is not None and needs_grad(*args):
            return self.Function.apply(*args)
        return self.fwd(*args)


def define_op(name: str, fwd: Callable, *, fake: Callable, bwd_name: str | None = None,
              bwd: Callable | None = None, bwd_fake: Callable | None = None,
              setup_context: Callable | None = None, grads: Callable | None = None,
              nondiff_outputs: Sequence[int] = (), mutates_args: Sequence[str] = (),
              function_name: str | None = None) -> RegisteredOp:
    """Register ``name`` (``"namespace::op"``) implemented by ``fwd`` (type-annotated; the schema
    is inferred from it) with ``fake``, and, when ``bwd`` is given, the backward op ``bwd_name``
    (implemented by ``bwd``, faked by ``bwd_fake``) plus autograd (``setup_context``, ``grads``).
    ``function_name`` names the eager autograd.Function class. See the module docstring."""
    cdef = torch.library.custom_op(name, fwd, mutates_args=tuple(mutates_args))
    cdef.register_fake(fake)
    if bwd is None:
        return RegisteredOp(name, cdef, _op_handle(name), None, fwd, None)
    if bwd_name is None or bwd_fake is None or setup_context is None or grads is None:
        raise TypeError(f"define_op({name!r}): a backward needs bwd_name, bwd_fake, "
                        f"setup_context and grads")
    schema = torch.library.infer_schema(bwd, mutates_args=())
    bdef = torch.library.custom_op(bwd_name, _fill_empties(bwd), mutates_args=(), schema=schema)
    bdef.register_fake(_fill_empties(bwd_fake))
    bwd_op = _op_handle(bwd_name)

    def registered_setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.lk_list_inputs = {i: len(a) for i, a in enumerate(inputs)
                              if isinstance(a, (list, tuple)) and a
                              and all(isinstance(t, torch.Tensor) for t in a)}

    def registered_backward(ctx, *grad_outputs):
        # the registered op wants one gradient per element of a Tensor[] input: a None that
        # ``grads`` returns for such an input becomes [None] * len
        out = grads(ctx, bwd_op, *grad_outputs)
        lists = ctx.lk_list_inputs
        if not lists:
            return out
        return tuple([None] * lists[i] if g is None and i in lists else g
                     for i, g in enumerate(out))

    cdef.register_autograd(registered_backward, setup_context=registered_setup)
    nondiff = tuple(nondiff_outputs)

    def forward(ctx, *args):
        out = fwd(*args)
        setup_context(ctx, args, out)
        if nondiff:
            ctx.mark_non_differentiable(*(out[i] for i in nondiff))
            ctx.set_materialize_grads(False)
        return out

    def backward(ctx, *grad_outputs):
        return grads(ctx, bwd, *grad_outputs)

    cls_name = function_name or name.split("::")[1] + "_function"
    function = type(cls_name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward),
        "__doc__": f"Eager fast path of ``{name}``: the same implementation and backward "
                   f"without the custom-op dispatcher (``define_op``).",
        "__module__": getattr(fwd, "__module__", __name__)})
    return RegisteredOp(name, cdef, _op_handle(name), bwd_op, fwd, function)
