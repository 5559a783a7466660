"""Benchmarks: every claim shown as a ratio against the baselines users run, in one run.

``python -m lora_kernels.bench [--quick] [--out DIR] [--only GROUP[,GROUP]]`` runs the cases of
:mod:`lora_kernels.bench.cases` through :mod:`lora_kernels.bench.harness` and writes
``<out>/<device-slug>[-quick].json`` (device, versions, measured peaks, every row, ``"headline"``),
a PNG plot and a printed table (:mod:`lora_kernels.bench.report`).

Timing (see ``harness``): CUDA device events, median of many runs after warm-up, input sets
rotated so that caches don't flatter, CUDA-graph replay for decode shapes; wall-clock median on
CPU. Each row carries the FLOPs and the fewest bytes its op must move, the measured device peaks
(a large device-to-device copy, a large GEMM) and its distance from the floor
``max(FLOPs / peak_flops, bytes / peak_bw)``.
"""

from .harness import Case, Impl, Peaks, device_info, run_cases

__all__ = ["Case", "Impl", "Peaks", "device_info", "run_cases"]
