"""Beta-Rank (Homayounfar et al. 2023): filter importance = L1 norm x how much the filter changes the spread of data.

For a conv with weights W (K x C x k x k), batch input X and output Y (the conv's own output, before BN):

    a(j, p) = std_n Y[n, j, p]                  spread of filter j's output at output position p over the batch
    b(p)    = std(receptive field of p)          spread of the input patch the filter reads at p (batch x C x k x k)
    score_j = mean|W_j| * sum_p a(j, p) / b(p)   (= R_L1 / (C k^2) * beta)

Modes (`beta_mode`; the research note, section 1.2, documents the code/paper differences):
  corrected (default)  the released code's direction sigma_out / sigma_in, with the receptive fields the conv really
                       reads (`F.unfold` with its padding, stride and groups); the engine copies BN and biases of
                       kept channels, so accuracy right after pruning is meaningful.
  readme               the README equation's direction sigma_in / sigma_out (invariant to scaling a filter).
  faithful             the released code's quirks: the NCHW input sliced as if NHWC (rows from the channel axis,
                       columns from the height axis, the width whole; empty slabs skipped), population std, a fresh
                       batch per layer with only that batch used, per-layer min-max normalisation, and after pruning
                       every BatchNorm re-initialised and kept filters scaled by (1 + r_hat[new index]). Not
                       reproduced: the code's unaligned per-block residual indices (the engine keeps one index set
                       per coupled group), the VGG classifier re-initialisation, and the stale-variable scaling of
                       unpruned convs.

Ranking uses unlabeled images (--calib, else --data) with the CIFAR flip/crop augmentation, as the code's training
loader does. A second, independent batch gives the stability fraction (overlap of the bottom- and top-25% filter
sets between the two rankings, the paper's "S_t"), recorded per layer in the history.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.progress import log
from compress.prune import METHODS
from compress.prune.graph import CONV
from compress.prune.targets import TargetConfig, TargetedPruneMethod, calibration_batches
from compress.stages import Context, option

MODES = ("corrected", "readme", "faithful")


@dataclass
class BetaRankConfig(TargetConfig):
    beta_mode: str = option("corrected", "Beta-Rank score: corrected (code direction, true receptive fields) | "
                                         "readme (sigma_in/sigma_out) | faithful (the released code's quirks)", MODES)
    rank_batch_size: int = option(128, "images in the batch a ranking is computed from")
    rank_batches: int = option(1, "batches averaged for the ranking (the released code uses only the last one)")
    rank_augment: bool = option(True, "flip/crop the ranking images, as the released code's training loader does")

    def validate(self) -> None:
        super().validate()
        from compress.errors import UserError

        if self.rank_batch_size < 2:
            raise UserError(f"rank_batch_size must be at least 2 (a std over the batch), got {self.rank_batch_size}")
        if self.rank_batches < 1:
            raise UserError(f"rank_batches must be at least 1, got {self.rank_batches}")


# ---- the score --------------------------------------------------------------------------------------------

def beta_score(conv: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str = "corrected") -> torch.Tensor:
    """Raw (un-normalised) Beta-Rank score per output filter of `conv`, from its input x and output y."""
    if mode == "faithful":
        return _beta_faithful(x, y, conv.weight)
    w = conv.weight.detach()
    k_out, groups = w.shape[0], conv.groups
    b = patch_std(x, conv)  # groups x H' x W': std of every receptive field over batch x channels x kernel
    a = y.detach().double().std(0, unbiased=False)  # K x H' x W'
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"output positions {tuple(a.shape[1:])} != receptive fields {tuple(b.shape[1:])}")
    b = b.repeat_interleave(k_out // groups, 0)  # filter j reads its group's input channels
    if mode == "readme":
        valid = (a > 0) & (b > 0)
        ratio = torch.where(valid, b / a.clamp_min(1e-300), torch.zeros_like(a))
    else:
        valid = b > 0
        ratio = torch.where(valid, a / b.clamp_min(1e-300), torch.zeros_like(a))
    return (w.double().abs().flatten(1).mean(1) * ratio.flatten(1).sum(1)).float()


def patch_std(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Population std of each receptive field of `conv` (zero padding included, as the conv sees it), pooled over
    the batch, the group's input channels and the kernel window: groups x H' x W'.

    Same numbers as `F.unfold(x, ...)` followed by a std per position, computed as E[x^2] - E[x]^2 with a ones
    kernel (two cheap convolutions instead of materialising every patch)."""
    x = x.detach().double()
    c_in, groups = x.shape[1], conv.groups
    kernel = torch.ones(groups, c_in // groups, *conv.kernel_size, dtype=torch.float64)
    args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=groups)
    if isinstance(conv.padding, str):
        args["padding"] = conv.padding
    s1 = F.conv2d(x, kernel, **args).sum(0)
    s2 = F.conv2d(x * x, kernel, **args).sum(0)
    count = x.shape[0] * kernel[0].numel()
    var = (s2 / count - (s1 / count) ** 2).clamp_min(0)
    return var.sqrt()


def _beta_faithful(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`std_filters` of the released code: x is NCHW but sliced as [:, rows, cols, :] (channel, height, width);
    positions whose slab is empty (row start >= C) give NaN there and are skipped. Vectorised with prefix sums."""
    x, y = x.detach().double(), y.detach().double()
    kh, kw = weight.shape[2], weight.shape[3]
    stride = int(x.shape[3] / y.shape[3])
    a = y.std(0, unbiased=False)  # K x H' x W'
    n, d1, d2, d3 = x.shape  # sliced as [:, d1 rows, d2 cols, all d3]
    t1 = F.pad(x.sum((0, 3)).cumsum(0).cumsum(1), (1, 0, 1, 0))  # (d1+1) x (d2+1) prefix sums
    t2 = F.pad((x * x).sum((0, 3)).cumsum(0).cumsum(1), (1, 0, 1, 0))
    r0 = torch.arange(y.shape[2]) * stride
    c0 = torch.arange(y.shape[3]) * stride
    r1, c1 = (r0 + kh).clamp(max=d1), (c0 + kw).clamp(max=d2)
    r0, c0 = r0.clamp(max=d1), c0.clamp(max=d2)

    def box(t):
        return t[r1][:, c1] - t[r0][:, c1] - t[r1][:, c0] + t[r0][:, c0]

    count = (n * d3 * (r1 - r0).view(-1, 1) * (c1 - c0).view(1, -1)).double()
    valid = count > 0
    mean = box(t1) / count.clamp_min(1)
    b = (box(t2) / count.clamp_min(1) - mean ** 2).clamp_min(0).sqrt()
    ratio = torch.where(valid, a / b, torch.zeros_like(a))  # b == 0 gives inf, as numpy would
    return (weight.detach().double().abs().flatten(1).mean(1) * ratio.flatten(1).sum(1)).float()


def minmax(s: torch.Tensor) -> torch.Tensor:
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) if hi > lo else torch.zeros_like(s)


def stability(s1: torch.Tensor, s2: torch.Tensor, fraction: float = 0.25) -> tuple[float, float]:
    """Overlap of the bottom- and top-`fraction` filter sets of two rankings (1 = identical sets)."""
    k = max(1, int(round(len(s1) * fraction)))
    lo = len(set(s1.argsort()[:k].tolist()) & set(s2.argsort()[:k].tolist())) / k
    hi = len(set(s1.argsort()[-k:].tolist()) & set(s2.argsort()[-k:].tolist())) / k
    return lo, hi


def _conv_io(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    mods = dict(model.named_modules())
    io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: io.__setitem__(n, (i[0].detach(), o.detach())))
             for n in names]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return io


class BetaRank(TargetedPruneMethod):
    name = "beta-rank"
    summary = "Beta-Rank: L1 norm x output/input std ratio from unlabeled batches (Homayounfar et al. 2023)"
    Config: ClassVar[type] = BetaRankConfig

    def score(self, model: nn.Module, cfg: BetaRankConfig, ctx: Context, info: dict) -> dict[str, torch.Tensor]:
        convs = [n for n, m in model.named_modules() if isinstance(m, CONV)]
        need = cfg.rank_batches + 1 if cfg.beta_mode != "faithful" else 2 * len(convs)
        data = calibration_batches(ctx, cfg.rank_batch_size * need, cfg.rank_batch_size, cfg.rank_augment,
                                   who="beta-rank")
        batches = [x for x in data if len(x) >= 2]
        if cfg.beta_mode == "faithful":
            # the code re-runs inference per hooked layer with a shuffled loader: every layer sees its own batch
            scores, second = {}, {}
            for i, name in enumerate(convs):
                for target, batch in ((scores, batches[i % len(batches)]),
                                      (second, batches[(len(convs) + i) % len(batches)])):
                    x_in, y_out = _conv_io(model, batch, [name])[name]
                    target[name] = minmax(beta_score(model.get_submodule(name), x_in, y_out, "faithful"))
        else:
            main, extra = batches[:cfg.rank_batches], batches[cfg.rank_batches:cfg.rank_batches + 1]
            scores = self._average(model, convs, main, cfg.beta_mode)
            second = self._average(model, convs, extra, cfg.beta_mode) if extra else {}
        stab = {n: stability(scores[n], second[n]) for n in second}
        if stab:
            lo = sum(v[0] for v in stab.values()) / len(stab)
            hi = sum(v[1] for v in stab.values()) / len(stab)
            log(f"beta-rank ({cfg.beta_mode}): ranking stability between two batches: bottom-25% overlap {lo:.2f}, "
                f"top-25% overlap {hi:.2f} (mean over {len(stab)} layers)")
            info["stability"] = {"bottom25_mean": round(lo, 3), "top25_mean": round(hi, 3),
                                 "per_layer": {n: [round(a, 3), round(b, 3)] for n, (a, b) in stab.items()}}
        info["beta_mode"] = cfg.beta_mode
        info["ranking_images"] = sum(len(b) for b in batches[:cfg.rank_batches]) if cfg.beta_mode != "faithful" \
            else len(batches[0])
        return scores

    @staticmethod
    def _average(model: nn.Module, convs: list[str], batches: list[torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
        total: dict[str, torch.Tensor] = {}
        for x in batches:
            io = _conv_io(model, x, convs)
            for n in convs:
                s = beta_score(model.get_submodule(n), *io[n], mode)
                total[n] = total.get(n, 0) + s / len(batches)
        return total

    def after_prune(self, model: nn.Module, keep: dict[str, list[int]], scores: dict, cfg: BetaRankConfig,
                    ctx: Context, info: dict) -> None:
        if cfg.beta_mode != "faithful":
            return
        thinned = set()
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, CONV) and name in scores and m.weight.shape[0] < len(scores[name]):
                    r_hat = scores[name][:m.weight.shape[0]]  # indexed by the *new* position, as the code does
                    m.weight.mul_((1 + r_hat).view(-1, *[1] * (m.weight.ndim - 1)).to(m.weight.dtype))
                    thinned.add(name)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_parameters()  # the code builds a fresh thin model and copies no BatchNorm
        info["faithful_post"] = {"batchnorm": "re-initialised", "scaled_convs": sorted(thinned)}
        log("beta-rank faithful: BatchNorm re-initialised and kept filters scaled by (1 + r_hat[new index]) "
            "as in the released code; accuracy before fine-tuning is not meaningful in this mode")


METHODS.add("beta-rank", BetaRank())
