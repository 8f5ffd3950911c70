"""The one channel-removal engine every pruning method shares: "keep these channels" -> a smaller network.

Methods say which output channels matter, per conv/linear layer name (`importance`), or which ones to keep
(`keep`). Torch-Pruning's DependencyGraph finds the coupled groups (a residual stream couples every conv
that writes into it; a depthwise conv couples its input and output), so a group is pruned as one: its
members' scores are normalized per layer and averaged. Channels are physically removed: exporters see the
smaller tensors, and `compress.structure.conform_to_state_dict` reloads them from the state dict alone.

Never pruned: the network input (groups are rooted at layer outputs) and anything coupled to the model's
output (the classifier's logits).
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.utils.flop_counter import FlopCounterMode

from compress.errors import UserError
from compress.metrics import count_flops
from compress.zoo.resnet_cifar import ShortcutA

Importance = Mapping[str, torch.Tensor] | Callable[[nn.Module], Mapping[str, torch.Tensor]]
Ratio = float | Mapping[str, float]

MAX_RATIO = 0.99  # a group always keeps at least one channel; this bounds the FLOPs-target search


# --- Option-A shortcut: Torch-Pruning has no notion of a zero-padding gather, so we teach it one ---------

class ShortcutAPruner(tp.pruner.BasePruningFunc):
    """In and out channels are independent (like a conv): out = rows of `index`, in = what `index` points at."""

    TARGET_MODULES = ShortcutA

    def prune_out_channels(self, layer: ShortcutA, idxs: Sequence[int]) -> ShortcutA:
        keep = sorted(set(range(layer.out_channels)) - set(idxs))
        layer.index = layer.index[keep].clone()
        return layer

    def prune_in_channels(self, layer: ShortcutA, idxs: Sequence[int]) -> ShortcutA:
        n_in, removed = layer.in_channels, sorted(set(idxs))
        n_new = n_in - len(removed)
        # old input k -> its new position; removed inputs and the old zero slot both go to the new zero slot
        remap = torch.full((n_in + 1,), n_new, dtype=torch.long)
        kept = torch.tensor(sorted(set(range(n_in)) - set(removed)), dtype=torch.long)
        remap[kept] = torch.arange(len(kept))
        layer.index = remap[layer.index].clone()
        layer.n_in = torch.tensor(n_new, dtype=layer.n_in.dtype)
        return layer

    def get_out_channels(self, layer: ShortcutA) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ShortcutA) -> int:
        return layer.in_channels


CUSTOM_PRUNERS: dict[type, tp.pruner.BasePruningFunc] = {ShortcutA: ShortcutAPruner()}


class _OpaqueGather(torch.autograd.Function):
    """ShortcutA as one autograd node, so tracing sees `x -> shortcut -> add` and not its slice/cat internals."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: ShortcutA) -> torch.Tensor:  # noqa: ARG004
        return ShortcutA.forward(module, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ARG004 - tracing never back-propagates
        return None, None


@contextmanager
def _opaque_shortcuts(model: nn.Module) -> Iterator[None]:
    patched = [m for m in model.modules() if isinstance(m, ShortcutA)]
    for m in patched:
        m.forward = lambda x, m=m: _OpaqueGather.apply(x, m)  # instance attribute: hooks still fire
    try:
        yield
    finally:
        for m in patched:
            del m.forward


# --- Groups ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that must be removed together. `name` (its first member) keys ratios and keep sets."""

    name: str
    members: tuple[str, ...]  # conv/linear layers whose output channels are these channels, in model order
    channels: int


@dataclass
class _Group:
    info: ChannelGroup
    tp_group: tp.dependency.Group
    member_idxs: dict[str, tuple[list[int], list[int]]]  # member -> (its channel idxs, root channel idxs)


def _dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    with _opaque_shortcuts(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input, customized_pruners=CUSTOM_PRUNERS, verbose=False)


def _is_model_output(dg: tp.DependencyGraph, item) -> bool:
    # a layer whose output feeds nothing is the network's output (tracing adds no output op then)
    node = item.dep.target
    return node.type == tp.ops.OPTYPE.OUTPUT or (not node.outputs and dg.is_out_channel_pruning_fn(item.dep.handler))


def _groups(model: nn.Module, dg: tp.DependencyGraph, ignore: Sequence[str]) -> list[_Group]:
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    missing = sorted(set(ignore) - set(order))
    if missing:
        raise UserError(f"cannot ignore {', '.join(missing)}: no such layer in the model")
    ignored = [m for m, n in names.items() if n in set(ignore)]
    out: list[_Group] = []
    for g in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
        if any(_is_model_output(dg, item) for item in g):
            continue  # these channels are the model's output (the classifier's logits)
        members: dict[str, tuple[list[int], list[int]]] = {}
        for item in g:
            module = item.dep.target.module
            if (isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and module in names
                    and dg.is_out_channel_pruning_fn(item.dep.handler)):
                members[names[module]] = (list(item.idxs), list(item.root_idxs))
        if not members:
            continue
        ordered = tuple(sorted(members, key=order.__getitem__))
        root = g[0].dep.target.module
        info = ChannelGroup(ordered[0], ordered, dg.get_pruner_of_module(root).get_out_channels(root))
        out.append(_Group(info, g, members))
    return sorted(out, key=lambda g: order[g.info.name])


def channel_groups(model: nn.Module, example_input: torch.Tensor, ignore: Sequence[str] = ()) -> list[ChannelGroup]:
    """The prunable channel groups of `model`, in model order (for per-group ratios and keep sets)."""
    return [g.info for g in _groups(model, _dependency_graph(model, example_input), ignore)]


# --- Scores -> keep sets -----------------------------------------------------------------------------

def _group_scores(g: _Group, scores: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Mean over the group's scored members of per-layer-normalized importance, per root channel."""
    total = torch.zeros(g.info.channels, dtype=torch.float64)
    count = torch.zeros(g.info.channels, dtype=torch.float64)
    for name, (idxs, root_idxs) in g.member_idxs.items():
        if name not in scores:
            continue
        s = torch.as_tensor(scores[name]).detach().double().flatten().cpu()
        if s.numel() <= max(idxs):
            raise ValueError(f"importance for {name} has {s.numel()} entries, the layer has more output channels")
        if not torch.isfinite(s).all():
            raise ValueError(f"importance for {name} is not finite (NaN or inf): fix the method's scores")
        scale = s.abs().mean()
        s = s / scale if scale > 0 else s  # layers with larger raw scores must not dominate the group
        total[root_idxs] += s[idxs]
        count[root_idxs] += 1
    if not count.any():
        return None
    return total / count.clamp(min=1)


def _n_keep(channels: int, ratio: float, round_to: int | None) -> int:
    keep = channels - int(math.floor(channels * ratio + 1e-9))
    if round_to and round_to > 1:
        keep = round_to * max(1, round(keep / round_to))
    return max(1, min(channels, keep))


def _ratio_of(g: ChannelGroup, ratio: Ratio) -> float:
    if not isinstance(ratio, Mapping):
        return float(ratio)
    for key in (g.name, *g.members):
        if key in ratio:
            return float(ratio[key])
    return 0.0  # a group the per-group dict does not name is left whole


def _check_ratio_keys(groups: list[_Group], ratio: Ratio) -> None:
    if isinstance(ratio, Mapping):
        known = {n for g in groups for n in g.info.members}
        unknown = sorted(set(ratio) - known)
        if unknown:
            raise UserError(f"per-group ratio for unknown group {', '.join(unknown)}; groups are named by a member layer")


def _plan(groups: list[_Group], scores: Mapping[str, torch.Tensor], ratio: Ratio,
          round_to: int | None) -> dict[str, list[int]]:
    """Group name -> channels to keep (highest scores; ties go to the lower index, deterministically)."""
    plan = {}
    for g in groups:
        s = _group_scores(g, scores)
        r = _ratio_of(g.info, ratio)
        if s is None or r <= 0:
            continue
        n = _n_keep(g.info.channels, r, round_to)
        if n < g.info.channels:
            order = sorted(range(g.info.channels), key=lambda i: (-float(s[i]), i))
            local, root = g.member_idxs[g.info.name]  # the keep set is read in the named member's numbering
            to_local = dict(zip(root, local))
            plan[g.info.name] = sorted(to_local[i] for i in order[:n])
    return plan


def _resolve(importance: Importance, model: nn.Module) -> Mapping[str, torch.Tensor]:
    return importance(model) if callable(importance) else importance


# --- Removal -----------------------------------------------------------------------------------------

def _remove(dg: tp.DependencyGraph, groups: list[_Group], keep: Mapping[str, Sequence[int]]) -> None:
    by_member = {n: g for g in groups for n in g.info.members}
    chosen: dict[str, tuple[_Group, set[int]]] = {}
    for key, idxs in keep.items():
        g = by_member.get(key)
        if g is None:
            raise UserError(f"cannot keep channels of {key}: not a prunable layer output (ignored, or the model output)")
        # a keep set given for any member is translated to the group's root channel numbering
        local, root = g.member_idxs[key]
        to_root = dict(zip(local, root))
        kept = {to_root[int(i)] for i in idxs if int(i) in to_root}
        if len(kept) != len(set(int(i) for i in idxs)):
            raise UserError(f"keep set for {key} has indices outside its {len(local)} channels")
        if not kept:
            raise UserError(f"keep set for {key} is empty: a layer must keep at least one channel")
        if g.info.name in chosen and chosen[g.info.name][1] != kept:
            raise UserError(f"conflicting keep sets for coupled layers {chosen[g.info.name][0].info.name} and {key}")
        chosen[g.info.name] = (g, kept)
    for g, kept in chosen.values():
        drop = [i for i in range(g.info.channels) if i not in kept]
        if drop:
            root = g.tp_group[0]
            dg.get_pruning_group(root.dep.target.module, root.dep.handler, drop).prune()


def prune_to_keep(model: nn.Module, example_input: torch.Tensor, keep: Mapping[str, Sequence[int]],
                  ignore: Sequence[str] = ()) -> nn.Module:
    """Keep exactly these output channels (per layer name; any one member names its whole group). In place."""
    was_training = model.training
    dg = _dependency_graph(model, example_input)
    _remove(dg, _groups(model, dg, ignore), keep)
    return model.train(was_training)


@contextmanager
def tracked_channels(model: nn.Module) -> Iterator[dict[str, list[int]]]:
    """Around a prune: which original channels each BatchNorm of `model` still holds, BN name -> indices, filled
    in on exit for the BNs that lost channels (distillation maps student features back to the teacher's by them).

    Torch-Pruning slices a BatchNorm's running_mean together with its channels, so the channel numbers ride in
    running_mean during the prune and the real statistics are put back from a copy afterwards."""
    bns = {n: m for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None}
    saved = {n: m.running_mean.clone() for n, m in bns.items()}
    with torch.no_grad():
        for m in bns.values():
            m.running_mean.copy_(torch.arange(m.num_features, dtype=m.running_mean.dtype))
    kept: dict[str, list[int]] = {}
    try:
        yield kept
    finally:
        with torch.no_grad():
            for n, m in bns.items():
                idx = m.running_mean.round().long()
                m.running_mean.copy_(saved[n][idx])
                if len(idx) < len(saved[n]):
                    kept[n] = idx.tolist()


def keep_sets(model: nn.Module, example_input: torch.Tensor, importance: Importance, ratio: Ratio,
              round_to: int | None = None, ignore: Sequence[str] = ()) -> dict[str, list[int]]:
    """Which channels `prune_channels` would keep: group name -> channel indices (of the group's first member)."""
    groups = _groups(model, _dependency_graph(model, example_input), ignore)
    _check_ratio_keys(groups, ratio)
    _note_too_narrow(groups, ratio, round_to)
    return _plan(groups, _resolve(importance, model), ratio, round_to)


def _note_too_narrow(groups: list[_Group], ratio: Ratio, round_to: int | None) -> None:
    """Say which groups round_to leaves whole: a group of at most round_to channels has no smaller multiple."""
    if not round_to or round_to < 2:
        return
    whole = [g.info for g in groups if _ratio_of(g.info, ratio) > 0 and g.info.channels <= round_to]
    if whole:
        from compress.progress import log

        widths = sorted({g.channels for g in whole})
        log(f"round_to {round_to}: {len(whole)} of {len(groups)} channel groups stay whole ({', '.join(map(str, widths))} "
            f"channels: no smaller multiple of {round_to}), e.g. {whole[0].name}")


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy whose float tensors live on the meta device (shapes only: tracing and FLOP counting cost no
    arithmetic); integer buffers such as a shortcut's gather index keep their values."""
    memo: dict[int, torch.Tensor] = {}  # deepcopy takes these instead of copying the data
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _flops_after(model: nn.Module, example_input: torch.Tensor, keep: Mapping[str, Sequence[int]],
                 ignore: Sequence[str]) -> int:
    """FLOPs of the model pruned to `keep` (same counter as compress.metrics.count_flops), on a meta copy."""
    x = torch.zeros((1, *example_input.shape[1:]), device="meta")
    trial = prune_to_keep(_meta_copy(model), x, keep, ignore).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        trial(x)
    return int(counter.get_total_flops())


def find_ratio(model: nn.Module, example_input: torch.Tensor, importance: Importance, flops_target: float,
               round_to: int | None = None, ignore: Sequence[str] = ()) -> float:
    """The smallest uniform ratio whose pruned model keeps at most `flops_target` of the FLOPs.

    Channel counts are integers, so only ratios k/C (C a group's width) change the result: a binary search
    over those breakpoints finds the exact answer in log2(#breakpoints) trial prunes.
    """
    if not 0 < flops_target < 1:
        raise UserError(f"flops_target is the fraction of FLOPs to keep: between 0 and 1, got {flops_target}")
    base = count_flops(model, tuple(example_input.shape[1:]))
    groups = _groups(model, _dependency_graph(model, example_input), ignore)
    scores = _resolve(importance, model)
    cache: dict[tuple, float] = {}

    def fraction(r: float) -> float:
        plan = _plan(groups, scores, r, round_to)
        key = tuple(sorted((k, len(v)) for k, v in plan.items()))  # FLOPs depend only on the widths
        if key not in cache:
            cache[key] = _flops_after(model, example_input, plan, ignore) / base
        return cache[key]

    candidates = sorted({k / g.info.channels for g in groups for k in range(1, g.info.channels)} | {MAX_RATIO})
    candidates = [r for r in candidates if r <= MAX_RATIO]
    if not candidates or fraction(candidates[-1]) > flops_target:
        lowest = fraction(candidates[-1]) if candidates else 1.0
        raise UserError(f"flops_target {flops_target:g} is out of reach: removing channels uniformly keeps "
                        f"at least {lowest:.3g} of the FLOPs here")
    lo, hi = 0, len(candidates) - 1  # invariant: candidates[hi] meets the target
    while lo < hi:
        mid = (lo + hi) // 2
        if fraction(candidates[mid]) <= flops_target:
            hi = mid
        else:
            lo = mid + 1
    return candidates[hi]


def prune_channels(model: nn.Module, example_input: torch.Tensor, importance: Importance,
                   ratio: Ratio | None = None, flops_target: float | None = None, round_to: int | None = None,
                   ignore: Sequence[str] = ()) -> nn.Module:
    """Remove the least important output channels, in place; returns `model`.

    importance: layer name -> 1-D scores over its output channels (higher = keep), or a callable computing
        that from the model. Groups with no scored member are left whole.
    ratio: fraction of each group's channels to remove, or a dict group/member name -> ratio (unnamed: 0).
    flops_target: instead of ratio, the fraction of the original FLOPs to keep (bisection on a uniform ratio).
    round_to: keep a multiple of this many channels per group (hardware-friendly widths).
    ignore: layer names whose output channels must stay.
    """
    if (ratio is None) == (flops_target is None):
        raise UserError("give exactly one of ratio or flops_target")
    scores = _resolve(importance, model)
    if flops_target is not None:
        ratio = find_ratio(model, example_input, scores, flops_target, round_to, ignore)
    was_training = model.training
    dg = _dependency_graph(model, example_input)
    groups = _groups(model, dg, ignore)
    _check_ratio_keys(groups, ratio)
    _note_too_narrow(groups, ratio, round_to)
    _remove(dg, groups, _plan(groups, scores, ratio, round_to))
    return model.train(was_training)
