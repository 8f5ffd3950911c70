"""Consensus sub-network by polarization (Zhi et al., arXiv 2302.10798): binary gates trained in one pass, removed.

Only the abstract of the paper could be read and no code exists (research note, section 2): the gate module, the
polarizing loss, the budget and the schedule below are the note's reconstruction (section 2.2) plus the choices
marked CHOICE. What the abstract fixes: binarized differentiable gates, a polarizing loss that makes the dynamic
gates agree on one static sub-network of user-defined sparsity, one training pass, gates removed at inference.

Gates. One gate vector per channel group of the engine (a residual stream's channels share one gate vector, so
the extracted network stays aligned). For an input x the gate of group g is

    z = A_g e + b_g,  e = GAP(I) / mean|GAP(I)|,  p = sigmoid(z),  h = 1[p > 0.5]  (straight-through: dh/dp = 1)

with I the input of the group's first conv (CHOICE: e is scale-free, and A's learning rate is gate_lr / C_in, so
that per step the input-dependent part moves z no more than the bias does; without this, Adam on A closed most
gates within a few steps, far below the budget, and the polarizing term then kept them closed). h multiplies
the group's channels after every member's BatchNorm (before its ReLU) and, for residual streams,
also the option-A shortcut output that is added to them (CHOICE: this is what makes "gate closed" equal
"channel removed" exactly, so the extracted network reproduces the gated one wherever the gates agree with the
consensus). A = 0 and b = +2 at the start: every gate open, the network unchanged.

Loss (note 2.2; lambda_* options; CHOICE: lambda_budget 5 instead of the note's 2, which left the consensus
~0.15 above a 0.4 FLOPs budget after 80 steps because the polarizing term holds gates near their state):

    task + lambda_budget * (cost(h_bar) - target(t))^2 + lambda_polar * mean p_bar (1 - p_bar)
         + lambda_agree * mean (p - p_bar)^2

p_bar, h_bar: per-channel mean over the batch. The budget sits on the hard gates (the note's pilot: a budget on the
soft p_bar is met with every hard gate open). cost = fraction of kept channels (ratio: target 1 - ratio) or, with
flops_target, the FLOPs fraction of the gated widths (CHOICE: channels differ in cost; the abstract's sparsity is
in "connections"). CHOICE: target(t) ramps linearly from 1 to the budget over the first `ramp` of the steps, so
the gates close progressively instead of all at once. The task loss is distillation from the unpruned model
(plus cross-entropy when labels exist, as in `compress.finetune`), or cross-entropy with `--no-distill`.
CHOICE: the training starts from the given (pretrained) weights; the paper's "one pass" may be from scratch.
CHOICE: gates get their own optimizer, Adam by default: the budget's gradient per gate is tiny (one channel's
share of the FLOPs, times the sigmoid slope) and plain SGD barely moves the gates within one short pass; Adam's
scale-free steps let the sign of (budget push - task pull) decide which gates close.

Extraction: per-channel open frequency q over calibration images; channels with q > 0.5 stay (the consensus),
the rest are removed by the engine and the gates are dropped: an ordinary, physically smaller network. The
short training does not land exactly on the budget: if a FLOPs or latency target is missed, the least-open
channels are removed greedily until it is met (with a latency target the allocator starts from the full widths,
least-open channels first, so a consensus below the target gets channels back and widths stay on the latency
grid); with a FLOPs target, a consensus more than 0.01 below it gets
its most-open closed channels back up to the target (so methods compare at equal FLOPs). Both are logged and
recorded ("adjusted", "consensus_flops_fraction"). A --ratio (fraction of channels) is held the same way.
Reported: achieved FLOPs (not the requested sparsity), the consensus' own FLOPs, the per-sample agreement of the
hard gates with the consensus mask, and the open-frequency histogram. No fine-tuning unless --finetune-epochs is
given. The equivalence "extracted == gated where the gates agree" is a test (tests/compress/test_prune_methods.py).
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.data import batches
from compress.errors import UserError
from compress.finetune import kd_loss
from compress.progress import log, track
from compress.prune import METHODS
from compress.prune.graph import conv_sites, trace
from compress.prune.targets import (TargetConfig, TargetedPruneMethod, WidthModel, _plan_latency,
                                    calibration_batches, greedy_fill, greedy_keep, latency_flops_budget,
                                    snap_to_grid)
from compress.stages import Context, option
from compress.zoo.resnet_cifar import ShortcutA


@dataclass
class PolarizationConfig(TargetConfig):
    epochs: int = option(1, "training epochs over --data with gates (the method's single pass)")
    max_steps: int | None = option(None, "stop the gate training after this many steps (CPU budgets, smoke runs)")
    train_lr: float = option(0.01, "backbone learning rate during the gate training (SGD, cosine)")
    gate_lr: float = option(0.15, "gate learning rate (no weight decay)")
    gate_optimizer: str = option("adam", "gate optimizer: adam (scale-free steps) | sgd (momentum 0.9)", ("adam", "sgd"))
    lambda_budget: float = option(5.0, "weight of the budget term (cost of the open hard gates - target)^2")
    lambda_polar: float = option(0.5, "weight of the polarizing term mean p_bar (1 - p_bar)")
    lambda_agree: float = option(0.5, "weight of the agreement term mean (p - p_bar)^2")
    gate_init: float = option(2.0, "initial gate logit (positive: every gate open at the start)")
    ramp: float = option(0.5, "fraction of the steps over which the budget ramps from 1 to its target")
    calib_images: int = option(2000, "images the open frequencies are measured on (--calib, else --data)")

    takes_widths: ClassVar[bool] = False  # the gates learn the widths


# ---- gates ------------------------------------------------------------------------------------------------

class _HardGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return (p > 0.5).to(p.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - straight-through
        return grad


class GateSet(nn.Module):
    """The gates of every channel group, attached to a model with hooks (nothing of them is ever saved)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, wm: WidthModel | None = None, init: float = 3.0):
        super().__init__()
        self.wm = wm or WidthModel(model, example)
        sites = conv_sites(model, "polarization")
        order = {n: i for i, n in enumerate(sites)}
        modules = dict(model.named_modules())
        self.groups: list[str] = []
        self.first: dict[str, str] = {}
        self.site_of: dict[str, str] = {}   # member conv -> module whose output is gated
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        for name, g in self.wm.groups.items():
            members = [m for m in g.members if m in sites]
            if not members:
                continue
            first = min(members, key=order.__getitem__)
            c_in = modules[first].in_channels
            key = self._key(name)
            self.groups.append(name)
            self.first[name] = first
            self.weight[key] = nn.Parameter(torch.zeros(g.channels, c_in))
            self.bias[key] = nn.Parameter(torch.full((g.channels,), float(init)))
            for m in members:
                self.site_of[m] = sites[m].norm or m
        self.group_of_site = {self.site_of[m]: g for g in self.groups for m in self.wm.groups[g].members
                              if m in self.site_of}
        self.shortcuts = self._shortcuts(model, modules)
        self.cur: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.force: dict[str, torch.Tensor] | None = None
        self._handles: list = []

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def _shortcuts(self, model: nn.Module, modules: dict) -> dict[str, str]:
        """Parameter-free shortcut modules whose output is added to a gated site: they carry that group."""
        gm = trace(model, "polarization")
        node_site = {n.name: n.target for n in gm.graph.nodes if n.op == "call_module"}
        out = {}
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in (operator.add, torch.add, operator.iadd):
                args = [a for a in n.args if hasattr(a, "name")]
                groups = {self.group_of_site[node_site[a.name]] for a in args
                          if node_site.get(a.name) in self.group_of_site}
                for a in args:
                    tgt = node_site.get(a.name)
                    if groups and tgt and isinstance(modules.get(tgt), ShortcutA):
                        out[tgt] = next(iter(groups))
        return out

    def attach(self, model: nn.Module) -> "GateSet":
        modules = dict(model.named_modules())
        for g in self.groups:
            self._handles.append(modules[self.first[g]].register_forward_pre_hook(
                lambda m, args, g=g: self._compute(g, args[0])))
        for site, g in self.group_of_site.items():
            self._handles.append(modules[site].register_forward_hook(lambda m, i, o, g=g: self._gate(g, o)))
        for sc, g in self.shortcuts.items():
            self._handles.append(modules[sc].register_forward_hook(lambda m, i, o, g=g: self._gate(g, o)))
        self._handles.append(model.register_forward_pre_hook(lambda m, args: self.cur.clear()))
        return self

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _compute(self, g: str, x: torch.Tensor) -> None:
        key = self._key(g)
        if self.force is not None:
            h = self.force[g].to(x.dtype).expand(x.shape[0], -1)
            self.cur[g] = (h, h)
            return
        e = x.mean((2, 3))
        e = e / (e.abs().mean(1, keepdim=True) + 1e-6)  # scale-free input: entries O(1) whatever the layer's scale
        z = F.linear(e, self.weight[key], self.bias[key])
        p = torch.sigmoid(z)
        self.cur[g] = (p, _HardGate.apply(p))

    def _gate(self, g: str, out: torch.Tensor) -> torch.Tensor:
        if g not in self.cur:
            raise RuntimeError(f"gate of group {g} used before its first conv ran: unsupported execution order")
        h = self.cur[g][1]
        return out * h.view(*h.shape, *[1] * (out.ndim - 2))

    def cost_terms(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Soft widths (sum of mean hard gates), polarization and agreement terms of the current batch."""
        widths, polar, agree, n = {}, 0.0, 0.0, 0
        for g, (p, h) in self.cur.items():
            widths[g] = h.mean(0).sum()
            pbar = p.mean(0)
            polar = polar + (pbar * (1 - pbar)).sum()
            agree = agree + ((p - pbar) ** 2).mean(0).sum()
            n += p.shape[1]
        return widths, polar / max(n, 1), agree / max(n, 1)


def soft_flops_fraction(wm: WidthModel, widths: dict[str, torch.Tensor]) -> torch.Tensor:
    total = 0.0
    for lay in wm.layers:
        c_in = widths.get(lay.in_group, lay.c_in) if lay.in_group else lay.c_in
        c_out = widths.get(lay.out_group, lay.c_out) if lay.out_group else lay.c_out
        if lay.linear:
            total = total + c_in * c_out
        else:
            per = (1 if lay.depthwise else c_in / lay.groups) * lay.kernel[0] * lay.kernel[1]
            total = total + c_out * lay.out_hw[0] * lay.out_hw[1] * per
    return total / wm.macs(wm.full)


# ---- the method ---------------------------------------------------------------------------------------------

class Polarization(TargetedPruneMethod):
    name = "polarization"
    needs_data = ("train",)
    summary = ("consensus sub-network: binary STE gates + polarizing loss trained in one pass, extracted as a "
               "smaller static network (Zhi et al. 2023, reconstructed)")
    Config: ClassVar[type] = PolarizationConfig
    uniform: ClassVar[bool] = False

    def score(self, model: nn.Module, cfg: PolarizationConfig, ctx: Context, info: dict) -> dict[str, torch.Tensor]:
        example = ctx.spec.example(1, ctx.seed)
        wm = WidthModel(model, example)
        budget_kind, target = self._budget(model, example, wm, cfg, ctx, info)
        teacher = copy.deepcopy(model).eval() if cfg.distill else None  # before the hooks: the teacher is ungated
        gates = GateSet(model, example, wm, cfg.gate_init).attach(model)
        try:
            self._train(model, teacher, gates, wm, budget_kind, target, cfg, ctx, info)
            q, pbar, agree = self._frequencies(model, gates, cfg, ctx)
        finally:
            gates.detach_hooks()
        info["consensus_agreement"] = round(agree, 4)
        hist = torch.cat([v for v in q.values()])
        info["open_frequency_histogram"] = _histogram(hist)
        scores = {m: v for g, v in q.items() for m in wm.groups[g].members}
        info["_wm"], info["_pbar"] = wm, pbar  # for plan(); popped there (the history keeps plain data only)
        log(f"polarization: per-sample agreement with the consensus mask {agree:.4f}; open frequencies "
            f"{info['open_frequency_histogram']}")
        return scores

    def _budget(self, model, example, wm, cfg, ctx, info) -> tuple[str, float]:
        if cfg.ratio is not None:
            info["budget"] = {"kind": "channels", "keep": 1 - cfg.ratio}
            return "channels", 1 - cfg.ratio
        if cfg.flops_target is not None:
            info["budget"] = {"kind": "flops", "keep": cfg.flops_target}
            return "flops", cfg.flops_target
        # latency: train towards the FLOPs fraction of an allocation that meets the target (then topped up)
        keep = latency_flops_budget(model, ctx.spec, example, cfg)
        info["budget"] = {"kind": "flops (from latency target)", "keep": round(keep, 4)}
        return "flops", keep

    def _train(self, model, teacher, gates: GateSet, wm, kind: str, target: float, cfg: PolarizationConfig,
               ctx: Context, info: dict) -> None:
        ds = ctx.dataset("train", required=True)
        if ds.labels is None and teacher is None:
            raise UserError("polarization trains with a task loss: give labeled --data, or keep --distill")
        from compress.metrics import check_labels

        check_labels(ds, model, ctx.spec.example(batch=1))
        norm = ctx.normalizer()
        per_epoch = math.ceil(len(ds) / cfg.batch_size)
        total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=cfg.train_lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
        # a weight row sums C_in inputs of size ~1: lr / C_in keeps its effect on z per step like the bias's
        groups = [{"params": [gates.bias[k]], "lr": cfg.gate_lr} for k in gates.bias] + \
                 [{"params": [gates.weight[k]], "lr": cfg.gate_lr / gates.weight[k].shape[1]} for k in gates.weight]
        gopt = (torch.optim.Adam(groups, lr=cfg.gate_lr) if cfg.gate_optimizer == "adam"
                else torch.optim.SGD(groups, lr=cfg.gate_lr, momentum=0.9))
        step, trace_log = 0, []
        ramp_steps = max(1, int(cfg.ramp * total))
        for epoch in range(cfg.epochs):
            model.train()
            data = batches(ds, norm, cfg.batch_size, shuffle=True, seed=ctx.seed + 1000 + epoch, augment=True)
            for x, y in track(data, f"polarization {epoch + 1}/{cfg.epochs}", total=min(per_epoch, total - step)):
                out = model(x)
                task = _task_loss(out, x, y, teacher)
                widths, polar, agree = gates.cost_terms()
                goal = 1 - (1 - target) * min(1.0, (step + 1) / ramp_steps)
                if kind == "flops":
                    cost = soft_flops_fraction(wm, widths)
                else:
                    cost = sum(widths.values()) / sum(wm.full[g] for g in widths)
                loss = task + cfg.lambda_budget * (cost - goal) ** 2 + cfg.lambda_polar * polar + cfg.lambda_agree * agree
                opt.zero_grad(set_to_none=True)
                gopt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                gopt.step()
                sched.step()
                step += 1
                if step % max(1, total // 10) == 0 or step == total:
                    trace_log.append({"step": step, "task": round(float(task.detach()), 4), "cost": round(float(cost.detach()), 4),
                                      "goal": round(goal, 4), "polar": round(float(polar.detach()), 4)})
                if step >= total:
                    break
            if step >= total:
                break
        model.eval()
        info["training"] = {"steps": step, "trace": trace_log}
        log(f"polarization: {step} training steps, final cost {trace_log[-1]['cost'] if trace_log else '?'} "
            f"(budget {target:.3f} of {'FLOPs' if kind == 'flops' else 'channels'})")

    @torch.no_grad()
    def _frequencies(self, model, gates: GateSet, cfg, ctx):
        model.eval()
        hs: dict[str, list[torch.Tensor]] = {g: [] for g in gates.groups}
        ps: dict[str, list[torch.Tensor]] = {g: [] for g in gates.groups}
        for x in calibration_batches(ctx, cfg.calib_images, 256, who="polarization"):
            model(x)
            for g, (p, h) in gates.cur.items():
                hs[g].append(h)
                ps[g].append(p)
        q = {g: torch.cat(v).mean(0) for g, v in hs.items() if v}
        pbar = {g: torch.cat(v).mean(0) for g, v in ps.items() if v}
        consensus = {g: (v > 0.5).float() for g, v in q.items()}
        agree_n = sum(float((torch.cat(hs[g]) == consensus[g]).float().sum()) for g in q)
        agree_d = sum(torch.cat(hs[g]).numel() for g in q)
        return q, pbar, agree_n / max(agree_d, 1)

    def plan(self, model, spec, example, scores, cfg: PolarizationConfig, ctx, info) -> dict[str, list[int]]:
        wm, pbar = info.pop("_wm"), info.pop("_pbar")
        q = {g: scores[wm.groups[g].members[0]] for g in pbar}
        keep: dict[str, list[int]] = {}
        for g, v in q.items():
            kept = [i for i in range(len(v)) if v[i] > 0.5]
            if not kept:  # a group must keep one channel: the most open one
                kept = [int(pbar[g].argmax())]
            if len(kept) < len(v):
                keep[g] = kept
        consensus_flops = wm.flops(wm.widths_of(keep)) / wm.flops(wm.full)
        info["consensus_flops_fraction"] = round(consensus_flops, 4)
        importance = {g: q[g].double() + 1e-3 * pbar[g].double() for g in q}
        if cfg.by_latency:
            # the latency allocator thins from the full widths, least-open channels first (a closed channel costs
            # almost nothing to remove), until the target is met: it takes the consensus' closed channels out first
            # and stops as soon as the target is met (closed channels it did not need to remove stay, as with
            # flops_target's refill), and every width it sets is on the latency grid. Starting from the consensus
            # instead kept free widths such as 7 or 43 in the groups it did not touch, which run like the next SIMD
            # block up (ResNet-20 at 1.6x: widths 6-43, measured 1.16x at -71% FLOPs; now 1.77x at -66%)
            keep2, how = _plan_latency(model, spec, example, importance_scores(wm, importance), cfg, False, "max",
                                       start=None)
            info.update(how)
            return keep2
        if cfg.flops_target is not None or cfg.ratio is not None:
            # the short training rarely lands on the budget: a ratio is held like a FLOPs target (it used to be
            # left to the consensus, which after a short pass could keep every channel: a silent 0% prune)
            if cfg.flops_target is not None:
                target, what = cfg.flops_target, "FLOPs"
                frac = lambda w: wm.flops(w) / wm.flops(wm.full)  # noqa: E731
            else:
                target, what = 1 - cfg.ratio, "channels"
                total = sum(wm.full[g] for g in q)
                frac = lambda w: sum(w[g] for g in q) / total  # noqa: E731
            reached = frac(wm.widths_of(keep))
            info["consensus_fraction"] = {"of": what, "kept": round(reached, 4)}
            if reached > target + 1e-9:
                keep = greedy_keep(wm, importance, frac, target, start=keep)
                info["adjusted"] = "removed the least-open channels down to the target"
            elif reached < target - 0.01:
                keep = greedy_fill(wm, importance, frac, target, keep)
                info["adjusted"] = "re-opened the most-open closed channels up to the target"
            if "adjusted" in info:
                log(f"polarization: the consensus keeps {reached:.3f} of the {what}; {info['adjusted']} ({target:g})")
        if cfg.round_to:  # widths on the runtime's channel grid (free widths cost like the next block up)
            keep = snap_to_grid(wm, importance, keep, cfg, info)
        return keep


def importance_scores(wm: WidthModel, importance: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Group importance -> per-member scores (every member of a group gets the group's vector)."""
    return {m: v for g, v in importance.items() for m in wm.groups[g].members}


def _task_loss(out, x, y, teacher, alpha: float = 0.9, temperature: float = 4.0):
    if teacher is None:
        return F.cross_entropy(out, y)
    with torch.no_grad():
        soft = teacher(x)
    kd = kd_loss(out, soft, temperature)
    return kd if y is None else alpha * kd + (1 - alpha) * F.cross_entropy(out, y)


def _histogram(q: torch.Tensor) -> dict[str, int]:
    return {"never_open(<=1%)": int((q <= 0.01).sum()), "always_open(>=99%)": int((q >= 0.99).sum()),
            "input_dependent": int(((q > 0.01) & (q < 0.99)).sum()), "total": int(q.numel())}


def gated_and_extracted(model: nn.Module, example: torch.Tensor, biases: dict[str, torch.Tensor]):
    """Test helper: a copy gated with input-independent gates (given logits per group) and its extraction."""
    from compress.prune.engine import prune_to_keep

    gated = copy.deepcopy(model).eval()
    gates = GateSet(gated, example)
    with torch.no_grad():
        for g in gates.groups:
            gates.weight[gates._key(g)].zero_()
            if g in biases:
                gates.bias[gates._key(g)].copy_(biases[g])
    gates.attach(gated)
    keep = {g: [i for i, b in enumerate(biases[g]) if b > 0] for g in biases}
    static = prune_to_keep(copy.deepcopy(model).eval(), example, {g: v for g, v in keep.items() if v})
    return gated, gates, static


METHODS.add("polarization", Polarization())
