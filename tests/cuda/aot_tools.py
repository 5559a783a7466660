"""Ahead-of-time compilation of every Triton kernel for real GPU targets, with no GPU.

The interpreter checks what a kernel computes; it does not run Triton's GPU compiler, which
rejects things the interpreter accepts (dtype mismatches in tl.dot, shared-memory overflow,
unsupported ops). This module records every kernel launch made under TRITON_INTERPRET=1
(kernel, every argument's dtype / alignment / value, constexprs) and, in a fresh process without
the interpreter, compiles each distinct launch to a cubin for sm_80 and sm_90 with Triton's own
compiler, specialised as the JIT would specialise that launch (``tt.divisibility`` on 16-aligned
pointers and multiple-of-16 integers, integers equal to 1 as constexprs; see
``lora_kernels.bench.static.jit_specialization``). Compiled is not verified: nothing here runs.

Usage (CLI, used by tests/cuda/test_triton_aot.py and tests/cuda/test_triton36.py):
    python tests/cuda/aot_tools.py compile launches.json [--archs 90,80] [--no-tuned]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json


@contextlib.contextmanager
def record_launches(out: list):
    """Record each interpreted launch: module, name, constexprs, options, and every argument
    encoded by ``lora_kernels.bench.static.encode`` (dtype and 16-byte alignment of tensors,
    values of scalars: what the JIT's specialisation reads)."""
    from triton.runtime.interpreter import InterpretedFunction

    from lora_kernels.bench.static import encode

    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        ann = getattr(fn, "__annotations__", {})
        const = {n: bound.get(n) for n in names if "constexpr" in str(ann.get(n, ""))}
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        out.append({"module": fn.__module__, "name": fn.__name__, "label": "interpreter call",
                    "args": {n: encode(bound.get(n)) for n in names}, "constexprs": const,
                    "options": opts, "configs": None})
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield out
    finally:
        InterpretedFunction.run = orig


def dedupe(launches: list) -> list:
    """One launch per kernel, constexprs, options and argument dtypes (the first recorded, which
    is compiled with its own JIT specialisation). Launches differing only in alignment or
    divisibility of their values compile to variants of the same code; one is kept to bound CI
    time (the headline shapes' exact specialisations are the static profile's job)."""
    seen, out = set(), []
    for ln in launches:
        kinds = {n: (v.get("tensor") or v.get("tdesc") or "fp32") if isinstance(v, dict)
                 else type(v).__name__ for n, v in ln["args"].items()}
        key = json.dumps([ln["module"], ln["name"], ln["constexprs"], ln["options"], kinds],
                         sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(ln)
    return out


def compile_all(launches: list, archs=(80, 90), tuned: bool = True) -> list[str]:
    """Compile each launch for each arch, JIT-specialised; one line per compile (raises on
    failure). bf16 launches (the performance targets' dtype) compile for every arch and also
    with the GPU tile configs of the module's ``AOT_CONFIGS`` (``tuned``, last arch); other
    dtypes for the last arch only (bounds CI time; the headline shapes' every autotune candidate
    on sm_90 and sm_80 is the static profile's job, bench/results/static-sm*.json)."""
    from lora_kernels.bench.static import compile_launch

    lines = []
    for ln in launches:
        mod = importlib.import_module(ln["module"])
        base = dict(ln["constexprs"])
        if "UPCAST" in base:  # interpreter-only workaround (kernels.common.mma): off on a GPU
            base["UPCAST"] = False
        bf16 = any(isinstance(v, dict) and v.get("tensor") == "bf16" for v in ln["args"].values())
        variants = [(base, ln["options"])]
        for cfg in getattr(mod, "AOT_CONFIGS", {}).get(ln["name"], []) if bf16 and tuned else []:
            variants.append(({**base, **cfg.kwargs},
                             {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
        for i, (const, opts) in enumerate(variants):
            # the launch itself: every arch for bf16; tuned tiles: the last arch (sm_90) only
            for arch in archs if bf16 and i == 0 else archs[-1:]:
                k = compile_launch(ln, const, opts, arch)
                lines.append(f"{ln['name']} sm_{arch} {opts} shared={k.metadata.shared} "
                             f"cubin={len(k.asm['cubin'])}B")
    return lines


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("cmd", choices=["compile"])
    ap.add_argument("launches")
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--no-tuned", action="store_true")
    a = ap.parse_args()
    with open(a.launches) as f:
        launches = json.load(f)
    import triton

    archs = tuple(int(x) for x in a.archs.split(","))
    for line in compile_all(launches, archs, tuned=not a.no_tuned):
        print(line)
    print(f"AOT OK: {len(launches)} distinct launches, triton {triton.__version__}")
