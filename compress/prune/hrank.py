"""HRank (Lin et al., CVPR 2020): a filter is as important as the average rank of the feature maps it produces.

The baseline Beta-Rank's paper compares against, under the same engine and budgets. For every conv the feature map
ranked is the output of the first ReLU after it (for a ResNet block's second conv that is the ReLU after the
residual add, as in HRank's `relu2` hook); a conv with no ReLU downstream is ranked on its normalized output.
Scores are the mean matrix rank over the ranking images (unlabeled; --calib, else --data).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from compress.errors import UserError
from compress.prune import METHODS
from compress.prune.graph import Capture, conv_sites, trace
from compress.prune.targets import TargetConfig, TargetedPruneMethod, calibration_batches
from compress.stages import Context, option


@dataclass
class HRankConfig(TargetConfig):
    rank_batch_size: int = option(128, "images in the batch a ranking is computed from")
    rank_batches: int = option(1, "batches averaged for the ranking (HRank's code: --limit)")

    def validate(self) -> None:
        super().validate()
        if self.rank_batch_size < 1 or self.rank_batches < 1:
            raise UserError("rank_batch_size and rank_batches must be at least 1")


def feature_map_rank(fmap: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the matrix rank of each channel's H x W map: N x C x H x W -> C."""
    n, c, h, w = fmap.shape
    if h == 1 or w == 1:
        return (fmap.flatten(2).abs().amax(2) > 0).float().mean(0)
    ranks = torch.linalg.matrix_rank(fmap.reshape(n * c, h, w).float())
    return ranks.view(n, c).float().mean(0)


class HRank(TargetedPruneMethod):
    name = "hrank"
    summary = "HRank: keep the filters whose feature maps have the highest average rank (Lin et al. 2020)"
    Config: ClassVar[type] = HRankConfig

    def score(self, model: nn.Module, cfg: HRankConfig, ctx: Context, info: dict) -> dict[str, torch.Tensor]:
        sites = conv_sites(model, "hrank")
        gm = trace(model, "hrank")
        node_of = {}
        names = {n.target: n.name for n in gm.graph.nodes if n.op == "call_module"}
        for conv, s in sites.items():
            node_of[conv] = s.relu_node or names[s.norm or conv]
        total: dict[str, torch.Tensor] = {}
        count = 0
        model.eval()
        for x in calibration_batches(ctx, cfg.rank_batch_size * cfg.rank_batches, cfg.rank_batch_size, who="hrank"):
            cap = Capture(gm, set(node_of.values()))
            with torch.no_grad():
                cap.run(x)
            for conv, node in node_of.items():
                total[conv] = total.get(conv, 0) + feature_map_rank(cap.values[node]) * len(x)
            count += len(x)
        info["ranking_images"] = count
        return {k: v / count for k, v in total.items()}


METHODS.add("hrank", HRank())
