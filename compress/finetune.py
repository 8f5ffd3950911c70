"""Recovery fine-tuning shared by every method that changes weights (pruning, low-rank, quantization-aware).

SGD with momentum and a per-step cosine schedule on the `train` data, CIFAR flip/crop augmentation. With a
teacher (the model before compression) the loss is knowledge distillation (Hinton et al. 2015): the KL
divergence between temperature-softened outputs, times T^2 so its gradient scale does not depend on T.
Labels are optional: unlabeled data gives pure distillation; labeled data mixes in cross-entropy.
Optionally (`features`) the student's intermediate outputs are also pulled towards the teacher's at named modules
(FitNets, Romero et al. 2015, without a regressor: a pruned student's channels are a subset of the teacher's, so
each student channel is compared with the teacher channel it was cut from).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.data import batches
from compress.errors import UserError
from compress.metrics import check_labels
from compress.progress import log as note
from compress.progress import track
from compress.stages import Context


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1),
                    reduction="batchmean", log_target=True) * (t * t)


@dataclass
class FeatureDistill:
    """Feature distillation at named modules: for each module (the same name in student and teacher), the teacher
    channel each student output channel corresponds to; `weight` scales the summed per-module loss, the mean
    squared difference divided by the mean square of the teacher's features (so modules of any scale weigh alike)."""

    points: dict[str, list[int]]
    weight: float


def feature_points(model: nn.Module, kept: dict[str, list[int]], names: list[str] | None = None) -> dict[str, list[int]]:
    """Distillation points of a pruned `model` and their channel maps, from the pruning's kept BatchNorm channels
    (compress.prune.engine.tracked_channels). A module's output channels are taken to be those of the last
    BatchNorm inside it (true of residual blocks and stages, and of conv-BN-activation stacks).
    names: the modules; default: the model's top-level containers that hold a BatchNorm (ResNet: its stages)."""
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in model.named_children() if list(m.children())
                 and any(isinstance(b, nn.modules.batchnorm._BatchNorm) for b in m.modules())]
    points: dict[str, list[int]] = {}
    for name in names:
        if name not in modules:
            raise UserError(f"feature distillation: no module named {name!r} in the model")
        bns = [n for n, m in modules[name].named_modules(prefix=name)
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            raise UserError(f"feature distillation: {name!r} holds no BatchNorm to map its channels to the teacher's")
        last = bns[-1]
        points[name] = kept.get(last, list(range(modules[last].num_features)))  # not in kept: nothing was cut
    if not points:
        raise UserError("feature distillation: the model has no top-level block with a BatchNorm; name the modules")
    return points


def finetune(model: nn.Module, ctx: Context, epochs: int, lr: float = 0.01, batch_size: int = 128,
             teacher: nn.Module | None = None, distill: bool = True, temperature: float = 4.0,
             alpha: float = 0.9, weight_decay: float = 5e-4, momentum: float = 0.9,
             max_steps: int | None = None, log: list[dict] | None = None, role: str = "train",
             features: FeatureDistill | None = None) -> nn.Module:
    """Train `model` in place for `epochs` on ctx's `role` data; returns it in eval mode.

    alpha: weight of the distillation term when labels exist (1 - alpha goes to cross-entropy).
    features: also distill intermediate features (needs the teacher).
    max_steps: stop early after this many optimizer steps in total (smoke runs and tests).
    log: if given, one dict per epoch is appended: epoch, steps, loss (mean), seconds.
    """
    if epochs <= 0:
        return model.eval()
    ds = ctx.dataset(role, required=True)
    use_kd = distill and teacher is not None
    if ds.labels is None and not use_kd:
        raise UserError(f"fine-tuning on {ds.source} needs labels ('y') or distillation from the original model")
    check_labels(ds, model, ctx.spec.example(batch=1))
    norm = ctx.normalizer()
    per_epoch = math.ceil(len(ds) / batch_size)
    total = per_epoch * epochs if max_steps is None else min(max_steps, per_epoch * epochs)
    # no weight decay on BN/bias: decaying them only fights the normalization
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    if use_kd:
        teacher.eval()
    taps = None
    if features is not None and features.weight > 0:
        if not use_kd:
            raise UserError("feature distillation needs the original model as teacher (distillation on)")
        taps = _FeatureTaps(model, teacher, features)
    step = 0
    try:  # the hooks come off even when training fails: the teacher is the caller's model
        for epoch in range(epochs):
            model.train()  # BN statistics re-adapt to the smaller layers
            start, loss_sum, n = time.perf_counter(), 0.0, 0
            data = batches(ds, norm, batch_size, shuffle=True, seed=ctx.seed + epoch, augment=True)
            for x, y in track(data, f"fine-tune {epoch + 1}/{epochs}", total=min(per_epoch, total - step)):
                out = model(x)
                loss = _loss(out, x, y, teacher if use_kd else None, temperature, alpha)
                if taps is not None:
                    loss = loss + features.weight * taps.loss()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum, n, step = loss_sum + loss.item() * len(x), n + len(x), step + 1
                if step >= total:
                    break
            record = {"epoch": epoch + 1, "steps": step, "loss": loss_sum / max(1, n),
                      "seconds": round(time.perf_counter() - start, 2)}
            note(f"fine-tune epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}, {record['seconds']:.0f} s")
            if log is not None:
                log.append(record)
            if step >= total:
                break
    finally:
        if taps is not None:
            taps.remove()
    return model.eval()


class _FeatureTaps:
    """Forward hooks that keep the latest output of each distillation point, in student and teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, features: FeatureDistill):
        self.index = {n: torch.tensor(idx, dtype=torch.long) for n, idx in features.points.items()}
        self.out: dict[tuple[str, str], torch.Tensor] = {}
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        self.handles = []
        for name in self.index:
            if name not in s_mods or name not in t_mods:
                raise UserError(f"feature distillation: {name!r} is not a module of both the student and the teacher")
            for side, mods in (("s", s_mods), ("t", t_mods)):
                self.handles.append(mods[name].register_forward_hook(self._keep(side, name)))

    def _keep(self, side: str, name: str):
        def hook(_module, _inputs, output):
            self.out[side, name] = output
        return hook

    def loss(self) -> torch.Tensor:
        total = 0.0
        for name, idx in self.index.items():
            s, t = self.out["s", name], self.out["t", name].detach()
            if s.ndim < 2 or s.shape[1] != len(idx) or t.shape[1] <= int(idx.max()):
                raise UserError(f"feature distillation at {name!r}: student output {tuple(s.shape)} does not match "
                                f"its {len(idx)} mapped teacher channels (teacher output {tuple(t.shape)})")
            t = t[:, idx]
            total = total + ((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _loss(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, teacher: nn.Module | None,
          temperature: float, alpha: float) -> torch.Tensor:
    if teacher is None:
        return F.cross_entropy(out, y)
    with torch.no_grad():
        soft = teacher(x)
    kd = kd_loss(out, soft, temperature)
    if y is None:
        return kd
    return alpha * kd + (1 - alpha) * F.cross_entropy(out, y)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, ctx: Context, images: int = 1000, batch_size: int = 128, role: str = "calib") -> bool:
    """Re-estimate BatchNorm running statistics on unlabeled data (no weight changes).

    After channels are removed, the surviving layers see different input statistics; re-estimating
    BN statistics recovers much of the accuracy before any fine-tuning. Returns False when no data is available.
    """
    ds = ctx.dataset(role)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if ds is None or not bns or images <= 0:
        return False
    ds = ds.subset(images, seed=ctx.seed)
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    for x, _ in batches(ds, ctx.normalizer(), batch_size):
        model(x)
    for m, momentum in saved:
        m.momentum = momentum
    model.eval()
    return True
