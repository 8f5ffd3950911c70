"""The staged pipeline end to end through the real CLI: prune -> quantize -> export -> profile, manifest, recipes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from compress.fileio import sha256_file
from compress.io import load_model
from devices.profile import load_profile
from tests.conftest import CALIB1000, RESNET20, TEST_LOSSLESS, run_cli


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    recipe = {
        "model": str(RESNET20), "arch": "resnet20", "seed": 0,
        "data": {"calib": f"cifar10:{CALIB1000}", "eval": [f"cifar10:{TEST_LOSSLESS}"]},
        "stages": [
            {"stage": "prune", "method": "l1", "ratio": 0.25, "bn_recalibration": 256},
            {"stage": "quantize", "method": "minmax", "bits": "w8a8", "calib_size": 128},
            {"stage": "export", "formats": ["onnx"], "variants": ["original", "quantized"]},
            {"stage": "profile", "threads": 1, "warmup": 5, "iterations": 30, "rounds": 3},
        ],
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run_cli("run", path, "-o", tmp / "out", "--json")
    assert proc.returncode == 0, proc.stderr
    return tmp / "out", json.loads(proc.stdout)


def test_manifest_records_the_run(recipe_run):
    out, result = recipe_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"] == "compress.manifest/1"
    assert manifest["input_model"]["sha256"] == sha256_file(RESNET20)
    assert [s["stage"] for s in manifest["stages"]] == ["prune", "quantize", "export", "profile"]
    assert manifest["environment"]["versions"]["torch"].startswith("2.13")
    for art in manifest["artifacts"]:  # every artifact is on disk, hashed and parity-checked
        assert sha256_file(art["path"]) == art["sha256"]
        assert art["parity"]["top1_agreement"] >= 0.95
    for prof in manifest["profiles"]:
        p = load_profile(prof["path"])
        assert p["latency_ms"]["n"] == 30
        # rounds: 3 fresh processes per artifact; the kept profile is the median round
        assert len(p["rounds_p50_ms"]) == 3 and p["latency_ms"]["p50"] == sorted(p["rounds_p50_ms"])[1]
    for name in ("pruned", "quantized"):
        v = manifest["variants"][name]
        assert sha256_file(v["path"]) == v["sha256"]


def test_table_shows_compression_and_honest_accuracy(recipe_run):
    _, result = recipe_run
    rows = {(r["model"], r["format"]): r for r in result["table"]}
    orig, pruned, quant = rows[("original", "onnx")], rows[("pruned", "torch")], rows[("quantized", "onnx")]
    assert abs(orig["accuracy"]["cifar10_test_lossless846"] - 91.73) < 0.01  # the published number, via ORT
    assert pruned["flops"] < 0.75 * orig["flops"] and pruned["params"] < orig["params"]
    assert quant["precision"] == "int8"
    # INT8 of the pruned model: measured through ONNX Runtime, close to its torch fake-quant accuracy
    assert quant["p50_ms"] > 0 and quant["peak_rss_mb"] > 0
    assert 0 < quant["accuracy"]["cifar10_test_lossless846"] <= orig["accuracy"]["cifar10_test_lossless846"]


def test_saved_variants_reload_and_chain(recipe_run, tmp_path):
    out, _ = recipe_run
    lm = load_model(out / "quantized.pt")
    assert [h["stage"] for h in lm.history] == ["prune", "quantize"]
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(lm.model(x), load_model(out / "quantized.pt").model(x))
    # compress prune -> compress quantize on the pruned file, through the CLI
    proc = run_cli("quantize", out / "pruned.pt", "-m", "minmax", "--calib", f"cifar10:{CALIB1000}",
                   "--calib-size", "64", "-o", tmp_path / "q.pt", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["metrics"]["precision"] == "int8"


def test_verb_save_recipe_replays_to_the_same_model(tmp_path):
    proc = run_cli("prune", RESNET20, "--arch", "resnet20", "-m", "l1", "--ratio", "0.5", "--bn-recalibration", "0",
                   "-o", tmp_path / "a.pt", "--save-recipe", tmp_path / "r.yaml")
    assert proc.returncode == 0, proc.stderr
    recipe = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert recipe["stages"][0]["method"] == "l1" and recipe["stages"][0]["ratio"] == 0.5
    model = Path(recipe["model"])  # absolute stays absolute: the recipe can be moved
    assert model.is_absolute() and model.resolve() == RESNET20.resolve()
    proc = run_cli("run", tmp_path / "r.yaml", "-o", tmp_path / "replay")
    assert proc.returncode == 0, proc.stderr
    a, b = load_model(tmp_path / "a.pt").model, load_model(tmp_path / "replay" / "a.pt").model
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x))


def test_first_line_of_an_exception():
    from compress.errors import first_line

    assert first_line(EOFError()) == "EOFError"  # torch.load of a cut file raises one with no message
    assert first_line(ValueError("\n  bad thing\nmore")) == "bad thing"
    assert first_line(ValueError("x" * 500), 10) == "x" * 10
