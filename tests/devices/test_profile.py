"""compress.profile/1: statistics on known samples, schema validation, and real fresh-process profiles of the
real ResNet-20 on ONNX Runtime and OpenVINO."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compress.errors import UserError
from devices import DEVICES, ProfileOptions
from devices.profile import (SCHEMA, build_profile, latency_stats, load_profile, median_ci95, render_table,
                             t_critical_95, validate_profile)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def onnx_and_ir(resnet20_artifacts) -> tuple[Path, Path]:
    return resnet20_artifacts  # the session-wide real ResNet-20 ONNX + FP32 IR from conftest.py


# ---- statistics ------------------------------------------------------------------------------------------------

def test_stats_match_numpy_on_known_samples():
    x = np.random.default_rng(0).lognormal(0.0, 0.3, 1000)  # skewed, like latencies
    s = latency_stats(x)
    assert s["n"] == 1000 and s["min"] == x.min() and s["max"] == x.max()
    assert s["mean"] == pytest.approx(x.mean()) and s["std"] == pytest.approx(x.std(ddof=1))
    assert [s["p50"], s["p90"], s["p99"]] == pytest.approx(np.percentile(x, [50, 90, 99]).tolist())
    lo, hi = s["ci95_mean"]
    assert lo < s["mean"] < hi and hi - lo == pytest.approx(2 * 1.9623 * x.std(ddof=1) / np.sqrt(1000), rel=1e-3)
    lo, hi = s["ci95_p50"]
    assert lo < s["p50"] < hi


def test_tiny_samples():
    s = latency_stats([2.0])
    assert s["std"] == 0 and s["ci95_mean"] is None and s["ci95_p50"] is None and s["p99"] == 2.0
    assert latency_stats([1.0, 3.0])["ci95_mean"] == pytest.approx([2 - 12.706, 2 + 12.706])


def test_t_quantiles():
    assert t_critical_95(1) == 12.706 and t_critical_95(30) == 2.042
    assert t_critical_95(31) == pytest.approx(2.0395, abs=2e-4) and t_critical_95(10**6) == pytest.approx(1.96, abs=1e-3)
    try:
        from scipy.stats import t
    except ImportError:
        return
    for df in (1, 7, 30, 31, 45, 100, 999):
        assert t_critical_95(df) == pytest.approx(t.ppf(0.975, df), abs=1e-3)


def test_median_ci_order_statistics():
    assert median_ci95(np.arange(1.0, 6.0)) is None                        # n = 5: 2/32 > 5%, no 95% pair
    assert median_ci95(np.arange(1.0, 7.0)) == [1.0, 6.0]                  # n = 6: 1 - 2/64
    assert median_ci95(np.arange(1.0, 11.0)) == [2.0, 9.0]                 # n = 10: 1 - 2 * 11/1024
    # the exact and normal-approximation branches meet at n = 5000
    assert abs(median_ci95(np.arange(5000.0))[0] - median_ci95(np.arange(5001.0))[0]) <= 1
    # coverage on skewed data, 400 repetitions of n = 40
    rng = np.random.default_rng(1)
    true_median = np.log(2)
    hits = sum(lo <= true_median <= hi for lo, hi in (median_ci95(np.sort(rng.exponential(1, 40))) for _ in range(400)))
    assert hits / 400 >= 0.93


# ---- schema ----------------------------------------------------------------------------------------------------

def _profile(samples=(1.0, 1.2, 0.9, 1.1, 1.0, 1.05, 0.95, 1.3), batch=2) -> dict:
    return build_profile(
        artifact={"path": "m.onnx", "size_bytes": 10, "sha256": "0" * 64, "files": []},
        runtime={"name": "onnxruntime", "version": "1.32.0", "threads": 1, "options": {}},
        settings={"warmup": 1, "iterations": len(samples), "batch": batch, "seed": 0, "input": {}},
        load_ms=5.0, first_inference_ms=2.0, samples_ms=samples,
        memory={"rss_before_load_bytes": 100, "peak_rss_bytes": 150, "model_peak_bytes": 50, "method": "test",
                "isolated_process": True})


def test_build_save_load_roundtrip(tmp_path):
    p = _profile()
    assert p["schema"] == SCHEMA and p["latency_ms"]["n"] == 8
    assert p["throughput_items_per_s"] == pytest.approx(2 * 1000 / np.mean(p["samples_ms"]))
    assert any("p99" in note for note in p["notes"])  # 8 samples: the p99 caveat is spelled out
    (tmp_path / "p.json").write_text(json.dumps(p))
    assert load_profile(tmp_path / "p.json") == p


@pytest.mark.parametrize("load, threads, busy", [(3.1, None, True), (3.1, 2, True), (3.1, 1, False), (1.5, None, False)])
def test_a_busy_machine_with_a_thread_per_cpu_is_noted(load, threads, busy):
    """torch with its default threads measured 500 ms instead of 3 ms on a loaded 2-CPU host: the profile says so."""
    env = {"hostname": "h", "os": "Linux", "cpu": "x", "cores_logical": 2, "python": "3.11", "load_avg_1m": load}
    p = build_profile(
        artifact={"path": "m.pt2", "size_bytes": 10, "sha256": "0" * 64, "files": []},
        runtime={"name": "torch", "version": "2", "threads": threads, "options": {}},
        settings={"warmup": 1, "iterations": 100, "batch": 1, "seed": 0, "input": {}},
        load_ms=5.0, first_inference_ms=2.0, samples_ms=[1.0] * 100, environment=env,
        memory={"rss_before_load_bytes": 100, "peak_rss_bytes": 150, "model_peak_bytes": 50, "method": "test",
                "isolated_process": True})
    assert any("--threads 1 measures steadier" in n for n in p["notes"]) == busy, p["notes"]


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(schema="compress.profile/2"), "this version reads"),
    (lambda p: p.pop("memory"), "missing memory"),
    (lambda p: p["latency_ms"].pop("p90"), "missing latency_ms.p90"),
    (lambda p: p["settings"].update(batch=True), "settings.batch is bool"),
    (lambda p: p["samples_ms"].pop(), "latency_ms.n = 8, 7 samples"),
    (lambda p: p["latency_ms"].update(p50=99.0), "out of order"),
])
def test_invalid_profiles_are_user_errors(tmp_path, edit, message):
    p = _profile()
    edit(p)
    with pytest.raises(UserError, match=message):
        validate_profile(p)


def test_load_profile_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[]")
    for name, message in [("bad.json", "not a JSON profile"), ("list.json", "JSON list"), ("none.json", "not found")]:
        with pytest.raises(UserError, match=message):
            load_profile(tmp_path / name)


def test_render_table():
    from rich.console import Console

    console = Console(record=True, width=220)
    console.print(render_table([_profile(), _profile(batch=1)]))
    text = console.export_text()
    assert "onnxruntime 1.32.0" in text and "m.onnx" in text and f"{_profile()['latency_ms']['p50']:.3f}" in text


def test_options_validation():
    assert ProfileOptions.coerce({"threads": 2, "cpus": [0]}).agent_argv()[-4:] == ["--threads", "2", "--cpus", "0"]
    for bad in ({"iterations": 0}, {"threads": 0}, {"batch": 0}, {"iters": 5}):
        with pytest.raises(UserError):
            ProfileOptions.coerce(bad)


# ---- real profiles in a fresh process ----------------------------------------------------------------------------

def _own_peak_rss() -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def test_local_profile_onnxruntime(onnx_and_ir):
    import onnxruntime

    onnx_path, _ = onnx_and_ir
    p = DEVICES.get("local")().run_profile(onnx_path, "onnxruntime", {"threads": 1, "warmup": 3, "iterations": 30})
    assert p["schema"] == SCHEMA and p["target"] == "local"
    assert p["latency_ms"]["n"] == 30 == len(p["samples_ms"]) and p["latency_ms"]["p50"] > 0
    assert p["runtime"] == {**p["runtime"], "name": "onnxruntime", "version": onnxruntime.__version__, "threads": 1}
    assert p["artifact"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert p["settings"]["input"]["shape"] == [1, 3, 32, 32]
    mem = p["memory"]
    assert mem["isolated_process"] and mem["peak_rss_bytes"] > 0 and mem["model_peak_bytes"] >= 0
    assert mem["peak_rss_bytes"] >= mem["rss_before_load_bytes"]
    if sys.platform == "linux":  # this pytest holds torch; a peak inherited from it would exceed the child's own
        assert mem["peak_rss_bytes"] < _own_peak_rss()


def test_local_profile_openvino_pinned_batch4(onnx_and_ir):
    _, xml = onnx_and_ir
    p = DEVICES.get("local")().run_profile(xml, None, ProfileOptions(threads=1, warmup=2, iterations=10, batch=4,
                                                                     cpus=(0,)))
    assert p["runtime"]["name"] == "openvino" and p["environment"]["cpu_affinity"] == [0]
    assert p["settings"]["input"]["shape"] == [4, 3, 32, 32] and p["latency_ms"]["n"] == 10
    assert [f["name"] for f in p["artifact"]["files"]] == ["resnet20.xml", "resnet20.bin"]
    assert p["artifact"]["size_bytes"] == xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def test_local_profile_bad_artifacts(tmp_path):
    device = DEVICES.get("local")()
    with pytest.raises(UserError, match="not found"):
        device.run_profile(tmp_path / "missing.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        device.run_profile(tmp_path / "garbage.onnx", options={"iterations": 1})


def test_agent_script_needs_neither_torch_nor_rich(onnx_and_ir, tmp_path):
    """The board case: `python devices/agent.py`, with torch and rich unimportable."""
    out = tmp_path / "p.json"
    code = f"""
import json, runpy, sys
sys.modules['torch'] = sys.modules['rich'] = None
sys.argv = ['agent.py', '--artifact', {str(onnx_and_ir[0])!r}, '--iterations', '5', '--warmup', '1', '--json', {str(out)!r}]
try:
    runpy.run_path({str(ROOT / 'devices' / 'agent.py')!r}, run_name='__main__')
except SystemExit as e:
    assert e.code == 0, e.code
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in ('compress', 'torch', 'rich'))
print(json.dumps(loaded), file=sys.stderr)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == ["compress", "compress.errors", "compress.registry"]
    assert json.loads(proc.stdout) == load_profile(out)
    assert load_profile(out)["latency_ms"]["n"] == 5
