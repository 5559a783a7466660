"""lora_embedding / multi_lora_embedding (issue 23): embedding LoRA (PEFT's lora.Embedding) against
a float64 F.embedding reference on odd shapes, every dtype and backend, forward and every
gradient; served lookups per token; bad input refused before any kernel runs."""

import pytest
import torch
import torch.nn.functional as F

import lora_kernels as lk
from lora_kernels.ops.embedding import LORA_EMBEDDING_OP, MULTI_LORA_EMBEDDING_OP

from conftest import DEVICE, DTYPES
from helpers import assert_close, noncontig, randn

BACKENDS = ["torch", "triton"]
# (num_embeddings, dim, r, ids shape, padding_idx)
CASES = [(37, 23, 5, (13,), 4), (11, 16, 1, (1,), None), (53, 40, 17, (2, 9), 0)]


def _backends():
    from conftest import backends

    return [b for b in BACKENDS if b in backends()]


def _ref(ids, W, A, B, s, pad):
    """PEFT's lora.Embedding forward, in float64 (a trained base table: nn.Embedding's padding
    rule too)."""
    low = F.embedding(ids, A.t(), padding_idx=pad) @ B.t()
    return F.embedding(ids, W, padding_idx=pad) + low * s


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_float64(backend, dtype, case):
    num, dim, r, shape, pad = case
    ids = torch.randint(0, num, shape, device=DEVICE)
    if pad is not None:
        ids.view(-1)[0] = pad
    W, A, B = randn(num, dim, dtype=dtype), randn(r, num, dtype=dtype), randn(dim, r, dtype=dtype)
    W, A, B = noncontig(W), noncontig(A), noncontig(B)      # strided views of every operand
    train_w = case is CASES[2]
    W.requires_grad_(train_w)
    A.requires_grad_()
    B.requires_grad_()
    y = lk.lora_embedding(ids, W, A, B, 0.7, padding_idx=pad, backend=backend)
    W64, A64, B64 = (t.detach().double().requires_grad_() for t in (W, A, B))
    y64 = _ref(ids, W64, A64, B64, 0.7, pad)
    assert y.shape == (*shape, dim) and y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    dy = torch.randn(y64.shape, dtype=torch.float64, device=DEVICE)
    y.backward(dy.to(dtype))
    y64.backward(dy)
    assert_close(A.grad, A64.grad, dtype, "dA")
    assert_close(B.grad, B64.grad, dtype, "dB")
    if train_w:
        assert_close(W.grad, W64.grad, dtype, "dW")
    # sparse: the columns of A no token touched (and the padding column) get exactly zero
    untouched = torch.ones(num, dtype=torch.bool, device=DEVICE)
    untouched[ids.reshape(-1)] = False
    if pad is not None:
        untouched[pad] = True
    assert (A.grad[:, untouched] == 0).all()


@pytest.mark.parametrize("backend", _backends())
def test_only_requested_gradients(backend):
    ids = torch.randint(0, 19, (5,), device=DEVICE)
    W, A, B = randn(19, 16), randn(3, 19), randn(16, 3, requires_grad=True)
    lk.lora_embedding(ids, W, A, B, 2.0, backend=backend).sum().backward()
    assert A.grad is None and W.grad is None and B.grad is not None


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_served_lookup_per_token(backend, dtype):
    num, dim = 29, 21
    pool = lk.AdapterPool(num, dim, 4, 8, dtype=dtype, device=DEVICE)
    for k, r in enumerate((1, 5, 8)):
        pool.add(f"a{k}", randn(r, num), randn(dim, r), 0.5 + k)
    W = randn(num, dim, dtype=dtype)
    ids = torch.randint(0, num, (3, 6), device=DEVICE)
    slots = torch.tensor([[2] * 6, [-1] * 6, [0, 0, 1, 1, -1, 2]], device=DEVICE)
    y = lk.multi_lora_embedding(ids, W, pool, slots, backend=backend)
    ref = F.embedding(ids, W.double())
    for b in range(3):
        for t in range(6):
            k = int(slots[b, t])
            if k >= 0:
                A, B, s = pool.get(f"a{k}")
                ref[b, t] += s * (A[:, ids[b, t]].double() @ B.double().t())
    assert_close(y, ref, dtype, "served")
    assert torch.equal(y[1], F.embedding(ids[1], W))         # base-only rows: the plain lookup


def test_bad_input_refused_before_any_kernel():
    W, A, B = randn(10, 8), randn(2, 10, requires_grad=True), randn(8, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\).*\[0, 10\]"):
        lk.lora_embedding(torch.tensor([0, 10], device=DEVICE), W, A, B)
    with pytest.raises(ValueError, match="ids must lie"):
        lk.lora_embedding(torch.tensor([-1], device=DEVICE), W, A, B)
    with pytest.raises(TypeError, match="ids must be an int64/int32"):
        lk.lora_embedding(torch.zeros(3, device=DEVICE), W, A, B)
    with pytest.raises(ValueError, match=r"lora_A must have shape \(2, 10\)"):
        lk.lora_embedding(torch.tensor([1], device=DEVICE), W, randn(2, 11), B)
    with pytest.raises(ValueError, match=r"lora_B must have shape \(8, 2\)"):
        lk.lora_embedding(torch.tensor([1], device=DEVICE), W, A, randn(9, 2))
    with pytest.raises(ValueError, match="padding_idx"):
        lk.lora_embedding(torch.tensor([1], device=DEVICE), W, A, B, padding_idx=10)
    assert A.grad is None and B.grad is None
    pool = lk.AdapterPool(10, 8, 2, 4, device=DEVICE)
    pool.add("a", randn(2, 10), randn(8, 2), 1.0)
    with pytest.raises(ValueError, match=r"slot_ids must lie in \[-1, 2\)"):
        lk.multi_lora_embedding(torch.tensor([1], device=DEVICE), W, pool,
                                torch.tensor([2], device=DEVICE))
    with pytest.raises(ValueError, match="num_embeddings"):
        lk.multi_lora_embedding(torch.tensor([1], device=DEVICE), randn(11, 8), pool,
                                torch.tensor([0], device=DEVICE))


def test_registered_op_opcheck():
    ids = torch.randint(0, 13, (6,), device=DEVICE)
    W, A = randn(13, 16), randn(3, 13, requires_grad=True)
    B = randn(16, 3, requires_grad=True)
    torch.library.opcheck(LORA_EMBEDDING_OP.custom_op, (ids, W, A, B, 0.5, 2, "torch"))
    pool = lk.AdapterPool(13, 16, 3, 4, device=DEVICE)
    pool.add("a", randn(2, 13), randn(16, 2), 0.5)
    view = pool.view()
    slots = torch.tensor([0, -1, 0, 0, -1, 0], device=DEVICE)
    torch.library.opcheck(MULTI_LORA_EMBEDDING_OP.custom_op, (
        ids, slots, W, view.lora_A, view.lora_Bt, view.scalings, view.rank_bound, "torch"))


def test_bench_rows_run_and_agree_with_their_reference():
    """The ``embedding`` bench group end to end on tiny shapes (no timing asserted): every row
    runs and matches the case's reference."""
    from lora_kernels.bench.cases_embedding import embedding_case, lm_head_case
    from lora_kernels.bench.harness import Budget, Peaks, run_cases

    cpu = torch.device("cpu")
    cases = [embedding_case(64, 97, 16, 4, torch.float32, cpu),
             lm_head_case(4, 16, 97, 2, torch.float32, cpu)]
    rows = run_cases(cases, cpu, Peaks(cpu, quick=True),
                     Budget(warmup_ms=0.0, rep_ms=1.0, min_reps=2, max_reps=3),
                     show_progress=False)
    assert {r["impl"] for r in rows} == {"base_lookup", "ours_default", "peft", "eager", "base",
                                         "loop"}
    for r in rows:
        assert r["status"] == "ok", r
        if r["impl"] in ("ours_default", "peft"):
            assert r["rel_err_vs_ref"] < 1e-5, r


def test_layer_refuses_embeddings_it_would_compute_wrong():
    class Scaled(torch.nn.Embedding):          # Gemma-style: the lookup times a scale
        def forward(self, ids):
            return super().forward(ids) * 3.0

    with pytest.raises(ValueError, match="Scaled with its own forward"):
        lk.LoRAEmbedding.from_embedding(Scaled(10, 4), r=2)
    with pytest.raises(ValueError, match="max_norm"):
        lk.LoRAEmbedding.from_embedding(torch.nn.Embedding(10, 4, max_norm=1.0), r=2)
    model = torch.nn.Sequential(Scaled(10, 4))
    with pytest.raises(ValueError, match="Scaled"):
        lk.inject(model, "lora", target_modules=["0"], r=2)
    assert type(model[0]) is Scaled


def test_served_embedding_sums_and_base_rows():
    """MultiAdapterModel over a bare embedding: per-sequence adapters, a summed adapter (one pass
    per part), base rows equal to the plain lookup."""
    emb = torch.nn.Embedding(23, 8).to(DEVICE)
    model = torch.nn.Sequential(emb)
    W = emb.weight.detach().clone().double()
    ads = {n: {"0": (randn(r, 23), randn(8, r), s)} for n, r, s in (("a", 2, 0.5), ("b", 3, 2.0))}
    srv = lk.MultiAdapterModel(model, target_modules=["0"], max_rank=4)
    for n, ad in ads.items():
        srv.add(n, ad)
    srv.add_sum("ab", ["a", "b"])
    ids = torch.randint(0, 23, (4, 5), device=DEVICE)
    with torch.no_grad():
        y = srv(ids, adapters=["a", None, "ab", "b"])

    def delta(n, row):
        A, B, s = ads[n]["0"]
        return s * (A.double()[:, row].t() @ B.double().t())

    ref = F.embedding(ids, W)
    ref[0] += delta("a", ids[0])
    ref[2] += delta("a", ids[2]) + delta("b", ids[2])
    ref[3] += delta("b", ids[3])
    assert_close(y, ref, torch.float32, "served")
    assert torch.equal(y[1], emb(ids[1]))


def aot_calls():
    """Triton embedding-LoRA launches for the ahead-of-time compile check
    (tests/cuda/test_triton_aot.py): forward, both backward kernels and the served gather, bf16
    (the target dtype) and fp32."""
    for dtype in (torch.bfloat16, torch.float32):
        ids = torch.tensor([0, 5, 3, 5, 9, 1, 2])
        W = torch.randn(11, 24, dtype=dtype)
        A = torch.randn(4, 11, dtype=dtype, requires_grad=True)
        B = torch.randn(24, 4, dtype=dtype, requires_grad=True)
        lk.lora_embedding(ids, W, A, B, 0.5, backend="triton").sum().backward()
        pool = lk.AdapterPool(11, 24, 2, 4, dtype=dtype)
        pool.add("a", A.detach(), B.detach(), 0.5)
        lk.multi_lora_embedding(ids, W, pool, torch.tensor([0, 0, -1, 0, 0, -1, 0]),
                                backend="triton")


def test_layer_compiles_fullgraph_and_serves_under_inference_mode():
    emb = torch.nn.Embedding(17, 16).to(DEVICE)
    layer = lk.LoRAEmbedding.from_embedding(emb, r=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn_like(layer.lora_A))
    ids = torch.randint(0, 17, (2, 5), device=DEVICE)
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(ids)
    y.square().sum().backward()
    gA, gB = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    layer.lora_A.grad = layer.lora_B.grad = None
    y0 = layer(ids)
    y0.square().sum().backward()
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(gA, layer.lora_A.grad)
    torch.testing.assert_close(gB, layer.lora_B.grad)
    srv = lk.MultiAdapterModel(torch.nn.Sequential(emb), target_modules=["0"], max_rank=4)
    srv.add("a", {"0": layer.as_lora()})
    with torch.inference_mode():
        out = srv(ids, adapters=["a", None])
    torch.testing.assert_close(out[0], y0[0].detach())
    torch.testing.assert_close(out[1], emb(ids[1]).detach())


def test_triton_gather_offsets_past_2_31(tmp_path):
    """64-bit offsets: a table whose rows lie 2^30 elements apart (rows 2, 3 start beyond 2^31:
    a 128k x 16k-sized stride) is gathered right by the forward and the served kernel (int32
    ``ids * stride`` would wrap); a sparse file holds the few touched pages (interpreted)."""
    if "triton" not in _backends() or DEVICE.type != "cpu":
        pytest.skip("interpreter test (TRITON_INTERPRET=1, CPU)")
    big = 1 << 30
    fn = tmp_path / "sparse.bin"
    with open(fn, "wb") as f:
        f.truncate((3 * big + 64) * 4)
    W = torch.from_file(str(fn), shared=True, size=3 * big + 64,
                        dtype=torch.float32).as_strided((4, 8), (big, 1))
    W.copy_(torch.randn(4, 8))
    A, B = torch.randn(2, 4), torch.randn(8, 2)
    ids = torch.tensor([3, 2, 0, 3])
    ref = F.embedding(ids, W.clone()) + 0.5 * A.t()[ids] @ B.t()
    torch.testing.assert_close(lk.lora_embedding(ids, W, A, B, 0.5, backend="triton"), ref)
    pool = lk.AdapterPool(4, 8, 2, 2)
    pool.add("a", A, B, 0.5)
    torch.testing.assert_close(lk.multi_lora_embedding(ids, W, pool, torch.zeros_like(ids),
                                                       backend="triton"), ref)
