"""``python -m lora_kernels.bench [--quick] [--out DIR] [--only GROUP[,GROUP]]``.

Writes ``<out>/<device-slug>.json`` for a full run on all groups (the file the README table comes
from), ``<device-slug>-quick.json`` for ``--quick`` and ``<slug>[-quick]-<groups>.json`` for an
``--only`` run, plus a PNG of the same name. ``<out>`` defaults to ``runs/`` (untracked, in
.gitignore) for ``--quick`` and ``--only`` runs, so a checkout stays clean, and to
``bench/results/`` for the full sweep; refresh a committed reference deliberately with
``--out bench/results``. The JSON is rewritten after every case with
``"complete": false`` so an interrupted run keeps what it measured.

If a full GPU sweep does not fit one time limit, run it in parts (``--only train,methods``, then
``--only decode,prefill``) and ``--combine`` the part files into ``<device-slug>.json``.
``--readme FILE.json`` prints the README benchmark table generated from a results file;
``--update-readme README.md --readme FILE.json`` replaces it between the README's markers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

SCRATCH_DIR = "runs"             # run outputs by default (untracked)
REFERENCE_DIR = "bench/results"  # committed reference results


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m lora_kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sweep (CPU: under two minutes on 2 cores; GPU: headline points)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: {SCRATCH_DIR}/ for --quick and --only runs, "
                        f"untracked; {REFERENCE_DIR}/ for the full sweep, the committed reference)")
    p.add_argument("--only", default=None,
                   help="comma-separated groups: train,layer,methods,decode,prefill")
    p.add_argument("--headline", action="store_true",
                   help="GPU: the three DESIGN.md headline points alone (train, decode, prefill; "
                        "no torch.compile baseline): bench/gpu_session.sh's decisions step")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for a --quick CPU sweep, steadier on a "
                        "shared host and well inside two minutes; torch's own otherwise)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--readme", metavar="RESULTS_JSON", default=None,
                   help="print the README benchmark table made from this results file and exit")
    p.add_argument("--combine", nargs="+", metavar="RESULTS_JSON", default=None,
                   help="merge --only result files of one device into <out>/<device-slug>.json "
                        "(headline recomputed) and exit")
    p.add_argument("--update-readme", metavar="README", default=None,
                   help="with --readme: write the table between the README's bench-table markers")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    from . import report

    if args.combine:
        doc = report.combine(args.combine)
        path = Path(args.out) / f"{doc['device_info']['slug']}.json"
        path.write_text(json.dumps(doc, indent=1, default=str))
        print(report.format_headline(doc["headline_detail"]))
        print(f"combined {len(args.combine)} files -> {path}")
        return 0
    if args.readme:
        if args.update_readme:
            report.update_readme(args.update_readme, args.readme)
            print(f"updated {args.update_readme} from {args.readme}")
        else:
            print(report.readme_table(args.readme))
        return 0

    from .cases import build_cases, headline_cases
    from .harness import Budget, Peaks, check_interpreter, device_info, run_cases

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    err = check_interpreter(device)
    if err:
        print(err, file=sys.stderr)
        return 2
    only = [g.strip() for g in args.only.split(",") if g.strip()] if args.only else None
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick and device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    info = device_info(device)
    if args.headline:
        args.quick = True
        cases = headline_cases(device)
        stem = info["slug"] + "-headline"
    else:
        cases = build_cases(device, args.quick, only)
        stem = info["slug"] + ("-quick" if args.quick else "") + \
            (f"-{'-'.join(only)}" if only else "")
    out_dir = Path(args.out if args.out is not None else
                   SCRATCH_DIR if (args.quick or only) else REFERENCE_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    print(f"lora_kernels.bench: {len(cases)} cases on {info['name']} "
          f"({'quick' if args.quick else 'full'} sweep) -> {json_path}", flush=True)

    if device.type == "cpu" and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        if load > 0.5 * (os.cpu_count() or 1):
            print(f"note: load average {load:.1f} on {os.cpu_count()} CPUs: other work shares this "
                  "CPU, so times are noisy (implementations are timed in interleaved rounds so "
                  "ratios stay fair)", flush=True)
    t0 = time.time()
    peaks = Peaks(device, quick=args.quick)
    bw = peaks.bandwidth()
    dtypes = list(dict.fromkeys(c.dtype for c in cases))
    for dt in dtypes:
        peaks.matmul(dt)
    print(f"measured peaks: copy {bw / 1e9:.1f} GB/s; matmul "
          + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.as_dict()["matmul_TFLOPs"].items()),
          flush=True)

    def doc(rows, complete):
        return report.results_doc(info, peaks, rows, quick=args.quick, only=only,
                                  complete=complete, wall_s=time.time() - t0)

    def write(rows, complete=False):
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc(rows, complete), indent=1, default=str))
        tmp.replace(json_path)

    rows = run_cases(cases, device, peaks, Budget.for_run(device, args.quick),
                     show_progress=not args.no_progress, on_case=write)
    write(rows, complete=True)
    final = doc(rows, True)
    print(report.format_table(rows))
    print(report.format_headline(final["headline_detail"]))
    if "cpu_checks" in final:
        cc = final["cpu_checks"]
        print("\nCPU check: our default LoRALinear fwd+bwd / PEFT lora.Linear:")
        for k, v in cc["lora_layer_fwd_bwd_vs_peft"].items():
            print(f"  {k:<28} {_fmt(v.get('ours_over_peft'))}"
                  + (f"   (ours {v['ours_ms']:.3f} ms, peft {v['peft_ms']:.3f} ms)"
                     if v.get("ours_ms") else f"   ({v.get('reason')})"))
        if "worst" in cc:
            print(f"  worst {cc['worst']:.3f}, geomean {cc['geomean']:.3f}, "
                  f"no slower on every shape: {cc['no_slower_all']}; significantly slower "
                  f"(beyond half the p20-p80 spread): {cc['significantly_slower'] or 'none'}")
    n_bad = sum(r.get("status") == "error" for r in rows)
    if n_bad:
        print(f"\n{n_bad} row(s) errored (see 'error' in {json_path}); "
              "LORA_KERNELS_BENCH_TRACEBACK=1 prints tracebacks")
    if not args.no_plot:
        # the JSON is complete by now: a plotting failure (matplotlib missing or broken on the
        # device machine) must not turn a finished GPU run into a failed one
        try:
            png = report.plot(rows, out_dir / f"{stem}.png",
                              f"lora_kernels bench on {info['name']} ({stem})")
        except Exception as e:  # noqa: BLE001 - reported, the results are already written
            png = None
            print(f"plot skipped: {type(e).__name__}: {e}", file=sys.stderr)
        if png:
            print(f"plot: {png}")
    print(f"results: {json_path}  ({time.time() - t0:.0f} s)")
    return 0


def _fmt(v):
    return "null" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
