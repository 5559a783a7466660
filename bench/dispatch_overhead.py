"""Dispatch overhead of the torch.library registration at small decode shapes.

Times the same tiny LoRA forward three ways, on whatever device is given (median of many calls):
  direct      the backend implementation called as a plain function (no validation, no op)
  op          torch.ops.lora_kernels.lora_fwd (custom-op dispatch, autograd not needed)
  public      lora_kernels.lora_linear (argument checks + backend resolution + op)
  public+grad the same with inputs that require grad (autograd node recorded)
and prints the added microseconds per call. Usage: python bench/dispatch_overhead.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import lora_kernels as lk
from lora_kernels.ops import lora as L


def _median_us(fn, sync, n=2000, warm=200):
    for _ in range(warm):
        fn()
    sync()
    samples = []
    for _ in range(n // 100):
        t0 = time.perf_counter()
        for _ in range(100):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / 100 * 1e6)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--json", default=None, help="write the numbers to this file")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    T, d, r = 1, 256, 16  # one decode token, a small layer: pure overhead dominates
    x = torch.randn(T, d, device=dev, dtype=dtype)
    w = torch.randn(d, d, device=dev, dtype=dtype)
    a = torch.randn(r, d, device=dev, dtype=dtype)
    b = torch.randn(d, r, device=dev, dtype=dtype)
    impl = L.BACKENDS[args.backend][0]
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
    res = {
        "direct": _median_us(lambda: impl(x, w, None, a, b, 2.0, 0.0, None), sync),
        "op": _median_us(lambda: torch.ops.lora_kernels.lora_fwd(x, w, None, a, b, 2.0, 0.0, None,
                                                                 args.backend), sync),
        "public": _median_us(lambda: lk.lora_linear(x, w, None, a, b, 2.0, backend=args.backend),
                             sync),
        "public+grad": _median_us(lambda: lk.lora_linear(x, w, None, ag, bg, 2.0,
                                                         backend=args.backend), sync),
    }
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device={name} backend={args.backend} T={T} d={d} r={r} dtype={dtype}")
    for k, v in res.items():
        print(f"  {k:12s} {v:8.1f} us/call   (+{v - res['direct']:6.1f} us over direct)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "backend": args.backend, "us_per_call": res}, f, indent=1)


if __name__ == "__main__":
    main()
