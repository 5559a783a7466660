"""Structure rules of the package, checked on its source (no imports, no kernels run)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lora_kernels"
MAX_POSITIONAL = 8


def _decorator_names(fn) -> set[str]:
    names = set()
    for d in fn.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        names.add(ast.unparse(d))
    return names


def _op_boundary(tree: ast.Module) -> set[str]:
    """Names of functions that *are* a custom-op boundary in this module: passed to
    ``define_op(...)`` (the op's implementation, fake, backward and backward fake: their signature
    is the op's schema)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("define_op"):
            for a in [*node.args, *(k.value for k in node.keywords)]:
                if isinstance(a, ast.Name):
                    out.add(a.id)
    return out


def _exempt(fn, boundary: set[str], cls: ast.ClassDef | None) -> bool:
    deco = _decorator_names(fn)
    # torch.library ops (schema = signature), Triton kernels (the launch ABI: scalars and
    # pointers only, no structs)
    if any(d.startswith(("torch.library.custom_op", "triton.")) or d.endswith(
            (".register_fake", "register_kernel")) or d == "jit" for d in deco):
        return True
    if fn.name in boundary:
        return True
    # an autograd.Function's forward/backward take the op's inputs (ctx, *inputs)
    return (cls is not None and fn.name in ("forward", "backward") and any(
        ast.unparse(b).endswith("autograd.Function") for b in cls.bases))


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    boundary = _op_boundary(tree)
    out = []

    def visit(node, cls=None):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = len(child.args.posonlyargs) + len(child.args.args)
                if n > MAX_POSITIONAL and not _exempt(child, boundary, cls):
                    out.append(f"{path.relative_to(PKG.parent)}:{child.lineno} {child.name} "
                               f"({n} positional)")
                visit(child)
            elif isinstance(child, ast.ClassDef):
                visit(child, child)
            else:
                visit(child, cls)

    visit(tree)
    return out


def test_no_long_positional_signatures():
    """No function in lora_kernels/ takes more than 8 positional arguments outside the custom-op
    boundary (ops registered through ``define_op`` or ``torch.library``, their fakes, autograd
    Functions, Triton kernels): bundle them into a small named value or make them keyword-only."""
    bad = [v for path in sorted(PKG.rglob("*.py")) for v in _violations(path)]
    assert not bad, "functions with more than 8 positional arguments:\n" + "\n".join(bad)
