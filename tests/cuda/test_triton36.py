"""Every Triton kernel compiles with the GPU machine's Triton (3.6), and the committed static
profile (bench/results/static-sm90.json, made with that Triton) is current and clean.

The GPU machine has torch 2.11 and Triton 3.6; CI has newer ones. A throw-away virtual environment
(``python -m venv --system-site-packages``: this torch, plus ``pip install triton==3.6.0``; cached
under ~/.cache/lora_kernels/triton-3.6.0, or ``$LORA_KERNELS_TRITON36_VENV``) runs

* the ahead-of-time compile (tests/cuda/aot_tools.py) of every kernel code path's recorded
  launch (one per kernel and constexpr set, bf16 where recorded) for sm_90, JIT-specialised, so
  that an API break shows here, not on the first GPU run;
* ``python -m lora_kernels.bench.static --check``: the profile's rows are exactly the current
  headline launches x autotune candidates, two headline GEMM rows recompile to the same
  registers / spills / MMA / load width, and ``check_rows`` passes (tensor cores, 16-byte
  operand loads and no spills in every headline base GEMM on sm_90; no GEMM candidate spills).

Creating the environment needs the package index (~30 s once); if it cannot be reached the test
fails with pip's message. ``LORA_KERNELS_SKIP_TRITON36=1`` opts out explicitly (reported as a
skip with that reason).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEVICE

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
VERSION = "3.6.0"
VENV = Path(os.environ.get("LORA_KERNELS_TRITON36_VENV",
                           Path.home() / ".cache" / "lora_kernels" / f"triton-{VERSION}"))

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or DEVICE.type != "cpu",
    reason="CPU suite (records launches through the interpreter); the GPU runs the kernels",
)


def _venv_triton(py: Path) -> str | None:
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", "import triton; print(triton.__version__)"],
                       capture_output=True, text=True, timeout=120)
    return r.stdout.strip() if r.returncode == 0 else None


@pytest.fixture(scope="module")
def py36() -> Path:
    if os.environ.get("LORA_KERNELS_SKIP_TRITON36") == "1":
        pytest.skip("LORA_KERNELS_SKIP_TRITON36=1: the Triton 3.6 compile was opted out")
    py = VENV / "bin" / "python"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    # one creator at a time: pytest-xdist workers may reach this fixture together
    with open(VENV.parent / f".triton-{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _venv_triton(py) != VERSION:
            r = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages",
                                str(VENV)], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
            r = subprocess.run([str(py), "-m", "pip", "install", "-q", f"triton=={VERSION}"],
                               capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, "pip install triton==3.6.0 failed:\n" + r.stderr[-3000:]
    assert _venv_triton(py) == VERSION, _venv_triton(py)
    return py


def _env() -> dict:
    pypath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
            "PYTHONPATH": pypath}


def representatives(launches: list) -> list:
    """One launch per kernel code path (name + constexprs other than the dtype-derived
    PRECISION / UPCAST), the bf16 one where there is one: every path is compiled once with
    Triton 3.6 (the 3.9 test compiles every dtype and specialisation)."""
    groups: dict[str, list] = {}
    for ln in launches:
        key = json.dumps([ln["name"], {k: v for k, v in ln["constexprs"].items()
                                       if k not in ("PRECISION", "UPCAST")}],
                         sort_keys=True, default=str)
        groups.setdefault(key, []).append(ln)

    def bf16(ln):
        return any(isinstance(v, dict) and v.get("tensor") == "bf16" for v in ln["args"].values())

    return [next((ln for ln in g if bf16(ln)), g[0]) for g in groups.values()]


@pytest.mark.timeout(900)
def test_all_kernels_compile_with_triton_3_6(py36, tmp_path):
    from test_triton_aot import recorded_launches

    launches = representatives(recorded_launches())
    assert {ln["name"] for ln in launches} == {
        "gemm_lowrank_kernel", "tn_kernel", "glora_gemm_kernel", "bgmv_kernel", "sgmv_kernel",
        "seg_tn_kernel", "sgmv_gemm_kernel", "gemm_lowrank_tma_kernel", "keep_mask_kernel",
        "qgemm_lowrank_kernel", "splitk_epilogue_kernel", "embedding_lora_fwd_kernel",
        "embedding_lora_dyb_kernel", "embedding_lora_db_kernel", "moe_shrink_kernel",
        "moe_gemm_kernel", "moe_seg_tn_kernel"}
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches, default=str))
    proc = subprocess.run([str(py36), str(HERE / "aot_tools.py"), "compile", str(path),
                           "--archs", "90", "--no-tuned"],
                          capture_output=True, text=True, env=_env(), timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"AOT OK: {len(launches)} distinct launches, triton {VERSION}" in proc.stdout


@pytest.mark.timeout(600)
def test_static_profile_is_current_and_clean(py36):
    proc = subprocess.run([str(py36), "-m", "lora_kernels.bench.static", "--check",
                           str(ROOT / "bench" / "results" / "static-sm90.json"), "--spot", "2"],
                          capture_output=True, text=True, env=_env(), timeout=580, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "0 problems" in proc.stdout


def _row(**kw):
    row = {"kernel": "gemm_lowrank_kernel", "launch": "train fwd", "config": "M128 N128 K64 w8 s3",
           "arch": "sm_90", "MNK": [8192, 4096, 4096], "spill_stores": 0, "spill_loads": 0,
           "hgmma": 6, "hmma": 0, "global_load_bytes_max": 16}
    row.update(kw)
    return row


def test_check_rows_flags_each_defect():
    """The profile check can fail: fabricated rows with each defect are reported."""
    from lora_kernels.bench.static import check_rows

    assert check_rows([_row()]) == []
    assert "spills" in check_rows([_row(spill_stores=3)])[0]
    assert "tensor-core" in check_rows([_row(hgmma=0)])[0]
    assert check_rows([_row(hgmma=0, hmma=4)]) == []
    assert "16 B" in check_rows([_row(global_load_bytes_max=2)])[0]
    assert check_rows([_row(hgmma=0, MNK=[8192, 16, 4096])]) == []   # a rank-r shrink
    assert check_rows([_row(hgmma=0, arch="sm_80")]) == []            # sm_90 rule only


def test_parse_sass_counts():
    """The SASS reader on a hand-written excerpt (opcodes as cuobjdump prints them)."""
    from lora_kernels.bench.static import parse_sass

    sass = """
        /*0070*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR8][R2.64] ;
        /*0080*/              @!P0 LDG.E.U16 R7, desc[UR8][R8.64] ;
        /*0090*/                   LDG.E R9, desc[UR8][R8.64] ;
        /*00a0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*00b0*/                   STL.64 [R1], R10 ;
        /*00c0*/                   LDL R12, [R1+0x8] ;
        /*00d0*/               @P1 FFMA R3, R4, R5, R6 ;
    """
    p = parse_sass(sass, "Function k: REG:168 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:900")
    assert (p["regs"], p["stack_bytes"], p["spill_stores"], p["spill_loads"]) == (168, 8, 1, 1)
    assert (p["hgmma"], p["hmma"], p["ffma"]) == (1, 0, 1)
    assert p["global_loads_by_bytes"] == {"2": 1, "4": 1, "16": 1}
    assert p["widest_global_load"] == "LDGSTS 16 B" and p["cp_async"] and not p["tma"]
