"""`--format ort`: the real ResNet-20 exported to ONNX Runtime's mobile format with the command the Android example
runs, loaded back in ONNX Runtime and compared with torch on real CIFAR-10 images; the required-operators config
and the app manifest (model.json)."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.data import Normalizer, load_dataset
from compress.errors import GateFailed
from exporters import EXPORTERS, SUFFIX
from exporters.ort import CIFAR10_CLASSES, companion_paths, export_ort, required_operators
from runtimes import open_session
from tests.conftest import RESNET20, TEST_LOSSLESS, run_cli


@pytest.fixture(scope="module")
def images(resnet20) -> torch.Tensor:
    ds = load_dataset(f"cifar10:{TEST_LOSSLESS}")
    return Normalizer(resnet20.spec.mean, resnet20.spec.std)(ds.images[:64])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The command examples/android/compress-model.gradle.kts runs before preBuild, through the real CLI."""
    app = tmp_path_factory.mktemp("android-app")
    assets = app / "src" / "main" / "assets"
    r = run_cli("-q", "export", RESNET20, "--arch", "resnet20", "--format", "ort", "--precision", "auto",
                "-o", assets / "model.ort", "--json", cwd=app)
    assert r.returncode == 0, r.stderr
    (art,) = json.loads(r.stdout)["artifacts"]
    return assets, art


def test_registered():
    assert EXPORTERS.get("ort") is export_ort and SUFFIX["ort"] == ".ort"


def test_ort_file_loads_in_onnxruntime_and_matches_torch(resnet20, images, exported):
    d, art = exported
    assert art["format"] == "ort" and art["precision"] == "fp32" and Path(art["path"]) == d / "model.ort"
    assert art["parity"]["top1_agreement"] == 1.0 and art["parity"]["max_rel_err"] < 1e-4
    with torch.no_grad():
        ref = resnet20.model.eval()(images).numpy()
    with open_session(d / "model.ort", threads=1) as s:
        assert s.runtime == "onnxruntime"
        got = np.concatenate([s.run(images[:1].numpy()), s.run(images[1:].numpy())])  # dynamic batch kept
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert (d / "model.ort").read_bytes()[4:8] == b"ORTM"  # the flatbuffer's file identifier: not an ONNX protobuf


def test_manifest_fields_and_sha256(resnet20, exported):
    d, art = exported
    m = json.loads((d / "model.json").read_text())
    assert m["model"] == "model.ort" and m["format"] == "ort" and m["precision"] == "fp32"
    assert m["sha256"] == hashlib.sha256((d / "model.ort").read_bytes()).hexdigest() == art["sha256"]
    assert m["size_bytes"] == (d / "model.ort").stat().st_size
    assert m["inputs"] == [{"name": "input", "shape": [-1, 3, 32, 32], "dtype": "float32", "layout": "NCHW"}]
    assert m["outputs"] == [{"name": "logits", "shape": [-1, 10], "dtype": "float32"}]
    assert m["normalization"]["mean"] == list(resnet20.spec.mean) and m["normalization"]["std"] == list(resnet20.spec.std)
    assert m["normalization"]["scale"] == pytest.approx(1 / 255) and m["normalization"]["channel_order"] == "RGB"
    assert m["labels"] == CIFAR10_CLASSES and len(m["labels"]) == 10
    assert m["required_operators_config"] == "model.required_operators.config"
    assert m["converter"]["optimization"] == {"style": "fixed", "level": "all", "target_platform": "arm"}


def test_required_operators_config(exported):
    d, art = exported
    config = d / "model.required_operators.config"
    assert sorted(art["files"]) == sorted(str(p) for p in companion_paths(d / "model.ort").values())
    assert sorted(p.name for p in d.iterdir()) == ["model.json", "model.ort", "model.required_operators.config"]
    assert art["size_bytes"] == sum(Path(f).stat().st_size for f in art["files"])
    ops = required_operators(config)
    flat = {op for names in ops.values() for op in names}
    # ORT's level-"all" optimizer fuses Conv+ReLU into com.microsoft FusedConv; either way the conv kernel is listed
    assert {"Conv", "FusedConv"} & flat and {"Gemm", "GlobalAveragePool"} <= flat
    assert any(k.startswith("ai.onnx;") for k in ops)
    text = config.read_text()
    assert "# - model.ort" in text and "/tmp" not in text  # no temporary path in a file that ships with the app


def test_failed_parity_leaves_nothing(resnet20, tmp_path, monkeypatch):
    import exporters.ort as ort

    def fail(*a, **k):
        raise GateFailed("parity check failed (injected)")

    monkeypatch.setattr(ort, "check_parity", fail)
    with warnings.catch_warnings(), pytest.raises(GateFailed):
        warnings.simplefilter("ignore")
        export_ort(resnet20.model, resnet20.spec, tmp_path / "model.ort")
    assert list(tmp_path.iterdir()) == []  # no .ort, config, manifest, or temporary folder




def test_run_table_says_ort_timings_on_x86_are_not_the_phones(monkeypatch):
    """.ort files are optimized for ARM: on x86 they measured ~2.5x slower than .onnx with no word of why."""
    from types import SimpleNamespace

    from compress import report

    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    rows = [{"model": "original", "format": "ort", "precision": "fp32", "p50_ms": 1.0}]
    with report.console.capture() as captured:
        report.print_run(rows, SimpleNamespace(manifest_path=None, profiles=[]), SimpleNamespace(eval_sets={}))
    assert "optimized for ARM" in captured.get()
