"""Every Triton kernel compiles with Triton's GPU compiler for sm_80 and sm_90 (no GPU needed).

Representative public calls run under the interpreter while their launches are recorded
(tests/cuda/aot_tools.py); a fresh process without the interpreter then compiles each distinct
launch signature to a cubin. This catches what the interpreter accepts but the GPU compiler
rejects. It does not show the kernels run correctly on a GPU: that needs
``python -m lora_kernels.check --gpu``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_kernels as lk

from conftest import DEVICE

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or DEVICE.type != "cpu",
    reason="records launches through the interpreter; on a GPU the suite runs the kernels instead",
)

HERE = Path(__file__).parent


def _calls():
    """One call per kernel role and dtype, small shapes: LoRA (fwd, bwd, dropout), GLoRA (every
    support mode), multi-LoRA (decode, prefill, backward)."""
    from test_glora import CONFIGS, FULL, _shrink, _supports

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(5, 24, dtype=dtype, requires_grad=True)
        w, b = torch.randn(20, 24, dtype=dtype), torch.randn(20, dtype=dtype)
        a = torch.randn(4, 24, dtype=dtype, requires_grad=True)
        bb = torch.randn(20, 4, dtype=dtype, requires_grad=True)
        g = torch.Generator().manual_seed(0)
        for p in (0.0, 0.1):
            y = lk.lora_linear(x, w, b, a, bb, 0.5, p, generator=g, backend="triton")
            y.sum().backward()
            # DoRA: the ROW_SCALE / X_SCALE flags of gemm_lowrank_kernel and keep_mask_kernel
            m = torch.rand(20, dtype=dtype).add_(0.5).requires_grad_(True)
            y = lk.dora_linear(x, w, b, a, bb, m, 0.5, p, generator=g, backend="triton")
            y.sum().backward()

        pool = lk.AdapterPool(24, 20, 3, 8, dtype=dtype)
        pool.add("a", torch.randn(3, 24), torch.randn(20, 3), 0.5)
        pool.add("b", torch.randn(5, 24), torch.randn(20, 5), 2.0)
        pool.requires_grad_()
        for T, path in ((5, "decode"), (40, "prefill"), (40, "prefill_fused")):
            xm = torch.randn(T, 24, dtype=dtype, requires_grad=True)
            ids = torch.tensor([0, 1, -1, 1, 0] * (T // 5))
            y = lk.multi_lora_linear(xm, w, b, pool, ids, backend="triton", path=path)
            y.sum().backward()

    from lora_kernels.ops import lora_tma
    from lora_kernels.quant import quantize

    for dtype in (torch.bfloat16,):  # DoRA (row scale) and QLoRA (NF4 base), the target dtype
        x = torch.randn(5, 64, dtype=dtype, requires_grad=True)
        w, b = torch.randn(32, 64, dtype=dtype), torch.randn(32, dtype=dtype)
        a = torch.randn(4, 64, dtype=dtype, requires_grad=True)
        bb = torch.randn(32, 4, dtype=dtype, requires_grad=True)
        g = torch.Generator().manual_seed(0)
        for p in (0.0, 0.1):
            lk.dora_linear(x, w, b, a, bb, torch.rand(32, dtype=dtype) + 0.5, 0.5, p,
                           generator=g, backend="triton").sum().backward()
        lk.lora_linear(x, quantize(w, "nf4"), b, a, bb, 0.5, 0.1, generator=g,
                       backend="triton").sum().backward()

    for dtype in (torch.float32, torch.bfloat16):  # the TMA-descriptor candidate, with dropout
        x, w = torch.randn(5, 24, dtype=dtype), torch.randn(16, 24, dtype=dtype)
        a, bb = torch.randn(4, 24, dtype=dtype), torch.randn(16, 4, dtype=dtype)
        seed = torch.tensor([3])
        y, s = lora_tma.fwd(x, w, None, a, bb, 0.5, 0.1, seed)
        lora_tma.bwd(torch.randn(5, 16, dtype=dtype),
                     lora_tma.Saved(x, w, a, bb, s, 0.5, 0.1, seed),
                     lora_tma.Needs(True, False, False))

    for cfg, dtype in ((FULL, torch.bfloat16), (CONFIGS["vec-scalar"], torch.float16),
                       (CONFIGS["mixed"], torch.float32)):
        x = torch.randn(5, 24, dtype=dtype, requires_grad=True)
        w = torch.randn(20, 24, dtype=dtype)
        sup = {k: _shrink(v) for k, v in _supports({**cfg, "C": "none"}, 3, dtype).items()}
        lk.glora_linear(x, w, None, **sup, backend="triton").sum().backward()
    __import__("test_quant").aot_calls()  # quantized bases (kernels.quant)
    __import__("test_moe_lora").aot_calls()  # MoE-LoRA grouped GEMM (kernels.moe)
    __import__("test_embedding_lora").aot_calls()  # embedding LoRA (kernels.embedding)


def recorded_launches() -> list:
    """Every kernel's distinct launches (one per JIT specialisation) of :func:`_calls`."""
    sys.path.insert(0, str(HERE))
    from aot_tools import dedupe, record_launches

    launches = []
    with record_launches(launches):
        _calls()
    return dedupe(launches)


@pytest.mark.timeout(900)
def test_all_kernels_compile_for_sm80_sm90(tmp_path):
    launches = recorded_launches()
    names = {ln["name"] for ln in launches}
    assert names == {"gemm_lowrank_kernel", "tn_kernel", "glora_gemm_kernel", "bgmv_kernel",
                     "sgmv_kernel", "seg_tn_kernel", "sgmv_gemm_kernel",
                     "gemm_lowrank_tma_kernel", "keep_mask_kernel", "qgemm_lowrank_kernel",
                     "splitk_epilogue_kernel", "moe_shrink_kernel", "moe_gemm_kernel",
                     "moe_seg_tn_kernel", "embedding_lora_fwd_kernel", "embedding_lora_dyb_kernel",
                     "embedding_lora_db_kernel"}, names
    flags = {(ln["constexprs"]["ROW_SCALE"], ln["constexprs"]["X_SCALE"]) for ln in launches
             if ln["name"] == "gemm_lowrank_kernel"}
    assert flags == {(False, False), (True, False), (False, True)}, flags
    modes = {(ln["constexprs"]["A_MODE"], ln["constexprs"]["B_MODE"]) for ln in launches
             if ln["name"] == "glora_gemm_kernel"}
    assert modes == {(4, 4), (2, 1), (3, 1), (1, 2), (1, 3)}, modes
    assert {ln["constexprs"]["STORE_S"] for ln in launches if ln["name"] == "sgmv_kernel"} == {
        True, False}
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches, default=str))
    root = str(HERE.parents[1])
    pypath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": pypath}
    proc = subprocess.run([sys.executable, str(HERE / "aot_tools.py"), "compile", str(path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "AOT OK" in proc.stdout
