"""`--format tensorrt` and the tensorrt runtime.

Three kinds of tests:
  * here, without TensorRT (this project's CI): the missing-package path is a one-line error with the install
    hint, exit code 2, and no file; the explicit-INT8 preflight; the registrations;
  * a contract test of the builder calls against a stand-in `tensorrt` module that records them (flags, profile,
    timing cache, atomic write). It checks our call sequence, not TensorRT's behaviour;
  * on a machine with tensorrt and an NVIDIA GPU: real engines (FP32, FP16) of the real ResNet-20, run against
    torch, and profiled. Skipped elsewhere, with the install hint as the reason.
"""
from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.errors import UserError
from exporters import EXPORTERS, SUFFIX
from exporters.tensorrt import INSTALL_HINT, default_timing_cache, explicit_int8_problems, export_tensorrt
from runtimes import RUNTIMES, default_runtime_for, open_session
from tests.conftest import RESNET20, run_cli

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_no_trt = pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here: the missing-package path can't be hit")
needs_trt_gpu = pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()), reason=INSTALL_HINT)


def test_registered():
    assert EXPORTERS.get("tensorrt") is export_tensorrt and SUFFIX["tensorrt"] == ".engine"
    assert RUNTIMES.get("tensorrt").module == "runtimes.tensorrt"
    assert default_runtime_for("m.engine") == default_runtime_for("m.plan") == "tensorrt"


# ---- without TensorRT ----------------------------------------------------------------------------------------

@needs_no_trt
def test_cli_export_without_tensorrt_exit_2_hint_no_file(tmp_path):
    out = tmp_path / "out"
    r = run_cli("-q", "export", RESNET20, "--arch", "resnet20", "--format", "tensorrt", "-o", out / "m.engine")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT export needs the tensorrt package")
    assert INSTALL_HINT in lines[0]
    assert not out.exists() or list(out.iterdir()) == []  # no engine, no .part file


@needs_no_trt
def test_runtime_without_tensorrt_names_the_hint(tmp_path):
    fake = tmp_path / "m.engine"
    fake.write_bytes(b"\0" * 64)
    with pytest.raises(UserError, match="pip install tensorrt") as e:
        open_session(fake)
    assert "\n" not in str(e.value) and "not available" in str(e.value)


def _qdq_model(zp_type: int, zp_value: int, with_zp: bool = True) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s")]
    q_inputs = ["x", "s"]
    if with_zp:
        np_type = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}[zp_type]
        inits.append(numpy_helper.from_array(np.array(zp_value, np_type), "zp"))
        q_inputs.append("zp")
    nodes = [helper.make_node("QuantizeLinear", q_inputs, ["q"], name="act_q"),
             helper.make_node("DequantizeLinear", ["q", *q_inputs[1:]], ["y"], name="act_dq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_explicit_int8_preflight():
    assert explicit_int8_problems(_qdq_model(TensorProto.INT8, 0)) == []
    assert explicit_int8_problems(_qdq_model(TensorProto.UINT8, 128)) == ["act_q: uint8 zero-point",
                                                                          "act_dq: uint8 zero-point"]
    assert explicit_int8_problems(_qdq_model(TensorProto.INT8, 3))[0] == "act_q: nonzero zero-point"
    assert explicit_int8_problems(_qdq_model(TensorProto.INT8, 0, with_zp=False)) == [
        "act_q: no zero-point (uint8 by default)"]


def test_default_timing_cache_path(monkeypatch, tmp_path):
    monkeypatch.delenv("COMPRESS_TRT_TIMING_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    p = default_timing_cache("10.8.0", "NVIDIA GeForce RTX 4090")
    assert p == tmp_path / "edge-compress" / "tensorrt" / "timing-trt10.8.0-NVIDIA_GeForce_RTX_4090.cache"
    monkeypatch.setenv("COMPRESS_TRT_TIMING_CACHE", str(tmp_path / "mine.cache"))
    assert default_timing_cache("10.8.0", "x") == tmp_path / "mine.cache"


# ---- contract test against a stand-in module --------------------------------------------------------------------

def _fake_tensorrt(version: str, calls: list, with_precision_flags: bool = True) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger:
        WARNING = "warning"

        def __init__(self, level):
            calls.append(("Logger", level))

    class Input:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        num_inputs = 1

        def __init__(self, flags):
            self.flags, self.onnx = flags, None

        def get_input(self, i):
            dims = [d.dim_value or -1 for d in self.onnx.graph.input[0].type.tensor_type.shape.dim]
            return Input(self.onnx.graph.input[0].name, dims)

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network.onnx = onnx.load(path)
            calls.append(("parse", path))
            return True

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            calls.append(("profile", name, tuple(mn), tuple(opt), tuple(mx)))

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timed"

    class Config:
        cache = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", pool, size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, p):
            calls.append(("add_profile",))

        def create_timing_cache(self, data):
            calls.append(("load_cache", bytes(data)))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            types_ = {i.data_type for i in network.onnx.graph.initializer}
            calls.append(("build", "fp16-graph" if TensorProto.FLOAT16 in types_ else "fp32-graph"))
            return b"PLAN"

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = (types.SimpleNamespace(FP16="FP16", INT8="INT8") if with_precision_flags
                       else types.SimpleNamespace(REFIT="REFIT"))
    return trt


@pytest.mark.parametrize("version, flags, precision, expect", [
    ("10.8.0", True, "fp32", {"network_flags": 0, "flags": [], "graph": "fp32-graph"}),
    ("10.8.0", True, "fp16", {"network_flags": 0, "flags": ["FP16"], "graph": "fp32-graph"}),
    ("8.6.1", True, "fp16", {"network_flags": 1, "flags": ["FP16"], "graph": "fp32-graph"}),  # EXPLICIT_BATCH < 10
    ("11.0.0", False, "fp16", {"network_flags": 1 << 5, "flags": [], "graph": "fp16-graph"}),  # strongly typed
])
def test_engine_build_calls(resnet20, tmp_path, monkeypatch, version, flags, precision, expect):
    import exporters.tensorrt as trt_exporter

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(version, calls, flags))
    monkeypatch.setattr(trt_exporter, "require_gpu", lambda: "Fake GPU")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = export_tensorrt(resnet20.model, resnet20.spec, tmp_path / "m.onnx", precision, check=False,
                              timing_cache=cache)
    assert art.path == str(tmp_path / "m.engine") and (tmp_path / "m.engine").read_bytes() == b"PLAN"
    assert art.precision == precision and art.format == "tensorrt"
    assert ("network_flags", expect["network_flags"]) in calls
    assert [c[1] for c in calls if c[0] == "flag"] == expect["flags"]
    assert ("build", expect["graph"]) in calls
    assert ("profile", "input", (1, 3, 32, 32), (1, 3, 32, 32), (32, 3, 32, 32)) in calls and ("add_profile",) in calls
    assert ("load_cache", b"old") in calls and cache.read_bytes() == b"old+timed"  # loaded before, saved after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json", "timing.cache"]
    # the engine has no metadata: its input spec sits beside it, where eval / profile --accuracy-data read it
    from compress.gates import artifact_normalization

    assert artifact_normalization(tmp_path / "m.engine") == (tuple(resnet20.spec.mean), tuple(resnet20.spec.std))
    assert art.files == [str(tmp_path / "m.engine"), str(tmp_path / "m.engine.json")]


def test_int8_qdq_sets_int8_flag_and_refuses_asymmetric(tmp_path, monkeypatch, resnet20):
    """Explicit quantization: the INT8 flag and no calibrator; a uint8-activation QDQ graph is refused, no file."""
    import exporters.tensorrt as trt_exporter

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.8.0", calls))
    monkeypatch.setattr(trt_exporter, "require_gpu", lambda: "Fake GPU")
    plan = trt_exporter.build_engine(sys.modules["tensorrt"], _write(tmp_path, _qdq_model(TensorProto.INT8, 0)),
                                     "int8", resnet20.spec, 8, None, strongly_typed=False)
    assert plan == b"PLAN" and [c[1] for c in calls if c[0] == "flag"] == ["INT8"]
    assert not any(c[0] == "load_cache" for c in calls)  # no cache path: none touched

    monkeypatch.setattr(trt_exporter, "export_onnx", lambda *a, **k: types.SimpleNamespace(
        path=str(_write(tmp_path, _qdq_model(TensorProto.UINT8, 128))), precision="int8", input={}, output_names=[]))
    with pytest.raises(UserError, match="symmetric INT8 only"):
        export_tensorrt(resnet20.model, resnet20.spec, tmp_path / "out" / "q.engine", check=False)
    assert not (tmp_path / "out").exists()


def _write(d: Path, model: onnx.ModelProto) -> Path:
    p = d / "qdq.onnx"
    onnx.save(model, str(p))
    return p


# ---- with TensorRT and a GPU --------------------------------------------------------------------------------------

@needs_trt_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_engine_matches_torch(resnet20, tmp_path, monkeypatch, precision):
    monkeypatch.setenv("COMPRESS_TRT_TIMING_CACHE", str(tmp_path / "timing.cache"))
    art = export_tensorrt(resnet20.model, resnet20.spec, tmp_path / "r20.engine", precision)
    assert art.parity["top1_agreement"] >= 0.97 and (tmp_path / "timing.cache").stat().st_size > 0
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = resnet20.model.eval()(x).numpy()
    with open_session(tmp_path / "r20.engine") as s:
        assert s.runtime == "tensorrt" and s.inputs[0].shape == (None, 3, 32, 32)
        got = np.concatenate([s.run(x[:1].numpy()), s.run(x[1:].numpy())])
        assert s.last_compute_ms is not None and len(s.compute_ms) == 2
    tol = 1e-3 if precision == "fp32" else 2e-2
    assert np.abs(got - ref).max() / np.abs(ref).max() < tol


@needs_trt_gpu
def test_real_engine_profiles(resnet20, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_TRT_TIMING_CACHE", str(tmp_path / "timing.cache"))
    export_tensorrt(resnet20.model, resnet20.spec, tmp_path / "r20.engine", "fp16")
    r = run_cli("profile", tmp_path / "r20.engine", "--iterations", "50", "--budget", "latency.p90=50ms")
    assert r.returncode == 0, r.stderr
