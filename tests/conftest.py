"""Shared test fixtures.

Device: CPU by default (Triton through TRITON_INTERPRET=1); ``LORA_KERNELS_TEST_DEVICE=cuda``
(set by ``python -m lora_kernels.check --gpu``) runs the same suite on the GPU.
"""

import os

# every kernel output buffer starts as NaN (lora_kernels.ops._triton.empty): unwritten elements show
os.environ.setdefault("LORA_KERNELS_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = torch.device(os.environ.get("LORA_KERNELS_TEST_DEVICE", "cpu"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# DESIGN.md tolerances on ||out - ref|| / ||ref|| against float64
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def backends():
    """Backends runnable here: torch always; triton (interpreter on CPU); cuda only on a GPU."""
    out = ["torch"]
    try:
        import triton  # noqa: F401

        if DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            out.append("triton")
    except ImportError:
        pass
    if DEVICE.type == "cuda":
        import lora_kernels

        if lora_kernels.cuda_available():
            out.append("cuda")
    return out


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (the CPU multi-LoRA cost model divides FLOP costs by
    the thread count: tests that assert its choice pin it), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
