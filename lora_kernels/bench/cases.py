"""Benchmark definitions: what is timed, against what, and how much work it is.

Groups (``--only`` takes these names):

``train``    LoRA layer forward + backward (dX, dA, dB; frozen W) against the frozen base GEMM pair
             (forward GEMM + dX GEMM, the floor of any adapter layer), PEFT's ``lora.Linear``, the
             unfused eager formula and ``torch.compile`` of it.
``layer``    our *default* layer (``LoRALinear``, backend=None) fwd+bwd against PEFT's
             ``lora.Linear`` on the same shapes (issue 6: ours must be no slower on CPU).
``methods``  NoRA, CURLoRA, Deep LoRA and GLoRA layers fwd+bwd against plain LoRA at the same
             effective rank.
``decode``   multi-adapter decode (one token per request) against a gather-BMM baseline, PEFT's
             mixed-batch ``adapter_names`` loop and the base GEMM alone; uniform / Zipf /
             identical / distinct adapter popularity; timed by CUDA-graph replay on GPU. The
             ``*_adapters`` rows time the adapter part alone (``multi_lora_add_`` in place, no
             base GEMM), rotating over more input sets: DESIGN.md's decode bandwidth goal is on
             the adapter bytes.
``prefill``  segments of tokens per adapter against the base GEMM alone, PEFT's mixed batch and a
             per-segment PyTorch loop.

Work counts (``flops``, ``bytes``) are the op's useful work and the fewest bytes it must move (each
input read once per pass that needs it, each output written once), so every implementation of a
case is measured against the same floor; the base-GEMM baselines carry their own counts.

LoRA fwd+bwd, x (T, K=in), W (N=out, K), rank r, element size e:
  FLOPs = 4TNK (forward + dX GEMMs) + 6Tr(K+N) (shrink, expand, dy B, (dy B) A, dA, dB)
  bytes = e(3TK + 2TN + 2NK + N) (x twice, dx, y, dy, W twice, bias) + 3e r(K+N) + 8Tr (S fp32)
Decode / prefill over T tokens using n distinct adapters:
  FLOPs = 2TNK + 2Tr(K+N);  bytes = e(NK + N + TK + TN) + e n r(K+N) + 8T (ids)

GPU kernel cases call ``backend="triton"`` explicitly (the default on CUDA stays torch until a GPU
run verifies Triton) and ``backend="cuda"`` where the compiled module is present; CPU cases use
the default backend (torch). Every name of the package is imported inside the implementation that
needs it, so a piece that has not landed yet gives an error row, not an import failure.
"""

from __future__ import annotations

import importlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .harness import DTYPE_NAMES, Case, Impl

GROUPS = ("train", "layer", "methods", "decode", "prefill", "store")
GROUPS += ("dora",)  # bench/cases_dora.py
# (module, function) of the case groups that live in their own modules (each imports this one)
EXTRA_CASES = (("cases_dora", "dora_cases"), ("cases_dropin", "dropin_cases"),
               ("cases_store", "store_cases"))
GROUPS += ("qlora",)  # bench/cases_quant.py
EXTRA_CASES += (("cases_quant", "quant_cases"),)
GROUPS += ("moe",)  # bench/cases_moe.py
EXTRA_CASES += (("cases_moe", "moe_cases"),)
GROUPS += ("embedding",)  # bench/cases_embedding.py (issue 23)
EXTRA_CASES += (("cases_embedding", "embedding_cases"),)
GROUPS += ("moe_block",)  # bench/cases_moe_block.py (issue 22b)
EXTRA_CASES += (("cases_moe_block", "moe_block_cases"),)


# ----------------------------------------------------------------------------- helpers

def linear_of(d: dict, device) -> nn.Linear:
    """An ``nn.Linear`` holding a case's base weight ``d["W"]`` and bias ``d["b"]``."""
    N, K = d["W"].shape
    lin = nn.Linear(K, N, device=device, dtype=d["W"].dtype)
    with torch.no_grad():
        lin.weight.copy_(d["W"])
        lin.bias.copy_(d["b"])
    return lin

def gen(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(shape, dtype, device, g, scale=1.0, requires_grad=False) -> torch.Tensor:
    t = (torch.randn(shape, generator=g, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def lora_train_counts(T, K, N, r, e) -> tuple[float, float]:
    flops = 4.0 * T * N * K + 6.0 * T * r * (K + N)
    nbytes = e * (3.0 * T * K + 2.0 * T * N + 2.0 * N * K + N) + 3.0 * e * r * (K + N) + 8.0 * T * r
    return flops, nbytes


def base_pair_counts(T, K, N, e) -> tuple[float, float]:
    return 4.0 * T * N * K, e * (2.0 * T * K + 2.0 * T * N + 2.0 * N * K + N)


def multi_counts(T, K, N, r, n_used, e) -> tuple[float, float]:
    flops = 2.0 * T * N * K + 2.0 * T * r * (K + N)
    nbytes = e * (N * K + N + T * K + T * N) + e * n_used * r * (K + N) + 8.0 * T
    return flops, nbytes


def base_gemm_counts(T, K, N, e) -> tuple[float, float]:
    return 2.0 * T * N * K, e * (N * K + N + T * K + T * N)


def dt(dtype) -> str:
    return DTYPE_NAMES[dtype]


def train_key(T, K, N, r, dtype) -> str:
    return f"T{T}-{K}x{N}-r{r}-{dt(dtype)}"


def decode_key(T, K, N, r, n_pool, popularity, dtype) -> str:
    return f"T{T}-{K}x{N}-r{r}-{n_pool}ad-{popularity}-{dt(dtype)}"


def prefill_key(n_seg, seg_len, K, N, r, dtype) -> str:
    return f"{n_seg}x{seg_len}-{K}x{N}-r{r}-{dt(dtype)}"


def _peft_linear(W, b, adapters, names):
    """A PEFT ``lora.Linear`` around a copy of (W, b) holding ``adapters`` [(A, B, scaling)].

    Built through PEFT's public ``inject_adapter_in_model`` (stable across PEFT versions, unlike
    ``lora.Linear.__init__``); scaling enters as ``lora_alpha = scaling * r``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    N, K = W.shape
    holder = nn.Module()
    holder.lin = nn.Linear(K, N, bias=b is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        holder.lin.weight.copy_(W)
        if b is not None:
            holder.lin.bias.copy_(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "Already found a peft_config": multiple adapters wanted
        for name, (A, B, s) in zip(names, adapters):
            r = A.shape[0]
            cfg = LoraConfig(r=r, lora_alpha=float(s) * r, lora_dropout=0.0,
                             target_modules=["lin"])
            inject_adapter_in_model(cfg, holder, adapter_name=name)
            with torch.no_grad():
                holder.lin.lora_A[name].weight.copy_(A)
                holder.lin.lora_B[name].weight.copy_(B)
    lin = holder.lin
    for p in lin.base_layer.parameters():
        p.requires_grad_(False)
    return lin


def _ours_backends(device: torch.device) -> list[tuple[str, str | None, str | None]]:
    """(impl name, backend, skip reason) of our implementations on this device."""
    if device.type != "cuda":
        return [("ours_default", None, None)]
    import lora_kernels

    cuda_skip = None if lora_kernels.cuda_available() else \
        "lora_kernels._C not built/usable (lora_kernels.cuda_available() is False)"
    return [("ours_triton", "triton", None), ("ours_cuda", "cuda", cuda_skip)]


# ----------------------------------------------------------------------------- training
def train_inputs(T, K, N, r, dtype, scaling):
    def make(device, k):
        g = gen(device, 1000 + k)
        return dict(x=randn((T, K), dtype, device, g, requires_grad=True),
                    dy=randn((T, N), dtype, device, g),
                    W=randn((N, K), dtype, device, g, 1 / math.sqrt(K)),
                    b=randn((N,), dtype, device, g, 0.1),
                    A=randn((r, K), dtype, device, g, 1 / math.sqrt(K), requires_grad=True),
                    B=randn((N, r), dtype, device, g, 1 / math.sqrt(r), requires_grad=True),
                    s=scaling)
    return make


def grads(y, wrt, dy):
    return (y, *torch.autograd.grad(y, wrt, dy))


def _eager_formula(x, W, b, A, B, s: float):
    return F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)


def _impl_base_pair() -> Impl:
    def prepare(sets, device):
        def step(i):
            d = sets[i]
            x = d["x"].detach()
            return F.linear(x, d["W"], d["b"]), d["dy"] @ d["W"]
        return step
    return Impl("base_pair", prepare, check=False,
                note="frozen base: forward GEMM (+bias) and dX GEMM, no adapter")


def _impl_lora_op(name, backend) -> Impl:
    def prepare(sets, device):
        from lora_kernels import lora_linear

        def step(i):
            d = sets[i]
            y = lora_linear(d["x"], d["W"], d["b"], d["A"], d["B"], d["s"], backend=backend)
            return grads(y, (d["x"], d["A"], d["B"]), d["dy"])
        return step
    return Impl(name, prepare, note=f"lora_kernels.lora_linear(backend={backend!r})")


def _impl_lora_tma() -> Impl:
    """Benchmark candidate: the LoRA op with both base GEMMs on the persistent TMA-descriptor
    kernel (ops.lora_tma), called directly (no autograd node: ~10 us less than the backend rows
    at T=8192, noise against a ~1 ms step)."""
    def prepare(sets, device):
        from lora_kernels.ops import lora_tma

        def step(i):
            d = sets[i]
            x = d["x"].detach()
            y, s = lora_tma.fwd(x, d["W"], d["b"], d["A"].detach(), d["B"].detach(), d["s"],
                                0.0, None)
            dx, dA, dB = lora_tma.bwd(
                d["dy"], lora_tma.Saved(x, d["W"], d["A"].detach(), d["B"].detach(), s, d["s"],
                                        0.0, None), lora_tma.Needs(True, True, True))
            return y, dx, dA, dB
        return step
    return Impl("ours_triton_tma", prepare,
                note="candidate: persistent TMA-descriptor Triton GEMM + fused low-rank epilogue")


def lora_layers(sets, device, backend, *, base=None, **kwargs) -> list:
    """One ``LoRALinear`` per input set, holding that set's factors (``A``, ``B``, scaling
    ``s``); ``base(d, device)`` builds its frozen base (default: an ``nn.Linear`` of ``W``, ``b``);
    ``kwargs`` go to ``from_linear`` (e.g. ``quantize``)."""
    from lora_kernels import LoRALinear

    layers = []
    for d in sets:
        r = d["A"].shape[0]
        layer = LoRALinear.from_linear((base or linear_of)(d, device), r, alpha=d["s"] * r,
                                       backend=backend, **kwargs)
        with torch.no_grad():
            layer.lora_A.copy_(d["A"])
            layer.lora_B.copy_(d["B"])
        layers.append(layer)
    return layers


def layer_train_step(sets, layers):
    """``step(i)``: forward + backward of ``layers[i]`` on input set ``i`` (grads of x, A, B)."""
    def step(i):
        d, m = sets[i], layers[i]
        return grads(m(d["x"]), (d["x"], m.lora_A, m.lora_B), d["dy"])
    return step


def _impl_lora_layer(name, backend) -> Impl:
    def prepare(sets, device):
        return layer_train_step(sets, lora_layers(sets, device, backend))
    return Impl(name, prepare, note=f"LoRALinear module, backend={backend!r}")


def _impl_peft_train() -> Impl:
    def prepare(sets, device):
        mods = [_peft_linear(d["W"], d["b"], [(d["A"].detach(), d["B"].detach(), d["s"])],
                             ["default"]) for d in sets]

        def step(i):
            d, m = sets[i], mods[i]
            return grads(m(d["x"]), (d["x"], m.lora_A["default"].weight,
                                      m.lora_B["default"].weight), d["dy"])
        return step
    return Impl("peft", prepare, note="peft.tuners.lora.Linear (eager)")


def _impl_eager_train() -> Impl:
    def prepare(sets, device):
        def step(i):
            d = sets[i]
            y = _eager_formula(d["x"], d["W"], d["b"], d["A"], d["B"], d["s"])
            return grads(y, (d["x"], d["A"], d["B"]), d["dy"])
        return step
    return Impl("eager", prepare, note="x W^T + b + s (x A^T) B^T with torch autograd")


def _impl_compile_train(skip: str | None) -> Impl:
    def prepare(sets, device):
        fn = torch.compile(_eager_formula, dynamic=False)

        def step(i):
            d = sets[i]
            y = fn(d["x"], d["W"], d["b"], d["A"], d["B"], d["s"])
            return grads(y, (d["x"], d["A"], d["B"]), d["dy"])
        return step
    return Impl("compile", prepare, skip=skip, note="torch.compile of the eager formula")


def train_case(T, K, N, r, dtype, device, *, compile_skip: str | None = None,
               group: str = "train") -> Case:
    e = esize(dtype)
    flops, nbytes = lora_train_counts(T, K, N, r, e)
    bpf, bpb = base_pair_counts(T, K, N, e)
    scaling = 2.0
    if group == "layer":
        impls = [_impl_base_pair(), _impl_lora_layer("ours_default", None), _impl_peft_train(),
                 _impl_eager_train()]
        baseline = "peft"
    else:
        impls = [_impl_base_pair()]
        impls += [_impl_lora_op(n, be) if sk is None else Impl(n, None, skip=sk)
                  for n, be, sk in _ours_backends(device)]
        if device.type == "cuda":  # the TMA candidate (GPU only: descriptors need sm_90)
            impls.append(_impl_lora_tma())
        impls += [_impl_peft_train(), _impl_eager_train(), _impl_compile_train(compile_skip)]
        baseline = "base_pair"
    impls[0].flops, impls[0].bytes = bpf, bpb
    return Case(group, "lora_fwd_bwd", train_key(T, K, N, r, dtype),
                dict(T=T, in_features=K, out_features=N, r=r), dtype, flops, nbytes,
                train_inputs(T, K, N, r, dtype, scaling), impls, ref="eager", baseline=baseline,
                grad=True, set_bytes=nbytes)


# ----------------------------------------------------------------------------- method variants
METHOD_SPECS = {
    # name: (layer class name, from_linear kwargs builder at effective rank r)
    "nora": ("NoRALinear", lambda r: dict(outer_rank=2 * r, inner_rank=r, alpha=1.0)),
    "curlora": ("CURLoRALinear", lambda r: dict(rank=r, alpha=1.0)),
    "deep_lora": ("DeepLoRALinear", lambda r: dict(rank=r, depth=3)),
    "glora": ("GLoRALinear", lambda r: dict(rank=r)),
}


def _impl_method(method: str, backend: str | None, flops=None, nbytes=None) -> Impl:
    cls_name, kw = METHOD_SPECS[method]

    def prepare(sets, device):
        import lora_kernels

        cls = getattr(lora_kernels, cls_name)
        layers = []
        for k, d in enumerate(sets):
            r = d["A"].shape[0]
            lin = linear_of(d, device)
            layer = cls.from_linear(lin, **kw(r))
            layer.backend = backend
            g = gen(device, 77 + k)
            with torch.no_grad():   # never time zeros: zero-initialised factors get random values
                for p in layer.parameters():
                    if p.requires_grad and p.is_floating_point():
                        p.copy_(randn(p.shape, p.dtype, device, g, 0.02))
            layers.append(layer)

        def step(i):
            d, m = sets[i], layers[i]
            wrt = [d["x"]] + [p for p in m.parameters() if p.requires_grad]
            return grads(m(d["x"]), wrt, d["dy"])
        return step
    return Impl(method, prepare, flops=flops, bytes=nbytes,
                note=f"{cls_name}.from_linear(**{kw('r')}), backend={backend!r}")


def methods_case(T, K, N, r, dtype, device) -> Case:
    e = esize(dtype)
    flops, nbytes = lora_train_counts(T, K, N, r, e)
    # GLoRA's W*A term needs dW_eff = dy^T x (one more T x N x K GEMM, W and x and dy read again)
    g_flops = flops + 2.0 * T * N * K
    g_bytes = nbytes + e * (N * K + T * K + T * N)
    backend = "triton" if device.type == "cuda" else None
    impls = [_impl_lora_op("lora", backend)]
    impls[0].note = f"lora_linear at rank r, backend={backend!r}"
    impls += [_impl_method(m, backend) for m in ("nora", "curlora", "deep_lora")]
    impls.append(_impl_method("glora", backend, g_flops, g_bytes))
    return Case("methods", "method_fwd_bwd", train_key(T, K, N, r, dtype),
                dict(T=T, in_features=K, out_features=N, r=r), dtype, flops, nbytes,
                train_inputs(T, K, N, r, dtype, 2.0), impls, ref=None, baseline="lora",
                grad=True, set_bytes=nbytes,
                note="effective rank r: NoRA inner r (outer 2r), CURLoRA r, Deep LoRA r (depth 3), "
                     "GLoRA low-rank A/B at r; counts are LoRA's at rank r (GLoRA: + dW GEMM)")


# ----------------------------------------------------------------------------- serving
def _ids(T, n_pool, popularity, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if popularity == "distinct":
        return torch.randperm(n_pool, generator=g)[:T]
    if popularity == "uniform":
        return torch.randint(0, n_pool, (T,), generator=g)
    if popularity == "zipf":
        p = 1.0 / torch.arange(1, n_pool + 1, dtype=torch.float64) ** 1.1
        return torch.multinomial(p, T, replacement=True, generator=g)
    if popularity == "identical":
        return torch.zeros(T, dtype=torch.long)
    if popularity == "segments":
        raise ValueError("segments ids are built by prefill_case")
    raise ValueError(f"unknown popularity {popularity!r}")


def _multi_inputs(T, K, N, r, n_pool, dtype, ids_fn):
    def make(device, k):
        g = gen(device, 5000 + k)
        ids = ids_fn(k)
        return dict(x=randn((T, K), dtype, device, g),
                    W=randn((N, K), dtype, device, g, 1 / math.sqrt(K)),
                    b=randn((N,), dtype, device, g, 0.1),
                    As=randn((n_pool, r, K), dtype, device, g, 1 / math.sqrt(K)),
                    Bs=randn((n_pool, N, r), dtype, device, g, 1 / math.sqrt(r)),
                    sc=0.5 + 1.5 * torch.rand(n_pool, generator=g, device=device),
                    ids=ids.to(device), ids_list=ids.tolist())
    return make


def _impl_multi_ours(name, backend, *, adapters_only=False, flops=None, nbytes=None,
                     set_bytes=None, path=None) -> Impl:
    """Ours on the pool: ``multi_lora_linear`` (base GEMM + adapters), or with ``adapters_only``
    the adapter part alone, ``multi_lora_add_(y, x, pool, ids)`` in place on a preallocated ``y``
    (what ``decode_hbm_bandwidth_util`` divides the adapter bytes by; ``y`` keeps accumulating
    over the timed repetitions, which changes its values, not the work).

    Adapter ids are passed the way a server passes them, so the per-call validation costs what it
    costs there: eagerly as a CPU tensor (checked against the pool's host mirror, then an async
    copy: no device sync; ids already on the GPU would cost one sync per call, which stalls the
    launch queue and would be timed as kernel time), and while a CUDA graph is being captured as
    a device tensor (a host-to-device copy from pageable memory cannot be captured; the pool
    skips the check during capture).
    """
    def prepare(sets, device):
        from lora_kernels import AdapterPool, multi_lora_add_, multi_lora_linear

        pools, ids_host, ids_dev, ys = [], [], [], []
        for d in sets:
            n_pool, r, K = d["As"].shape
            N = d["Bs"].shape[1]
            pool = AdapterPool(K, N, n_pool, r, dtype=d["W"].dtype, device=device)
            slots = [pool.add(f"a{j}", d["As"][j], d["Bs"][j], float(d["sc"][j]))
                     for j in range(n_pool)]
            pools.append(pool)
            host = torch.tensor(slots, dtype=torch.long)[d["ids"].cpu()]
            ids_host.append(host)
            ids_dev.append(host.to(device))
            if adapters_only:
                ys.append(torch.zeros(d["x"].shape[0], N, dtype=d["x"].dtype, device=device))
        cuda = device.type == "cuda"

        def step(i):
            d = sets[i]
            ids = ids_dev[i] if cuda and torch.cuda.is_current_stream_capturing() else ids_host[i]
            if adapters_only:
                return multi_lora_add_(ys[i], d["x"], pools[i], ids, backend=backend)
            return multi_lora_linear(d["x"], d["W"], d["b"], pools[i], ids, backend=backend,
                                     path=path)
        return step
    if adapters_only:
        return Impl(name, prepare, flops=flops, bytes=nbytes, check=False, set_bytes=set_bytes,
                    note=f"adapter part alone: multi_lora_add_(y, x, pool, ids, "
                         f"backend={backend!r}) in place, no base GEMM")
    return Impl(name, prepare, note=f"AdapterPool + multi_lora_linear(backend={backend!r}"
                                    + (f", path={path!r})" if path else ")"))


def _impl_gather_bmm() -> Impl:
    def prepare(sets, device):
        def step(i):
            d = sets[i]
            y = F.linear(d["x"], d["W"], d["b"])
            a, bm = d["As"][d["ids"]], d["Bs"][d["ids"]]            # (T, r, K), (T, N, r)
            s = torch.bmm(a, d["x"].unsqueeze(-1))                  # (T, r, 1)
            delta = torch.bmm(bm, s).squeeze(-1)                    # (T, N)
            return y + d["sc"][d["ids"]].unsqueeze(-1).to(y.dtype) * delta
        return step
    return Impl("gather_bmm", prepare,
                note="base GEMM + per-token gathered A/B and two BMMs (Punica-style baseline)")


def _impl_peft_loop(per_sequence: int = 1) -> Impl:
    def prepare(sets, device):
        mods = []
        for d in sets:
            n_pool = d["As"].shape[0]
            names = [f"a{j}" for j in range(n_pool)]
            mods.append(_peft_linear(d["W"], d["b"],
                                     [(d["As"][j], d["Bs"][j], float(d["sc"][j]))
                                      for j in range(n_pool)], names))
        names_per_set = [[f"a{j}" for j in d["ids_list"][::per_sequence]] for d in sets]

        def step(i):
            d = sets[i]
            T, K = d["x"].shape
            x3 = d["x"].reshape(T // per_sequence, per_sequence, K)
            return mods[i](x3, adapter_names=names_per_set[i]).reshape(T, -1)
        return step
    return Impl("peft_loop", prepare, graph=False,
                note="PEFT lora.Linear(x, adapter_names=[...]) mixed-batch loop (eager)")


def _impl_base_gemm(flops, nbytes) -> Impl:
    def prepare(sets, device):
        return lambda i: F.linear(sets[i]["x"], sets[i]["W"], sets[i]["b"])
    return Impl("base", prepare, flops=flops, bytes=nbytes, check=False,
                note="base GEMM alone (F.linear), no adapter")


def decode_case(T, K, N, r, n_pool, popularity, dtype, device) -> Case:
    e = esize(dtype)
    ids0 = _ids(T, n_pool, popularity, 0)
    n_used = int(ids0.unique().numel())
    flops, nbytes = multi_counts(T, K, N, r, n_used, e)
    bf, bb = base_gemm_counts(T, K, N, e)
    adapter_bytes = e * n_used * r * (K + N)
    # the adapter part alone: used adapters' factors, x read, y read + written, ids
    af, ab = 2.0 * T * r * (K + N), adapter_bytes + e * (T * K + 2.0 * T * N) + 8.0 * T
    impls = [_impl_multi_ours(n, be) if sk is None else Impl(n, None, skip=sk)
             for n, be, sk in _ours_backends(device)]
    impls += [_impl_multi_ours(n + "_adapters", be, adapters_only=True, flops=af, nbytes=ab,
                               set_bytes=ab)
              if sk is None else Impl(n + "_adapters", None, skip=sk)
              for n, be, sk in _ours_backends(device)]
    impls += [_impl_gather_bmm(), _impl_peft_loop(), _impl_base_gemm(bf, bb)]
    set_bytes = e * (N * K + T * (K + N) + n_pool * r * (K + N))
    return Case("decode", "multi_lora_decode", decode_key(T, K, N, r, n_pool, popularity, dtype),
                dict(T=T, in_features=K, out_features=N, r=r, n_adapters=n_pool,
                     popularity=popularity, distinct_used=n_used), dtype, flops, nbytes,
                _multi_inputs(T, K, N, r, n_pool, dtype, lambda k: ids0),
                impls, ref="gather_bmm", baseline="peft_loop", grad=False, graph=True,
                set_bytes=set_bytes, extra={"adapter_bytes": adapter_bytes})


def _impl_segment_loop(seg_len: int) -> Impl:
    def prepare(sets, device):
        scs = [d["sc"].tolist() for d in sets]

        def step(i):
            d = sets[i]
            y = F.linear(d["x"], d["W"], d["b"])
            for j, s in enumerate(scs[i]):
                sl = slice(j * seg_len, (j + 1) * seg_len)
                y[sl] += s * F.linear(F.linear(d["x"][sl], d["As"][j]), d["Bs"][j])
            return y
        return step
    return Impl("segment_loop", prepare, graph=False,
                note="base GEMM + per-segment x A^T B^T in a Python loop (eager)")


def prefill_case(n_seg, seg_len, K, N, r, dtype, device) -> Case:
    e = esize(dtype)
    T = n_seg * seg_len
    flops, nbytes = multi_counts(T, K, N, r, n_seg, e)
    bf, bb = base_gemm_counts(T, K, N, e)
    ids = torch.arange(n_seg).repeat_interleave(seg_len)
    impls = [_impl_multi_ours(n, be) if sk is None else Impl(n, None, skip=sk)
             for n, be, sk in _ours_backends(device)]
    if device.type == "cuda":  # the opt-in fused path (base GEMM in Triton, expand in its epilogue)
        impls.append(_impl_multi_ours("ours_triton_fused", "triton", path="prefill_fused"))
    impls += [_impl_base_gemm(bf, bb), _impl_peft_loop(per_sequence=seg_len),
              _impl_segment_loop(seg_len)]
    return Case("prefill", "multi_lora_prefill", prefill_key(n_seg, seg_len, K, N, r, dtype),
                dict(T=T, in_features=K, out_features=N, r=r, segments=n_seg, seg_len=seg_len),
                dtype, flops, nbytes, _multi_inputs(T, K, N, r, n_seg, dtype, lambda k: ids),
                impls, ref="segment_loop", baseline="base", grad=False, graph=False,
                set_bytes=nbytes, extra={"adapter_bytes": e * n_seg * r * (K + N)})


class _LinearStack(nn.Module):
    """A batch-first stand-in for a deep model: ``n`` square ``nn.Linear``s with tanh between."""

    def __init__(self, n: int, hidden: int, dtype, device, g):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden, dtype=dtype, device=device)
                                    for _ in range(n))
        with torch.no_grad():
            for lin in self.layers:     # seeded: every implementation builds the same stack
                lin.weight.copy_(randn(lin.weight.shape, dtype, device, g, hidden ** -0.5))
                lin.bias.copy_(randn(lin.bias.shape, dtype, device, g, 0.1))

    def forward(self, x):
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return x


class _PerLayerPlan(nn.Module):
    """The old behaviour, for comparison: every layer validates the ids and builds its own batch
    plan (``multi_lora_linear(x, W, b, pool, token_ids)`` per layer)."""

    def __init__(self, served: nn.Module, ids: torch.Tensor):
        super().__init__()
        self.layers = list(served.layers)      # ServingLinear modules (weights + pools shared)
        self.ids = ids

    def forward(self, x):
        from lora_kernels import multi_lora_linear
        from lora_kernels.ops.multi_lora import plan_for

        for lay in self.layers:
            # ids checked and a plan built in every layer (plan_for: no cache; the op's own
            # plan cache keys on the ids' content, so a fresh ids copy would share one)
            x = torch.tanh(multi_lora_linear(x, lay.weight, lay.bias, lay.pool,
                                             plan_for(lay.pool, self.ids)))
        return x


def served_case(n_layers, batch, seq, hidden, r, n_adapters, *, dtype, device,
                group) -> Case:
    """A ``MultiAdapterModel`` over ``n_layers`` served linears and a batch of ``batch``
    sequences of ``seq`` tokens with their adapters in unsorted order: the batch plan is built
    once per forward (``plan_builds_per_forward``, counted while preparing) and shared by every
    layer, against every layer building its own (``per_layer_plan``) and the base model."""
    e = esize(dtype)
    T = batch * seq
    flops, nbytes = multi_counts(T, hidden, hidden, r, n_adapters, e)
    flops, nbytes = n_layers * flops, n_layers * nbytes
    bf, bb = base_gemm_counts(T, hidden, hidden, e)
    names = [f"a{(3 * b + 1) % n_adapters}" for b in range(batch)]    # mixed, unsorted
    extra: dict = {"adapters_per_sequence": names}

    def make(dev, k):
        return dict(x=randn((batch, seq, hidden), dtype, dev, gen(dev, 7000 + k)))

    def build(dev):
        from lora_kernels import MultiAdapterModel

        g = gen(dev, 77)
        model = _LinearStack(n_layers, hidden, dtype, dev, g)
        server = MultiAdapterModel(model, [f"layers.{i}" for i in range(n_layers)],
                                   max_adapters=n_adapters, max_rank=r)
        for j in range(n_adapters):
            server.add(f"a{j}", {f"layers.{i}": (randn((r, hidden), dtype, dev, g, hidden ** -.5),
                                                 randn((hidden, r), dtype, dev, g, r ** -.5), 0.5)
                                 for i in range(n_layers)})
        return server

    def prepare_served(sets, dev):
        from lora_kernels.ops.multi_lora import plan as mp

        server = build(dev)
        b0 = mp.builds()
        server(sets[0]["x"], adapters=names)
        extra["plan_builds_per_forward"] = mp.builds() - b0
        return lambda i: server(sets[i]["x"], adapters=names)

    def prepare_per_layer(sets, dev):
        from lora_kernels.ops.multi_lora import plan as mp

        server = build(dev)
        slots = torch.tensor([server.store.resident()[n] for n in names]).repeat_interleave(seq)
        old = _PerLayerPlan(server.model, slots)
        b0 = mp.builds()
        old(sets[0]["x"])
        extra["plan_builds_per_forward_per_layer_plan"] = mp.builds() - b0
        return lambda i: old(sets[i]["x"])

    def prepare_base(sets, dev):
        server = build(dev)
        return lambda i: server(sets[i]["x"])

    impls = [Impl("ours_served", prepare_served, graph=False,
                  note="MultiAdapterModel: one batch plan per forward, shared by every layer "
                       "(count: plan_builds_per_forward)"),
             Impl("per_layer_plan", prepare_per_layer, graph=False,
                  note="multi_lora_linear per layer: ids checked and a plan built in every layer"),
             Impl("base", prepare_base, flops=n_layers * bf, bytes=n_layers * bb, check=False,
                  graph=False, note="the same stack without adapters")]
    return Case(group, "served_model",
                f"served-{n_layers}L-{batch}x{seq}-{hidden}-r{r}-{n_adapters}ad-{dt(dtype)}",
                dict(layers=n_layers, batch=batch, seq=seq, hidden=hidden, r=r,
                     n_adapters=n_adapters), dtype, flops, nbytes, make, impls,
                ref="per_layer_plan", baseline="per_layer_plan", grad=False, graph=False,
                extra=extra)


# ----------------------------------------------------------------------------- sweeps
# The DESIGN.md headline points (H100, bf16)
HEAD_TRAIN = (8192, 4096, 4096, 16, torch.bfloat16)
HEAD_DECODE = (64, 4096, 4096, 16, 64, "distinct", torch.bfloat16)
HEAD_PREFILL = (4, 1024, 4096, 4096, 16, torch.bfloat16)


def gpu_cases(device, quick: bool) -> list[Case]:
    """The GPU sweep; ``--quick`` is exactly the three DESIGN.md headline points.

    Order: the cheap headline points first (decode, prefill: seconds each), then the training
    point (~18 autotuned Triton GEMM configs plus ~20 s of Inductor compile for the
    ``torch.compile`` baseline, its last implementation), the other shapes after them and the
    methods cases (the most autotuning) last. The JSON is rewritten after every implementation on
    a GPU, so a run cut short by a time limit (``bench/gpu_session.sh`` runs ``--headline``:
    these three points alone, under its own limit)
    keeps every headline row it finished. ``--quick`` leaves the methods case out: its
    autotuning alone (GLoRA's own GEMM, forward and dX: ~28 more Triton compiles, ~40-50 s)
    would leave no margin; ``--only methods`` runs it.
    """
    bf16, fp16 = torch.bfloat16, torch.float16
    T0, K0, N0, r0, dt0 = HEAD_TRAIN
    cases = [decode_case(*HEAD_DECODE, device),
             prefill_case(*HEAD_PREFILL, device),
             train_case(*HEAD_TRAIN, device)]
    if quick:
        return cases
    shapes = [(T, K0, N0, r0) for T in (512, 2048, 16384)]
    shapes += [(T0, h, h, r0) for h in (2048, 8192)]
    shapes += [(T0, K0, N0, r) for r in (8, 64, 128)]
    cases += [train_case(*s, bf16, device, compile_skip="compile timed at the headline shapes "
                         "only (compile time)") for s in shapes]
    cases.append(train_case(T0, K0, N0, r0, fp16, device))
    cases.append(decode_case(1, 4096, 4096, 16, 64, "identical", bf16, device))
    for T in (16, 64, 256):
        for pop in ("distinct", "uniform", "zipf", "identical"):
            n_pool = T if pop == "distinct" else 64
            if (T, n_pool, pop) != (64, 64, "distinct"):
                cases.append(decode_case(T, 4096, 4096, 16, n_pool, pop, bf16, device))
    cases.append(decode_case(256, 4096, 4096, 16, 256, "uniform", bf16, device))
    for r in (8, 64):
        cases.append(decode_case(64, 4096, 4096, r, 64, "distinct", bf16, device))
    cases.append(decode_case(64, 4096, 4096, 16, 64, "distinct", fp16, device))
    for n_seg, seg_len in ((1, 1024), (16, 256), (4, 256), (16, 1024)):
        cases.append(prefill_case(n_seg, seg_len, 4096, 4096, 16, bf16, device))
    cases.append(prefill_case(4, 1024, 4096, 4096, 16, fp16, device))
    cases.append(methods_case(*HEAD_TRAIN, device))
    cases.append(methods_case(T0, K0, N0, 64, bf16, device))
    return cases


def headline_cases(device) -> list[Case]:
    """The three DESIGN.md headline points alone (``--headline``: the GPU session's decisions,
    ``lora_kernels.bench.decide``), without the ``torch.compile`` baseline (its Inductor compile
    is no candidate and would cost the session ~20 s)."""
    return [decode_case(*HEAD_DECODE, device), prefill_case(*HEAD_PREFILL, device),
            train_case(*HEAD_TRAIN, device, compile_skip="headline step: torch.compile is no "
                       "candidate (Inductor compile time)")]


def cpu_cases(device, quick: bool) -> list[Case]:
    f32 = torch.float32
    skip = "quick sweep: torch.compile not timed (compile time)" if quick else None
    cases = []
    layer_shapes = [(32, 256, 256, 8), (256, 1024, 1024, 16), (1024, 1024, 1024, 16),
                    (256, 2048, 2048, 64)]
    if not quick:
        layer_shapes += [(512, 2048, 2048, 64), (2048, 2048, 2048, 16), (512, 4096, 4096, 16)]
    cases += [train_case(*s, f32, device, group="layer") for s in layer_shapes]
    cases.append(train_case(256, 1024, 1024, 16, f32, device, compile_skip=skip))
    cases.append(methods_case(256, 512, 512, 8, f32, device))
    cases.append(decode_case(16, 512, 512, 8, 16, "distinct", f32, device))
    cases.append(decode_case(16, 512, 512, 8, 16, "zipf", f32, device))
    if not quick:
        cases.append(decode_case(64, 1024, 1024, 16, 64, "uniform", f32, device))
    # an unsorted prefill-shaped mixed batch over many slots (the CPU sorted strategy)
    cases.append(decode_case(256, 1024, 1024, 16, 64, "uniform", f32, device))
    cases.append(prefill_case(4, 64, 512, 512, 8, f32, device))
    # the batch plan built once per forward, on a deep served model (decode and prefill shapes)
    cases.append(served_case(32, 8, 1, 256, 8, 4, dtype=f32, device=device, group="decode"))
    cases.append(served_case(32, 4, 32, 256, 8, 3, dtype=f32, device=device, group="prefill"))
    if not quick:
        cases.append(prefill_case(4, 256, 1024, 1024, 16, f32, device))
    return cases


def build_cases(device: torch.device, quick: bool, only: list[str] | None = None) -> list[Case]:
    """All cases for this device (``only``: keep these groups)."""
    if only:
        bad = [g for g in only if g not in GROUPS]
        if bad:
            raise ValueError(f"--only: unknown group(s) {bad}; expected names from {GROUPS}")
    cases = gpu_cases(device, quick) if device.type == "cuda" else cpu_cases(device, quick)
    # the case groups of later features live in their own modules (each imports this one)
    for mod, fn in EXTRA_CASES:
        cases += getattr(importlib.import_module(f".{mod}", __package__), fn)(device, quick)
    return [c for c in cases if not only or c.group in only]
