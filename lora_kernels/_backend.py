"""Backend selection: which implementation runs an op.

``backend=None`` resolves, in order, to the ``LORA_KERNELS_BACKEND`` environment variable, else
the fastest backend *verified* for the tensors' device:

* CPU tensors: ``"torch"`` (the plain-PyTorch reference path).
* CUDA tensors: ``"cuda"`` if that op's CUDA kernel is listed in :data:`VERIFIED_ON_GPU`, else
  ``"triton"`` if its Triton kernel is listed there, else ``"torch"``.

:data:`VERIFIED_ON_GPU` is read from ``lora_kernels/verified_gpu.json``, written only by
``python -m lora_kernels.check --apply`` from a GPU session's committed results: a kernel that has
only been compiled, or run through Triton's interpreter, is never picked implicitly.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "LORA_KERNELS_BACKEND"

def _load_verified() -> tuple[frozenset[tuple[str, str]], dict[str, str]]:
    """(backend, op) pairs that passed the float64-referenced suite on a real GPU, and the
    defaults the GPU benchmark chose (op -> backend to prefer when both kernels are verified;
    the multi-LoRA prefill path), from ``lora_kernels/verified_gpu.json``, which only
    ``python -m lora_kernels.check --apply RESULTS_DIR`` writes from a committed GPU session's
    results (a pair counts only when all of its planned tests ran and passed). Empty: no GPU run
    has been made yet (README "What is verified where"). Explicit backend="triton" / "cuda" still
    runs those kernels. A package without the file (it ships in the wheel) verifies nothing."""
    import json
    from pathlib import Path

    path = Path(__file__).with_name("verified_gpu.json")
    doc = json.loads(path.read_text()) if path.exists() else {}
    pairs = frozenset((str(b), str(o)) for b, o in doc.get("verified", []))
    return pairs, {str(k): str(v) for k, v in doc.get("defaults", {}).items()}


VERIFIED_ON_GPU, MEASURED_DEFAULTS = _load_verified()


def triton_interpret() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_ERR: list[str | None] = []  # filled on first use (plain cache: dynamo-traceable)


def _triton_import_error() -> str | None:
    if not _TRITON_ERR:
        try:
            import triton  # noqa: F401

            _TRITON_ERR.append(None)
        except ImportError as e:  # reported by triton_available()/the backend error, not hidden
            _TRITON_ERR.append(f"{type(e).__name__}: {e}")
    return _TRITON_ERR[0]


def triton_available() -> bool:
    """Whether the ``triton`` package imports (a device is checked per call, not here)."""
    return _triton_import_error() is None


def cuda_available() -> bool:
    """Whether the compiled module ``lora_kernels._C`` imports *and* a CUDA device is usable."""
    from . import _cuda

    return _cuda.module_error() is None and torch.cuda.is_available()


def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """Return the backend that runs ``op`` on ``device``; raise ``ValueError`` if it cannot."""
    if backend is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(
                        f"{ENV_VAR}={env!r} is not a backend; expected one of {BACKENDS}")
            backend = env
    if backend is None:
        if device.type == "cuda":
            order = ("cuda", "triton")
            if MEASURED_DEFAULTS.get(op) == "triton":  # measured faster on a GPU
                order = ("triton", "cuda")
            for be in order:
                usable = cuda_available() if be == "cuda" else triton_available()
                if (be, op) in VERIFIED_ON_GPU and usable:
                    return be
        return "torch"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise ValueError(
                f"backend='triton' needs the triton package ({_triton_import_error()}); "
                "pip install triton"
            )
        if device.type == "cpu" and not triton_interpret():
            raise ValueError(
                "backend='triton' on CPU tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing triton, or use backend='torch'"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' supports cuda (and cpu via the interpreter), "
                             f"got device {device}")
    if backend == "cuda":
        from . import _cuda

        err = _cuda.module_error()
        if err is not None:
            raise ValueError(f"backend='cuda' is unavailable: {err}")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not _cuda.has_op(op):
            raise ValueError(f"backend='cuda' has no kernel for {op!r}; use 'triton' or 'torch'")
    return backend
