"""Data-free baselines every paper compares against: L1-norm filters (Li et al. 2017) and random channels.

Both take every budget the data-driven methods take (`--ratio`, `--flops-target`, `--latency-target`; TargetConfig),
so they can be compared at equal FLOPs and at equal measured latency."""
from __future__ import annotations

import torch
import torch.nn as nn

from compress.prune import METHODS
from compress.prune.targets import TargetConfig, TargetedPruneMethod
from compress.stages import Context

PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def l1_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Sum of |w| over each output filter, for every conv and linear layer."""
    return {name: m.weight.detach().abs().flatten(1).sum(1)
            for name, m in model.named_modules() if isinstance(m, PRUNABLE)}


class L1Prune(TargetedPruneMethod):
    name = "l1"
    summary = "remove the filters with the smallest L1 norm (Li et al. 2017); needs no data"

    def score(self, model: nn.Module, cfg: TargetConfig, ctx: Context, info: dict) -> dict[str, torch.Tensor]:
        return l1_scores(model)


class RandomPrune(TargetedPruneMethod):
    name = "random"
    summary = "remove channels at random (seeded): the floor any criterion must beat"

    def score(self, model: nn.Module, cfg: TargetConfig, ctx: Context, info: dict) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(ctx.seed)
        return {name: torch.rand(m.weight.shape[0], generator=gen)
                for name, m in model.named_modules() if isinstance(m, PRUNABLE)}


METHODS.add("l1", L1Prune())
METHODS.add("random", RandomPrune())
