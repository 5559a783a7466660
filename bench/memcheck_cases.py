"""A few small shapes of every GPU kernel family, for ``compute-sanitizer --tool memcheck``.

Run by bench/gpu_session.sh as ``compute-sanitizer --tool memcheck --error-exitcode 9 python
bench/memcheck_cases.py``: odd sizes (tails in every tile dimension), row-padded inputs (the
kernels' leading-dimension paths) and rank 1, through the CUDA backend (cuBLAS + our kernels),
the Triton kernels, the TMA-descriptor candidate and the multi-LoRA decode / prefill / fused
prefill / backward. Each result is also compared with a float64 reference (rel. error printed),
so a race or a wrong index shows even when memcheck stays silent. Needs a CUDA device.
"""

from __future__ import annotations

import sys

import torch

import lora_kernels as lk


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def padded(t, pad=8):
    buf = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    v = buf[:, : t.shape[1]]
    v.copy_(t)
    return v


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda",
                    help="cuda (the session); cpu only for the session plan's launch recording "
                         "under TRITON_INTERPRET=1")
    dev = torch.device(ap.parse_args(argv).device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("memcheck_cases: no CUDA device", file=sys.stderr)
        return 2
    dt = torch.bfloat16
    worst = 0.0
    backends = ["triton"] + (["cuda"] if dev.type == "cuda" and lk.cuda_available() else [])
    for T, i, o, r in ((37, 96, 72, 1), (130, 104, 80, 16)):
        x0 = torch.randn(T, i, device=dev, dtype=dt)
        w = (torch.randn(o, i, device=dev) * i ** -0.5).to(dt)
        b = torch.randn(o, device=dev, dtype=dt)
        A = (torch.randn(r, i, device=dev) * i ** -0.5).to(dt).requires_grad_()
        B = torch.randn(o, r, device=dev, dtype=dt).requires_grad_()
        ref = (x0.double() @ w.double().t() + b.double()
               + 0.5 * (x0.double() @ A.detach().double().t()) @ B.detach().double().t())
        for be in backends:
            x = padded(x0).requires_grad_()
            y = lk.lora_linear(x, w, b, A, B, 0.5, backend=be)
            y.backward(torch.randn_like(y))
            e = rel(y, ref)
            worst = max(worst, e)
            print(f"lora_linear {be} T{T} {i}x{o} r{r}: rel err {e:.2e}")
        from lora_kernels.ops import lora_tma

        y, s = lora_tma.fwd(padded(x0), w, b, A.detach(), B.detach(), 0.5, 0.0, None)
        lora_tma.bwd(padded(torch.randn(T, o, device=dev, dtype=dt)),
                     lora_tma.Saved(x0, w, A.detach(), B.detach(), s, 0.5, 0.0, None),
                     lora_tma.Needs(True, True, True))
        e = rel(y, ref)
        worst = max(worst, e)
        print(f"lora_tma T{T} {i}x{o} r{r}: rel err {e:.2e}")

    i, o = 104, 72
    pool = lk.AdapterPool(i, o, 5, 16, dtype=dt, device=dev)
    pool64 = lk.AdapterPool(i, o, 5, 16, dtype=torch.float64)
    for n, rk in zip("abcd", (16, 1, 7, 16)):
        fa, fb = (torch.randn(rk, i) * 0.1).to(dt), (torch.randn(o, rk) * 0.1).to(dt)
        pool.add(n, fa, fb, 0.5)
        pool64.add(n, fa.double(), fb.double(), 0.5)
    w = (torch.randn(o, i, device=dev) * i ** -0.5).to(dt)
    for T in (5, 67):
        ids = torch.randint(-1, 4, (T,), device=dev)
        x = torch.randn(T, i, device=dev, dtype=dt)
        ref = lk.multi_lora_linear(x.double().cpu(), w.double().cpu(), None, pool64, ids.cpu(),
                                   backend="torch")
        for be in backends:
            for path in ("decode", "prefill") + (("prefill_fused",) if be == "triton" else ()):
                xx = x.clone().requires_grad_(be == "triton")
                y = lk.multi_lora_linear(xx, w, None, pool, ids, backend=be, path=path)
                if xx.requires_grad:
                    y.float().sum().backward()
                e = rel(y, ref)
                worst = max(worst, e)
                print(f"multi_lora_linear {be} {path} T{T}: rel err {e:.2e}")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"memcheck_cases done; worst rel err {worst:.2e} (bf16 bound 1e-2)")
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
