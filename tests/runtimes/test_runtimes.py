"""Runtimes on real artifacts: the real ResNet-20 checkpoint exported to ONNX, OpenVINO IR, .pt2 and TorchScript
(dynamic batch everywhere), each run against torch on the same inputs."""
from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.errors import UserError
from compress.io import zoo_model
from runtimes import RUNTIMES, default_runtime_for, open_session
from runtimes.base import TensorInfo

ROOT = Path(__file__).resolve().parents[2]
# max |runtime - torch| / max |torch| for FP32 artifacts (OpenVINO forced to f32: bf16 on this CPU gives ~6e-3)
TOLERANCE = {"onnxruntime": 1e-5, "openvino": 1e-5, "torch": 1e-5}


@pytest.fixture(scope="module")
def resnet20() -> torch.nn.Module:
    return zoo_model("resnet20").model.eval()


@pytest.fixture(scope="module")
def artifacts(resnet20, tmp_path_factory) -> dict[str, Path]:
    import openvino as ov

    d = tmp_path_factory.mktemp("runtimes")
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(resnet20, (x[:1],), str(d / "resnet20.onnx"), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        ov.save_model(ov.convert_model(str(d / "resnet20.onnx")), str(d / "resnet20.xml"),
                      compress_to_fp16=False)  # save_model's default stores FP16 weights: this is the FP32 IR
        # example batch 2: with 1, export specializes the batch to the constant 1
        program = torch.export.export(resnet20, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
        torch.export.save(program, str(d / "resnet20.pt2"))
        torch.jit.save(torch.jit.trace(resnet20, x), str(d / "resnet20.ts"))
    torch.save(resnet20.state_dict(), d / "state_dict.pt")
    return {p.suffix: p for p in d.iterdir()} | {"state_dict": d / "state_dict.pt"}


@pytest.fixture(scope="module")
def reference(resnet20) -> tuple[np.ndarray, np.ndarray]:
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return x.numpy(), resnet20(x).numpy()


@pytest.mark.parametrize("suffix", [".onnx", ".xml", ".pt2", ".ts"])
def test_same_outputs_as_torch_at_any_batch(artifacts, reference, suffix):
    x, ref = reference
    with open_session(artifacts[suffix], threads=1) as session:
        for batch in (1, 5):
            y = session.run(x[:batch])
            assert y.shape == (batch, 10) and y.dtype == np.float32
            assert np.abs(y - ref[:batch]).max() / np.abs(ref).max() < TOLERANCE[session.runtime]
            assert (y.argmax(1) == ref[:batch].argmax(1)).all()


def test_sessions_describe_inputs_outputs_and_version(artifacts):
    import onnxruntime
    import openvino

    ort = open_session(artifacts[".onnx"], threads=2)
    assert ort.runtime == "onnxruntime" and ort.version == onnxruntime.__version__
    assert [(i.name, i.shape, i.dtype) for i in ort.inputs] == [("input", ("batch", 3, 32, 32), "float32")]
    assert ort.outputs[0].name == "logits" and ort.options["intra_op_threads"] == 2
    ov = open_session(artifacts[".xml"], threads=1)
    assert ov.runtime == "openvino" and ov.version == openvino.__version__
    assert ov.inputs[0].shape == (None, 3, 32, 32)
    assert ov.options["inference_precision"] == "f32" and ov.options["inference_num_threads"] == 1
    pt2 = open_session(artifacts[".pt2"])
    assert pt2.inputs[0].shape[1:] == (3, 32, 32) and isinstance(pt2.inputs[0].shape[0], str)  # symbolic batch
    assert open_session(artifacts[".ts"]).inputs[0].shape is None  # TorchScript records no shapes


def test_example_input_is_seeded_and_shaped(artifacts):
    session = open_session(artifacts[".onnx"])
    a, b = session.example_input(batch=3, seed=7), session.example_input(batch=3, seed=7)
    assert a.shape == (3, 3, 32, 32) and a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, session.example_input(batch=3, seed=8))
    with pytest.raises(UserError, match="--input-shape"):
        open_session(artifacts[".ts"]).example_input()
    assert open_session(artifacts[".ts"]).example_input(2, sample_shape=(3, 32, 32)).shape == (2, 3, 32, 32)


def test_input_shape_rules():
    assert TensorInfo("x", (1, 3, 8, 8)).concrete(1) == (1, 3, 8, 8)
    with pytest.raises(UserError, match="fixed batch of 1"):
        TensorInfo("x", (1, 3, 8, 8)).concrete(4)
    with pytest.raises(UserError, match="dynamic dimensions"):
        TensorInfo("x", ("batch", 3, "h", "w")).concrete(1)
    assert TensorInfo("x", ("batch", 3, "h", "w")).concrete(2, (3, 16, 16)) == (2, 3, 16, 16)


def test_default_runtime_by_suffix():
    assert [default_runtime_for(f"m{s}") for s in (".onnx", ".ort", ".xml", ".pt2", ".ts", ".pt", ".engine")] == \
        ["onnxruntime", "onnxruntime", "openvino", "torch", "torch", "torch", "tensorrt"]
    with pytest.raises(UserError, match="--runtime"):
        default_runtime_for("model.bin")
    assert RUNTIMES.names() == ["onnxruntime", "openvino", "tensorrt", "torch"]


def test_named_runtime_reads_any_suffix(artifacts, tmp_path):
    # exporters check parity on a temporary `.part` file before renaming it into place
    part = shutil.copy(artifacts[".onnx"], tmp_path / ".resnet20.onnx.abc.part")
    assert open_session(part, "onnxruntime").run(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)


def test_bad_artifacts_are_user_errors(artifacts, tmp_path):
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    (tmp_path / "garbage.xml").write_text("<net>")
    cases = [(tmp_path / "missing.onnx", None, "not found"),
             (tmp_path, "onnxruntime", "folder"),
             (tmp_path / "garbage.onnx", None, "onnxruntime cannot load"),
             (tmp_path / "garbage.xml", None, "OpenVINO cannot load"),
             (artifacts["state_dict"], None, "does not unpickle"),
             (artifacts[".onnx"], "tflite", "unknown runtime"),
             (tmp_path / "m.engine", None, "not found")]
    for path, runtime, message in cases:
        with pytest.raises(UserError, match=message):
            open_session(path, runtime)
    with pytest.raises(UserError, match="threads"):
        open_session(artifacts[".onnx"], threads=0)


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_wrong_input_shape_is_a_user_error(artifacts, suffix):
    with pytest.raises(UserError, match=r"shape \[1, 3, 16, 16\]"):
        open_session(artifacts[suffix]).run(np.zeros((1, 3, 16, 16), np.float32))


def test_missing_runtime_package_gives_install_hint(artifacts, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(UserError, match="pip install openvino"):
        open_session(artifacts[".xml"])


def test_runtimes_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import runtimes, runtimes.onnxruntime, runtimes.openvino, runtimes.torch\n"
            "assert not [m for m, v in sys.modules.items() if m.split('.')[0] == 'torch' and v is not None]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cli_takes_torch_export_and_torchscript_models(artifacts, resnet20, tmp_path):
    """The .pt2 and TorchScript inputs through the verbs a user types: export (with parity), eval, profile."""
    import json

    from tests.conftest import TEST_LOSSLESS, run_cli

    static = tmp_path / "static.pt2"  # traced at batch 1 without a dynamic batch: torch guards the batch size
    torch.export.save(torch.export.export(resnet20, (torch.randn(1, 3, 32, 32),)), str(static))
    for model, extra in ((artifacts[".pt2"], ()), (static, ()), (artifacts[".ts"], ("--input-shape", "3,32,32"))):
        out = tmp_path / f"{model.stem}{model.suffix.replace('.', '_')}.onnx"
        proc = run_cli("export", model, *extra, "-o", out, "--eval-data", f"cifar10:{TEST_LOSSLESS}", "--json")
        assert proc.returncode == 0, proc.stderr
        art = json.loads(proc.stdout)["artifacts"][0]
        assert art["parity"]["top1_agreement"] == 1.0 and art["parity"]["max_rel_err"] < 1e-4
        assert art["accuracy"]["cifar10_test_lossless846"] == pytest.approx(91.73, abs=0.01)  # the published model
        batch = open_session(out).inputs[0].shape[0]
        assert batch == 1 if model == static else isinstance(batch, str)  # a static program exports its own batch
    proc = run_cli("eval", static, "--data", f"cifar10:{TEST_LOSSLESS}", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["accuracy"]["cifar10_test_lossless846"] == pytest.approx(91.73, abs=0.01)
    proc = run_cli("profile", artifacts[".ts"], "--input-shape", "3,32,32", "--iterations", "5", "--warmup", "1",
                   "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["latency_ms"]["n"] == 5
