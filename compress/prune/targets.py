"""Budgets shared by the data-driven pruning methods: a channel ratio, a FLOPs target, or a measured latency target.

`--latency-target MS` chooses per-group ratios from latency *measured on the target runtime*, not from FLOPs:

1. A per-layer cost table: every distinct conv shape of the model (kernel, stride, input size, full widths) is
   exported alone (Conv + ReLU) to ONNX at a grid of input/output widths (multiples of 8, at most 8 per
   dimension) and timed with ONNX Runtime (batch 1, `latency_threads` threads). Runtimes pad channels to SIMD
   blocks (ORT's NCHWc: 8 floats with AVX2, 16 with AVX-512): on such a CPU a 3x3 conv with 9 to 16 output
   channels costs the same, so the table is a step function and widths between grid points cost the next one up. The table is cached as JSON under $COMPRESS_CACHE or ~/.cache/compress, keyed by
   runtime + version, threads, CPU model and layer shape, so a second run measures nothing new.
2. Calibration: the whole model is exported at three uniform widths and timed; latency ~= a + b * (sum of the
   per-layer table entries) is fitted, which absorbs what single layers miss (BN folding, adds, shortcuts). Each
   of the three is timed twice, in two passes, and the faster reading kept; the dense reading anchors the fit and
   a speed-up target (dense / S).
3. Allocation: channels are removed greedily, one grid step of one group at a time (down to the next measured
   width, so allocations land on grid widths: the grid step is `round_to`, by default 8; `--round-to 16` forces
   the AVX-512 block, see `latency_step` for why that is not the default), always the step with the least
   importance per predicted millisecond saved, until the predicted latency meets the target (a group keeps at least 20% of its width);
   the last step is the one that meets the target losing the least importance, when that loses less than the
   best-ratio step (which can overshoot with a big, important step where a small one would do).
   Then what the last step overshot is given back (greedy_fill: grid steps back, most importance per ms first,
   while the prediction stays within the goal).
   A channel's importance is its share of its group's total score (scores normalized per layer as the engine
   does, divided by the group width), summed over the group's member layers: a channel of a narrow layer weighs
   more than one of a wide layer, and a residual-stream channel (one filter in every block) more than one of a
   single layer.
4. The pruned model is exported and measured (a miss is measured once more and the faster reading kept: another
   process's noise only adds time, and on a loaded 2-core machine one reading of a -56% allocation came out 26% slow);
   if it misses the target the allocation is redone against a proportionally lower internal target, and if it
   measures more than 10% faster than asked, against a higher one (up to four rounds); the least-thinned
   allocation that measured within the target (2% tolerance) is kept. Predicted and measured latency of every
   round are recorded.

On a shared machine the measurements are noisy (the table stores medians); the history says what was measured.
`flops_target` for score-based methods uses the engine's uniform ratio (so every criterion is compared at the same
per-layer widths); gate-based methods allocate FLOPs greedily by their learned channel frequencies.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from compress.errors import UserError
from compress.exportable import exportable
from compress.fileio import cache_dir
from compress.finetune import FeatureDistill, feature_points, finetune, recalibrate_bn
from compress.io import InputSpec, LoadedModel
from compress.metrics import count_flops, count_params
from compress.progress import log, status
from compress.prune.base import ImportancePruneMethod, PruneConfig
from compress.prune.engine import channel_groups, find_ratio, keep_sets, prune_to_keep, tracked_channels
from compress.prune.graph import ADD_FUNCS, CONV, NORM, PASS_FUNCS, PASS_MODULES, trace
from compress.stages import Context, option

MIN_KEEP_FRACTION = 0.2          # the greedy allocator never thins a group below this
GRID_POINTS = 8  # the latency table measures at most this many widths per layer dimension
LATENCY_TOLERANCE = 1.02  # a trial measuring within this factor of the latency target meets it
LATENCY_SLACK = 0.9  # a trial measuring faster than this fraction of the target is redone wider
LATENCY_ROUNDS = 4  # allocation rounds at most (each measures one trial model)


# ---- config -----------------------------------------------------------------------------------------------

@dataclass
class TargetConfig(PruneConfig):
    latency_target: float | None = option(None, "latency to reach in ms (batch 1) on the target runtime; per-group "
                                                "ratios are chosen from a measured per-layer latency table")
    speedup_target: float | None = option(None, "speed-up over the unpruned model to reach, measured on the target "
                                                "runtime (e.g. 1.5: 1.5x faster); a latency_target that travels "
                                                "between machines (the dense model is measured first)")
    latency_threads: int = option(1, "threads used when measuring latency for latency_target / speedup_target")
    widths: dict | str | None = option(None, "keep exactly these per-group widths (the method's scores pick which "
                                             "channels): a JSON file, either {group: width} or a manifest.json of "
                                             "an earlier prune (its recorded kept_widths), or group=width,...: "
                                             "re-applies an allocation found before, e.g. by a latency target, "
                                             "without measuring again")

    requires_target: ClassVar[bool] = True  # score methods need one budget; gate methods may learn their own
    takes_widths: ClassVar[bool] = True  # gate methods learn their widths: fixed widths are for score methods
    BUDGETS: ClassVar[tuple[str, ...]] = ("ratio", "flops_target", "latency_target", "speedup_target", "widths")

    @property
    def by_latency(self) -> bool:
        """The budget is measured latency (absolute ms or a speed-up over the dense model)."""
        return self.latency_target is not None or self.speedup_target is not None

    def validate(self) -> None:
        given = [n for n in self.BUDGETS if getattr(self, n) is not None]
        if len(given) > 1:
            raise UserError(f"pruning: give one of {', '.join(self.BUDGETS)}, not {' and '.join(given)}")
        if not given and self.requires_target:
            raise UserError(f"pruning: give one of {', '.join(self.BUDGETS)}")
        if self.latency_target is not None and self.latency_target <= 0:
            raise UserError(f"latency_target is in milliseconds and must be positive, got {self.latency_target}")
        if self.speedup_target is not None and self.speedup_target <= 1:
            raise UserError(f"speedup_target must be above 1 (1.5 = 1.5x faster), got {self.speedup_target}")
        if self.latency_threads < 1:
            raise UserError(f"latency_threads must be at least 1, got {self.latency_threads}")
        if self.widths is not None:
            if not self.takes_widths:
                raise UserError("widths: fixed per-group widths are for the score methods (beta-rank, l1, hrank, "
                                "random); this method learns its own widths")
            self.widths = parse_widths(self.widths)
        # the remaining shared checks (lr, epochs, ratio range ...) are PruneConfig's
        probe = dataclasses.replace(self, ratio=self.ratio if self.ratio is not None else 0.5, flops_target=None) \
            if self.flops_target is None else self
        PruneConfig.validate(probe)

    def check_model(self, lm: LoadedModel) -> None:
        """Fixed widths must name this model's groups and fit in them; distillation points must be its modules."""
        if self.widths is not None:
            check_widths(WidthModel(lm.model.eval(), lm.spec.example(1)), self.widths)
        if self.distill_features > 0:
            feature_points(lm.model, {}, self.point_names)  # module names survive pruning: refuse before it


def parse_widths(spec: dict | str) -> dict[str, int]:
    """{group: width} from a mapping, a JSON file ({group: width}, {"widths": {...}}, or a manifest.json whose
    history records a prune's kept_widths), or "group=width,group=width"."""
    if isinstance(spec, str) and "=" not in spec:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"widths: no such file: {spec} (give a JSON file or group=width,...)")
        try:
            spec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"widths: {path.name} is not a JSON file ({type(e).__name__})") from None
        if isinstance(spec, dict) and "variants" in spec:  # a manifest: the prune entries' recorded widths
            found = [h["kept_widths"] for v in (spec.get("variants") or {}).values() for h in (v.get("history") or [])
                     if isinstance(h, dict) and h.get("stage") == "prune" and h.get("kept_widths")]
            if len({json.dumps(f, sort_keys=True) for f in found}) != 1:
                raise UserError(f"widths: {path.name} records {len(found)} different prune allocations; "
                                f"give a {{group: width}} JSON file instead")
            spec = found[0]
        elif isinstance(spec, dict) and isinstance(spec.get("widths"), dict):
            spec = spec["widths"]
    elif isinstance(spec, str):
        pairs = [item.partition("=") for item in spec.split(",") if item.strip()]
        if any(not k.strip() or not sep for k, sep, _ in pairs):
            raise UserError(f"widths: expected group=width,... or a JSON file, got {spec!r}")
        spec = {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(spec, dict) or not spec:
        raise UserError("widths: expected a non-empty {group: width} mapping")
    out = {}
    for g, w in spec.items():
        try:
            out[str(g)] = int(w)
        except (TypeError, ValueError):
            raise UserError(f"widths: {g}: expected a whole number of channels, got {w!r}") from None
        if out[str(g)] < 1 or out[str(g)] != float(w):
            raise UserError(f"widths: {g}: expected a whole number of channels (at least 1), got {w!r}")
    return out


# ---- the width model: which group sets each layer's in/out channels, and what that costs ------------------

@dataclass(frozen=True)
class Layer:
    name: str
    linear: bool
    c_in: int
    c_out: int
    in_group: str | None      # group whose width is this layer's input width (None: fixed, e.g. the image)
    out_group: str | None     # group this layer's output channels belong to (None: never pruned)
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    depthwise: bool = False
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)

    def dims(self, widths: Mapping[str, int]) -> tuple[int, int]:
        c_out = widths.get(self.out_group, self.c_out) if self.out_group else self.c_out
        c_in = widths.get(self.in_group, self.c_in) if self.in_group else self.c_in
        if self.depthwise:
            c_in = c_out
        return c_in, c_out

    def macs(self, widths: Mapping[str, int]) -> float:
        c_in, c_out = self.dims(widths)
        if self.linear:
            return float(c_in * c_out)
        per_out = (1 if self.depthwise else c_in / self.groups) * self.kernel[0] * self.kernel[1]
        return float(c_out * self.out_hw[0] * self.out_hw[1] * per_out)

    def shape_key(self) -> str:
        kind = "dw" if self.depthwise else f"g{self.groups}"
        return (f"conv k{self.kernel[0]}x{self.kernel[1]} s{self.stride[0]}x{self.stride[1]} "
                f"p{self.padding[0]}x{self.padding[1]} d{self.dilation[0]}x{self.dilation[1]} {kind} "
                f"in{self.in_hw[0]}x{self.in_hw[1]} full{self.c_in}x{self.c_out}")


class WidthModel:
    """Layers, channel groups and an analytic cost (MACs) of any assignment of group widths."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        groups = channel_groups(model, example)
        self.groups = {g.name: g for g in groups}
        self.full = {g.name: g.channels for g in groups}
        member_of = {m: g.name for g in groups for m in g.members}
        modules = dict(model.named_modules())
        gm = trace(model, "channel budgets")
        producers = {n: n.target for n in gm.graph.nodes
                     if n.op == "call_module" and isinstance(modules.get(n.target), (CONV, nn.Linear))}
        hw: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
        hooks = [modules[n].register_forward_hook(
            lambda m, i, o, n=n: hw.__setitem__(n, (tuple(i[0].shape[2:4]) or (1, 1), tuple(o.shape[2:4]) or (1, 1))))
            for n in producers.values()]
        try:
            with torch.no_grad():
                model.eval()(example[:1])
        finally:
            for h in hooks:
                h.remove()
        self.layers: list[Layer] = []
        for node, name in producers.items():
            m = modules[name]
            in_group = _input_group(node, producers, member_of, modules)
            (ih, iw), (oh, ow) = hw.get(name, ((1, 1), (1, 1)))
            if isinstance(m, nn.Linear):
                self.layers.append(Layer(name, True, m.in_features, m.out_features, in_group, member_of.get(name)))
                continue
            dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            self.layers.append(Layer(name, False, m.in_channels, m.out_channels, in_group, member_of.get(name),
                                     _pair(m.kernel_size), _pair(m.stride), _pair(m.padding), _pair(m.dilation),
                                     dw, m.groups, (ih, iw), (oh, ow)))

    def macs(self, widths: Mapping[str, int]) -> float:
        return sum(layer.macs(widths) for layer in self.layers)

    def flops(self, widths: Mapping[str, int]) -> float:
        return 2.0 * self.macs(widths)

    def widths_of(self, keep: Mapping[str, list[int]]) -> dict[str, int]:
        return {g: len(keep[g]) if g in keep else c for g, c in self.full.items()}


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # type: ignore[return-value]


def _input_group(node: fx.Node, producers: dict, member_of: dict, modules: dict) -> str | None:
    """The channel group whose width is this layer's input width: walk back through channel-preserving ops
    (and residual adds, whose inputs are coupled) to a producing conv/linear."""
    todo = [a for a in node.args[:1] if isinstance(a, fx.Node)]
    seen = set()
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n in producers:
            return member_of.get(producers[n])
        passes = ((n.op == "call_module" and isinstance(modules.get(n.target), (*PASS_MODULES, *NORM, nn.Flatten)))
                  or (n.op == "call_function" and (n.target in PASS_FUNCS or n.target in (torch.flatten,)))
                  or (n.op == "call_method" and n.target in ("relu", "flatten", "view", "reshape", "mean", "contiguous")))
        if passes:
            todo += [a for a in n.args[:1] if isinstance(a, fx.Node)]
        elif n.op == "call_function" and n.target in ADD_FUNCS:
            todo += [a for a in n.args if isinstance(a, fx.Node)]
    return None


# ---- importance per group and greedy allocation -----------------------------------------------------------

def group_importance(wm: WidthModel, scores: Mapping[str, torch.Tensor], normalize: bool | str = True,
                     combine: str = "mean") -> dict[str, torch.Tensor]:
    """Per group, one importance per channel from its members' scores (members share the channel numbering).

    normalize: True / "mean" divides each member's scores by their mean |score| (as the engine does), so layers with
    larger raw scores do not dominate; "share" then divides by the group width too, so a channel's importance is
    its share of the group's total (a channel of a 16-wide layer carries more than one of a 64-wide layer: what
    the greedy allocator weighs against cost); False leaves frequencies (comparable across layers) as they are.
    combine: mean | max | sum over the members that have scores (sum: removing a channel of a residual stream
    removes one filter from every member, so it loses all of their importance).
    """
    out = {}
    for name, g in wm.groups.items():
        vals = []
        for m in g.members:
            if m in scores:
                s = torch.as_tensor(scores[m]).detach().double().flatten()
                if s.numel() != g.channels:
                    raise ValueError(f"importance for {m} has {s.numel()} entries, its group has {g.channels} channels")
                if normalize:
                    scale = s.abs().mean()
                    s = s / scale if scale > 0 else s
                vals.append(s)
        if vals:
            stack = torch.stack(vals)
            out[name] = {"max": lambda t: t.max(0).values, "sum": lambda t: t.sum(0)}.get(combine, lambda t: t.mean(0))(stack)
            if normalize == "share":
                out[name] = out[name] / g.channels
    return out


def greedy_keep(wm: WidthModel, importance: Mapping[str, torch.Tensor], cost: Callable[[Mapping[str, int]], float],
                target: float, start: Mapping[str, list[int]] | None = None,
                min_keep_fraction: float = MIN_KEEP_FRACTION,
                next_width: Callable[[str, int], list[int]] | None = None, strict: bool = True,
                finish_cheapest: bool = False) -> dict[str, list[int]]:
    """Remove channels, least importance per unit of cost saved first, until cost <= target.

    start: keep sets to begin from (channels outside them count as already removed; they must be the lowest
    ranked of their group). Groups without importance are never thinned. next_width(group, width): the smaller
    widths one step may go to (default [width - 1]; the latency allocator offers every measured width below, since
    runtimes pad channels to SIMD blocks: one channel, or one block of 8, often saves nothing on its own). Returns keep sets; when the
    target is out of reach, raises (strict) or returns the thinnest allocation reached.
    """
    order = {g: sorted(range(len(s)), key=lambda i: (float(s[i]), -i)) for g, s in importance.items()}  # ascending
    removed = {g: 0 for g in order}
    if start:
        for g, kept in start.items():
            if g in order:
                drop = set(range(wm.full[g])) - set(kept)
                order[g] = sorted(drop, key=lambda i: (float(importance[g][i]), -i)) + [i for i in order[g] if i not in drop]
                removed[g] = len(drop)
    widths = {g: wm.full[g] - removed.get(g, 0) for g in wm.full}
    floor = {g: max(1, math.ceil(wm.full[g] * min_keep_fraction)) for g in order}
    step_to = next_width or (lambda g, w: [w - 1])
    current = cost(widths)
    while current > target:
        best, best_val, best_cost, best_w, best_lost = None, math.inf, current, 0, math.inf
        finish = None  # (lost, group, cost, width): the step that meets the target losing the least importance
        for g in order:
            w_old = widths[g]
            for w_new in step_to(g, w_old):  # every smaller width one step may go to (plateaus need look-ahead)
                if w_new < floor[g] or w_new >= w_old:
                    continue
                widths[g] = w_new
                c = cost(widths)
                widths[g] = w_old
                saved = current - c
                lost = sum(float(importance[g][i]) for i in order[g][removed[g]:removed[g] + w_old - w_new])
                val = lost / saved if saved > 1e-12 else (math.inf if lost > 0 else -math.inf)
                if best is None or val < best_val:
                    best, best_val, best_cost, best_w, best_lost = g, val, c, w_new, lost
                if finish_cheapest and c <= target and (finish is None or lost < finish[0]):
                    finish = (lost, g, c, w_new)
        if finish is not None and finish[0] <= best_lost:
            # a last step costs its whole loss, not its loss per unit saved: the best ratio step can overshoot the
            # target by a big, important step where a smaller one would do (any path through it loses more)
            _, best, best_cost, best_w = finish
        if best is None or best_val == math.inf:
            if not strict:
                break
            raise UserError(f"the budget is out of reach: thinning any group further (each keeps at least "
                            f"{MIN_KEEP_FRACTION:.0%} of its width) saves nothing; cost {current:.4g}, target {target:.4g}")
        removed[best] += widths[best] - best_w
        widths[best] = best_w
        current = best_cost
    return {g: sorted(order[g][removed[g]:]) for g in order if removed[g]}


def greedy_fill(wm: WidthModel, importance: Mapping[str, torch.Tensor], cost: Callable[[Mapping[str, int]], float],
                target: float, keep: Mapping[str, list[int]], step: int = 1,
                next_width_up: Callable[[str, int], list[int]] | None = None) -> dict[str, list[int]]:
    """The reverse of greedy_keep: give removed channels back, most important per unit of cost first, while the
    cost stays <= target (for learned allocations that undershot their budget, and for the latency allocator, whose
    last removal step can overshoot its goal). step > 1 gives them back so that widths return to multiples of step
    (the next `step` most important channels of a group at a time); next_width_up(group, width), if given, lists
    the larger widths one move may go to instead (the latency grid: one block back may cost nothing on its own)."""
    kept = {g: set(v) for g, v in keep.items()}
    pending = {g: sorted(set(range(wm.full[g])) - kept[g], key=lambda i: (-float(importance[g][i]), i))
               for g in kept if g in importance}
    widths = wm.widths_of(keep)

    def sizes(g: str) -> list[int]:  # channel counts one move may give back to g
        if next_width_up is not None:
            return [w - widths[g] for w in next_width_up(g, widths[g]) if 0 < w - widths[g] <= len(pending[g])]
        return [min(len(pending[g]), step - widths[g] % step)]  # up to the next multiple of step

    current = cost(widths)
    while True:
        best, best_val, best_cost, best_n = None, -math.inf, current, 0
        for g, todo in pending.items():
            for n in sizes(g) if todo else []:
                widths[g] += n
                c = cost(widths)
                widths[g] -= n
                if c > target:
                    continue
                val = sum(float(importance[g][i]) for i in todo[:n]) / max(c - current, 1e-12)
                if val > best_val:
                    best, best_val, best_cost, best_n = g, val, c, n
        if best is None:
            break
        kept[best].update(pending[best][:best_n])
        del pending[best][:best_n]
        widths[best] += best_n
        current = best_cost
    return {g: sorted(v) for g, v in kept.items() if len(v) < wm.full[g]}


def aligned_keep(wm: WidthModel, importance: Mapping[str, torch.Tensor], keep: Mapping[str, list[int]], step: int,
                 cost: Callable[[Mapping[str, int]], float] | None = None,
                 target: float | None = None) -> dict[str, list[int]]:
    """Snap a free allocation (the gate methods' extraction) to widths that are multiples of `step` (--round-to).

    Each group's width rounds to the nearest multiple of step (at least one step, at most the full width, which
    always counts as aligned); the channels kept are the group's most important. Then, if a cost and target are
    given and rounding up overshot the budget, whole steps are removed (greedy_keep, least importance per unit of
    cost first) until cost <= target. Runtimes pad channels to SIMD blocks, so widths such as 5, 7 or 12 cost
    like the next block up: free widths buy FLOPs but not latency.
    """
    if step <= 1:
        return {g: list(v) for g, v in keep.items()}
    widths = wm.widths_of(keep)
    snapped: dict[str, list[int]] = {}
    for g, full in wm.full.items():
        if g not in importance:
            if g in keep:
                snapped[g] = list(keep[g])
            continue
        w = widths[g]
        w_new = full if w >= full else min(full, max(step, int(math.floor(w / step + 0.5)) * step))
        if w_new < full:
            order = sorted(range(full), key=lambda i: (-float(importance[g][i]), i))  # most important first
            snapped[g] = sorted(order[:w_new])
    if cost is None or target is None:
        return snapped
    if cost(wm.widths_of(snapped)) > target:
        def grid_below(g: str, w: int) -> list[int]:
            below = (w - 1) // step * step
            return [below] if below >= step else []

        snapped = greedy_keep(wm, importance, cost, target, start=snapped, next_width=grid_below, strict=False)
    return greedy_fill(wm, importance, cost, target, snapped, step)


def snap_to_grid(wm: WidthModel, importance: Mapping[str, torch.Tensor], keep: Mapping[str, list[int]],
                 cfg: PruneConfig, info: dict) -> dict[str, list[int]]:
    """aligned_keep at cfg.round_to for a gate method's learned allocation, meeting cfg.flops_target (if any) in
    whole steps; records the grid and the resulting FLOPs fraction in info."""
    base = wm.flops(wm.full)
    frac = lambda w: wm.flops(w) / base  # noqa: E731
    keep = aligned_keep(wm, importance, keep, cfg.round_to, frac, cfg.flops_target)
    info["aligned_to"] = cfg.round_to
    info["aligned_flops_fraction"] = round(frac(wm.widths_of(keep)), 4)
    return keep


# ---- latency table ----------------------------------------------------------------------------------------

def time_session(session, x: np.ndarray, min_iters: int = 30, min_seconds: float = 0.15, warmup: int = 5) -> float:
    """Median wall time of session.run(x) in ms."""
    for _ in range(warmup):
        session.run(x)
    times, t_end = [], time.perf_counter() + min_seconds
    while len(times) < min_iters or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        session.run(x)
        times.append(time.perf_counter() - t0)
        if len(times) >= 2000:
            break
    return float(np.median(times) * 1e3)


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(exportable(model).eval(), (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["out"])


def measure_model_ms(model: nn.Module, spec: InputSpec, threads: int = 1) -> float:
    """Export `model` to ONNX (as `compress export` does) and return ONNX Runtime's median batch-1 latency in ms."""
    from runtimes import open_session

    with tempfile.TemporaryDirectory(prefix="compress-lat-") as tmp:
        path = Path(tmp) / "model.onnx"
        _export(copy.deepcopy(model).eval(), spec.example(1), path)
        session = open_session(path, "onnxruntime", threads=threads)
        try:
            return time_session(session, spec.example(1).numpy(), min_iters=100, min_seconds=0.5)
        finally:
            session.close()


class LatencyTable:
    """Measured ONNX Runtime latency of single conv layers at a grid of widths, cached as JSON."""

    def __init__(self, threads: int = 1, path: Path | None = None, step: int = 8):
        import onnxruntime

        from devices.profile import cpu_model  # the table is per CPU; devices/ stays out of import time

        if step < 1:
            raise UserError(f"the latency table's width step must be at least 1, got {step}")
        self.threads, self.step = threads, step
        self.prefix = f"onnxruntime-{onnxruntime.__version__}|threads={threads}|{cpu_model()}"
        digest = hashlib.sha1(self.prefix.encode()).hexdigest()[:10]
        self.path = path or cache_dir() / f"latency-table-v2-{digest}.json"
        self.entries: dict[str, float] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("key") == self.prefix:
                    self.entries = {k: float(v) for k, v in data.get("entries", {}).items()}
            except (OSError, ValueError):
                self.entries = {}
        self.measured = 0

    def grid(self, c: int) -> list[int]:
        """Widths measured for a dimension of full width c: multiples of `step` (8 by default: a SIMD block;
        AVX-512 runtimes pad output channels to 16), coarser for wide layers so that at most GRID_POINTS are
        measured, and c itself."""
        step = self.step * math.ceil(c / (self.step * GRID_POINTS))
        return sorted({*range(step, c, step), c})

    @staticmethod
    def ceil_to(grid: list[int], c: int) -> int:
        """The smallest measured width >= c: a width between two measured ones runs like the larger one (padding)."""
        return next((g for g in grid if g >= c), grid[-1])

    def next_width(self, c_full: int, c: int) -> list[int]:
        """The measured widths below c (where one allocation step may go)."""
        return [g for g in self.grid(c_full) if g < c]

    def _points(self, layer: Layer) -> list[tuple[int, int]]:
        outs = self.grid(layer.c_out) if layer.out_group else [layer.c_out]
        if layer.depthwise:
            return [(c, c) for c in outs]
        ins = self.grid(layer.c_in) if layer.in_group else [layer.c_in]
        return [(i, o) for i in ins for o in outs]

    def ensure(self, layers: list[Layer]) -> None:
        todo = [(lay, p) for lay in layers if not lay.linear for p in self._points(lay)
                if self._key(lay, *p) not in self.entries]
        if not todo:
            return
        from runtimes import open_session

        with status(f"measuring {len(todo)} layer latencies (cached afterwards in {self.path})"), \
                tempfile.TemporaryDirectory(prefix="compress-lat-") as tmp:
            for k, (lay, (ci, co)) in enumerate(todo):
                key = self._key(lay, ci, co)
                if key in self.entries:
                    continue
                conv = nn.Conv2d(ci, co, lay.kernel, lay.stride, lay.padding, lay.dilation,
                                 groups=ci if lay.depthwise else 1, bias=True)
                x = torch.randn(1, ci, *lay.in_hw)
                path = Path(tmp) / f"l{k}.onnx"
                _export(nn.Sequential(conv, nn.ReLU()), x, path)
                session = open_session(path, "onnxruntime", threads=self.threads)
                self.entries[key] = time_session(session, x.numpy())
                session.close()
                self.measured += 1
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.prefix, "entries": self.entries}, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def _key(self, layer: Layer, c_in: int, c_out: int) -> str:
        return f"{layer.shape_key()}|{c_in}x{c_out}"

    def layer_ms(self, layer: Layer, c_in: int, c_out: int) -> float:
        """Measured latency at the measured widths just above (c_in, c_out): a step function, like SIMD padding."""
        if layer.linear:
            return 0.0
        co = self.ceil_to(self.grid(layer.c_out), c_out) if layer.out_group else layer.c_out
        if layer.depthwise:
            return self.entries[self._key(layer, co, co)]
        ci = self.ceil_to(self.grid(layer.c_in), c_in) if layer.in_group else layer.c_in
        return self.entries[self._key(layer, ci, co)]


class LatencyModel:
    """latency(widths) ~= a + b * sum of per-layer table latencies, (a, b) fitted on whole-model measurements."""

    def __init__(self, wm: WidthModel, table: LatencyTable):
        self.wm, self.table = wm, table
        self.a, self.b = 0.0, 1.0
        self.calibration: list[dict] = []

    def layer_sum(self, widths: Mapping[str, int]) -> float:
        return sum(self.table.layer_ms(lay, *lay.dims(widths)) for lay in self.wm.layers)

    def __call__(self, widths: Mapping[str, int]) -> float:
        return self.a + self.b * self.layer_sum(widths)

    def calibrate(self, model: nn.Module, example: torch.Tensor, spec: InputSpec, threads: int,
                  fractions: tuple[float, ...] = (1.0, 0.6, 0.35)) -> None:
        """Fit (a, b) on the whole model thinned uniformly to grid-aligned widths (what allocations produce).

        Every model is timed twice, in two passes (dense, thinned ..., dense, thinned ...), and the faster reading
        kept: noise only adds time, and one slow spell of another process would otherwise bend the fit (with single
        thinned readings, a 1.6x ask on ResNet-20 once fitted a model that predicted even the thinnest allocation to
        miss the target, and the allocator kept that one: -87% FLOPs, measured 2.7x). The dense reading also
        anchors a speed-up target."""
        xs, ys, trials = [], [], []
        for f in fractions:
            keep = {g: list(range(self.table.ceil_to(self.table.grid(c), max(1, round(c * f)))))
                    for g, c in self.wm.full.items()} if f < 1 else {}
            keep = {g: v for g, v in keep.items() if len(v) < self.wm.full[g]}
            trials.append(prune_to_keep(copy.deepcopy(model), example, keep) if keep else model)
            xs.append(self.layer_sum(self.wm.widths_of(keep)))
        for trial in trials + trials:
            ys.append(measure_model_ms(trial, spec, threads))
        ys = [min(ys[i], ys[i + len(trials)]) for i in range(len(trials))]
        self.calibration = [{"width_fraction": f, "layer_sum_ms": round(x, 4), "measured_ms": round(y, 4)}
                            for f, x, y in zip(fractions, xs, ys)]
        b, a = np.polyfit(xs, ys, 1)
        if b <= 0:  # noise swamped the trend: trust the table's proportions, anchor at the full model
            b, a = ys[0] / xs[0], 0.0
        self.a, self.b = float(a), float(b)


# ---- choosing keep sets for a budget ----------------------------------------------------------------------

def plan_budget(model: nn.Module, spec: InputSpec, example: torch.Tensor, scores: Mapping[str, torch.Tensor],
                cfg: TargetConfig, uniform: bool = True, normalize: bool = True, combine: str = "mean",
                start: Mapping[str, list[int]] | None = None) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Keep sets (group name -> channel indices) meeting cfg's budget, and a record of how they were chosen.

    uniform: ratio / flops_target use the engine's uniform per-group ratio (score methods); otherwise FLOPs are
    allocated greedily (gate methods, whose scores are comparable across layers). Latency budgets are always greedy.
    """
    info: dict[str, Any] = {}
    if cfg.widths is not None:
        return _plan_widths(model, example, scores, cfg.widths)
    if cfg.by_latency:
        return _plan_latency(model, spec, example, scores, cfg, normalize, combine, start)
    if uniform or cfg.ratio is not None:
        ratio = cfg.ratio
        if cfg.flops_target is not None:
            with status(f"searching the ratio for {cfg.flops_target:g} of the FLOPs"):
                ratio = find_ratio(model, example, scores, cfg.flops_target, cfg.round_to)
        info["ratio"] = round(float(ratio), 4)
        return keep_sets(model, example, scores, ratio, cfg.round_to), info
    wm = WidthModel(model, example)
    base = wm.flops(wm.full)
    imp = group_importance(wm, scores, "share", "sum") if normalize else group_importance(wm, scores, False, combine)
    keep = greedy_keep(wm, imp, lambda w: wm.flops(w) / base, cfg.flops_target, start)
    info["allocation"] = "greedy by importance per FLOP"
    return keep, info


def check_widths(wm: WidthModel, widths: Mapping[str, int]) -> None:
    unknown = sorted(set(widths) - set(wm.full))
    if unknown:
        raise UserError(f"widths: no prunable group {', '.join(unknown[:3])} in this model; its groups: "
                        f"{', '.join(f'{g} ({w})' for g, w in wm.full.items())}")
    for g, w in widths.items():
        if w > wm.full[g]:
            raise UserError(f"widths: {g} has {wm.full[g]} channels, cannot keep {w}")


def _plan_widths(model, example, scores, widths: Mapping[str, int]) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Keep sets with exactly `widths` per group, the highest-ranked channels of each (ranked as the latency
    allocator ranks them, so a latency allocation's recorded widths give back the same channels)."""
    wm = WidthModel(model, example)
    check_widths(wm, widths)
    imp = group_importance(wm, scores, "share", "sum")
    keep: dict[str, list[int]] = {}
    for g, w in widths.items():
        if w == wm.full[g]:
            continue
        if g not in imp:
            raise UserError(f"widths: this method gives no scores for group {g}, so it cannot choose its channels")
        order = sorted(range(wm.full[g]), key=lambda i: (float(imp[g][i]), -i))  # ascending, as greedy_keep
        keep[g] = sorted(order[wm.full[g] - w:])
    return keep, {"allocation": "fixed widths", "widths": {g: int(w) for g, w in widths.items()}}


def _plan_latency(model, spec, example, scores, cfg, normalize, combine, start):
    wm = WidthModel(model, example)
    step = latency_step(cfg)
    table = LatencyTable(cfg.latency_threads, step=step)
    with status("latency table"):
        table.ensure(wm.layers)
    lat = LatencyModel(wm, table)
    with status("calibrating the latency model on whole-model exports"):
        lat.calibrate(model, example, spec, cfg.latency_threads)
    full_ms = lat.calibration[0]["measured_ms"]
    log(f"latency table: {table.measured} new layer measurements ({table.path}); dense model measures "
        f"{full_ms:.3f} ms; model = {lat.a:.3f} + {lat.b:.3f} x sum(layers)")
    imp = group_importance(wm, scores, "share", "sum") if normalize else group_importance(wm, scores, False, combine)
    target = cfg.latency_target if cfg.latency_target is not None else full_ms / cfg.speedup_target
    if cfg.speedup_target is not None:
        log(f"speed-up target {cfg.speedup_target:g}x: {target:.3f} ms")
    goal, rounds, keeps = target, [], []
    keep: dict[str, list[int]] = {}
    if full_ms <= target:
        log(f"the dense model already meets {target:.3f} ms ({full_ms:.3f} ms): nothing more removed")
        return dict(start or {}), {"allocation": "latency", "latency_dense_ms": full_ms, "rounds": []}
    for r in range(LATENCY_ROUNDS):
        # never strict: the model is a fit, so an allocation it predicts short of the goal may still measure in time
        keep = greedy_keep(wm, imp, lat, goal, start, next_width=lambda g, w: table.next_width(wm.full[g], w),
                           strict=False, finish_cheapest=True)
        if not start:
            # the greedy stops at the step that crosses the goal, which can be a big one (a residual stream's
            # width moves every conv on it): give back what fits under the goal, most important per ms first
            keep = greedy_fill(wm, imp, lat, goal, keep,
                               next_width_up=lambda g, w: [x for x in table.grid(wm.full[g]) if x > w])
        trial = prune_to_keep(copy.deepcopy(model), example, keep)
        measured = measure_model_ms(trial, spec, cfg.latency_threads)
        if measured > target * LATENCY_TOLERANCE:
            # a miss may be another process's noise (noise only adds time): confirm it before thinning further
            measured = min(measured, measure_model_ms(trial, spec, cfg.latency_threads))
        predicted = lat(wm.widths_of(keep))
        keeps.append(keep)
        at_floor = predicted > goal * (1 + 1e-9)  # the greedy ran out of steps before the internal target
        rounds.append({"round": r + 1, "internal_target_ms": round(goal, 4), "predicted_ms": round(predicted, 4),
                       "measured_ms": round(measured, 4), "at_floor": at_floor,
                       "flops_fraction": round(wm.flops(wm.widths_of(keep)) / wm.flops(wm.full), 4)})
        log(f"latency round {r + 1}: predicted {predicted:.3f} ms, measured {measured:.3f} ms (target {target:.3f} ms)")
        if target * LATENCY_SLACK <= measured <= target * LATENCY_TOLERANCE:
            break
        if measured < target * LATENCY_SLACK:
            # far faster than asked: the model over-predicted (it is fitted on uniformly thinned models, and an
            # allocation with a few very narrow layers runs faster than their table entries add up to): aim higher
            goal = max(goal, predicted) * target / measured
            continue
        if at_floor:
            raise UserError(f"latency target {target:.3f} ms is out of reach with widths in steps of {step} "
                            f"(each group keeps at least {MIN_KEEP_FRACTION:.0%}): the thinnest allocation measures "
                            f"{measured:.3f} ms; try a smaller --round-to or a larger target")
        goal = min(goal, predicted) * target / measured  # the model under-predicted: aim lower
    # the least-thinned allocation that measured within the target (else the fastest one)
    ok = [i for i, rd in enumerate(rounds) if rd["measured_ms"] <= target * LATENCY_TOLERANCE]
    best = max(ok, key=lambda i: rounds[i]["measured_ms"]) if ok else \
        min(range(len(rounds)), key=lambda i: rounds[i]["measured_ms"])
    keep = keeps[best]
    info = {"allocation": "greedy by importance share per predicted ms", "round_to": step,
            "latency_target_ms": round(target, 4),
            "latency_dense_ms": round(full_ms, 4),
            "latency_table": str(table.path), "latency_model": {"a": lat.a, "b": lat.b, "calibration": lat.calibration},
            "rounds": rounds, "latency_measured_ms": rounds[best]["measured_ms"],
            "widths": {g: len(v) for g, v in keep.items()}}
    if rounds[best]["measured_ms"] > target * LATENCY_TOLERANCE:
        log(f"[yellow]latency target {target:.3f} ms not met: measured {rounds[best]['measured_ms']:.3f} ms[/]")
    return keep, info


def simd_block() -> int:
    """Channels per SIMD block of ONNX Runtime's NCHWc convolutions on this CPU: 16 floats with AVX-512, else 8.

    ORT pads a conv's output channels up to a multiple of this block (measured here, 3x3 at 32x32 from 16 input
    channels: 8 outputs 0.033 ms, 16 outputs 0.035 ms; at 16x16, 24 outputs cost what 32 do), so output widths
    that are multiples of it are the ones that buy latency; input widths are cheaper in steps of 8."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return 16 if " avx512f" in f" {flags.split(':', 1)[-1]}" else 8


LATENCY_STEP = 8  # default width step of latency allocations (see latency_step)


def latency_step(cfg: PruneConfig) -> int:
    """Width step of latency_target allocations: cfg.round_to if given, else 8.

    Not the AVX-512 block (16) by default: the measured table already prices the padding of output channels to 16,
    while input channels are cheaper in steps of 8 (a 16->8-wide layer measures ~35% faster as the next conv's
    input), and on narrow nets a 16-step cannot thin a 16-wide stage at all. Measured on ResNet-20 here (ORT
    1 thread, 3 epochs KD): step 8 reached 1.82x at 63% fewer FLOPs and 77.8%; step 16 1.72x at 48% fewer and
    73.4% (it had to cut the wide stage-3 blocks to 16). Pass --round-to 16 to force block-aligned widths."""
    return int(cfg.round_to) if cfg.round_to else LATENCY_STEP


def latency_flops_budget(model: nn.Module, spec: InputSpec, example: torch.Tensor, cfg: TargetConfig) -> float:
    """For methods that learn under a FLOPs budget: the FLOPs fraction of an allocation that meets cfg's latency
    target (L1 norms standing in for the method's own importance, which does not exist before training)."""
    from compress.prune.baselines import l1_scores

    keep, _ = _plan_latency(model, spec, example, l1_scores(model), cfg, True, "mean", None)
    wm = WidthModel(model, example)
    return wm.flops(wm.widths_of(keep)) / wm.flops(wm.full)


# ---- a pruning method whose budget may be a ratio, FLOPs or latency ---------------------------------------

class TargetedPruneMethod(ImportancePruneMethod):
    """Score -> keep sets for the budget -> engine removes -> optional KD fine-tune -> history.

    Subclasses implement `score(model, cfg, ctx, info)` (info: a dict recorded in the history) and may override
    `plan` (how scores become keep sets) and `after_prune` (e.g. Beta-Rank's faithful BN reset).
    """

    Config: ClassVar[type] = TargetConfig
    uniform: ClassVar[bool] = True

    def score(self, model: nn.Module, cfg: Any, ctx: Context, info: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def plan(self, model: nn.Module, spec: InputSpec, example: torch.Tensor, scores: dict, cfg: Any,
             ctx: Context, info: dict) -> dict[str, list[int]]:
        keep, how = plan_budget(model, spec, example, scores, cfg, uniform=self.uniform)
        info.update(how)
        return keep

    def after_prune(self, model: nn.Module, keep: dict[str, list[int]], scores: dict, cfg: Any, ctx: Context,
                    info: dict) -> None:
        """Hook after the channels are removed (default: nothing)."""

    def result_model(self, model: nn.Module, lm: LoadedModel, cfg: Any, ctx: Context, info: dict) -> LoadedModel | None:
        """A different model to return instead of the pruned one (FTWT's masked-dense variant); default None."""
        return None

    def apply(self, lm: LoadedModel, cfg: TargetConfig, ctx: Context) -> LoadedModel:
        lm.require_compressible(f"prune {self.name}")
        model, shape = lm.model.eval(), lm.spec.shape
        example = lm.spec.example(1, ctx.seed)
        before = {"params": count_params(model), "flops": count_flops(model, shape)}
        teacher = copy.deepcopy(model).eval() if cfg.finetune_epochs and cfg.distill else None
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        with status(f"scoring channels ({self.name})"):
            scores = self.score(model, cfg, ctx, info)
        other = self.result_model(model, lm, cfg, ctx, info)
        if other is not None:
            return other
        keep = self.plan(model, lm.spec, example, scores, cfg, ctx, info)
        with tracked_channels(model) as kept_channels:
            if keep:
                prune_to_keep(model, example, keep)
        self.after_prune(model, keep, scores, cfg, ctx, info)
        bn_done = recalibrate_bn(model, ctx, cfg.bn_recalibration) if cfg.bn_recalibration and keep else False
        after = {"params": count_params(model), "flops": count_flops(model, shape)}
        log(f"pruned {self.name}: FLOPs {before['flops'] / 1e6:.1f}M -> {after['flops'] / 1e6:.1f}M "
            f"({1 - after['flops'] / before['flops']:.1%} fewer), params {before['params'] / 1e3:.0f}k -> "
            f"{after['params'] / 1e3:.0f}k")
        entry: dict[str, Any] = {"stage": "prune", "method": self.name, "config": asdict(cfg),
                                 "ratio": info.pop("ratio", None), "params_before": before["params"],
                                 "params_after": after["params"], "flops_before": before["flops"],
                                 "flops_after": after["flops"], "kept_widths": {g: len(v) for g, v in keep.items()},
                                 "bn_recalibrated": bn_done, "kept_channels": kept_channels,
                                 **info,
                                 "seconds_prune": round(time.perf_counter() - t0, 2)}
        if cfg.finetune_epochs:
            epochs: list[dict] = []
            features = None
            if cfg.distill_features > 0:
                features = FeatureDistill(feature_points(model, kept_channels, cfg.point_names), cfg.distill_features)
                entry["distill_points"] = list(features.points)
            finetune(model, ctx, cfg.finetune_epochs, cfg.lr, cfg.batch_size, teacher=teacher,
                     distill=cfg.distill, temperature=cfg.distill_temperature, alpha=cfg.distill_alpha, log=epochs,
                     features=features)
            entry["finetune"] = epochs
        return LoadedModel(model.eval(), lm.spec, "compress", lm.source, lm.arch, dict(lm.arch_kwargs),
                           list(lm.edits), [*lm.history, entry])


def calibration_batches(ctx: Context, n_images: int, batch_size: int, augment: bool = False, seed_offset: int = 0,
                        who: str = "this method"):
    """Normalized image batches (labels dropped) from the calib data (falls back to --data)."""
    from compress.data import batches

    ds = ctx.dataset("calib")
    if ds is None:
        raise UserError(f"{who} needs images to look at: pass --calib or --data (unlabeled is fine)")
    ds = ds.subset(n_images, seed=ctx.seed + seed_offset)
    for x, _ in batches(ds, ctx.normalizer(), batch_size, shuffle=True, seed=ctx.seed + seed_offset, augment=augment):
        yield x
