"""A model's own normalization (--mean/--std, recipe `normalization:`) reaches every verb and the artifacts.

The model under test really expects pixels in [0, 1] (mean 0, std 1): ResNet-20 behind an exact affine map from that input
space to the CIFAR normalization it was trained with. Fed with the right normalization it scores exactly what
ResNet-20 scores; fed with the CIFAR default (what an artifact without recorded normalization used to get) it
scores less.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from compress.zoo import CIFAR_MEAN, CIFAR_STD
from tests.conftest import RESNET20, TEST_LOSSLESS, run_cli

MEAN, STD = 0.0, 1.0  # pixels in [0, 1]: far enough from the CIFAR default to matter
ARCH = "tests.compress.test_normalization:renormalized_resnet20"
DATA = f"cifar10:{TEST_LOSSLESS}"
RESNET20_TOP1 = 91.73  # ResNet-20 on lossless846 with its own normalization (README, benchmarks)


class Renormalized(nn.Module):
    """Inputs normalized with (MEAN, STD) -> the CIFAR-normalized input ResNet-20 expects, exactly."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("scale", torch.tensor([STD / s for s in CIFAR_STD]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([(MEAN - m) / s for m, s in zip(CIFAR_MEAN, CIFAR_STD)]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.net(x * self.scale + self.shift)


def renormalized_resnet20(num_classes: int = 10) -> nn.Module:
    from compress.zoo.resnet_cifar import resnet20

    return Renormalized(resnet20(num_classes=num_classes))


@pytest.fixture(scope="module")
def state_dict(tmp_path_factory):
    from compress.io import load_model

    model = renormalized_resnet20()
    model.net.load_state_dict(load_model(RESNET20, arch="resnet20").model.state_dict())
    path = tmp_path_factory.mktemp("renorm") / "renorm.pt"
    torch.save(model.state_dict(), path)
    return path


def _top1(*args) -> float:
    proc = run_cli("eval", *args, "--data", DATA, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["accuracy"]["cifar10_test_lossless846"]


def test_torch_model_uses_the_given_normalization(state_dict):
    assert _top1(state_dict, "--arch", ARCH, "--mean", str(MEAN), "--std", str(STD)) == RESNET20_TOP1
    assert _top1(state_dict, "--arch", ARCH) < RESNET20_TOP1 - 0.5  # the CIFAR default is the wrong input space


def test_artifacts_record_normalization_and_eval_reads_it(state_dict, tmp_path):
    """ONNX metadata and OpenVINO rt_info carry the spec: eval needs no sidecar and no flags."""
    for fmt, name in (("onnx", "m.onnx"), ("openvino", "m.xml")):
        out = tmp_path / name
        proc = run_cli("export", state_dict, "--arch", ARCH, "--mean", str(MEAN), "--std", str(STD),
                       "--format", fmt, "-o", out, "--eval-data", DATA)
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json") == []  # nothing beside it
        assert _top1(out) == RESNET20_TOP1, fmt
        if fmt == "onnx":  # OpenVINO running the .onnx reads its metadata too (it used the default, with a warning)
            assert _top1(out, "--runtime", "openvino") == RESNET20_TOP1
        # an explicit --mean/--std wins over what the artifact records
        assert _top1(out, "--mean", ",".join(map(str, CIFAR_MEAN)), "--std", ",".join(map(str, CIFAR_STD))) < RESNET20_TOP1 - 0.5

    import onnxruntime as ort

    meta = json.loads(ort.InferenceSession(str(tmp_path / "m.onnx")).get_modelmeta().custom_metadata_map["compress.input"])
    assert meta["mean"] == [MEAN] * 3 and meta["std"] == [STD] * 3 and meta["shape"] == [None, 3, 32, 32]


def test_saved_model_and_recipe_keep_normalization(state_dict, tmp_path):
    """A recipe's `normalization:` is stored in the saved model: the next verb needs no flags."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {state_dict}\narch: {ARCH}\nnormalization: {{mean: [{MEAN}], std: [{STD}, {STD}, {STD}]}}\n"
                      f"data: {{calib: {DATA}, eval: [{DATA}]}}\n"
                      "stages:\n  - {stage: quantize, method: minmax, bits: w8a8, name: q}\n")
    proc = run_cli("run", recipe, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    saved = next(p for p in (tmp_path / "out").rglob("q*.pt"))
    info = json.loads(run_cli("info", saved, "--arch", ARCH, "--json").stdout)  # a custom arch is named again
    assert info["input"]["mean"] == [MEAN] * 3 and info["input"]["std"] == [STD] * 3, info["input"]
    assert _top1(saved, "--arch", ARCH) > RESNET20_TOP1 - 0.5, manifest  # int8 of the right input space, not the CIFAR default's


@pytest.mark.parametrize("args, message", [
    (["--mean", "0.5"], "--mean and --std go together"),
    (["--mean", "0.5", "--std", "0"], "std must be positive"),
    (["--mean", "a", "--std", "1"], "--mean 'a'"),
    (["--mean", "0.5,0.5", "--std", "1,1"], "the input has 3 channels"),
])
def test_bad_normalization_is_one_line(args, message):
    proc = run_cli("info", RESNET20, "--arch", "resnet20", *args)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_recipe_normalization_must_be_mean_and_std(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {RESNET20}\narch: resnet20\nnormalization: [0.5, 0.5]\nstages:\n  - {{stage: eval}}\n")
    proc = run_cli("run", recipe, "-o", tmp_path / "out")
    assert proc.returncode == 2 and "normalization is a mapping" in proc.stderr, proc.stderr


def test_profile_reference_is_read_in_the_artifacts_input_space(state_dict, tmp_path):
    """--reference (a state dict of a custom arch records no normalization) is evaluated with the normalization the
    artifact records: it used to get the default, scored 19.98% against the artifact's 91.73%, and an
    accuracy.drop gate passed a drop of -72 pt."""
    out = tmp_path / "m.onnx"
    assert run_cli("export", state_dict, "--arch", ARCH, "--mean", str(MEAN), "--std", str(STD), "-o", out).returncode == 0
    proc = run_cli("profile", out, "--iterations", "5", "--warmup", "1", "--accuracy-data", DATA, "--reference",
                   state_dict, "--reference-arch", ARCH, "--budget", "accuracy.drop=0.5", "--json")
    assert proc.returncode == 0, proc.stderr
    prof = json.loads(proc.stdout)
    assert round(prof["accuracy"]["top1"], 2) == RESNET20_TOP1 and prof["accuracy"]["normalization"]["from"] == "artifact"
    drop = next(r for r in prof["gates"]["budgets"] if r["metric"] == "accuracy.drop")
    assert drop["measured"] == pytest.approx(0.0, abs=1e-6), drop
