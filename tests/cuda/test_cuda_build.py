"""The CUDA module ``lora_kernels._C``: build, import and refusal checks, and correctness of every
CUDA kernel against float64 references.

Build part (CPU, runs in CI): when nvcc is present the module must have been built by
``pip install -e .`` (a missing module is a failure, not a skip), import without a GPU driver
(static CUDA runtime), report its ops and architectures, refuse CPU tensors with a clear
ValueError, map argument errors to ValueError and CUDA errors to RuntimeError naming the kernel,
and ship in the wheel.

Kernel part: every test taking the ``kdev`` fixture runs twice,
* ``[cuda]`` on a GPU with the real module (skipped, with the reason, where there is none), and
* ``[emu]`` on the CPU with the *same* csrc/ sources compiled by g++ against a host emulation of
  the CUDA execution model (csrc/emu: a thread per CUDA thread, barriers, warp shuffles). The
  emulated run checks the kernels' logic (indexing, tails, vector/scalar paths, tiles, segments,
  splits, the dropout RNG, barrier discipline) through the real Python wrappers and launchers; it
  says nothing about GPU execution itself (codegen, alignment faults, memory model, speed).
CUDA-graph capture/replay and the public ``lora_linear(backend="cuda")`` path are GPU-only.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lora_kernels
from lora_kernels import _cuda
from lora_kernels.ops.lowrank import Needs, Saved
from lora_kernels.reference.lora import lora_linear as ref_lora_linear
from lora_kernels.reference.philox import philox4x32_10_np, philox_keep_reference

from conftest import DTYPES
from helpers import assert_close as check

ROOT = Path(__file__).resolve().parents[2]


def find_nvcc() -> str | None:
    """The same search as setup.py: PATH, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(Path(home) / "bin" / "nvcc", os.X_OK):
            return str(Path(home) / "bin" / "nvcc")
    return None


def expect_module() -> bool:
    return find_nvcc() is not None and os.environ.get("LORA_KERNELS_NO_CUDA", "0") in ("", "0")


def expected_archs() -> tuple[int, ...]:
    raw = os.environ.get("LORA_KERNELS_CUDA_ARCHS", "80;90")
    out = []
    for tok in raw.replace(",", ";").replace(" ", ";").split(";"):
        tok = tok.strip().lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        tok = tok.removesuffix("-real").removesuffix("-virtual").removesuffix("a")
        if tok:
            out.append(int(tok))
    return tuple(sorted(set(out)))


needs_module = pytest.mark.skipif(
    _cuda.module_error() is not None and not expect_module(),
    reason="no nvcc here, so lora_kernels._C is not built (pure-Python install)",
)


def _gpu_ready() -> bool:
    return _cuda.module_error() is None and torch.cuda.is_available()


gpu = pytest.mark.skipif(
    not _gpu_ready(),
    reason="GPU-only: needs a CUDA device and the built lora_kernels._C (only compiled here)",
)


@functools.lru_cache(maxsize=1)
def _emu_module():
    """(module, None) for the CPU-emulated _C (built once, under build/emu), or (None, why)."""
    if find_nvcc() is None:
        return None, "no CUDA toolkit headers here"
    try:
        spec = importlib.util.spec_from_file_location("lk_build_emu",
                                                      ROOT / "csrc" / "emu" / "build_emu.py")
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        so = builder.build(ROOT / "build" / "emu")
        spec = importlib.util.spec_from_file_location("_C", so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod, None
    except Exception as e:  # reported as the skip reason
        return None, f"{type(e).__name__}: {e}"[:2000]


@pytest.fixture(params=["cuda", "emu"])
def kdev(request, monkeypatch):
    """Where the kernels run: a real GPU, or the CPU emulation of the same sources."""
    if request.param == "cuda":
        if not _gpu_ready():
            pytest.skip("GPU-only: needs a CUDA device and the built lora_kernels._C")
        return torch.device("cuda")
    return use_emulation(monkeypatch)


def use_emulation(monkeypatch, compact_gemm_operands: bool = True) -> torch.device:
    """Point lora_kernels' CUDA wrappers at the CPU-emulated module (skip if it cannot build)."""
    mod, err = _emu_module()
    if mod is None:
        pytest.skip(f"CPU emulation of the kernels unavailable: {err}")
    from lora_kernels.ops import lora_cuda

    monkeypatch.setattr(lora_cuda, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(_cuda, "module", lambda: mod)
    if compact_gemm_operands:
        compact_stand_in_gemms(monkeypatch, lora_cuda)
    return torch.device("cpu")


def compact_stand_in_gemms(monkeypatch, lora_cuda):
    """Give the emulation's cuBLAS stand-in (torch's CPU GEMM) compact copies of its operands.

    Why: the [emu] tests put NaN in the padding of row-strided x / dy ('rowpad', 'offset' layouts)
    to prove that *our* kernels (lora_shrink / lora_expand / lora_grad_tn, which take the row
    stride ld) never read past a row's logical end. The base GEMMs of the CUDA backend are cuBLAS
    on a GPU (which honours lda) and torch's CPU GEMM in the emulation. On Intel CPUs with AMX,
    torch's bf16 GEMM (oneDNN brgemm) reads whole K tiles, padding included, and multiplies the
    columns past K by zero: NaN * 0 = NaN, so y / dx came out NaN (issue 10) although our kernels
    were right. The stand-in GEMM is not under test, so it gets a compact copy of x / dy; our
    kernels still read the poisoned row-strided originals (``as_rows`` keeps them, with their ld),
    so the poison proves exactly what it proved before. tests/cuda/amx_sim.py simulates the AMX
    behaviour on any CPU: test_emulation_survives_padding_reading_gemm shows this shim is what
    keeps the suite green there, and that without it the poison does reach the output.
    """
    import types

    def linear(x, w, b=None):
        return F.linear(x.contiguous(), w.contiguous(), b)

    def mm(a, b):
        return torch.mm(a.contiguous(), b.contiguous())

    monkeypatch.setattr(lora_cuda, "F", types.SimpleNamespace(linear=linear))
    monkeypatch.setattr(lora_cuda, "torch", _TorchWithCompactMM(mm))


class _TorchWithCompactMM:
    """``torch`` as lora_cuda sees it in the emulation: every name forwarded, ``mm`` replaced."""

    def __init__(self, mm):
        self.mm = mm

    def __getattr__(self, name):
        return getattr(torch, name)


def test_emulation_builds():
    if find_nvcc() is None or shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("needs the CUDA headers and g++")
    mod, err = _emu_module()
    assert mod is not None, err
    assert tuple(mod.OPS) == ("lora_linear", "multi_lora_linear")


# ============================================================================ CPU: build / import
def test_module_built_when_nvcc_present():
    if not expect_module():
        pytest.skip("nvcc not found (or LORA_KERNELS_NO_CUDA set): the module is optional here")
    err = _cuda.module_error()
    assert err is None, f"nvcc is at {find_nvcc()} but lora_kernels._C did not import: {err}"


@needs_module
def test_ops_and_archs():
    C = _cuda.module()
    assert tuple(C.OPS) == ("lora_linear", "multi_lora_linear")
    assert _cuda.has_op("lora_linear") and _cuda.has_op("multi_lora_linear")
    archs = tuple(C.compiled_archs())
    assert archs and all(isinstance(a, int) for a in archs)
    assert tuple(sorted(set(archs))) == expected_archs(), (archs, expected_archs())
    assert C.cuda_runtime_version() >= 11080


@needs_module
def test_import_needs_no_gpu_driver():
    """A fresh interpreter imports the module with no CUDA call; the .so does not link the shared
    CUDA runtime or the driver (static cudart loads libcuda lazily at the first CUDA call)."""
    code = "import lora_kernels._C as C; print(C.OPS)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(ROOT), timeout=120)
    assert res.returncode == 0, res.stderr
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not available to list the module's DT_NEEDED entries")
    so = _cuda.module().__file__
    dyn = subprocess.run([readelf, "-d", so], capture_output=True, text=True, check=True).stdout
    needed = [ln for ln in dyn.splitlines() if "(NEEDED)" in ln]
    assert needed, dyn
    assert not any("libcudart" in ln or "libcuda." in ln for ln in needed), needed


def test_cuda_backend_refused_on_cpu():
    x = torch.randn(3, 8)
    w, b = torch.randn(5, 8), torch.randn(5)
    a, bb = torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError, match="backend='cuda'"):
        lora_kernels.lora_linear(x, w, b, a, bb, 1.0, backend="cuda")


def test_cuda_wrappers_refuse_cpu_tensors():
    from lora_kernels.ops import lora_cuda
    from lora_kernels.ops.multi_lora import cuda_backend as multi_lora_cuda

    x = torch.randn(3, 8)
    w, b = torch.randn(5, 8), torch.randn(5)
    a, bb = torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError, match="needs CUDA tensors: x is on cpu"):
        lora_cuda.fwd(x, w, b, a, bb, 1.0, 0.0, None)
    y = torch.zeros(3, 5)
    A, Bt = torch.zeros(2, 4, 8), torch.zeros(2, 4, 5)
    ranks, sc = torch.ones(2, dtype=torch.int32), torch.ones(2)
    ids = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="needs CUDA tensors: x is on cpu"):
        multi_lora_cuda.add_lora_(y, x, A, Bt, ranks, sc, ids)


@needs_module
def test_launcher_errors_map_to_python_exceptions():
    C = _cuda.module()
    # argument errors: std::invalid_argument -> ValueError, before any CUDA call
    with pytest.raises(ValueError, match="lora_shrink: null pointer"):
        C.lora_shrink(0, 8, 4, 8, 0, 2, 0, 2, 0, 0.0, 0, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        C.lora_expand(16, 2, 16, 16, 8, 4, 8, 2, 1.0, 0, 0.0, 7, 0, 0)
    with pytest.raises(ValueError, match="dropout p"):
        C.lora_shrink(16, 8, 4, 8, 16, 2, 16, 2, 16, 1.5, 0, 0, 0)
    with pytest.raises(ValueError, match="seed"):
        C.lora_shrink(16, 8, 4, 8, 16, 2, 16, 2, 0, 0.5, 0, 0, 0)
    # grid limits: seg_expand's 32-token tiles give 2^31 blocks for T = 2^36 (gridDim.x limit)
    with pytest.raises(ValueError, match="too large"):
        C.multi_lora_prefill(0, 8, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1 << 36, 8, 8, 4, 2, 0, 0, 0)
    assert C.grad_ldp(5) == 8 and C.grad_ldp(8) == 8
    if torch.cuda.is_available():
        return  # the rest would launch on fake pointers
    # CUDA errors: std::runtime_error("<kernel>: <cuda error>") -> RuntimeError (no driver here)
    with pytest.raises(RuntimeError, match=r"^lora_shrink: "):
        C.lora_shrink(256, 8, 4, 8, 256, 2, 256, 2, 0, 0.0, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"^multi_lora_decode: "):
        C.multi_lora_decode(256, 8, 256, 8, 256, 256, 256, 256, 256, True, 4, 8, 8, 2, 2, 1, 0, 0)


@needs_module
@pytest.mark.timeout(400)
def test_wheel_contains_module(tmp_path):
    """``pip wheel .`` ships ``lora_kernels/_C*.so``. setup.py reuses its CMake build directory
    (build/cmake-<config hash>), so after ``pip install -e .`` this only relinks."""
    if not expect_module():
        pytest.skip("nvcc not found: the wheel is pure Python here")
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)]
    try:  # with this environment's pybind11: offline, and reuses the CMake build dir
        import pybind11  # noqa: F401

        cmd.append("--no-build-isolation")
    except ImportError:
        pass
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=380)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    wheels = list(tmp_path.glob("lora_kernels-*.whl"))
    assert len(wheels) == 1, list(tmp_path.iterdir())
    names = zipfile.ZipFile(wheels[0]).namelist()
    mods = [n for n in names if n.startswith("lora_kernels/_C") and n.endswith(".so")]
    assert mods, names
    assert "-none-any" not in wheels[0].name  # a platform wheel, since it carries the module


# ============================================================================ kernels: helpers
def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Same values in another memory layout (2-D t): 'contig'; 'rowpad' (row stride > width, rows
    stay 16-byte aligned: vector path with ld != width); 'offset' (starts one element into the
    buffer: unaligned rows, scalar path); 'colstep' (column stride 2: the wrapper copies)."""
    rows, cols = t.shape
    if kind == "contig":
        return t.clone()
    if kind == "colstep":
        buf = torch.full((rows, 2 * cols), float("nan"), dtype=t.dtype, device=t.device)
        buf[:, ::2] = t
        return buf[:, ::2]
    start = {"rowpad": 0, "offset": 1}[kind]
    buf = torch.full((rows, cols + 8 + start), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[:, start:start + cols]
    view.copy_(t)
    return view


def rnd(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def test_reference_philox_known_answers():
    """Random123's known-answer vectors for philox4x32_10 (kat_vectors)."""
    kats = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
            ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2,
             (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
            ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
             (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in kats:
        got = tuple(int(w) for w in philox4x32_10_np(*ctr, *key))
        assert got == want, [hex(w) for w in got]


# ============================================================================ kernels: LoRA
LORA_SHAPES = [(1, 97, 75, 1), (3, 64, 80, 7), (130, 97, 75, 16), (300, 256, 136, 33),
               (70, 128, 520, 64), (6, 40, 24, 256)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LORA_SHAPES)
@pytest.mark.parametrize("kind,p", [("contig", 0.0), ("contig", 0.3), ("rowpad", 0.3),
                                    ("offset", 0.3), ("colstep", 0.0)])
def test_lora_kernels_vs_float64(kdev, dtype, shape, kind, p):
    run_lora_case(kdev, dtype, shape, kind, p)


def run_lora_case(dev, dtype, shape, kind, p):
    """fwd + bwd of the CUDA backend on x / dy in ``kind`` layout (NaN padding) vs float64."""
    from lora_kernels.ops import lora_cuda

    T, in_f, out_f, r = shape
    s = 0.7
    x = rnd(T, in_f, dtype=dtype, device=dev)
    w = rnd(out_f, in_f, dtype=dtype, device=dev, scale=in_f ** -0.5)
    b = rnd(out_f, dtype=dtype, device=dev)
    A = rnd(r, in_f, dtype=dtype, device=dev, scale=in_f ** -0.5)
    B = rnd(out_f, r, dtype=dtype, device=dev, scale=r ** -0.5)
    dy = rnd(T, out_f, dtype=dtype, device=dev)
    x, dy = layout(x, kind), layout(dy, kind)
    seed = torch.tensor([123456789], dtype=torch.int64, device=dev)

    y, S = lora_cuda.fwd(x, w, b, A, B, s, p, seed)
    dx, dA, dB = lora_cuda.bwd(dy, Saved(x, w, A, B, S, s, p, seed), Needs(True, True, True))
    keep = lora_cuda.keep_mask(seed, T, in_f, p).cpu() if p > 0 else None

    f64 = [t.detach().cpu().double().requires_grad_() for t in (x, w, b, A, B)]
    x64, w64, b64, A64, B64 = f64
    y64 = ref_lora_linear(x64, w64, b64, A64, B64, s, keep=keep, dropout_p=p)
    y64.backward(dy.cpu().double())
    xd64 = x64.detach() if keep is None else x64.detach() * keep / (1 - p)
    check(y, y64, dtype, "y")
    check(S, xd64 @ A64.detach().t(), dtype, "S")
    check(dx, x64.grad, dtype, "dx")
    check(dA, A64.grad, dtype, "dA")
    check(dB, B64.grad, dtype, "dB")


def test_emulation_survives_padding_reading_gemm(monkeypatch):
    """Issue 10 on any CPU: with torch's GEMM replaced by one that reads row padding like oneDNN
    on AMX (tests/cuda/amx_sim.py), the emulated bf16 'rowpad' / 'offset' cases still pass,
    because the stand-in GEMM gets compact copies (compact_stand_in_gemms), while our kernels
    still read the NaN-padded originals. Without the compact copies the poison reaches y: the
    simulation is faithful and the poison still catches a padding read."""
    from amx_sim import padding_reading_linear, padding_reading_mm

    from lora_kernels.ops import lora_cuda

    # the reproducer, under the simulation
    sim_linear = padding_reading_linear(F.linear)
    x = torch.randn(130, 97).bfloat16()
    w = torch.randn(75, 97).bfloat16()
    buf = torch.full((130, 105), float("nan"), dtype=torch.bfloat16)
    v = buf[:, :97]
    v.copy_(x)
    assert torch.isnan(sim_linear(v, w)).all()
    assert torch.equal(sim_linear(v.contiguous(), w), F.linear(x, w))

    monkeypatch.setattr(F, "linear", sim_linear)
    monkeypatch.setattr(torch, "mm", padding_reading_mm(torch.mm))
    dev = use_emulation(monkeypatch)
    for kind in ("rowpad", "offset"):
        run_lora_case(dev, torch.bfloat16, (130, 97, 75, 16), kind, 0.3)

    # without the compact copies: the padding's NaN reaches y through the stand-in GEMM
    monkeypatch.undo()
    monkeypatch.setattr(F, "linear", sim_linear)
    dev = use_emulation(monkeypatch, compact_gemm_operands=False)
    xr = layout(x, "rowpad")
    y, _ = lora_cuda.fwd(xr, w, None, torch.randn(4, 97).bfloat16(), torch.randn(75, 4).bfloat16(),
                         0.5, 0.0, None)
    assert torch.isnan(y).all()


def test_dropout_mask_matches_reference_philox_and_rate(kdev):
    from lora_kernels.ops import lora_cuda

    seed_val, T, K, p = 987654321012345, 37, 101, 0.25
    seed = torch.tensor([seed_val], dtype=torch.int64, device=kdev)
    mask = lora_cuda.keep_mask(seed, T, K, p).cpu().numpy()
    assert (mask == philox_keep_reference(seed_val, T, K, p)).all()
    big = lora_cuda.keep_mask(seed, 512, 1024, p).float().mean().item()
    assert abs(big - (1 - p)) < 0.005


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_grads_deterministic(kdev, dtype):
    from lora_kernels.ops import lora_cuda

    dev = kdev
    T, in_f, out_f, r = 4099, 192, 160, 16
    x = rnd(T, in_f, dtype=dtype, device=dev)
    w = rnd(out_f, in_f, dtype=dtype, device=dev, scale=0.1)
    A = rnd(r, in_f, dtype=dtype, device=dev, scale=0.1)
    B = rnd(out_f, r, dtype=dtype, device=dev, scale=0.1)
    dy = rnd(T, out_f, dtype=dtype, device=dev)
    seed = torch.tensor([5], dtype=torch.int64, device=dev)
    _, S = lora_cuda.fwd(x, w, None, A, B, 2.0, 0.1, seed)
    g1 = lora_cuda.bwd(dy, Saved(x, w, A, B, S, 2.0, 0.1, seed), Needs(True, True, True))
    g2 = lora_cuda.bwd(dy, Saved(x, w, A, B, S, 2.0, 0.1, seed), Needs(True, True, True))
    for a, b_ in zip(g1, g2):
        assert torch.equal(a, b_)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_public_lora_linear_cuda_backend(dtype, p):
    """lora_linear(backend="cuda") end to end with autograd, leading dims and a seeded generator."""
    from lora_kernels.ops import lora_cuda
    from lora_kernels.ops._triton import draw_seed

    dev = torch.device("cuda")
    x = rnd(2, 5, 97, dtype=dtype, device=dev).requires_grad_()
    w = rnd(75, 97, dtype=dtype, device=dev, scale=0.1)
    b = rnd(75, dtype=dtype, device=dev)
    A = rnd(7, 97, dtype=dtype, device=dev, scale=0.1).requires_grad_()
    B = rnd(75, 7, dtype=dtype, device=dev, scale=0.3).requires_grad_()
    y = lora_kernels.lora_linear(x, w, b, A, B, 0.5, p, generator=torch.Generator().manual_seed(3),
                                 backend="cuda")
    dy = rnd(*y.shape, dtype=dtype, device=dev)
    y.backward(dy)
    keep = None
    if p > 0:
        seed = draw_seed(torch.Generator().manual_seed(3), dev)
        keep = lora_cuda.keep_mask(seed, 10, 97, p).cpu().reshape(2, 5, 97)
    x64, A64, B64 = (t.detach().cpu().double().requires_grad_() for t in (x, A, B))
    y64 = ref_lora_linear(x64, w.cpu().double(), b.cpu().double(), A64, B64, 0.5, keep=keep,
                          dropout_p=p)
    y64.backward(dy.cpu().double())
    check(y, y64, dtype, "y")
    check(x.grad, x64.grad, dtype, "dx")
    check(A.grad, A64.grad, dtype, "dA")
    check(B.grad, B64.grad, dtype, "dB")


def test_lora_zero_tokens(kdev):
    from lora_kernels.ops import lora_cuda

    dev = kdev
    x = torch.empty(0, 16, device=dev)
    w, A, B = torch.randn(8, 16, device=dev), torch.randn(4, 16, device=dev), torch.randn(8, 4,
                                                                                         device=dev)
    y, S = lora_cuda.fwd(x, w, None, A, B, 1.0, 0.0, None)
    assert y.shape == (0, 8) and S.shape == (0, 4)
    dx, dA, dB = lora_cuda.bwd(torch.empty(0, 8, device=dev), Saved(x, w, A, B, S, 1.0, 0.0, None),
                               Needs(True, True, True))
    assert dx.shape == (0, 16) and torch.equal(dA, torch.zeros_like(A))
    assert torch.equal(dB, torch.zeros_like(B))


# ============================================================================ kernels: serving
def make_pool(M, R, in_f, out_f, ranks, dtype, dev):
    A = torch.zeros(M, R, in_f, dtype=dtype, device=dev)
    Bt = torch.zeros(M, R, out_f, dtype=dtype, device=dev)
    for i, r in enumerate(ranks):
        A[i, :r] = rnd(r, in_f, dtype=dtype, device=dev, scale=in_f ** -0.5)
        Bt[i, :r] = rnd(r, out_f, dtype=dtype, device=dev, scale=max(r, 1) ** -0.5)
    rk = torch.tensor(ranks, dtype=torch.int32, device=dev)
    sc = torch.tensor([0.5 + 0.25 * i for i in range(M)], dtype=torch.float32, device=dev)
    return A, Bt, rk, sc


def multi_reference(y0, x, A, Bt, ranks, scalings, ids):
    y = y0.detach().cpu().double().clone()
    x64, A64, B64 = (t.cpu().double() for t in (x, A, Bt))
    for t, i in enumerate(ids.cpu().tolist()):
        if i < 0:
            continue
        r = int(ranks[i])
        y[t] += float(scalings[i]) * (x64[t] @ A64[i, :r].t()) @ B64[i, :r]
    return y


MULTI_SHAPES = [(1, 97, 75), (5, 64, 128), (70, 97, 75), (200, 256, 264), (9, 4096, 4096)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MULTI_SHAPES)
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_multi_lora_vs_float64(kdev, dtype, shape, mode, id_dtype):
    from lora_kernels.ops.multi_lora import cuda_backend as multi_lora_cuda

    dev = kdev
    T, in_f, out_f = shape
    ranks = [1, 7, 16, 3, 16]
    M, R = len(ranks) + 1, 16  # the last slot is never used
    A, Bt, rk, sc = make_pool(M, R, in_f, out_f, ranks + [0], dtype, dev)
    ids = torch.randint(-1, len(ranks), (T,), generator=torch.Generator().manual_seed(T))
    ids[0] = 2
    ids = ids.to(id_dtype).to(dev)
    # int32 ids with unaligned x / y rows (scalar paths), int64 with padded aligned rows
    kind = "offset" if id_dtype == torch.int32 else "rowpad"
    x = layout(rnd(T, in_f, dtype=dtype, device=dev), kind)
    y0 = rnd(T, out_f, dtype=dtype, device=dev)
    y = layout(y0, kind)
    out = multi_lora_cuda.add_lora_(y, x, A, Bt, rk, sc, ids, mode=mode)
    assert out is y
    check(y, multi_reference(y0, x, A, Bt, rk, sc, ids), dtype, f"y ({mode})")
    skipped = ids == -1
    assert torch.equal(y[skipped], y0[skipped])


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_multi_lora_large_ranks(kdev, mode):
    """Ranks up to 256 in one pool (decode's rank-r shared buffer, prefill's rank tiles)."""
    from lora_kernels.ops.multi_lora import cuda_backend as multi_lora_cuda

    dev = kdev
    T, in_f, out_f = 11, 48, 40
    A, Bt, rk, sc = make_pool(3, 256, in_f, out_f, [256, 1, 130], torch.float32, dev)
    ids = torch.tensor([0, 1, 2, -1, 2, 0, 1, 0, 2, 2, -1], device=dev)
    x = rnd(T, in_f, dtype=torch.float32, device=dev)
    y0 = rnd(T, out_f, dtype=torch.float32, device=dev)
    y = y0.clone()
    multi_lora_cuda.add_lora_(y, x, A, Bt, rk, sc, ids, mode=mode)
    check(y, multi_reference(y0, x, A, Bt, rk, sc, ids), torch.float32, f"y ({mode})")


def test_multi_lora_bad_ids_rejected(kdev):
    from lora_kernels.ops.multi_lora import cuda_backend as multi_lora_cuda

    dev = kdev
    A, Bt, rk, sc = make_pool(2, 4, 16, 8, [4, 2], torch.float32, dev)
    x, y = torch.randn(3, 16, device=dev), torch.zeros(3, 8, device=dev)
    with pytest.raises(ValueError, match="adapter_ids"):
        multi_lora_cuda.add_lora_(y, x, A, Bt, rk, sc, torch.tensor([0, 2, -1], device=dev))
    # unchecked, an out-of-range id is skipped (no out-of-bounds read)
    multi_lora_cuda.add_lora_(y, x, A, Bt, rk, sc, torch.tensor([5, -3, 7], device=dev),
                              check_ids=False)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_multi_lora_y_is_x(kdev, mode):
    """In place on x itself (in == out). 2 tokens on the emulated 4 SMs (or a GPU's) make the
    decode kernel split each token's 512 columns over several blocks, each re-reading x[t]: the
    wrapper must give it a copy of x, or one slice's writes reach another slice's shrink."""
    from lora_kernels.ops.multi_lora import cuda_backend as multi_lora_cuda

    dev = kdev
    T, n = 2, 512
    A, Bt, rk, sc = make_pool(3, 8, n, n, [8, 5, 0], torch.float32, dev)
    x0 = rnd(T, n, dtype=torch.float32, device=dev)
    ids = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    want = multi_reference(x0, x0, A, Bt, rk, sc, ids)
    x = x0.clone()
    assert multi_lora_cuda.add_lora_(x, x, A, Bt, rk, sc, ids, mode=mode) is x
    check(x, want, torch.float32, f"y is x ({mode})")


@gpu
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_multi_lora_cuda_graph_replay(mode):
    """Capture one decode (or prefill) step in a CUDA graph, replay it on new inputs, new ids and
    with an adapter of another rank swapped into a slot between replays (the kernels read ranks
    and factors from the pool tensors, so the captured graph serves whatever the slots hold;
    tests/test_store.py does the same through the AdapterStore's side-stream copies)."""
    from lora_kernels.ops.multi_lora import cuda_backend as multi_lora_cuda

    dev = torch.device("cuda")
    dtype = torch.bfloat16
    T, in_f, out_f = 64, 512, 384
    A, Bt, rk, sc = make_pool(8, 16, in_f, out_f, [16, 4, 8, 1, 16, 12, 2, 16], dtype, dev)
    x = rnd(T, in_f, dtype=dtype, device=dev)
    y0 = rnd(T, out_f, dtype=dtype, device=dev)
    ids = torch.randint(-1, 8, (T,), device=dev)
    y = torch.empty_like(y0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (module load, allocator) outside the capture
        for _ in range(2):
            y.copy_(y0)
            multi_lora_cuda.add_lora_(y, x, A, Bt, rk, sc, ids, mode=mode)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.copy_(y0)
        multi_lora_cuda.add_lora_(y, x, A, Bt, rk, sc, ids, mode=mode)

    for step in range(3):
        x.copy_(rnd(T, in_f, dtype=dtype, device=dev))
        ids.copy_(torch.randint(-1, 8, (T,), generator=torch.Generator().manual_seed(step)))
        slot, r_new = (3 * step + 1) % 8, [5, 16, 1][step]      # swap an adapter in
        A[slot].zero_()
        Bt[slot].zero_()
        A[slot, :r_new] = rnd(r_new, in_f, dtype=dtype, device=dev, scale=in_f ** -0.5)
        Bt[slot, :r_new] = rnd(r_new, out_f, dtype=dtype, device=dev, scale=r_new ** -0.5)
        rk[slot], sc[slot] = r_new, 0.3 + step
        graph.replay()
        eager = y0.clone()
        multi_lora_cuda.add_lora_(eager, x, A, Bt, rk, sc, ids, mode=mode)
        torch.cuda.synchronize()
        assert torch.equal(y, eager), f"replay {step} differs from eager"
        check(y, multi_reference(y0, x, A, Bt, rk, sc, ids), dtype, "graph replay")


def test_reference_philox_statistics():
    """The numpy reference used by the GPU mask test: right keep rate, reproducible per seed."""
    m = philox_keep_reference(42, 64, 257, 0.3)
    assert abs(m.mean() - 0.7) < 0.02
    assert (m == philox_keep_reference(42, 64, 257, 0.3)).all()
    assert not (m == philox_keep_reference(43, 64, 257, 0.3)).all()
    assert math.isclose(philox_keep_reference(1, 8, 8, 0.0).mean(), 1.0)
