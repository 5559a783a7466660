"""Static profile of every Triton kernel as the JIT compiles it at the headline shapes (no GPU).

``python -m lora_kernels.bench.static [--archs 90,80] [--out bench/results]`` writes
``static-sm90.json`` (and ``static-sm80.json``): one row per (launch, autotune candidate) with the
registers, stack / local bytes, spill stores / loads (``STL`` / ``LDL`` in SASS), shared memory,
the matrix instructions (HGMMA = wgmma, HMMA = mma.sync, FFMA = no tensor core), the widest global
load (``LDG.E.128`` / ``LDGSTS...128`` = cp.async 16 B / ``UTMALDG`` = TMA) and cp.async / TMA use.

How (what makes it the code that runs):

1. **Launches.** The real launchers (the engine's ``ops.lowrank.triton_fwd`` / ``triton_bwd``,
   ``ops.glora.BACKENDS["triton"]``, ``ops.multi_lora`` decode / prefill / fused prefill /
   backward) run
   on CPU tensors of the headline shapes with ``TRITON_INTERPRET=0`` while
   ``JITFunction.run`` / ``Autotuner.run`` are replaced by recorders (:func:`dry_run_launches`):
   nothing executes, every argument, tile choice and autotune candidate (after the autotuner's
   own ``early_config_prune``) is captured exactly as the GPU path would pass it.
2. **Specialisation.** Each argument goes through Triton's own ``native_specialize_impl`` with the
   NVIDIA backend (:func:`jit_specialization`), as ``JITFunction`` does at a launch: integers
   equal to 1 become constexprs, integers and pointers divisible by 16 get
   ``tt.divisibility=16`` (pointers are 16-byte aligned when the recorded tensor was: torch's
   allocations are), then ``ASTSource(fn, signature, constexprs, attrs)`` and ``triton.compile``
   for ``GPUTarget("cuda", arch, 32)``.
3. **Machine code.** ``cuobjdump -sass`` / ``--dump-resource-usage`` (shipped in Triton's
   package, ``triton/backends/nvidia/bin``) on the cubin (:func:`sass_profile`).

Compiled is not run: these numbers say what the compiler emitted, not how fast it is.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# headline points (DESIGN.md "Performance targets")
TRAIN = dict(T=8192, K=4096, N=4096, r=16)
DECODE = dict(T=64, K=4096, N=4096, r=16, adapters=64)
PREFILL = dict(segments=4, seg_len=1024, K=4096, N=4096, r=16)

_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
       torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.int16: "i16",
       torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_DT[torch.float8_e4m3fn] = "fp8e4nv"  # FP8 weights (kernels.quant)
_TD = {v: k for k, v in _DT.items()}


# ----------------------------------------------------------------------------- argument records
def encode(v):
    """A launch argument as JSON: tensors by dtype and 16-byte alignment, scalars as they are."""
    if isinstance(v, torch.Tensor):
        return {"tensor": _DT[v.dtype], "align16": v.data_ptr() % 16 == 0}
    if type(v).__name__ == "TensorDescriptor":  # triton.tools.tensor_descriptor (host TMA)
        return {"tdesc": _DT[v.base.dtype], "shape": list(v.shape), "strides": list(v.strides),
                "block": list(v.block_shape)}
    if isinstance(v, float):
        return {"float": v}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return {"repr": repr(v)}


def decode(v):
    """The inverse of :func:`encode` for the specialiser: a tiny CPU tensor with the recorded
    dtype and alignment (its address is all the specialiser reads), or the scalar."""
    if isinstance(v, dict) and "tensor" in v:
        t = torch.empty(64, dtype=_TD[v["tensor"]])
        return t if v["align16"] else t[1:]
    if isinstance(v, dict) and "float" in v:
        return v["float"]
    if isinstance(v, dict) and "tdesc" in v:
        from triton.tools.tensor_descriptor import TensorDescriptor

        return TensorDescriptor(torch.empty(64, dtype=_TD[v["tdesc"]]), v["shape"], v["strides"],
                                v["block"])
    return v


def _constexpr_names(fn) -> set[str]:
    return {p.name for p in fn.params if p.is_constexpr}


def record(fn, args, kwargs, options, configs=None, label=None) -> dict:
    """One launch: kernel ``fn`` (a JITFunction) with bound ``args`` / ``kwargs``."""
    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    return {"module": fn.fn.__module__, "name": fn.fn.__name__, "label": label,
            "args": {n: encode(bound.get(n)) for n in names},
            "constexprs": {n: bound.get(n) for n in names if n in _constexpr_names(fn)},
            "options": dict(options), "configs": configs}


@contextlib.contextmanager
def dry_run_launches(out: list, label: list):
    """Record every ``kernel[grid](...)`` (plain or autotuned) instead of running it.

    ``label[0]`` is stored with each launch (set it before each phase). Needs
    ``TRITON_INTERPRET=0`` (compiled kernels are ``JITFunction``s). For an autotuned kernel the
    candidate configs are those its ``early_config_prune`` keeps at the recorded arguments."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    jit_run, tune_run = JITFunction.run, Autotuner.run

    def run_jit(self, *args, grid, warmup, **kwargs):
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        out.append(record(self, args, kwargs, opts, label=label[0]))

    def run_tuned(self, *args, **kwargs):
        nargs = dict(zip(self.arg_names, args))
        configs = self.configs
        if self.early_config_prune:
            configs = self.early_config_prune(configs, nargs, **kwargs)
        cfgs = [{"kwargs": dict(c.kwargs), "num_warps": c.num_warps, "num_stages": c.num_stages}
                for c in configs]
        kw = {k: v for k, v in kwargs.items() if k != "grid"}
        out.append(record(self.fn, args, kw, {}, configs=cfgs, label=label[0]))

    JITFunction.run, Autotuner.run = run_jit, run_tuned
    try:
        yield out
    finally:
        JITFunction.run, Autotuner.run = jit_run, tune_run


def headline_launches(dtype=torch.bfloat16) -> list[dict]:
    """Every Triton launch of the headline workloads, recorded (nothing runs). TRITON_INTERPRET
    must be 0 in this process (the launchers then take their GPU branches)."""
    from ..ops import _triton as TR
    from ..ops import glora as G
    from ..ops import lowrank as L

    if TR.triton_interpret():
        raise RuntimeError("headline_launches needs TRITON_INTERPRET=0 (GPU launch paths)")
    out, label = [], [None]

    def e(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    with dry_run_launches(out, label), torch.no_grad():
        T, K, N, r = TRAIN["T"], TRAIN["K"], TRAIN["N"], TRAIN["r"]
        x, w, A, B, dy = e(T, K), e(N, K), e(r, K), e(N, r), e(T, N)
        for p in (0.0, 0.1):
            seed = torch.zeros(1, dtype=torch.int64) if p else None
            label[0] = f"train{'-dropout' if p else ''} fwd T{T} {K}x{N} r{r}"
            _, s = L.triton_fwd(x, w, None, A, B, 2.0, p, seed)
            label[0] = f"train{'-dropout' if p else ''} bwd T{T} {K}x{N} r{r}"
            L.triton_bwd(dy, L.Saved(x, w, A, B, e(T, r, dt=torch.float32), 2.0, p, seed),
                         L.Needs(True, True, True))
        from ..kernels.lora_tma import TMA_CONFIGS
        from ..ops import lora_tma as LT

        s = e(T, r, dt=torch.float32)
        for c in TMA_CONFIGS:  # the candidate's base GEMMs (its shrink / tn are the rows above)
            label[0] = f"train-tma fwd T{T} {K}x{N} r{r}"
            LT.gemm_lowrank_tma(x, w, w_kmajor=True, out_dtype=dtype, s=s, bm=B, scale=2.0,
                                config=c)
            label[0] = f"train-tma bwd T{T} {K}x{N} r{r}"
            LT.gemm_lowrank_tma(dy, w, w_kmajor=False, out_dtype=dtype, s=s, bm=A.t(),
                                scale=2.0, config=c)
        from ..ops import dora as D
        from ..ops import weights as Q
        from ..quant import quantize

        g = torch.ones(N)
        label[0] = f"dora fwd T{T} {K}x{N} r{r}"
        _, s, _ = D.BACKENDS["triton"][0](x, w, None, A, B, 2.0, 0.0, None, g=g)
        label[0] = f"dora bwd T{T} {K}x{N} r{r}"
        D.BACKENDS["triton"][1](dy, L.Saved(x, w, A, B, s, 2.0, 0.0, None),
                                L.Needs(True, True, True), g=g)
        qw = quantize(torch.randn(N, K).to(dtype), "nf4")
        label[0] = f"qlora-nf4 fwd T{T} {K}x{N} r{r}"
        _, s = L.triton_fwd(x, qw, None, A, B, 2.0, 0.0, None)
        label[0] = f"qlora-nf4 bwd T{T} {K}x{N} r{r}"
        L.triton_bwd(dy, L.Saved(x, qw, A, B, s, 2.0, 0.0, None), L.Needs(True, True, True))
        label[0] = f"qlora-nf4 decode T16 {K}x{N} r{r}"
        real_splits = Q.decode_splits

        def h200_splits(M, N, K, device, tile):  # the GPU's split-K choice, with 132 SMs
            if M > 16:
                return 1
            return max(1, min(-(-4 * 132 // -(-N // tile["BLOCK_N"])), K // (2 * tile["BLOCK_K"])))

        Q.decode_splits = h200_splits
        try:
            L.triton_fwd(e(16, K), qw, None, A, B, 2.0, 0.0, None)
        finally:
            Q.decode_splits = real_splits
        label[0] = f"glora fwd T{T} {K}x{N} r{r} (A, B low-rank)"
        a1, a2 = G.parse_support("A", (e(N, r), e(r, K)), x, K, N)
        b1, b2 = G.parse_support("B", (e(N, r), e(r, K)), x, K, N)
        G.BACKENDS["triton"](x, w, None, G.Supports(a1, a2, b1, b2, None, None, None, None))

        from ..ops.multi_lora import plan as MP
        from ..ops.multi_lora import triton_backend as MT
        from ..pool import PoolView

        T, na = DECODE["T"], DECODE["adapters"]
        view = PoolView(e(na, r, K), e(na, r, N), torch.full((na,), r, dtype=torch.int32),
                        torch.ones(na), r)
        label[0] = f"decode T{T} {na} adapters {K}x{N} r{r}"
        ids = torch.arange(T)
        MT.add_(e(T, N), e(T, K), view, MP.build(ids, na, na, backend="triton", path="decode"))

        ns, sl = PREFILL["segments"], PREFILL["seg_len"]
        T = ns * sl
        ids = torch.arange(ns).repeat_interleave(sl)
        view = PoolView(e(ns, r, K), e(ns, r, N), torch.full((ns,), r, dtype=torch.int32),
                        torch.ones(ns), r)
        xp = e(T, K)
        label[0] = f"prefill {ns}x{sl} {K}x{N} r{r}"
        MT.add_(e(T, N), xp, view, MP.build(ids, ns, ns, backend="triton", path="prefill"))
        label[0] = f"prefill_fused {ns}x{sl} {K}x{N} r{r}"
        MT.prefill_fused(xp, w, None, view,
                         MP.build(ids, ns, ns, backend="triton", path="prefill_fused"))
        label[0] = f"multi-lora bwd {ns}x{sl} {K}x{N} r{r}"
        MT.bwd(e(T, N), xp, None, view, MP.build(ids, ns, ns, backend="triton", path="prefill"),
               (True, True, True))
    return out


# ----------------------------------------------------------------------------- compile
def jit_specialization(fn, args: dict, constexprs: dict):
    """``(signature, constexprs, attrs)`` exactly as ``JITFunction`` derives them at a launch with
    these arguments (Triton's native specialiser, NVIDIA backend)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    const_names = _constexpr_names(fn)
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        n = p.name
        if n in const_names:
            sig[n], const[n] = "constexpr", constexprs[n]
            continue
        v = decode(args[n])
        ty, key = native_specialize_impl(CUDABackend, v, False, not p.do_not_specialize,
                                         not p.do_not_specialize_on_alignment)[:2]
        sig[n] = ty
        if ty == "constexpr":
            const[n] = v
        elif isinstance(key, str):
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return sig, const, attrs


def _tiles_label(kw: dict) -> str:
    """'M128 N128 K64' style label of a launch's BLOCK_* constexprs (RB / BLOCK_R left out)."""
    order = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T")
    return " ".join(f"{k.removeprefix('BLOCK_')}{kw[k]}" for k in order if kw.get(k) is not None)


def variants(ln: dict) -> list[tuple[dict, dict, str]]:
    """``(constexprs, options, config label)`` to compile for one launch: the launch itself, or
    each autotune candidate. ``UPCAST`` (an interpreter-only workaround) is off on a GPU."""
    base = dict(ln["constexprs"])
    if "UPCAST" in base:
        base["UPCAST"] = False
    if not ln.get("configs"):
        o = ln["options"]
        return [(base, o, f"{_tiles_label(base)} w{o.get('num_warps', 4)} "
                          f"s{o.get('num_stages', 3)}")]
    out = []
    for c in ln["configs"]:
        out.append(({**base, **c["kwargs"]},
                    {"num_warps": c["num_warps"], "num_stages": c["num_stages"]},
                    f"{_tiles_label(c['kwargs'])} w{c['num_warps']} s{c['num_stages']}"))
    return out


def compile_launch(ln: dict, const: dict, opts: dict, arch: int, *, specialize: bool = True):
    """``triton.compile`` one launch variant for sm_<arch> (returns the CompiledKernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(ln["module"]), ln["name"])
    fn = fn.fn if not isinstance(fn, triton.runtime.JITFunction) else fn
    if specialize:
        sig, c, attrs = jit_specialization(fn, ln["args"], const)
    else:  # the old unspecialised compile (kept for comparison)
        sig = {n: ("constexpr" if n in const else _plain_sig(ln["args"][n])) for n in fn.arg_names}
        c, attrs = dict(const), {}
        c.update({n: None for n in fn.arg_names if ln["args"][n] is None})
        sig.update({n: "constexpr" for n in fn.arg_names if ln["args"][n] is None})
    src = ASTSource(fn=fn, signature=sig, constexprs=c, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": 4, "num_stages": 3, **opts})


def _plain_sig(v) -> str:
    if isinstance(v, dict) and "tensor" in v:
        return "*" + v["tensor"]
    if isinstance(v, dict) and "float" in v:
        return "fp32"
    if isinstance(v, dict) and "tdesc" in v:
        return ["tdesc", v["tdesc"], v["block"]]
    if isinstance(v, bool):
        return "i1"
    return "i32" if -(2**31) <= v < 2**31 else "i64"


# ----------------------------------------------------------------------------- machine code
def cuobjdump() -> str:
    """cuobjdump from Triton's package (``triton/backends/nvidia/bin``), else from PATH."""
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if p.exists():
        return str(p)
    found = shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump: not in triton/backends/nvidia/bin nor on PATH")
    return found


_LOAD = re.compile(r"\b(LDG|LDGSTS|UTMALDG|UBLKCP|LDS|LDSM)(\.[A-Z0-9_.]+)?")
_WIDTH = re.compile(r"\.(128|64|32|U16|S16|U8|S8)\b")
_BYTES = {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def sass_profile(cubin: bytes) -> dict:
    """Counts read off the SASS and resource usage of one cubin."""
    tool = cuobjdump()
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True,
                             text=True, check=True).stdout
    return parse_sass(sass, res)


def parse_sass(sass: str, res: str) -> dict:
    """:func:`sass_profile` on the text of ``cuobjdump -sass`` and ``--dump-resource-usage``."""
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)",
                                           sass)]

    def count(prefix):
        return sum(1 for o in ops if o == prefix or o.startswith(prefix + "."))

    glob: dict[int, int] = {}
    for o in ops:
        head = o.split(".")[0]
        if head == "LDG" or head == "LDGSTS":
            w = _WIDTH.search(o)
            b = _BYTES[w.group(1)] if w else 4   # no width suffix: 32-bit
            glob[b] = glob.get(b, 0) + 1
    tma = count("UTMALDG") + count("UBLKCP")
    widest = "UTMALDG (TMA)" if count("UTMALDG") else None
    if widest is None and glob:
        wb = max(glob)
        kind = "LDGSTS" if any(o.startswith("LDGSTS") and (_WIDTH.search(o) and
                                                          _BYTES[_WIDTH.search(o).group(1)] == wb)
                               for o in ops) else "LDG"
        widest = f"{kind} {wb} B"
    return {
        "regs": usage.get("reg"), "stack_bytes": usage.get("stack"),
        "local_bytes": usage.get("local"), "shared_static": usage.get("shared"),
        "spill_stores": count("STL"), "spill_loads": count("LDL"),
        "hgmma": count("HGMMA"), "hmma": count("HMMA"), "ffma": count("FFMA"),
        "global_loads_by_bytes": {str(k): v for k, v in sorted(glob.items())},
        "widest_global_load": widest,
        "global_load_bytes_max": 16 if count("UTMALDG") else (max(glob) if glob else 0),
        "cp_async": count("LDGSTS") > 0, "tma": tma > 0,
        "instructions": len(ops),
    }


def matrix_instruction(row: dict) -> str:
    return "HGMMA" if row["hgmma"] else "HMMA" if row["hmma"] else "FFMA" if row["ffma"] else "-"


def profile(launches: list[dict], archs=(90,), *, log=None) -> dict[int, list[dict]]:
    """Compile every launch variant for each arch and profile its SASS; identical compiles
    (same kernel, specialisation and options) are done once."""
    rows: dict[int, list[dict]] = {a: [] for a in archs}
    cache: dict[str, dict] = {}
    for ln in launches:
        for const, opts, cfg in variants(ln):
            for arch in archs:
                key = json.dumps([ln["module"], ln["name"], ln["args"], const, opts, arch],
                                 sort_keys=True, default=str)
                if key not in cache:
                    t0 = time.time()
                    k = compile_launch(ln, const, opts, arch)
                    prof = sass_profile(k.asm["cubin"])
                    prof["shared"] = k.metadata.shared
                    prof["compile_s"] = round(time.time() - t0, 2)
                    cache[key] = prof
                    if log:
                        log(f"sm_{arch} {ln['name']:<20} {cfg:<18} {ln['label']}: "
                            f"regs {prof['regs']} spills {prof['spill_stores']}/"
                            f"{prof['spill_loads']} {matrix_instruction(prof)} "
                            f"{prof['widest_global_load']} ({prof['compile_s']} s)")
                rows[arch].append({"kernel": ln["name"], "launch": ln["label"], "config": cfg,
                                   "arch": f"sm_{arch}", "MNK": _mnk(ln), **cache[key]})
    return rows


def _mnk(ln: dict) -> list:
    """[M, N, K] of a GEMM launch (None where the kernel has no such argument)."""
    return [ln["args"].get(k) if isinstance(ln["args"].get(k), int) else None for k in "MNK"]


def headline_gemm(row: dict) -> bool:
    """A base GEMM of the headline points: a GEMM kernel whose N and K are >= 1024 (the
    4096-wide weight operand in its main loop), not a rank-r shrink (N = r)."""
    _, n, k = row.get("MNK") or [None] * 3
    return row["kernel"] in ("gemm_lowrank_kernel", "glora_gemm_kernel", "sgmv_gemm_kernel",
                             "gemm_lowrank_tma_kernel", "qgemm_lowrank_kernel") \
        and (n or 0) >= 1024 and (k or 0) >= 1024


def check_rows(rows: list[dict]) -> list[str]:
    """Problems in sm_90 profile rows (empty list: none). Every headline base GEMM
    (:func:`headline_gemm`) must use a tensor-core instruction (HGMMA or HMMA), load its operands
    16 bytes wide (LDG.E.128 / LDGSTS.128 / TMA) and not spill; no GEMM kernel row may spill."""
    bad = []
    for r in rows:
        name = f"{r['arch']} {r['kernel']} [{r['config']}] ({r['launch']})"
        if "gemm" in r["kernel"] and (r["spill_stores"] or r["spill_loads"]):
            bad.append(f"{name}: spills ({r['spill_stores']} STL / {r['spill_loads']} LDL)")
        if r["arch"] == "sm_90" and headline_gemm(r):
            if not (r["hgmma"] or r["hmma"]):
                bad.append(f"{name}: no tensor-core instruction (HGMMA/HMMA)")
            if r["global_load_bytes_max"] < 16:
                bad.append(f"{name}: widest global load {r['global_load_bytes_max']} B < 16 B")
    return bad


def row_keys(launches: list[dict]) -> list[list[str]]:
    """(kernel, launch, config) of every row :func:`profile` writes for these launches."""
    return [[ln["name"], ln["label"], cfg] for ln in launches for _, _, cfg in variants(ln)]


def summary_table(rows: list[dict]) -> str:
    """Markdown table, one line per (kernel, launch, config)."""
    head = ("| kernel | launch | config | regs | spills st/ld | smem KiB | MMA | widest load |"
            " cp.async | TMA |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['launch']} | {r['config']} | {r['regs']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['shared'] / 1024:.0f} | "
                     f"{matrix_instruction(r)} | {r['widest_global_load']} | "
                     f"{'yes' if r['cp_async'] else 'no'} | {'yes' if r['tma'] else 'no'} |")
    return "\n".join(lines)


def check_file(path: Path, launches: list[dict], spot: int) -> int:
    """``--check``: 0 when the committed profile is current and passes :func:`check_rows`."""
    import triton

    doc = json.loads(path.read_text())
    problems = []
    if doc["triton"] != triton.__version__:
        problems.append(f"{path} was made with triton {doc['triton']}, this is "
                        f"{triton.__version__}")
    arch = int(doc["arch"].removeprefix("sm_"))
    have = [[r["kernel"], r["launch"], r["config"]] for r in doc["rows"]]
    want = row_keys(launches)
    if have != want:
        missing = [k for k in want if k not in have]
        extra = [k for k in have if k not in want]
        problems.append(f"{path} is stale (regenerate: python -m lora_kernels.bench.static): "
                        f"missing rows {missing[:4]}, extra rows {extra[:4]}")
    else:
        heads = [i for i, r in enumerate(doc["rows"]) if headline_gemm(r)]
        by_key = {json.dumps(k): ln for ln in launches for k in row_keys([ln])}
        for i in heads[:: max(1, len(heads) // max(1, spot))][:spot]:
            r = doc["rows"][i]
            ln = by_key[json.dumps(have[i])]
            const, opts = next((c, o) for c, o, cfg in variants(ln) if cfg == r["config"])
            prof = sass_profile(compile_launch(ln, const, opts, arch).asm["cubin"])
            for f in ("regs", "spill_stores", "spill_loads", "hgmma", "hmma",
                      "global_load_bytes_max"):
                if prof[f] != r[f]:
                    problems.append(f"{path} row {have[i]}: {f} is {prof[f]} now, "
                                    f"{r[f]} in the file (regenerate it)")
            print(f"recompiled {have[i]}: regs {prof['regs']}, {matrix_instruction(prof)}")
    problems += check_rows(doc["rows"])
    for p in problems:
        print("PROBLEM:", p)
    print(f"checked {path}: {len(doc['rows'])} rows, {len(problems)} problems")
    return 1 if problems else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_kernels.bench.static", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="90,80")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--launches", help="write the recorded launches here (JSON) too")
    ap.add_argument("--check", metavar="JSON",
                    help="instead of writing: check that this committed profile matches the "
                         "current launches and configs, recompile SPOT of its headline GEMM rows "
                         "and compare, and apply check_rows")
    ap.add_argument("--spot", type=int, default=2)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0 (the GPU launch paths are recorded)")
    import triton

    launches = headline_launches()
    if args.check:
        return check_file(Path(args.check), launches, args.spot)
    if args.launches:
        Path(args.launches).write_text(json.dumps(launches, indent=1, default=str))
    archs = tuple(int(a) for a in args.archs.split(","))
    rows = profile(launches, archs, log=lambda s: print(s, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for arch, rs in rows.items():
        doc = {"what": "static profile: Triton kernels compiled as the JIT specialises them at the "
                       "headline shapes; SASS read with cuobjdump; nothing was run",
               "triton": triton.__version__, "torch": torch.__version__, "arch": f"sm_{arch}",
               "headline": {"train": TRAIN, "decode": DECODE, "prefill": PREFILL},
               "rows": rs}
        (out / f"static-sm{arch}.json").write_text(json.dumps(doc, indent=1))
        print(summary_table([r for r in rs if r["arch"] == f"sm_{arch}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
