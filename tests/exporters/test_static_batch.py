"""`compress export --batch N`: a fixed batch baked into the artifact (ONNX and OpenVINO), and every consumer
(parity, accuracy, profile) still working on it; the real ResNet-20 and real CIFAR-10 images."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from compress.data import Normalizer, load_dataset
from runtimes import open_session
from tests.conftest import RESNET20, TEST_LOSSLESS, run_cli


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("static")
    for name, extra in (("dyn.onnx", []), ("b1.onnx", ["--batch", "1"]), ("b4.xml", ["--batch", "4"])):  # .xml: OpenVINO
        r = run_cli("export", RESNET20, "--arch", "resnet20", *extra, "-o", d / name, "--json")
        assert r.returncode == 0, r.stderr
    return d


def test_onnx_input_and_output_have_the_fixed_batch(exported):
    m = onnx.load(str(exported / "b1.onnx"))
    assert _dims(m.graph.input[0]) == [1, 3, 32, 32]
    assert _dims(m.graph.output[0]) == [1, 10]
    assert _dims(onnx.load(str(exported / "dyn.onnx")).graph.input[0])[0] == "batch"


def test_fixed_batch_session_takes_any_count_and_matches_dynamic(exported):
    ds = load_dataset(f"cifar10:{TEST_LOSSLESS}")
    x = Normalizer((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(ds.images[:7]).numpy()
    ref = open_session(exported / "dyn.onnx").run(x)
    ir = open_session(exported / "b4.xml")
    assert ir.fixed_batch == 4
    got = ir.run(x)  # 7 samples = a batch of 4 and a zero-padded batch of 4, trimmed back to 7
    assert got.shape == (7, 10)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_eval_and_profile_on_a_fixed_batch_artifact(exported):
    r = run_cli("eval", exported / "b4.xml", "--data", f"cifar10:{TEST_LOSSLESS}", "--json")
    assert r.returncode == 0, r.stderr
    assert "91.73" in r.stdout  # the dynamic export's (and torch's) top-1 on these 846 images
    ok = run_cli("profile", exported / "b1.onnx", "--iterations", "5", "--warmup", "1", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["settings"]["batch"] == 1
    bad = run_cli("profile", exported / "b4.xml", "--iterations", "5")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "--batch 4" in bad.stderr


def test_bad_batch_values_are_one_line_errors(tmp_path):
    r = run_cli("export", RESNET20, "--arch", "resnet20", "--batch", "0", "-o", tmp_path / "x.onnx")
    assert r.returncode == 2 and not (tmp_path / "x.onnx").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {RESNET20}\narch: resnet20\nstages:\n  - {{stage: export, formats: [onnx], batch: two}}\n")
    r = run_cli("run", recipe, "-o", tmp_path / "out")
    assert r.returncode == 2 and "batch must be a positive integer" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
