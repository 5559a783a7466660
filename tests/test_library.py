"""torch.library registration: opcheck on every registered op and fullgraph torch.compile."""

import pytest
import torch
from torch.library import opcheck

import lora_kernels as lk

from conftest import DEVICE, backends
from helpers import randn


def _lora_args(backend, p):
    x = randn(5, 12)
    w, b = randn(7, 12), randn(7)
    a, bb = randn(3, 12, requires_grad=True), randn(7, 3, requires_grad=True)
    seed = torch.tensor([5], device=DEVICE) if p > 0 else None
    return x, w, b, a, bb, 0.5, p, seed, backend


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_lora(backend, p):
    args = _lora_args(backend, p)
    opcheck(torch.ops.lora_kernels.lora_fwd.default, args)
    x, w, b, a, bb, s, p, seed, be = args
    dy, S = randn(5, 7), randn(5, 3)
    for needs in [(True, True, True), (False, True, False), (True, False, False)]:
        opcheck(torch.ops.lora_kernels.lora_bwd.default,
                (dy, x, w, a.detach(), bb.detach(), S, s, p, seed, be, *needs))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_opcheck_qlora(backend, fmt):
    """The quantized-base LoRA ops (a list[Tensor] input: the packed weight) on both paths."""
    from lora_kernels import quant
    from lora_kernels.ops import weights

    cls = {"nf4": quant.NF4Weight, "int8": quant.Int8Weight}[fmt]
    qt, qm, f = weights.flatten(cls.from_float(randn(7, 64)))
    x, b = randn(5, 64), randn(7)
    a, bb = randn(3, 64, requires_grad=True), randn(7, 3, requires_grad=True)
    opcheck(torch.ops.lora_kernels.qlora_fwd.default,
            (x, qt, qm, f, b, a, bb, 0.5, 0.0, None, backend))
    dy, S = randn(5, 7), randn(5, 3)
    for needs in [(True, True, True), (False, True, False), (True, False, False)]:
        opcheck(torch.ops.lora_kernels.qlora_bwd.default,
                (dy, x, qt, qm, f, a.detach(), bb.detach(), S, 0.5, 0.0, None, backend, *needs))


@pytest.mark.parametrize("backend", backends())
def test_compile_fullgraph_lora_layer(backend):
    torch._dynamo.reset()
    m = lk.LoRALinear.from_linear(torch.nn.Linear(12, 7), r=4, alpha=8).to(DEVICE)
    m.backend = backend
    with torch.no_grad():
        m.lora_B.normal_()
    x = randn(2, 3, 12)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = cm(x)
    y.square().sum().backward()
    g = m.lora_A.grad.clone()
    m.lora_A.grad = None
    y0 = m(x)
    y0.square().sum().backward()
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(g, m.lora_A.grad)


# every registered op -> the test that runs torch.library.opcheck on it
OPCHECKED = {
    "lora_kernels::lora_fwd": "test_library.py::test_opcheck_lora",
    "lora_kernels::lora_bwd": "test_library.py::test_opcheck_lora",
    "lora_kernels::glora_fwd": "test_glora.py::test_opcheck_registered_ops",
    "lora_kernels::glora_bwd": "test_glora.py::test_opcheck_registered_ops",
    "lora_kernels::multi_lora_fwd": "test_multi_lora.py::test_registered_ops_opcheck",
    "lora_kernels::multi_lora_bwd": "test_multi_lora.py::test_registered_ops_opcheck",
    "lora_kernels::multi_lora_add_": "test_multi_lora.py::test_registered_ops_opcheck",
    "lora_kernels::check_ids": "test_multi_lora.py::test_registered_ops_opcheck",
    "lora_kernels::multi_lora_plan": "test_multi_lora.py::test_registered_ops_opcheck",
}
OPCHECKED.update({"lora_kernels::qlora_fwd": "test_library.py::test_opcheck_qlora",
                  "lora_kernels::qlora_bwd": "test_library.py::test_opcheck_qlora"})
OPCHECKED.update({"lora_kernels::dora_fwd": "test_dora.py::test_opcheck_and_compile",
                  "lora_kernels::dora_bwd": "test_dora.py::test_opcheck_and_compile"})
OPCHECKED.update({n: "test_embedding_lora.py::test_registered_op_opcheck" for n in (
    "lora_kernels::lora_embedding_fwd", "lora_kernels::lora_embedding_bwd",
    "lora_kernels::multi_lora_embedding")})
OPCHECKED.update({n: "test_moe_lora.py::test_opcheck" for n in (
    "lora_kernels::moe_plan", "lora_kernels::moe_lora_fwd", "lora_kernels::moe_lora_bwd")})
OPCHECKED.update({n: "test_moe_lora.py::test_quantized_opcheck_and_compile" for n in (
    "lora_kernels::moe_qlora_fwd", "lora_kernels::moe_qlora_bwd")})


def test_every_registered_op_is_opchecked():
    """A new op registered without an opcheck test (listed above) fails here."""
    import lora_kernels  # noqa: F401  (registers every op)

    names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lora_kernels::")}
    assert names == set(OPCHECKED), (f"registered but not listed: {sorted(names - set(OPCHECKED))}"
                                     f"; listed but not registered: "
                                     f"{sorted(set(OPCHECKED) - names)}")


def test_define_op_docstring_example():
    """The usage example in ``ops._register``'s docstring runs as written (in its own namespace):
    forward, gradients (eager Function), opcheck on both ops, fullgraph compile, inference path."""
    import lora_kernels.ops._register as R

    class impl:  # the example's launchers: y = s x W^T
        def __init__(self, backend):
            pass

        def fwd(self, x, w, s):
            return s * x @ w.t()

        def bwd(self, dy, x, w, s, nx, nw):
            return (s * dy @ w if nx else None), (s * dy.t() @ x if nw else None)

    src = R.__doc__.split("::\n\n", 1)[1].split("Real uses")[0]
    src = "\n".join(line[4:] for line in src.splitlines())
    src = src.replace("from ._register import define_op", "").replace("lora_kernels::",
                                                                       "lk_doc_example::")
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    env = {"torch": torch, "impl": impl, "define_op": R.define_op, "x": x, "w": w}
    exec(src, env)
    op, y = env["MY_OP"], env["y"]
    assert isinstance(op, R.RegisteredOp)
    torch.testing.assert_close(y, 0.5 * x @ w.t())
    y.square().sum().backward()
    dy = 2 * y.detach()
    torch.testing.assert_close(x.grad, 0.5 * dy @ w.detach())
    torch.testing.assert_close(w.grad, 0.5 * dy.t() @ x.detach())
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, 0.5, "torch"), (x, w))
    opcheck(op.op, (x, w, 0.5, "torch"))
    for needs in [(True, True), (False, True), (True, False)]:
        opcheck(op.bwd_op, (dy, x.detach(), w.detach(), 0.5, "torch", *needs))
    torch._dynamo.reset()
    cf = torch.compile(lambda a, b: op(a, b, 0.5, "torch"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cf(x, w), y)
    with torch.no_grad():
        assert op(x, w, 0.5, "torch").grad_fn is None
