"""pytest-benchmark front end to the same cases as ``python -m lora_kernels.bench``.

    pytest bench/                                  # quick sweep on this device
    LORA_KERNELS_BENCH_FULL=1 pytest bench/        # full sweep
    pytest bench/ -k decode --benchmark-group-by=group

Each test is one implementation of one case (``<group>-<case>-<impl>``); tests of one case share a
benchmark group, so pytest-benchmark's table compares ours with the baselines side by side.
These are wall-clock times around each call (synchronised on CUDA), so micro-second GPU kernels
include launch and sync latency; the harness (``python -m lora_kernels.bench``: device events,
CUDA graphs for decode, FLOP/byte floors) is the reference for reported numbers. Kept out of
``tests/`` so ``make test`` never runs them.
"""

import itertools
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # source checkout, no install

from lora_kernels.bench.cases import build_cases  # noqa: E402
from lora_kernels.bench.harness import rotation_sets, sync  # noqa: E402

DEVICE = torch.device(os.environ.get("LORA_KERNELS_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
FULL = os.environ.get("LORA_KERNELS_BENCH_FULL") == "1"
CASES = build_cases(DEVICE, quick=not FULL)
PARAMS = [pytest.param(c, im, id=f"{c.group}-{c.key}-{im.name}") for c in CASES for im in c.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_bench(benchmark, case, impl):
    if impl.skip:
        pytest.skip(impl.skip)
    n_sets = rotation_sets(case.set_bytes or case.bytes, DEVICE)
    with torch.no_grad():
        sets = [case.make_inputs(DEVICE, k) for k in range(n_sets)]
    with torch.set_grad_enabled(case.grad):
        step = impl.prepare(sets, DEVICE)
        step(0)                                             # compile / autotune / warm caches
        sync(DEVICE)
        counter = itertools.count()

        def run():
            step(next(counter) % n_sets)
            sync(DEVICE)

        t0 = time.perf_counter()
        run()
        est = max(time.perf_counter() - t0, 1e-6)
        benchmark.group = f"{case.group}:{case.key}"
        benchmark.extra_info.update(
            op=case.op, impl=impl.name, shape=case.shape, dtype=str(case.dtype), n_sets=n_sets,
            flops=impl.flops if impl.flops is not None else case.flops,
            bytes=impl.bytes if impl.bytes is not None else case.bytes)
        benchmark.pedantic(run, rounds=int(min(200, max(5, 0.3 / est))), warmup_rounds=2,
                           iterations=1)
