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


# ----------------------------------------------------------------------------- import floors
#: The floors of the package, lowest first. A module may import from its own floor or any floor
#: below (never above), and no import circle may form, counting imports inside functions (only
#: ``if TYPE_CHECKING:`` imports are aside). Each module's floor is its longest matching prefix
#: here; a new top-level module needs a line (a new ``ops.*`` / ``layers.*`` / ``kernels.*``
#: module inherits its package's floor).
FLOORS: dict[str, tuple[str, ...]] = {
    # plain helpers every floor reads: validation, backend choice, the _C loader, caches, the
    # float64 references
    "foundation": ("_validate", "_backend", "_cpu_gemm", "_cuda", "_cache", "_conv1d", "reference"),
    "kernels": ("kernels",),                                 # Triton @jit code only
    # quantized weight formats (what the engine's weight interface reads)
    "weights": ("quant",),
    # the low-rank engine: launch helpers, define_op, the weight interface, the CUDA launchers,
    # "base GEMM + low-rank chain" forward/backward on every backend
    "engine": ("ops._triton", "ops._register", "ops.weights", "ops.lora_cuda", "ops.lowrank"),
    # one registered op family each; the adapter pool is the multi-LoRA ops' input (its id check
    # is a registered op)
    "ops": ("ops", "pool"),
    "layers/store": ("layers", "store", "compose", "fused", "generate"),
    # whole models: injection, PEFT files and patching, serving, parallelism, search
    "model-level": ("inject", "peft_io", "peft_patch", "serving", "serving_embedding", "moe",
                    "peft_moe", "serving_moe",
                    "serving_bias", "peft_extras", "serving_extras",
                    "parallel", "expert_parallel", "glora_search", "params"),
    "api": ("",),                                            # the package itself (lora_kernels)
    "tools": ("bench", "check", "demo", "examples"),
}
_FLOOR_ORDER = list(FLOORS)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _floor(module: str) -> str | None:
    """The floor of ``lora_kernels.<...>`` by its longest matching prefix in :data:`FLOORS`."""
    rel = module[len("lora_kernels"):].lstrip(".")
    best, best_len = None, -1
    for floor, prefixes in FLOORS.items():
        for pre in prefixes:
            hit = rel == pre or (pre and rel.startswith(pre + ".")) or (not pre and not rel)
            if hit and len(pre) > best_len:
                best, best_len = floor, len(pre)
    return best


def _imports_of(tree: ast.Module, pkg: str, modules) -> list[tuple[int, str, str | None]]:
    """``(line, target, name)`` of every import of a ``lora_kernels`` module in ``tree`` (at any
    depth; ``if TYPE_CHECKING:`` blocks left out); ``pkg`` is the package relative imports start
    from. ``target`` is the module imported from; ``name`` the name taken from it when that name
    is not itself a module (None when it is)."""
    found = []
    stack = [tree]
    while stack:
        node = stack.pop()
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                continue
            if isinstance(ch, ast.ImportFrom):
                if ch.level:
                    parts = pkg.split(".")
                    up = parts[:len(parts) - (ch.level - 1)]
                    base = ".".join(up + ([ch.module] if ch.module else []))
                else:
                    base = ch.module or ""
                for a in ch.names:
                    if f"{base}.{a.name}" in modules:
                        found.append((ch.lineno, f"{base}.{a.name}", None))
                    elif base.startswith("lora_kernels"):
                        found.append((ch.lineno, base, a.name))
            elif isinstance(ch, ast.Import):
                found += [(ch.lineno, a.name, None) for a in ch.names
                          if a.name.startswith("lora_kernels")]
            stack.append(ch)
    return found


def _package_imports():
    """``{module: (path, tree, imports)}`` for every module of the package (imports as
    :func:`_imports_of` lists them)."""
    paths = {_module_name(p): p for p in PKG.rglob("*.py")}
    out = {}
    for mod, path in paths.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        out[mod] = (path, tree, _imports_of(tree, pkg, paths))
    return out


def test_every_module_has_a_floor():
    missing = [m for m in _package_imports() if _floor(m) is None]
    assert not missing, f"modules without a floor in FLOORS: {missing}"


def test_imports_point_down():
    """No module imports from a floor above its own (function-local imports included)."""
    bad = []
    for mod, (path, _, found) in _package_imports().items():
        here = _FLOOR_ORDER.index(_floor(mod) or "tools")
        for line, target, _name in found:
            there = _floor(target)
            if there is not None and _FLOOR_ORDER.index(there) > here:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({_floor(mod)}) imports "
                           f"{target} ({there})")
    assert not bad, "imports that climb:\n" + "\n".join(bad)


def test_no_import_circles():
    """The module import graph (function-local imports counted; a package's ``__init__``
    importing its submodules counts too) has no cycle."""
    graph = {m: {t for _, t, _ in found if t != m}
             for m, (_, _, found) in _package_imports().items()}
    state, cycles = {}, []

    def dfs(m, stack):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t in graph and not state.get(t):
                dfs(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            dfs(m, [])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_names_across_modules():
    """No module takes another module's private (``_name``) names, by ``from m import _name`` or
    as ``m._name`` on an imported module (a private *module*, e.g. ``_validate``, is fine)."""
    bad = []
    for mod, (path, tree, found) in _package_imports().items():
        where = path.relative_to(PKG.parent)
        bad += [f"{where}:{line} from {target} import {name}" for line, target, name in found
                if name is not None and _private(name) and target != mod]
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    if any(t.endswith("." + a.name) or t == a.name
                           for _, t, n in found if n is None):
                        aliases[a.asname or a.name.split(".")[-1]] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                bad.append(f"{where}:{node.lineno} {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(sorted(set(bad)))


def test_floor_checks_see_local_and_private_imports():
    """The checks above read what they claim to: a function-local import is found (and
    resolved relative to its package), a TYPE_CHECKING one is not, and a kernel module importing
    an op climbs."""
    src = ("from typing import TYPE_CHECKING\n"
           "if TYPE_CHECKING:\n    from ..ops.lora import Saved\n"
           "def f():\n    from ..ops.multi_lora import tiles\n    from ..pool import _private\n")
    mods = {"lora_kernels.ops.multi_lora.tiles", "lora_kernels.pool", "lora_kernels.ops.lora"}
    found = _imports_of(ast.parse(src), "lora_kernels.kernels", mods)
    assert sorted(found) == [(5, "lora_kernels.ops.multi_lora.tiles", None),
                             (6, "lora_kernels.pool", "_private")]
    assert _floor("lora_kernels.kernels.multi_lora") == "kernels"
    assert _floor("lora_kernels.ops.lowrank") == "engine"
    assert _floor("lora_kernels.ops.multi_lora.tiles") == "ops"
    assert _floor("lora_kernels") == "api" and _floor("lora_kernels.bench.cases") == "tools"
    assert (_FLOOR_ORDER.index(_floor("lora_kernels.ops.multi_lora.tiles"))
            > _FLOOR_ORDER.index(_floor("lora_kernels.kernels.multi_lora")))


def test_one_all_per_module():
    """A module's ``__all__`` is written once, as one list (no ``__all__ +=`` extensions)."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        writes = [n for n in tree.body
                  if isinstance(n, ast.AugAssign) and ast.unparse(n.target) == "__all__"
                  or isinstance(n, ast.Assign) and any(ast.unparse(t) == "__all__"
                                                       for t in n.targets)]
        if len(writes) > 1 or any(isinstance(n, ast.AugAssign) for n in writes):
            bad.append(f"{path.relative_to(PKG.parent)}: __all__ written {len(writes)} times")
    assert not bad, "\n".join(bad)
