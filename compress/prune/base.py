"""What every pruning method shares: its config fields (budgets, recovery fine-tuning, channel grid).

The score -> keep sets -> remove -> recover flow is compress.prune.targets.TargetedPruneMethod: a method says how
important each output channel is, the engine removes channels, `compress.finetune` recovers accuracy (distilling
from the unpruned model by default), and the result is recorded in the model's history. Pruning records no
structure edit: the smaller tensors reload by themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from compress.errors import UserError
from compress.stages import Method, MethodConfig, option


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
    distill_features: float = option(0.0, "weight of feature distillation while fine-tuning: each distilled "
                                          "module's output is pulled towards the teacher's on the channels it kept "
                                          "(0: off). Keeps the original domain when the fine-tuning data differs "
                                          "from it (ResNet-32 pruned 55-57%, 3 epochs on JPEG images, same widths: "
                                          "20 gave +2.1 to +3.4 pt on clean test images and -0.2 to -0.4 pt on JPEG "
                                          "ones; see benchmarks/results/pruning.md)")
    distill_points: str | None = option(None, "modules whose outputs feature distillation compares, comma-separated "
                                               "(default: the model's top-level blocks holding a BatchNorm, e.g. "
                                               "ResNet stages)")
    round_to: int | None = option(None, "keep a multiple of this many channels per group: runtimes pad channels to "
                                        "SIMD blocks (ONNX Runtime: 16 with AVX-512, else 8), so aligned widths buy "
                                        "latency. Default: exact widths for ratio/flops_target; a measured grid in steps "
                                        "of 8 for latency_target. Polarization / FTWT snap their learned widths to "
                                        "multiples of it (then meet flops_target in whole steps)")
    bn_recalibration: int = option(1000, "re-estimate BatchNorm statistics on this many calib/train images after "
                                         "pruning, before fine-tuning (0: off)")

    @property
    def point_names(self) -> list[str] | None:
        """distill_points as module names (None: feature_points' default)."""
        return [n.strip() for n in self.distill_points.split(",") if n.strip()] if self.distill_points else None

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
        if self.distill_features < 0:
            raise UserError(f"distill_features is a loss weight, 0 or more, got {self.distill_features}")
        if self.distill_features > 0 and not (self.distill and self.finetune_epochs > 0):
            raise UserError("distill_features works during distillation fine-tuning: give finetune_epochs > 0 and "
                            "keep distill on")
        if self.bn_recalibration < 0:
            raise UserError(f"bn_recalibration is a number of images, 0 or more, got {self.bn_recalibration}")
        if self.round_to is not None and self.round_to < 1:
            raise UserError(f"round_to must be at least 1, got {self.round_to}")


class ImportancePruneMethod(Method):
    """Base of the pruning methods: the family and its shared config (the flow is compress.prune.targets'
    TargetedPruneMethod, which every registered method extends)."""

    family: ClassVar[str] = "prune"
    Config: ClassVar[type] = PruneConfig
