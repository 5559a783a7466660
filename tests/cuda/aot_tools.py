"""Ahead-of-time compilation of every Triton kernel for real GPU targets, with no GPU.

The interpreter checks what a kernel computes; it does not run Triton's GPU compiler, which
rejects things the interpreter accepts (dtype mismatches in tl.dot, shared-memory overflow,
unsupported ops). This module records every kernel launch made under TRITON_INTERPRET=1
(kernel, argument dtypes, constexprs) and, in a fresh process without the interpreter,
compiles each distinct signature to a cubin for sm_80 and sm_90 with Triton's own compiler
(``triton.compile`` with an explicit ``GPUTarget``). Compiled is not verified: nothing here runs.

Usage (CLI, used by tests/cuda/test_triton_aot.py):
    python tests/cuda/aot_tools.py compile launches.json
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys

import torch

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "i1",
}


def _sig_of(value) -> str | None:
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


@contextlib.contextmanager
def record_launches(out: list):
    """Record (module, name, signature, constexprs, options) of each interpreted launch."""
    from triton.runtime.interpreter import InterpretedFunction

    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        ann = getattr(fn, "__annotations__", {})
        sig, const = {}, {}
        for n in names:
            v = bound.get(n)
            if "constexpr" in str(ann.get(n, "")):
                const[n] = v
                sig[n] = "constexpr"
            elif v is None:
                const[n] = None
                sig[n] = "constexpr"
            else:
                sig[n] = _sig_of(v)
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        out.append({"module": fn.__module__, "name": fn.__name__, "signature": sig,
                    "constexprs": const, "options": opts})
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield out
    finally:
        InterpretedFunction.run = orig


def dedupe(launches: list) -> list:
    seen, out = set(), []
    for ln in launches:
        key = json.dumps(ln, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(ln)
    return out


def compile_all(launches: list, archs=(80, 90)) -> list[str]:
    """Compile each launch for each arch; return one line per compile (raises on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    lines = []
    for ln in launches:
        mod = importlib.import_module(ln["module"])
        fn = getattr(mod, ln["name"])
        fn = getattr(fn, "fn", fn) if not isinstance(fn, triton.runtime.JITFunction) else fn
        base = dict(ln["constexprs"])
        if "UPCAST" in base:  # interpreter-only workaround (kernels.common.mma): off on a GPU
            base["UPCAST"] = False
        variants = [base]
        # autotuned kernels: also compile the GPU tile configs they may pick
        # (bf16 launches only: the dtype of the performance targets; keeps CI time bounded)
        tuned = getattr(mod, "AOT_CONFIGS", {}).get(ln["name"], [])
        if "*bf16" not in ln["signature"].values():
            tuned = []
        for cfg in tuned:
            v = dict(base)
            v.update(cfg.kwargs)
            variants.append((v, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
        for var in variants:
            const, opts = (var, ln["options"]) if isinstance(var, dict) else var
            src = ASTSource(fn=fn, signature=ln["signature"], constexprs=const)
            # sm_90 for every launch; sm_80 for bf16 ones (the targets' dtype) to bound CI time
            for arch in archs if "*bf16" in ln["signature"].values() else archs[-1:]:
                k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                   options={"num_warps": 4, **opts})
                lines.append(f"{ln['name']} sm_{arch} {opts} shared={k.metadata.shared} "
                             f"cubin={len(k.asm['cubin'])}B")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "compile":
        sys.exit(__doc__)
    with open(sys.argv[2]) as f:
        launches = json.load(f)
    for line in compile_all(launches):
        print(line)
    print(f"AOT OK: {len(launches)} distinct launches")
