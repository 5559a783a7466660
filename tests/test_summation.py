"""The seed-study example (``python -m lora_kernels.examples.summation``) at its small size: it
runs end to end, its sums are exact and its output files are what the README points to."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")


def test_summation_example_small(tmp_path):
    from lora_kernels.examples import summation as S

    threads = torch.get_num_threads()
    res = S.main(["--small", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # restored
    doc = json.loads((tmp_path / "summation.json").read_text())
    assert doc["domains"] == ["d0", "d1", "twin", "clash"]
    assert len(doc["rows"]) == 6 and all(r["k"] == 2 for r in doc["rows"])
    cos = {"+".join(r["domains"]): r["rms_cosine"] for r in doc["rows"]}
    assert cos["d0+twin"] > cos["d0+d1"]  # the same task's adapters overlap more
    for r in doc["rows"]:
        assert r["summed_rank"] == S.SMALL.r * r["k"]
        assert abs(r["loss_sum_served"] - r["loss_sum"]) < 1e-5 * r["loss_sum"]
        assert 0.0 <= r["rms_cosine"] <= 1.0
        # the adapters learned their domains: both beat the pretrained base on the union data
        assert r["loss_merged"] < r["loss_base"] and r["loss_sum"] < r["loss_base"]
        assert math.isclose(r["rel_loss_change"],
                            (r["loss_sum"] - r["loss_merged"]) / r["loss_merged"])
    assert -1.0 <= doc["pearson_rms_cosine_vs_rel_change"] <= 1.0
    assert res["rows"] == doc["rows"]
    assert (tmp_path / "summation.png").stat().st_size > 1000
    assert "| d0 + twin |" in (tmp_path / "summation.md").read_text()


def test_summed_adapter_is_the_exact_sum():
    """What the example evaluates as 'the sum' is W + sum_k s_k B_k A_k (float64 check)."""
    import lora_kernels as lk

    g = torch.Generator().manual_seed(0)
    ads = [{"m": (torch.randn(4, 7, generator=g), torch.randn(5, 4, generator=g), 16.0)}
           for _ in range(3)]
    (A, B, s), = lk.sum_adapters(ads).values()
    want = sum(s_ * B_.double() @ A_.double() for (A_, B_, s_) in (a["m"] for a in ads))
    got = s * B.double() @ A.double()
    assert ((got - want).norm() / want.norm()).item() < 1e-6
