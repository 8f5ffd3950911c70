"""Feature distillation in recovery fine-tuning: the kept-channel map the pruning engine records, and the loss."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from compress.assets import data_path
from compress.data import load_dataset
from compress.errors import UserError
from compress.finetune import FeatureDistill, feature_points, finetune, recalibrate_bn
from compress.prune.baselines import l1_scores
from compress.prune.engine import keep_sets, prune_to_keep, tracked_channels
from compress.prune import METHODS
from compress.stages import Context, build_config
from tests.conftest import RESNET20, TEST_LOSSLESS, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pruned(resnet20):
    teacher = resnet20.model.eval()
    student = copy.deepcopy(teacher)
    x = resnet20.spec.example(1)
    keep = keep_sets(student, x, l1_scores(student), ratio=0.5)
    with tracked_channels(student) as kept:
        prune_to_keep(student, x, keep)
    return teacher, student.eval(), kept


def test_tracked_channels_name_the_original_channels_and_keep_the_statistics(pruned):
    teacher, student, kept = pruned
    t_mods, s_mods = dict(teacher.named_modules()), dict(student.named_modules())
    bns = [n for n, m in s_mods.items() if isinstance(m, nn.BatchNorm2d)]
    assert set(kept) == {n for n in bns if s_mods[n].num_features < t_mods[n].num_features} and kept
    for n in bns:
        idx = torch.tensor(kept.get(n, range(t_mods[n].num_features)))
        s, t = s_mods[n], t_mods[n]
        assert len(idx) == s.num_features and len(set(idx.tolist())) == len(idx)
        for attr in ("weight", "bias", "running_mean", "running_var"):  # the statistics came back, not the ids
            assert torch.equal(getattr(s, attr), getattr(t, attr)[idx]), (n, attr)


def test_feature_points_default_to_the_stages(pruned):
    _, student, kept = pruned
    points = feature_points(student, kept)
    assert list(points) == ["layer1", "layer2", "layer3"]
    assert points["layer3"] == kept["layer3.2.bn2"]  # a stage's channels are its last block's BN's
    with pytest.raises(UserError, match="no module named 'nope'"):
        feature_points(student, kept, ["nope"])
    with pytest.raises(UserError, match="holds no BatchNorm"):
        feature_points(student, kept, ["linear"])


def _stage_gap(student: nn.Module, teacher: nn.Module, points: dict, x: torch.Tensor) -> float:
    """Relative squared distance of the student's stage outputs to the teacher's mapped channels."""
    out: dict = {}
    hooks = [getattr(m, n).register_forward_hook(lambda _m, _i, o, k=(tag, n): out.__setitem__(k, o))
             for tag, m in (("s", student), ("t", teacher)) for n in points]
    with torch.no_grad():
        student.eval()(x), teacher.eval()(x)
    for h in hooks:
        h.remove()
    return sum(float(((out["s", n] - out["t", n][:, idx]) ** 2).mean() / (out["t", n][:, idx] ** 2).mean())
               for n, idx in points.items())


def test_feature_distillation_pulls_the_stages_to_the_teacher(pruned, resnet20, tmp_path):
    teacher, student0, kept = pruned
    sub = load_dataset(f"cifar10:{data_path('cifar10_train20k_jpeg.npz')}").subset(1024, seed=0)
    np.savez(tmp_path / "train.npz", x=sub.images, y=sub.labels)
    ctx = Context(spec=resnet20.spec, data={"train": f"cifar10:{tmp_path / 'train.npz'}"})
    student0 = copy.deepcopy(student0)
    recalibrate_bn(student0, ctx, 256, role="train")  # as the pruning flow does before fine-tuning
    points = feature_points(student0, kept)
    x = ctx.normalizer()(sub.images[:128])
    before = _stage_gap(student0, teacher, points, x)
    gaps = {}
    for weight in (0.0, 20.0):
        student = copy.deepcopy(student0)
        torch.manual_seed(0)
        finetune(student, ctx, epochs=2, lr=0.01, batch_size=64, teacher=teacher, alpha=0.2,
                 features=FeatureDistill(points, weight))
        gaps[weight] = _stage_gap(student, teacher, points, x)
        assert not student.layer1._forward_hooks and not teacher.layer1._forward_hooks  # the taps are gone
    # 32 steps: logits-only KD drifts the stages away from the teacher's; the feature term pulls them closer
    assert gaps[20.0] < 0.7 * gaps[0.0] and gaps[20.0] < 0.8 * before
    # channels mapped to the wrong teacher channels cannot be matched: the loss says so by staying high
    shuffled = {n: idx[::-1] for n, idx in points.items()}
    assert _stage_gap(student, teacher, shuffled, x) > 2 * gaps[20.0]


def test_feature_distillation_options_are_checked(resnet20, tmp_path):
    m = METHODS.get("l1")
    with pytest.raises(UserError, match="finetune_epochs > 0"):
        build_config(m, {"ratio": 0.5, "distill_features": 5.0})
    with pytest.raises(UserError, match="0 or more"):
        build_config(m, {"ratio": 0.5, "distill_features": -1.0, "finetune_epochs": 1})
    r = run_cli("prune", RESNET20, "--arch", "resnet20", "--method", "l1", "--ratio", "0.5", "--distill-features", "5",
                "--no-distill", "--finetune-epochs", "1", "--data", f"cifar10:{TEST_LOSSLESS}")
    assert r.returncode == 2 and "--distill-features" in r.stderr and "Traceback" not in r.stderr
    # an unknown distillation point is refused before any pruning work, with nothing written
    out = tmp_path / "p.pt"
    r = run_cli("prune", RESNET20, "--arch", "resnet20", "--method", "l1", "--ratio", "0.5", "--distill-features", "5",
                "--distill-points", "layer9", "--finetune-epochs", "1", "--data", f"cifar10:{TEST_LOSSLESS}", "-o", out)
    assert r.returncode == 2 and "no module named 'layer9'" in r.stderr and "pruned l1" not in r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.iterdir())
