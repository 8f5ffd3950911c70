"""What every importance-based pruning method shares: its config fields and the score -> remove -> recover flow.

A method only says how important each output channel is (`importance`); the engine removes channels,
`compress.finetune` recovers accuracy (distilling from the unpruned model by default), and the result is
recorded in the model's history. Pruning records no structure edit: the smaller tensors reload by themselves.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from compress.errors import UserError
from compress.finetune import finetune, recalibrate_bn
from compress.io import LoadedModel
from compress.metrics import count_flops, count_params
from compress.progress import log, status
from compress.prune.engine import find_ratio, prune_channels
from compress.stages import Context, Method, MethodConfig, option


@dataclass
class PruneConfig(MethodConfig):
    ratio: float | None = option(None, "fraction of channels to remove from every prunable group (0-1)")
    flops_target: float | None = option(None, "fraction of the original FLOPs to keep (0-1); sets a uniform ratio")
    finetune_epochs: int = option(0, "recovery fine-tuning epochs on the train data after pruning")
    distill: bool = option(True, "fine-tune by distilling from the unpruned model (works without labels)")
    lr: float = option(0.01, "fine-tuning learning rate (SGD, momentum 0.9, cosine decay)")
    batch_size: int = option(128, "fine-tuning batch size")
    distill_alpha: float = option(0.9, "weight of the distillation loss when the fine-tuning data has labels; the rest "
                                       "(1 - alpha) goes to cross-entropy on the labels (1: pure distillation; without "
                                       "labels it is always pure distillation). Lower values let the labels adapt the "
                                       "model to the fine-tuning data's domain when it differs from the original "
                                       "training data (JPEG CIFAR-10, ResNet-20 at -57% FLOPs, 3 epochs: 0.2 gave "
                                       "~3 pt more than 0.9; see benchmarks/results/pruning.md)")
    distill_temperature: float = option(4.0, "softmax temperature of the distillation loss")
    round_to: int | None = option(None, "keep a multiple of this many channels per group: runtimes pad channels to "
                                        "SIMD blocks (ONNX Runtime: 16 with AVX-512, else 8), so aligned widths buy "
                                        "latency. Default: exact widths for ratio/flops_target; a measured grid in steps "
                                        "of 8 for latency_target. Polarization / FTWT snap their learned widths to "
                                        "multiples of it (then meet flops_target in whole steps)")
    bn_recalibration: int = option(1000, "re-estimate BatchNorm statistics on this many calib/train images after "
                                         "pruning, before fine-tuning (0: off)")

    def validate(self) -> None:
        if (self.ratio is None) == (self.flops_target is None):
            raise UserError("pruning: give exactly one of ratio or flops_target")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise UserError(f"ratio is the fraction of channels to remove: between 0 and 1, got {self.ratio}")
        if self.flops_target is not None and not 0 < self.flops_target < 1:
            raise UserError(f"flops_target is the fraction of FLOPs to keep: between 0 and 1, got {self.flops_target}")
        if self.finetune_epochs < 0:
            raise UserError(f"finetune_epochs must be 0 or more, got {self.finetune_epochs}")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0 <= self.distill_alpha <= 1:
            raise UserError(f"distill_alpha is a loss weight between 0 and 1, got {self.distill_alpha}")
        if self.distill_temperature <= 0:
            raise UserError(f"distill_temperature must be positive, got {self.distill_temperature}")
        if self.bn_recalibration < 0:
            raise UserError(f"bn_recalibration is a number of images, 0 or more, got {self.bn_recalibration}")
        if self.round_to is not None and self.round_to < 1:
            raise UserError(f"round_to must be at least 1, got {self.round_to}")


class ImportancePruneMethod(Method):
    """Base of the score-based methods: subclasses implement `importance` (and may extend PruneConfig)."""

    family: ClassVar[str] = "prune"
    Config: ClassVar[type] = PruneConfig

    def importance(self, model: nn.Module, cfg: Any, ctx: Context) -> dict[str, torch.Tensor]:
        """Layer name -> 1-D scores over its output channels (higher = keep)."""
        raise NotImplementedError

    def apply(self, lm: LoadedModel, cfg: PruneConfig, ctx: Context) -> LoadedModel:
        """Prunes lm.model in place (the pipeline hands each stage a clone) and returns it as a new variant."""
        lm.require_compressible(f"prune {self.name}")
        model, shape = lm.model.eval(), lm.spec.shape
        example = lm.spec.example(1, ctx.seed)
        before = {"params": count_params(model), "flops": count_flops(model, shape)}
        teacher = copy.deepcopy(model) if cfg.finetune_epochs and cfg.distill else None
        t0 = time.perf_counter()
        with status(f"scoring channels ({self.name})"):
            scores = self.importance(model, cfg, ctx)
        ratio = cfg.ratio
        if cfg.flops_target is not None:
            with status(f"searching the ratio for {cfg.flops_target:g} of the FLOPs"):
                ratio = find_ratio(model, example, scores, cfg.flops_target, cfg.round_to)
        prune_channels(model, example, scores, ratio=ratio, round_to=cfg.round_to)
        bn_done = recalibrate_bn(model, ctx, cfg.bn_recalibration) if cfg.bn_recalibration else False
        after = {"params": count_params(model), "flops": count_flops(model, shape)}
        log(f"pruned {self.name}: ratio {ratio:.3f}, FLOPs {before['flops'] / 1e6:.1f}M -> {after['flops'] / 1e6:.1f}M, "
            f"params {before['params'] / 1e3:.0f}k -> {after['params'] / 1e3:.0f}k")
        entry: dict[str, Any] = {"stage": "prune", "method": self.name, "config": asdict(cfg), "ratio": round(ratio, 4),
                                 "params_before": before["params"], "params_after": after["params"],
                                 "flops_before": before["flops"], "flops_after": after["flops"],
                                 "bn_recalibrated": bn_done, "seconds_prune": round(time.perf_counter() - t0, 2)}
        if cfg.finetune_epochs:
            epochs: list[dict] = []
            finetune(model, ctx, cfg.finetune_epochs, cfg.lr, cfg.batch_size, teacher=teacher,
                     distill=cfg.distill, temperature=cfg.distill_temperature, alpha=cfg.distill_alpha, log=epochs)
            entry["finetune"] = epochs
        return LoadedModel(model.eval(), lm.spec, "compress", lm.source, lm.arch, dict(lm.arch_kwargs),
                           list(lm.edits), [*lm.history, entry])
