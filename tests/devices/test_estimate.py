"""--device estimate:NAME: the catalog, the graph analysis (FLOPs against torch's counter, fusion, memory), the
roofline, a calibration measured on this machine, and the profile it returns."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from compress.errors import UserError
from devices import get_device, profile_artifact
from devices.estimate import (CLASSES, EstimateDevice, analyze, calibrate, default_params, fit_warnings, load_catalog,
                              load_fit, op_class, predict, roofline_us)
from devices.profile import validate_profile

REQUIRED = ("rpi5", "jetson-orin-nano-cpu", "jetson-orin-nano-gpu", "snapdragon-8-gen3-cpu", "laptop-x86", "host")


def test_catalog_entries_have_peaks_and_sources():
    cat = load_catalog()
    assert set(REQUIRED) <= set(cat)
    for name in REQUIRED:
        e = cat[name]
        assert e.peak_gflops() > 0 and e.bandwidth_gbs > 0 and e.sources and e.estimated, name
        assert set(CLASSES) <= set(e.efficiency) and set(CLASSES) <= set(e.overhead_us)
    assert cat["rpi5"].peak_gflops() == pytest.approx(153.6) and cat["rpi5"].peak_gflops(1) == pytest.approx(38.4)
    assert cat["jetson-orin-nano-gpu"].peak_gflops(1) == pytest.approx(1280.0)  # a GPU uses all its cores
    sd = cat["snapdragon-8-gen3-cpu"]
    assert sd.peak_gflops(1) == pytest.approx(105.6)                  # one thread: the X4 prime core
    assert sd.peak_gflops(4) == pytest.approx(105.6 + 3 * 3.15 * 16)  # then the fastest A720s
    assert sd.peak_gflops(int8=True) > 3 * sd.peak_gflops()


def test_list_command():
    proc = subprocess.run([sys.executable, "-m", "devices.estimate", "list"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "RuntimeWarning" not in proc.stderr  # runpy's double-import warning
    assert {d["name"] for d in json.loads(proc.stdout)} >= set(REQUIRED)


def test_roofline_and_classes():
    assert roofline_us(2e9, 1e6, 1000.0, 10.0) == pytest.approx(2000.0)  # compute-bound: 2 GFLOP at 1 TFLOP/s
    assert roofline_us(1e6, 1e9, 1000.0, 10.0) == pytest.approx(1e5)     # memory-bound: 1 GB at 10 GB/s
    assert op_class("Conv", [32, 1, 3, 3]) == "conv_dw" and op_class("FusedConv", [32, 16, 3, 3]) == "conv"
    assert op_class("ReorderInput") == "memory" and op_class("Shape") == "meta" and op_class("Relu") == "elementwise"


def test_graph_flops_match_torch_and_fusion(resnet20_artifacts):
    from compress.io import zoo_model
    from compress.metrics import count_flops

    g = analyze(resnet20_artifacts[0])
    torch_flops = count_flops(zoo_model("resnet20").model, (3, 32, 32))  # conv + linear, 2 x MACs
    ours = sum(n.flops for n in g.nodes if n.cls in ("conv", "gemm"))
    assert ours == pytest.approx(torch_flops, rel=0.01)
    by_op = {}
    for n in g.nodes:
        by_op.setdefault(n.op, []).append(n.executed)
    assert by_op["Conv"] == [True] * 19
    assert by_op["Relu"].count(False) == 10  # after a Conv: fused; after a residual Add: runs
    assert by_op["Add"] == [True] * 9 and not any(by_op["Constant"])
    assert g.weights_bytes == pytest.approx(resnet20_artifacts[0].stat().st_size, rel=0.05)
    assert g.peak_activation_bytes >= 2 * 16 * 32 * 32 * 4  # at least a layer's input and output live at once
    assert analyze(resnet20_artifacts[0], batch=8).nodes[0].flops == pytest.approx(8 * g.nodes[0].flops)


def test_estimate_profile(resnet20_artifacts):
    onnx_path = resnet20_artifacts[0]
    p = profile_artifact(str(onnx_path), device="estimate:rpi5", threads=1, iterations=200)
    assert validate_profile(p) is p and p["target"] == "estimate:rpi5"
    from compress import gates

    report = gates.evaluate(p, gates.parse_budget("latency.load=1s"))  # a prediction loads nothing: not a 0 ms pass
    assert p["load_ms"] is None and not report["passed"] and "not measured" in report["failures"][0]
    assert p["settings"]["iterations"] == 1 and p["latency_ms"]["n"] == 1 and p["latency_ms"]["p50"] > 0
    assert p["notes"][0].startswith("PREDICTION, not a measurement") and any("uncalibrated" in n for n in p["notes"])
    assert p["layers"] and sum(layer["predicted_us"] for layer in p["layers"]) / 1000 <= p["latency_ms"]["p50"] + 1e-9
    mem = p["memory"]
    assert mem["model_peak_bytes"] == mem["weights_bytes"] + mem["peak_activations_bytes"] and not mem["isolated_process"]
    assert p["prediction"]["device"]["description"].startswith("Raspberry Pi 5")
    # more work, more time; more cores, less
    four = profile_artifact(str(onnx_path), device="estimate:rpi5", threads=1, batch=4)
    assert four["latency_ms"]["p50"] > 2 * p["latency_ms"]["p50"]
    all_cores = profile_artifact(str(onnx_path), device="estimate:rpi5", threads=4)
    assert all_cores["latency_ms"]["p50"] < p["latency_ms"]["p50"]
    gpu = profile_artifact(str(onnx_path), device="estimate:jetson-orin-nano-gpu")
    assert gpu["environment"]["machine"] == "gpu"


def test_estimate_errors(resnet20_artifacts, tmp_path):
    with pytest.raises(UserError, match="unknown estimate device 'pi9'.*rpi5"):
        profile_artifact(str(resnet20_artifacts[0]), device="estimate:pi9")
    with pytest.raises(UserError, match="estimate needs a device name"):
        get_device("estimate")
    with pytest.raises(UserError, match=r"reads ONNX graphs \(.onnx\)"):
        profile_artifact(str(resnet20_artifacts[1]), device="estimate:rpi5")
    with pytest.raises(UserError, match="calibration not found"):
        profile_artifact(str(resnet20_artifacts[0]), device=f"estimate:host?calibration={tmp_path / 'none.json'}")
    with pytest.raises(UserError, match="unknown option"):
        get_device("estimate:rpi5?colour=red")


def test_int8_qdq_nodes_use_the_int8_peak(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((16, 8, 3, 3), np.int8), "w_q")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "s", "z"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "q.onnx"))
    g = analyze(tmp_path / "q.onnx")
    conv = next(n for n in g.nodes if n.op == "Conv")
    dq = next(n for n in g.nodes if n.op == "DequantizeLinear")
    assert conv.int8 and conv.executed and not dq.executed  # weight dequantization folds into the int8 conv
    assert conv.flops == 2 * 16 * 16 * 16 * 8 * 9
    p = profile_artifact(str(tmp_path / "q.onnx"), device="estimate:rpi5")
    assert any("int8" in n for n in p["notes"])


def test_calibration_on_this_machine(resnet20_artifacts, tmp_path):
    """A real (small) calibration: ORT per-node profile + the local profiler on ResNet-20, saved, then used."""
    out = tmp_path / "fit.json"
    doc = calibrate([resnet20_artifacts[0]], threads=1, out=out, runs=10, iterations=40)
    assert doc["params"]["calibrated_classes"] and doc["bandwidth_gbs_measured"] > 0
    params = load_fit(out)
    assert "conv" in params.calibrated_classes and params.efficiency["conv"] > 0
    p = profile_artifact(str(resnet20_artifacts[0]), device=f"estimate:host?calibration={out}", threads=1)
    assert "calibrated" in p["runtime"]["options"]["params"]
    measured = doc["models"][0]["e2e_ms"]
    assert 0.5 < p["latency_ms"]["p50"] / measured < 2.0  # in-sample: the fit reproduces its own model
    # the saved fit reports that check itself, and says one model is too few to trust
    (row,) = doc["in_sample"]
    assert row["predicted_ms"] / row["measured_ms"] - 1 == pytest.approx(row["error"], abs=1e-3)
    assert any("1 calibration model(s)" in w for w in doc["warnings"])


def test_fit_warnings_name_the_models_a_fit_misses():
    """FP32 + INT8 ResNet-20 fitted together: -28% / +65% on their own measurements, and nothing said so."""
    rows = [{"model": f"m{i}.onnx", "measured_ms": 1.0, "predicted_ms": 1.0 + e, "error": e}
            for i, e in enumerate((-0.28, 0.65, 0.1))]
    (warning,) = fit_warnings(rows)
    assert "m0.onnx -28%, m1.onnx +65%" in warning and "m2" not in warning
    assert fit_warnings(rows[2:] * 3) == []


def test_default_params_and_uncalibrated_host(resnet20_artifacts):
    cat = load_catalog()
    g = analyze(resnet20_artifacts[0])
    pred = predict(g, cat["host"], default_params(cat["host"]), 1)
    assert pred["latency_ms"] > 0 and pred["executed_nodes"] == len(g.executed)
    assert isinstance(get_device("estimate:host"), EstimateDevice)


def test_cli_shows_an_estimate_as_a_prediction_and_refuses_it_as_a_baseline(resnet20_artifacts, tmp_path):
    """The table marks predicted values (~, no p90/p99, no 'n = 1 timed runs'), the notes are printed, and a
    baseline comparison with a prediction on either side is refused before anything is measured."""
    from tests.conftest import run_cli

    onnx_path, est = resnet20_artifacts[0], tmp_path / "est.json"
    r = run_cli("profile", onnx_path, "--device", "estimate:rpi5", "-o", est)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "estimate:rpi5: PREDICTED, not measured" in out and "timed runs" not in out
    assert "note: PREDICTION, not a measurement" in out and "~" in out
    for args in (["--baseline", est], ["--device", "estimate:rpi5", "--baseline", est]):
        r = run_cli("profile", onnx_path, *args, "--iterations", "100000", timeout=60)  # refused before measuring
        assert r.returncode == 2 and r.stderr.startswith("error: --baseline is a prediction (estimate:rpi5)"), r.stderr
    measured = tmp_path / "m.json"
    assert run_cli("-q", "profile", onnx_path, "--iterations", "30", "-o", measured).returncode == 0
    r = run_cli("profile", onnx_path, "--device", "estimate:rpi5", "--baseline", measured)
    assert r.returncode == 2 and "this profile is a prediction (estimate:rpi5)" in r.stderr


def test_an_estimate_is_gated_only_on_what_it_predicts(resnet20_artifacts, tmp_path):
    from tests.conftest import run_cli

    onnx_path = resnet20_artifacts[0]
    r = run_cli("profile", onnx_path, "--device", "estimate:rpi5", "--budget", "latency.p90=5ms,memory.peak=80MB")
    assert r.returncode == 2 and "not latency.p90, memory.peak" in r.stderr, r.stderr
    r = run_cli("profile", onnx_path, "--device", "estimate:rpi5", "--budget", "latency.p50=50ms,memory.model=80MB",
                "--summary", tmp_path / "s.md")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "s.md").read_text()
    assert "**Predicted** by `estimate:rpi5`" in text and "p90" not in text and "1 runs" not in text
    r = run_cli("profile", onnx_path, "--device", "estimate:rpi5", "--budget", "latency.p50=1us", "--junit",
                tmp_path / "g.xml")
    assert r.returncode == 1 and "PREDICTED by estimate:rpi5 (not measured)" in (tmp_path / "g.xml").read_text()
