"""A user's own architecture (--arch package.module:factory): factories without num_classes, class counts read
from the checkpoint's shapes, 1-channel inputs, data that does not fit the model. Each case used to end in a
traceback or a silently wrong number."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.conftest import TEST_LOSSLESS, run_cli

MODULE = "tests.compress.test_custom_models"


class GrayNet(nn.Module):
    """1 x 28 x 28 input; a squeeze-and-excitation block whose Linear layers come after the classifier in the
    state dict (the class count is not the last 2-D weight's)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.fc = nn.Linear(16, num_classes)
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.se = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16), nn.Sigmoid())

    def forward(self, x):
        if x.shape[-1] != 28:
            raise ValueError("GrayNet takes 28x28 images")
        h = self.conv(x)
        h = h * self.se(h.mean((2, 3)))[:, :, None, None]
        return self.fc(h.mean((2, 3)))


def graynet(num_classes: int = 5) -> nn.Module:
    return GrayNet(num_classes)


def graynet_fixed() -> nn.Module:  # a factory that takes no num_classes
    return GrayNet()


def graynet_exits() -> nn.Module:  # a factory that calls sys.exit: it ended the CLI with exit 0 and no output
    raise SystemExit(0)


def graynet_none():
    return None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("custom")
    torch.manual_seed(0)
    torch.save(GrayNet(5).state_dict(), d / "gray5.pt")
    torch.save(GrayNet(7).state_dict(), d / "gray7.pt")
    with np.load(TEST_LOSSLESS) as z:
        x, y = z["x"][:64], z["y"][:64]
    gray = x.mean(-1, keepdims=True).astype(np.uint8)
    np.savez(d / "gray28.npz", x=gray[:, 2:30, 2:30], y=y % 5)
    np.savez(d / "gray28_10.npz", x=gray[:, 2:30, 2:30], y=y)  # labels 0-9 for a 5-class model
    np.savez(d / "gray32.npz", x=gray, y=y % 5)
    from PIL import Image

    for i in range(10):
        (d / "folder" / f"c{y[i] % 5}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(d / "folder" / f"c{y[i] % 5}" / f"{i}.png")  # RGB files, a grayscale model
    return d


def _ok(*args) -> dict:
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _error(*args) -> str:
    """The one error line (notes may come before it), exit 2, no traceback."""
    proc = run_cli(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("error:") and sum(ln.startswith("error:") for ln in lines) == 1, proc.stderr
    return lines[-1]


def test_class_count_and_factories(files):
    shape = ("--input-shape", "1,28,28")
    # the 7-class checkpoint builds graynet(num_classes=7): read from the one layer whose output size differs
    info = _ok("info", files / "gray7.pt", "--arch", f"{MODULE}:graynet", *shape)
    assert info["params"] == sum(p.numel() for p in GrayNet(7).parameters())
    # a factory without num_classes: called without it (it used to get num_classes= and fail)
    assert _ok("info", files / "gray5.pt", "--arch", f"{MODULE}:graynet_fixed", *shape)["params"] == \
        sum(p.numel() for p in GrayNet(5).parameters())
    assert "takes no num_classes" in _error("info", files / "gray7.pt", "--arch", f"{MODULE}:graynet_fixed", *shape)


def test_factories_that_fail_are_one_line_errors(files):
    shape = ("--input-shape", "1,28,28")
    assert "graynet_exits() failed: SystemExit" in _error("info", files / "gray5.pt", "--arch", f"{MODULE}:graynet_exits", *shape)
    assert "returned a NoneType, not a torch.nn.Module" in _error("info", files / "gray5.pt", "--arch",
                                                                   f"{MODULE}:graynet_none", *shape)


def test_a_saved_custom_arch_model_imports_its_module_only_when_named(files, tmp_path):
    """The saved file records `arch: module:factory`; rebuilding it imports that module, which is code the file
    chose. The user names it (or passes --trust-pickle); a zoo arch needs nothing."""
    arch, shape = ("--arch", f"{MODULE}:graynet"), ("--input-shape", "1,28,28")
    saved = tmp_path / "p.pt"
    assert run_cli("prune", files / "gray5.pt", *arch, *shape, "-m", "l1", "--ratio", "0.25", "-o", saved).returncode == 0
    assert f"confirm with --arch {MODULE}:graynet" in _error("info", saved)
    assert _ok("info", saved, *arch)["params"] < sum(p.numel() for p in GrayNet(5).parameters())
    assert _ok("info", saved, "--trust-pickle")["params"] == _ok("info", saved, *arch)["params"]


def test_one_channel_inputs_and_data_that_does_not_fit(files):
    arch = ("--arch", f"{MODULE}:graynet")
    assert "give its shape with --input-shape C,H,W" in _error("info", files / "gray5.pt", *arch)
    shape = ("--input-shape", "1,28,28")
    acc = _ok("eval", files / "gray5.pt", *arch, *shape, "--data", f"cifar10:{files / 'gray28.npz'}")["accuracy"]
    assert 0 <= acc["gray28"] <= 100
    # the default RGB mean/std is averaged for one channel; a folder of RGB files is read as grayscale
    assert _ok("eval", files / "gray5.pt", *arch, *shape, "--data", f"folder:{files / 'folder'}")["accuracy"]["folder"] >= 0
    assert "images are 32x32 with 1 channel(s), the model takes 28x28" in _error(
        "eval", files / "gray5.pt", *arch, *shape, "--data", f"cifar10:{files / 'gray32.npz'}")
    # fine-tuning on labels the model cannot output: refused before training, as eval refuses it
    assert "labels go up to 9 but the model has 5 outputs" in _error(
        "prune", files / "gray5.pt", *arch, *shape, "-m", "l1", "--ratio", "0.25", "--finetune-epochs", "1",
        "--data", f"cifar10:{files / 'gray28_10.npz'}", "-o", files / "p.pt")
    assert not (files / "p.pt").exists()


def test_recipe_data_and_tensorrt_are_checked_before_any_stage(files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {files / 'gray5.pt'}\narch: {MODULE}:graynet\ninput_shape: [1, 28, 28]\n"
                      f"data: {{calib: cifar10:{tmp_path / 'missing.npz'}}}\n"
                      "stages:\n  - {stage: prune, method: l1, ratio: 0.25}\n")
    assert "data file not found" in _error("run", recipe, "-o", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    try:  # TensorRT absent: its export stage must fail before the prune stage runs
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        recipe.write_text(f"model: {files / 'gray5.pt'}\narch: {MODULE}:graynet\ninput_shape: [1, 28, 28]\n"
                          "stages:\n  - {stage: prune, method: l1, ratio: 0.25}\n  - {stage: export, formats: [onnx, tensorrt]}\n")
        assert "TensorRT export needs the tensorrt package" in _error("run", recipe, "-o", tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_one_channel_artifact_without_recorded_normalization(files, tmp_path):
    """An artifact that records no normalization gets the default, spread over its channels: a 1-channel ONNX got
    the 3-value RGB default and failed at the runtime."""
    import onnx

    out = tmp_path / "g.onnx"
    assert run_cli("export", files / "gray5.pt", "--arch", f"{MODULE}:graynet", "--input-shape", "1,28,28",
                   "-o", out).returncode == 0
    model = onnx.load(str(out))
    del model.metadata_props[:]
    onnx.save(model, str(out))
    proc = run_cli("eval", out, "--data", f"cifar10:{files / 'gray28.npz'}", "--json")
    assert proc.returncode == 0 and "no normalization recorded" in proc.stderr, proc.stderr
    assert _ok("eval", files / "gray5.pt", "--arch", f"{MODULE}:graynet", "--input-shape", "1,28,28",
               "--data", f"cifar10:{files / 'gray28.npz'}")["accuracy"] == json.loads(proc.stdout)["accuracy"]
