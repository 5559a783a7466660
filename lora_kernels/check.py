"""``python -m lora_kernels.check --gpu``: the whole test suite on the GPU, for every backend.

Runs ``pytest tests`` with ``LORA_KERNELS_TEST_DEVICE=cuda`` and ``TRITON_INTERPRET=0`` (the suite
parametrises over every backend runnable on the device: torch, triton, and cuda when the compiled
module is present), reads pytest's junit XML, and writes
``bench/results/check-<device-slug>.json`` (device name, versions, counts, every test's outcome,
duration and failure message) and prints a summary. Optional extra passes re-run the suite with
``LORA_KERNELS_BACKEND`` set (``--env-backends triton,cuda``), so that code paths taking the default
backend run on those kernels too.

Without a usable CUDA device it exits with status 2 and says so; it never falls back to CPU.

``python -m lora_kernels.check --apply RESULTS_DIR`` (no GPU needed; after a GPU run's results are
committed): rewrites the measured block of ``lora_kernels/_backend.py`` with exactly the
(backend, op) pairs whose tests all passed in ``RESULTS_DIR/check-*.json`` (:func:`verified_pairs`)
and the defaults ``RESULTS_DIR/decisions.json`` chose (:func:`measured_defaults`).
``--summary RESULTS_DIR`` prints both without writing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch


def parse_junit(path: Path) -> list[dict]:
    """Per-test results from a pytest junit XML file."""
    root = ET.parse(path).getroot()
    out = []
    for tc in root.iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or el.text or "")[:500]
                break
        out.append({"test": f"{tc.get('classname', '')}::{tc.get('name', '')}",
                    "outcome": outcome, "time_s": float(tc.get("time") or 0.0),
                    "message": message})
    return out


def run_pass(label: str, extra_env: dict, args, repo: Path) -> dict:
    env = dict(os.environ)
    env.update(LORA_KERNELS_TEST_DEVICE="cuda", TRITON_INTERPRET="0", **extra_env)
    with tempfile.TemporaryDirectory() as td:
        xml = Path(td) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", str(repo / "tests"), "-q", "-p", "no:cacheprovider",
               f"--junitxml={xml}", "-o", "junit_family=xunit2", *args.pytest_args]
        if args.workers > 1:
            cmd += ["-n", str(args.workers)]
        print(f"\n== pass {label}: {' '.join(cmd)}\n   env: LORA_KERNELS_TEST_DEVICE=cuda "
              f"TRITON_INTERPRET=0 {' '.join(f'{k}={v}' for k, v in extra_env.items())}",
              flush=True)
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=repo, env=env)
        interrupted = False
        try:
            proc.wait(timeout=args.deadline or None)
        except subprocess.TimeoutExpired:
            # SIGINT: pytest stops, reports what ran and still writes its junit XML
            interrupted = True
            print(f"\n== deadline {args.deadline} s reached: interrupting pytest", flush=True)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        tests = parse_junit(xml) if xml.exists() else []
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"label": label, "env": extra_env, "returncode": proc.returncode,
            "interrupted": interrupted,
            "wall_s": round(time.time() - t0, 1), "counts": counts, "tests": tests}


# test file -> op its backend-parametrised tests cover (tests/cuda/test_cuda_build.py's [cuda]
# kernel tests: by test name, below)
TEST_FILE_OPS = {"test_lora.py": "lora_linear", "test_glora.py": "glora_linear",
                 "test_quant.py": "lora_linear", "test_dora.py": "dora_linear",
                 "test_multi_lora.py": "multi_lora_linear",
                 "test_serving_model.py": "multi_lora_linear",
                 "test_serving_plan.py": "multi_lora_linear", "test_store.py": "multi_lora_linear",
                 "test_fused_proj.py": "multi_lora_linear", "test_lora_tma.py": None}
VARIANT_OPS = {"nora": "nora_linear", "cur": "cur_linear", "deep": "deep_lora_linear"}


def _test_pair(test_id: str) -> tuple[str | None, str | None]:
    """(backend | None, op | None) a test id belongs to, e.g.
    'tests.test_lora::test_fwd[triton-bf16]' -> ('triton', 'lora_linear')."""
    path, _, name = test_id.partition("::")
    fname = path.replace(".", "/").split("/")[-1] + ".py" if not path.endswith(".py") \
        else path.split("/")[-1]
    params = name[name.find("[") + 1:-1].replace("[", "-").split("-") if "[" in name else []
    backend = next((b for b in ("triton", "cuda") if b in params), None)
    op = TEST_FILE_OPS.get(fname)
    if fname == "test_variants.py":
        op = next((o for k, o in VARIANT_OPS.items() if k in name.lower()), None)
    if fname == "test_cuda_build.py":  # [cuda] kernel tests ([emu] ones run on CPU only)
        gpu = "cuda" in params or "cuda_backend" in name or "cuda_graph" in name
        backend = "cuda" if gpu else None
        op = None if not gpu else "multi_lora_linear" if "multi_lora" in name else \
            "lora_linear" if ("lora" in name or "dropout" in name) else None
    return backend, op


def verified_pairs(check_docs: list[dict]) -> frozenset[tuple[str, str]]:
    """(backend, op) pairs with at least one passed test and no failed / errored test, over
    every pass of every check file; a failure with no backend in its id blocks its op for every
    backend; a pass interrupted at its deadline verifies nothing."""
    passed, blocked = set(), set()
    for doc in check_docs:
        for p in doc.get("passes", []):
            if p.get("interrupted"):
                continue
            for t in p.get("tests", []):
                be, op = _test_pair(t["test"])
                if op is None:
                    continue
                if t["outcome"] in ("failed", "error"):
                    blocked |= {(b, op) for b in ("triton", "cuda")} if be is None else {(be, op)}
                elif t["outcome"] == "passed" and be is not None:
                    passed.add((be, op))
    return frozenset(passed - blocked)


def measured_defaults(decisions: dict, verified: frozenset) -> dict[str, str]:
    """op -> preferred backend (and ``multi_lora_prefill_path``) from a decisions document, for
    verified pairs only."""
    out: dict[str, str] = {}
    for name, p in decisions.get("points", {}).items():
        choice = p.get("choice") or {}
        be = choice.get("backend")
        if name == "train" and be and ("tma" not in choice.values()):
            if (be, "lora_linear") in verified:
                out["lora_linear"] = be
        if name == "decode" and be and (be, "multi_lora_linear") in verified:
            out["multi_lora_linear"] = be
        if name == "prefill" and ("triton", "multi_lora_linear") in verified:
            out["multi_lora_prefill_path"] = choice.get("path", "prefill") if be else "prefill"
    return out


def _read_results(folder: Path) -> tuple[list[dict], dict]:
    checks = [json.loads(f.read_text()) for f in sorted(folder.glob("check-*.json"))]
    if not checks:
        raise FileNotFoundError(f"no check-*.json in {folder}")
    dec = folder / "decisions.json"
    return checks, (json.loads(dec.read_text()) if dec.exists() else {})


def apply_results(folder: Path, backend_py: Path | None = None) -> tuple[frozenset, dict]:
    """Rewrite the ``# BEGIN measured`` block of ``_backend.py`` from a results folder."""
    checks, dec = _read_results(Path(folder))
    pairs = verified_pairs(checks)
    defaults = measured_defaults(dec, pairs)
    path = Path(backend_py) if backend_py else Path(__file__).with_name("_backend.py")
    src = path.read_text()
    a, b = src.index("# BEGIN measured\n"), src.index("# END measured")
    body = ("# BEGIN measured\n"
            f"VERIFIED_ON_GPU: frozenset[tuple[str, str]] = frozenset({sorted(pairs)!r})\n"
            f"MEASURED_DEFAULTS: dict[str, str] = {dict(sorted(defaults.items()))!r}\n")
    path.write_text(src[:a] + body + src[b:])
    return pairs, defaults


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_kernels.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="run the suite on the CUDA device")
    ap.add_argument("--out", default="bench/results", help="results folder")
    ap.add_argument("--env-backends", default="",
                    help="extra passes with LORA_KERNELS_BACKEND set, e.g. triton,cuda")
    ap.add_argument("--workers", type=int, default=1, help="pytest-xdist workers (default 1)")
    ap.add_argument("--deadline", type=float, default=0,
                    help="seconds per pass; then pytest is interrupted (SIGINT) and what ran is "
                         "recorded; an interrupted pass verifies nothing (default: none)")
    ap.add_argument("--apply", metavar="RESULTS_DIR",
                    help="write VERIFIED_ON_GPU / MEASURED_DEFAULTS from a GPU run's results")
    ap.add_argument("--summary", metavar="RESULTS_DIR",
                    help="print what --apply would write")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    if args.apply or args.summary:
        folder = Path(args.apply or args.summary)
        if args.apply:
            pairs, defaults = apply_results(folder)
        else:
            checks, dec = _read_results(folder)
            pairs = verified_pairs(checks)
            defaults = measured_defaults(dec, pairs)
        print(f"verified on GPU: {sorted(pairs)}\nmeasured defaults: {defaults}"
              + ("\nwritten to lora_kernels/_backend.py" if args.apply else ""))
        return 0
    if not args.gpu:
        ap.error("nothing to do: pass --gpu (the CPU suite is `make test`)")
    if not torch.cuda.is_available():
        print("lora_kernels.check --gpu: no CUDA device is usable here "
              f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); nothing was run. "
              "Run it on a machine with an NVIDIA GPU; on CPU use `make test`.", file=sys.stderr)
        return 2

    import lora_kernels
    from lora_kernels.bench.harness import device_info

    repo = Path(__file__).resolve().parents[1]
    info = device_info(torch.device("cuda"))
    info["cuda_module"] = {"available": lora_kernels.cuda_available()}
    passes = [run_pass("default", {}, args, repo)]
    for be in [b.strip() for b in args.env_backends.split(",") if b.strip()]:
        if be == "cuda" and not lora_kernels.cuda_available():
            passes.append({"label": "LORA_KERNELS_BACKEND=cuda", "skipped":
                           "lora_kernels._C not built/usable", "counts": {}, "tests": []})
            continue
        passes.append(run_pass(f"LORA_KERNELS_BACKEND={be}", {"LORA_KERNELS_BACKEND": be},
                               args, repo))
    ok = all(p.get("skipped") or (p["returncode"] == 0 and p["counts"].get("passed")
                                  and not p.get("interrupted")) for p in passes)
    doc = {"device": info["name"], "device_info": info, "versions": info["versions"],
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "ok": bool(ok), "passes": passes}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"check-{info['slug']}.json"
    path.write_text(json.dumps(doc, indent=1))

    print(f"\n== lora_kernels.check on {info['name']} (torch {info['versions']['torch']}, "
          f"triton {info['versions']['triton']}, CUDA {info['versions']['cuda']}, "
          f"_C {'yes' if lora_kernels.cuda_available() else 'no'})")
    for p in passes:
        if p.get("skipped"):
            print(f"  {p['label']:<30} skipped: {p['skipped']}")
            continue
        c = p["counts"]
        print(f"  {p['label']:<30} passed {c.get('passed', 0)}, failed {c.get('failed', 0)}, "
              f"errors {c.get('error', 0)}, skipped {c.get('skipped', 0)}  ({p['wall_s']} s, "
              f"pytest rc {p['returncode']})")
        for t in p["tests"]:
            if t["outcome"] in ("failed", "error"):
                print(f"    {t['outcome'].upper()}: {t['test']}: {(t['message'] or '')[:160]}")
    print(f"results: {path}\n{'ALL PASSED' if ok else 'FAILURES'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
