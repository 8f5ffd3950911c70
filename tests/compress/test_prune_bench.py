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


def test_fixed_width_rows_are_per_model_and_keyed_by_their_file(bench):
    args = type("A", (), {"width_rows": "beta-rank@benchmarks/allocations/resnet20_a.json,l1@/x/resnet32_b.json"})()
    assert [(m, Path(f).name) for m, f in bench.width_rows(args, "resnet20")] == [("beta-rank", "resnet20_a.json")]
    assert bench.width_rows(args, "resnet32") == [("l1", "/x/resnet32_b.json")]
    assert bench.row_key("beta-rank", 0.0, None, None, "x/resnet20_a.json") != bench.row_key("beta-rank", 0.0, None, None)
    row = {"method": "beta-rank", "flops_target": 0.0, "widths_file": "benchmarks/allocations/resnet20_a.json",
           "flops_reduction": 0.573, "drop_after_ft": 0.87, "speedup": 1.62}
    assert bench._budget(row) == "fixed widths resnet20_a.json"
    # the same allocation fine-tuned with feature distillation is another row, labelled as such
    assert bench.row_key("beta-rank", 0.0, None, None, "x/resnet20_a.json", 20.0) \
        != bench.row_key("beta-rank", 0.0, None, None, "x/resnet20_a.json")
    assert bench._label(row) == "beta-rank" and bench._label({**row, "distill_features": 20.0}) == "beta-rank + feature KD 20"
    met = bench.goal_check({"models": {"resnet20": {"dense": {"acc": 81.03}, "rows": [row]}}})[0]
    assert "MET" in met and "fixed widths resnet20_a.json: -57.3% FLOPs, drop +0.87 pt, 1.62x" in met


def test_rows_measured_on_the_old_shortcut_graph_are_marked(bench):
    base = {"method": "l1", "flops_target": 0.6, "flops_reduction": 0.4, "params": 1e5, "acc_before_ft": 10.0,
            "acc_before_ft_bn_recal": 20.0, "acc_after_ft": 70.0, "drop_after_ft": 11.0, "p50_ms": 0.3, "speedup": 1.4}
    r = {"created": "now", "host": {"platform": "x", "cpus": 2, "load_avg_start": [1]}, "settings": {"speedup": 1.7},
         "data": {"eval_before": 2000, "eval_after": 10000},
         "models": {"resnet20": {"dense": {"acc": 81.03, "flops": 8e7, "params": 2.7e5},
                                 "settings": {"lr": 0.01, "train_steps": 80},
                                 "rows": [base, {**base, "method": "random", "export_form": bench.EXPORT_FORM}]}}}
    rows = [ln for ln in bench.markdown(r).splitlines() if ln.startswith("| l1 ") or ln.startswith("| random ")]
    assert rows[0].endswith("| 1.4 † |") and rows[1].endswith("| 1.4 |")
