"""``python -m lora_kernels.check``: run the suite on the GPU, and read a GPU session's results.

``--gpu``: runs ``pytest tests`` with ``LORA_KERNELS_TEST_DEVICE=cuda`` and ``TRITON_INTERPRET=0``
(the suite parametrises over every backend runnable on the device: torch, triton, and cuda when
the compiled module is present), each result appended to ``<out>/tests.jsonl`` as it finishes
(``lora_kernels.bench.pytest_plugin``), then writes ``<out>/check-<device-slug>.json`` (device,
versions, counts) and prints a summary. Optional extra passes re-run the suite with
``LORA_KERNELS_BACKEND`` set (``--env-backends triton,cuda``). Without a usable CUDA device it
exits with status 2 and says so; it never falls back to CPU.

``--summary RESULTS_DIR`` (no GPU needed): what a session (``bench/gpu_session.sh``) ran, what was
cut and what did not run, per step; the (backend, op) pairs it verified; its decisions.
``--apply RESULTS_DIR``: writes those pairs and the measured defaults to
``lora_kernels/verified_gpu.json``, which ``lora_kernels._backend`` reads at import.

A (backend, op) pair is verified exactly when every test of it that a step planned ran and
passed (:func:`verified_pairs`): ``tests.jsonl`` holds each step's planned test ids first, then
one line per result, so a step cut at any moment still verifies the pairs it finished.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch


def read_results(path: Path) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """``(planned, results)`` of a ``tests.jsonl``: step -> the test ids it planned (the first
    plan of a step counts: a rerun plans only what is left), and test id -> its result
    ``{"outcome": passed | failed | error | skipped, "step", "time_s", "message"}`` (a failed setup
    or teardown makes the test an error). A torn last line (a kill mid-write) is ignored."""
    planned: dict[str, list[str]] = {}
    results: dict[str, dict] = {}
    if not Path(path).exists():
        return planned, results
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "planned" in r:
            planned.setdefault(r.get("step") or "", list(r["planned"]))
            continue
        prev = results.get(r["test"])
        bad = r["outcome"] in ("failed", "error")
        if prev is None or bad or (r["when"] == "call" and prev["outcome"] not in
                                   ("failed", "error")):
            results[r["test"]] = {"outcome": r["outcome"], "step": r.get("step"),
                                  "time_s": r.get("time_s"), "message": r.get("message")}
    return planned, results


def run_pass(label: str, extra_env: dict, args, repo: Path, jsonl: Path) -> dict:
    env = dict(os.environ)
    env.update(LORA_KERNELS_TEST_DEVICE="cuda", TRITON_INTERPRET="0",
               LORA_KERNELS_RESULTS_JSONL=str(jsonl), LORA_KERNELS_STEP=label, **extra_env)
    cmd = [sys.executable, "-m", "pytest", str(repo / "tests"), "-q", "-p", "no:cacheprovider",
           "-p", "lora_kernels.bench.pytest_plugin", *args.pytest_args]
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
        interrupted = True  # SIGINT: pytest stops; every finished result is already written
        print(f"\n== deadline {args.deadline} s reached: interrupting pytest", flush=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _, results = read_results(jsonl)
    tests = [{"test": t, **r} for t, r in results.items() if r["step"] == label]
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"label": label, "env": extra_env, "returncode": proc.returncode,
            "interrupted": interrupted,
            "wall_s": round(time.time() - t0, 1), "counts": counts, "tests": tests}


# test file -> op its backend-parametrised tests cover. A new op's test file belongs here: its
# [triton] / [cuda] tests then form the GPU session's correctness step for that (backend, op)
# pair and verify it (bench/gpu_session.sh; otherwise they only run in its broader suite).
# tests/cuda/test_cuda_build.py's [cuda] kernel tests: by test name, below.
TEST_FILE_OPS = {"test_lora.py": "lora_linear", "test_glora.py": "glora_linear",
                 "test_quant.py": "lora_linear", "test_dora.py": "dora_linear",
                 "test_multi_lora.py": "multi_lora_linear",
                 "test_serving_model.py": "multi_lora_linear",
                 "test_serving_plan.py": "multi_lora_linear", "test_store.py": "multi_lora_linear",
                 "test_fused_proj.py": "multi_lora_linear", "test_lora_tma.py": None,
                 "test_moe_lora.py": "moe_lora_linear",
                 "test_embedding_lora.py": "lora_embedding"}
VARIANT_OPS = {"nora": "nora_linear", "cur": "cur_linear", "deep": "deep_lora_linear"}


def test_pair(test_id: str) -> tuple[str | None, str | None]:
    """(backend | None, op | None) a test id belongs to, as junit writes it or as a pytest node
    id, e.g. 'tests.test_lora::test_fwd[triton-bf16]' or 'tests/test_lora.py::test_fwd[triton-bf16]'
    -> ('triton', 'lora_linear')."""
    path, _, name = test_id.partition("::")
    fname = path.replace(".", "/").split("/")[-1] + ".py" if not path.endswith(".py") \
        else path.split("/")[-1]
    params = name[name.find("[") + 1:-1].replace("[", "-").split("-") if "[" in name else []
    backend = next((b for b in ("triton", "cuda") if b in params), None)
    op = TEST_FILE_OPS.get(fname)
    if fname == "test_variants.py":
        op = next((o for k, o in VARIANT_OPS.items() if k in name.lower()), None)
    if fname == "test_embedding_lora.py" and ("served" in name or "multi" in name):
        op = "multi_lora_embedding"
    if fname == "test_cuda_build.py":  # [cuda] kernel tests ([emu] ones run on CPU only)
        gpu = "cuda" in params or "cuda_backend" in name or "cuda_graph" in name
        backend = "cuda" if gpu else None
        op = None if not gpu else "multi_lora_linear" if "multi_lora" in name else \
            "lora_linear" if ("lora" in name or "dropout" in name) else None
    return backend, op


def pair_status(planned: dict[str, list[str]], results: dict[str, dict]) -> dict[tuple, str]:
    """(backend, op) -> "verified", or why not: every test a step planned for the pair must have
    run and passed; a failed / errored test anywhere blocks its pair (one with no backend in its
    id blocks its op for both backends); a skipped or unrun planned test leaves it unverified."""
    status: dict[tuple, str] = {}
    want: dict[tuple, list[str]] = {}
    for ids in planned.values():
        for t in ids:
            be, op = test_pair(t)
            if be in ("triton", "cuda") and op is not None:
                want.setdefault((be, op), []).append(t)
    blocked: dict[tuple, str] = {}
    for t, r in results.items():
        if r["outcome"] not in ("failed", "error"):
            continue
        be, op = test_pair(t)
        if op is None:
            continue
        for b in ((be,) if be in ("triton", "cuda") else ("triton", "cuda")):
            blocked.setdefault((b, op), f"{r['outcome']}: {t}")
    for pair, ids in sorted(want.items()):
        if pair in blocked:
            status[pair] = blocked[pair]
            continue
        unrun = [t for t in ids if t not in results]
        skipped = [t for t in ids if t in results and results[t]["outcome"] == "skipped"]
        if unrun:
            status[pair] = f"{len(unrun)} of {len(ids)} planned tests did not run"
        elif skipped:
            status[pair] = f"{len(skipped)} of {len(ids)} planned tests skipped ({skipped[0]})"
        else:
            status[pair] = "verified"
    return status


def verified_pairs(planned: dict[str, list[str]],
                   results: dict[str, dict]) -> frozenset[tuple[str, str]]:
    """The pairs :func:`pair_status` calls verified."""
    return frozenset(p for p, s in pair_status(planned, results).items() if s == "verified")


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


VERIFIED_FILE = Path(__file__).with_name("verified_gpu.json")


def _decisions(folder: Path) -> dict:
    dec = Path(folder) / "decisions.json"
    return json.loads(dec.read_text()) if dec.exists() else {}


def apply_results(folder: Path, target: Path | None = None) -> tuple[frozenset, dict]:
    """Write the verified pairs and measured defaults of a results folder to
    ``lora_kernels/verified_gpu.json`` (or ``target``)."""
    folder = Path(folder)
    if not (folder / "tests.jsonl").exists():
        raise FileNotFoundError(f"no tests.jsonl in {folder}")
    planned, results = read_results(folder / "tests.jsonl")
    pairs = verified_pairs(planned, results)
    defaults = measured_defaults(_decisions(folder), pairs)
    doc = {"what": "(backend, op) pairs whose planned GPU tests all ran and passed, and the "
                   "defaults the GPU benchmark chose; written by python -m lora_kernels.check "
                   "--apply", "source": str(folder),
           "verified": [list(p) for p in sorted(pairs)],
           "defaults": dict(sorted(defaults.items()))}
    (Path(target) if target else VERIFIED_FILE).write_text(json.dumps(doc, indent=1) + "\n")
    return pairs, defaults


def summary(folder: Path) -> str:
    """What a session ran, cut and did not run (per step), the pairs it verified, its decisions."""
    folder = Path(folder)
    steps_file = folder / "steps.jsonl"
    events = []
    if steps_file.exists():
        for line in steps_file.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    planned, results = read_results(folder / "tests.jsonl")
    order = ["build", "correctness", "memcheck", "headline", "suite"]
    order += [e["step"] for e in events if e["step"] not in order]
    lines, not_run = [], []
    for st in dict.fromkeys(order):
        ev = [e for e in events if e["step"] == st]
        end = next((e for e in reversed(ev) if e["event"] == "end"), None)
        if not ev:
            not_run.append(st)
            lines.append(f"  {st:<12} NOT RUN")
            continue
        state = ("no end recorded (killed)" if end is None else
                 f"CUT at its deadline (rc {end['rc']}, {end.get('wall_s')} s)" if end["cut"]
                 else f"finished rc {end['rc']} in {end.get('wall_s')} s")
        lines.append(f"  {st:<12} {state}")
        if st in planned:
            ids = planned[st]
            got = [results[t]["outcome"] for t in ids if t in results]
            c = {k: got.count(k) for k in ("passed", "failed", "error", "skipped")}
            missing = [t for t in ids if t not in results]
            lines.append(f"  {'':<12} {len(ids)} planned: {c['passed']} passed, {c['failed']} "
                         f"failed, {c['error']} errors, {c['skipped']} skipped, {len(missing)} "
                         f"did not run" + (f" (first: {missing[0]})" if missing else ""))
            for t in ids:
                if t in results and results[t]["outcome"] in ("failed", "error"):
                    msg = (results[t]["message"] or "").strip().splitlines()
                    lines.append(f"    {results[t]['outcome'].upper()} {t}: "
                                 f"{msg[-1][:150] if msg else ''}")
    status = pair_status(planned, results)
    lines.append("(backend, op) pairs:")
    for (be, op), s in status.items():
        lines.append(f"  {be:<7}{op:<20}{s}")
    pairs = frozenset(p for p, s in status.items() if s == "verified")
    dec = _decisions(folder)
    if dec:
        from .bench.decide import table

        lines.append(table(dec))
    lines.append(f"measured defaults: {measured_defaults(dec, pairs)}")
    unrun_tests = sum(1 for ids in planned.values() for t in ids if t not in results)
    lines.append(f"did not run: steps {', '.join(not_run) or 'none'}; {unrun_tests} planned "
                 f"tests")
    return "\n".join(lines)


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
                    help="write lora_kernels/verified_gpu.json from a GPU run's results")
    ap.add_argument("--summary", metavar="RESULTS_DIR",
                    help="what a GPU session ran / cut / did not run, and the verified pairs")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(Path(args.summary)))
        return 0
    if args.apply:
        pairs, defaults = apply_results(Path(args.apply))
        print(f"verified on GPU: {sorted(pairs)}\nmeasured defaults: {defaults}\n"
              f"written to {VERIFIED_FILE}")
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "tests.jsonl"
    passes = [run_pass("default", {}, args, repo, jsonl)]
    for be in [b.strip() for b in args.env_backends.split(",") if b.strip()]:
        if be == "cuda" and not lora_kernels.cuda_available():
            passes.append({"label": "LORA_KERNELS_BACKEND=cuda", "skipped":
                           "lora_kernels._C not built/usable", "counts": {}, "tests": []})
            continue
        passes.append(run_pass(f"LORA_KERNELS_BACKEND={be}", {"LORA_KERNELS_BACKEND": be},
                               args, repo, jsonl))
    ok = all(p.get("skipped") or (p["returncode"] == 0 and p["counts"].get("passed")
                                  and not p.get("interrupted")) for p in passes)
    doc = {"device": info["name"], "device_info": info, "versions": info["versions"],
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "ok": bool(ok), "passes": passes}
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
