"""benchmarks/pruning.py: the paired, interleaved latency rounds behind a row's speed-up (--latency-rounds)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    from tests.conftest import load_benchmark

    return load_benchmark("pruning.py")


def test_paired_speedup_interleaves_and_takes_each_sides_median(bench, monkeypatch, tmp_path):
    import devices

    # a load spike hits the second round of both sides: the medians skip it, and each round profiles dense first
    readings = {"dense": iter([0.50, 0.90, 0.48]), "row": iter([0.30, 0.60, 0.31])}
    calls = []

    def fake_profile(path, runtime=None, **opts):
        assert runtime == "onnxruntime" and opts["threads"] == 1 and opts["iterations"] == 77
        side = Path(path).stem
        calls.append(side)
        return {"latency_ms": {"p50": next(readings[side])}}

    monkeypatch.setattr(devices, "profile_artifact", fake_profile)
    out = bench.paired_speedup(tmp_path / "dense.onnx", tmp_path / "row.onnx", 3, 77)
    assert calls == ["dense", "row"] * 3
    assert out["latency_rounds"] == 3
    assert out["dense_p50_rounds_ms"] == [0.5, 0.9, 0.48] and out["p50_rounds_ms"] == [0.3, 0.6, 0.31]
    assert out["dense_p50_paired_ms"] == 0.5  # the median, not the mean (0.627) nor the first reading alone


def test_goal_check_reads_the_measured_rows_and_skips_a_missing_reference(bench):
    row = {"method": "beta-rank", "flops_target": 0.0, "latency_target_ms": 0.28, "speedup_target": 1.6, "round_to": 8,
           "flops_reduction": 0.573, "drop_after_ft": 0.87, "speedup": 1.595, "ft_epochs": 3, "drop_vs_dense_ft": 5.35}
    r = {"models": {"resnet20": {"dense": {"acc": 81.03, "ft": {}}, "rows": [row]}}}
    out = bench.goal_check(r)  # the row's dense + FT (3 ep) reference is not in this entry: no KeyError
    assert "MISSED" in out[0] and len(out) == 1
    r["models"]["resnet20"]["rows"] = [{**row, "speedup": 1.6}]
    assert "MET" in bench.goal_check(r)[0] and "MISSED" not in bench.goal_check(r)[0]
    r["models"]["resnet20"]["rows"] = [{**row, "speedup": 1.7, "drop_after_ft": 1.01}]
    assert "MISSED" in bench.goal_check(r)[0]
