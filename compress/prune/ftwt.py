"""Fire Together Wire Together (Elkerdawy et al., CVPR 2022): per-input channel masks from small predictors.

Predictor (per masked conv; research note 3.1, `utils/layers.py` of the reference code):

    e = softmax_channels(Pool(I))     Pool = global average (the code's default; `predictor_pool max` = the
                                      paper's GMP, Fig. 3)
    P = Conv1x1(C_in -> C_out, bias)(e)            mask logits
    M = 1[sigmoid(P) > 0.5]                        computed without gradient, applied in training and at test time
    output = M * act(norm(conv(I)))                (ResNet conv2: M * norm(conv2(I)) before the residual add)

Self-supervised target (note 3.2): on the unmasked output O, a_c = max_hw |O_c|, normalized to sum 1, sorted
descending; the top-k channels whose cumulative mass stays <= r (+1e-5) are 1; r = 1 keeps every channel with
mass > 1e-5. Mask loss: BCE-with-logits, mean over the batch, sum over channels, mean over layers.
Training (note 3.3), decoupled by default: predictors see a detached input, so the mask loss trains only them and
the backbone sees only the task loss (through the masked activations). Two SGD optimisers: backbone `train_lr`
(0.01, momentum 0.9, wd 5e-4; CHOICE: cosine decay over the short CPU run instead of the code's step schedule),
predictors `mlr` (0.1, momentum 0.9, no wd, no schedule). The mask loss is switched off after `cooldown` (0.5) of
the steps (the code counts epochs). The task loss is distillation from the unpruned model (+ cross-entropy with
labels) or cross-entropy with `--no-distill`. CHOICE (CPU budget): `head_init rate` (default) starts every
predictor as the best constant, bias = logit(the channel's target on-rate on 256 calibration images), weight 0:
with the mask loss averaged over layers a predictor's bias moves ~1/L as fast as alone, and the paper's 78k steps
are out of reach here, so predictors starting open (`head_init open`: bias +3, the effect of the code's optional
"--headinit") never switch a channel off within a few hundred steps; `head_init random` is the code's default. r: `mthresh`; if not given and a FLOPs (or latency) budget is, r is the
largest value of a grid whose ground-truth masks on calibration images cost at most that FLOPs fraction (the
paper's "FLOPs reduction estimation before training"); otherwise 1.0 (the code's default).

Dynamic FLOPs are counted per input (`dynamic_flops`): a masked conv costs active_out x H'W' x active_in x k^2
where active_in is the active count of the masked conv feeding it directly, and the full width when its input
is a residual sum (dense: the code's counter under-counts this, note 3.4); predictor MACs (pooling + 1x1 conv)
are counted too. All masks on gives exactly the dense conv FLOPs.

DEPLOYMENT. Per-input sparsity gives no speed-up on dense runtimes (ONNX Runtime, OpenVINO, TensorRT run the
full convolution and multiply by the mask; the predictors only add work). So what this method saves (and what
`compress export` then exports) is, by default, a STATIC model: per-channel firing frequencies q are measured on
calibration images and channels are removed physically (q < `freq_threshold`, or, with a ratio / FLOPs /
latency budget, the least-firing channels until the budget is met; a residual stream channel counts as firing as
often as its most active writer). The always-on / never-on / input-dependent histogram is logged and recorded.
With `masked_dense` the dynamic network itself (predictors + masks over the dense convs) is saved instead, for
parity checks against the exported graph; it reloads through the "ftwt" structure edit.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.data import batches
from compress.errors import UserError
from compress.io import LoadedModel
from compress.metrics import count_flops, count_params
from compress.progress import log, track
from compress.prune import METHODS
from compress.prune.graph import conv_sites
from compress.prune.polarization import _histogram, _task_loss, importance_scores
from compress.prune.targets import (TargetConfig, TargetedPruneMethod, WidthModel, _plan_latency,
                                    calibration_batches, greedy_keep, group_importance, latency_flops_budget,
                                    snap_to_grid)
from compress.stages import Context, option
from compress.structure import EDITS

R_GRID = (1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.9, 0.88, 0.85, 0.82, 0.8, 0.75, 0.7, 0.6, 0.5)
NO_SPEEDUP = ("ftwt: per-input (dynamic) channel sparsity gives no speed-up on dense runtimes such as ONNX Runtime "
              "or TensorRT (they compute every channel and multiply by the mask); ")
SAVED_FORM = {False: "the saved model is the static network derived from firing frequencies",
              True: "--masked-dense: the saved model is that dense network with its predictors and masks"}


@dataclass
class FTWTConfig(TargetConfig):
    mthresh: float | None = option(None, "r: heat-map mass kept by the target masks (0-1]; default: from the "
                                         "FLOPs/latency budget, else 1.0")
    epochs: int = option(1, "training epochs over --data with predictors (the paper: 200 on CIFAR)")
    max_steps: int | None = option(None, "stop the predictor training after this many steps")
    train_lr: float = option(0.01, "backbone learning rate while training with masks (SGD, cosine)")
    mlr: float = option(0.1, "mask predictor learning rate (SGD, momentum 0.9, no decay, no schedule)")
    cooldown: float = option(0.5, "fraction of the steps after which the mask loss is switched off")
    ftwt_mode: str = option("decoupled", "decoupled: mask loss trains only the predictors | joint", ("decoupled", "joint"))
    predictor_pool: str = option("avg", "predictor pooling: avg (the code) | max (the paper's GMP)", ("avg", "max"))
    head_init: str = option("rate", "predictor init: rate (bias = logit of each channel's target on-rate) | open "
                                    "(all masks on) | random (the code's default)", ("rate", "open", "random"))
    freq_threshold: float = option(0.5, "static model without a budget: remove channels firing on fewer inputs")
    calib_images: int = option(2000, "images the firing frequencies are measured on (--calib, else --data)")
    masked_dense: bool = option(False, "save the dynamic masked-dense network (predictors + masks) instead of the "
                                       "static one: for parity checks, no speed-up")

    requires_target: ClassVar[bool] = False
    takes_widths: ClassVar[bool] = False  # firing frequencies decide the widths

    def validate(self) -> None:
        super().validate()
        if self.mthresh is not None and not 0 < self.mthresh <= 1:
            raise UserError(f"mthresh (r) must be in (0, 1], got {self.mthresh}")
        if not 0 <= self.cooldown <= 1:
            raise UserError(f"cooldown is a fraction of the steps (0-1), got {self.cooldown}")
        if not 0 <= self.freq_threshold <= 1:
            raise UserError(f"freq_threshold is a frequency (0-1), got {self.freq_threshold}")


# ---- target masks --------------------------------------------------------------------------------------------

def mass_target(a: torch.Tensor, r: float) -> torch.Tensor:
    """Ground-truth masks from per-channel heat-map maxima a (N x C, >= 0): top-k by cumulative mass <= r."""
    a = a.double()
    mass = a / a.sum(1, keepdim=True).clamp_min(1e-30)
    delta = 1e-5
    if r >= 1:
        return (mass > delta).float()
    sorted_mass, idx = mass.sort(1, descending=True)
    keep_sorted = (sorted_mass.cumsum(1) - r <= delta).to(mass.dtype)
    return torch.zeros_like(mass).scatter(1, idx, keep_sorted).float()


# ---- modules -------------------------------------------------------------------------------------------------

class MaskPredictor(nn.Module):
    def __init__(self, c_in: int, c_out: int, pool: str = "avg"):
        super().__init__()
        self.pool = pool
        self.fc = nn.Conv2d(c_in, c_out, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = x.amax((2, 3), keepdim=True) if self.pool == "max" else x.mean((2, 3), keepdim=True)
        return self.fc(torch.softmax(e, dim=1)).flatten(1)


class FTWTConv(nn.Module):
    """conv -> norm, multiplied per output channel by the predicted binary mask (the norm's old place holds an
    Identity). `mode`: dynamic (predicted masks) | open (all on) | gt (ground-truth masks at `r`)."""

    def __init__(self, conv: nn.Module, norm: nn.Module | None, predictor: MaskPredictor, act: bool):
        super().__init__()
        self.conv, self.norm, self.predictor = conv, norm if norm is not None else nn.Identity(), predictor
        self.act = act
        self.mode, self.r, self.decoupled, self.record = "dynamic", 1.0, True, False
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.predictor(x.detach() if self.decoupled else x)
        out = self.norm(self.conv(x))
        gt = None
        if self.record or self.mode == "gt":
            with torch.no_grad():
                o = F.relu(out) if self.act else out
                gt = mass_target(o.abs().amax((2, 3)), self.r)
        if self.mode == "open":
            mask = torch.ones_like(logits)
        elif self.mode == "gt":
            mask = gt
        else:
            mask = (logits > 0).to(out.dtype).detach()  # sigmoid(P) > 0.5, no gradient (as in the code)
        if self.record:
            self.last = {"logits": logits, "gt": gt, "mask": mask.detach()}
        return out * mask.view(*mask.shape, 1, 1).to(out.dtype)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def attach(model: nn.Module, pool: str = "avg", head_init: str = "open", layers: list[dict] | None = None) -> list[dict]:
    """Wrap every conv (with its norm) in an FTWTConv, in place; returns the edit's layer list."""
    if layers is None:
        sites = conv_sites(model, "ftwt")
        layers = [{"name": s.conv, "norm": s.norm, "act": s.act, "source": s.source} for s in sites.values()]
    for entry in layers:
        conv = model.get_submodule(entry["name"])
        norm = model.get_submodule(entry["norm"]) if entry.get("norm") else None
        pred = MaskPredictor(conv.in_channels, conv.out_channels, entry.get("pool", pool))
        if head_init == "open":
            nn.init.zeros_(pred.fc.weight)
            nn.init.constant_(pred.fc.bias, 3.0)
        _set(model, entry["name"], FTWTConv(conv, norm, pred, bool(entry["act"])))
        if entry.get("norm"):
            _set(model, entry["norm"], nn.Identity())
        entry["pool"] = entry.get("pool", pool)
    return layers


def detach(model: nn.Module, layers: list[dict]) -> nn.Module:
    """Undo `attach`: put the convs and norms back (the predictors are dropped)."""
    for entry in layers:
        w: FTWTConv = model.get_submodule(entry["name"])
        _set(model, entry["name"], w.conv)
        if entry.get("norm"):
            _set(model, entry["norm"], w.norm)
    return model


def wrapped(model: nn.Module) -> dict[str, FTWTConv]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FTWTConv)}


def set_mode(model: nn.Module, mode: str | None = None, r: float | None = None, record: bool | None = None,
             decoupled: bool | None = None) -> None:
    for m in wrapped(model).values():
        if mode is not None:
            m.mode = mode
        if r is not None:
            m.r = r
        if record is not None:
            m.record = record
        if decoupled is not None:
            m.decoupled = decoupled


def replay_ftwt(model: nn.Module, edit: dict) -> nn.Module:
    """Structure edit "ftwt": rebuild the predictors of a saved masked-dense FTWT model (weights from the state dict)."""
    attach(model, layers=[dict(e) for e in edit["layers"]], head_init="random")
    for m in wrapped(model).values():
        m.r = float(edit.get("r", 1.0))
    return model


EDITS.add("ftwt", replay_ftwt)


# ---- dynamic FLOPs -------------------------------------------------------------------------------------------

class DynamicFlops:
    """Per-input FLOPs (2 x MACs, like compress.metrics.count_flops) of an FTWT-wrapped model."""

    def __init__(self, model: nn.Module, layers: list[dict], example: torch.Tensor):
        self.layers = {e["name"]: e for e in layers}
        shapes: dict[str, tuple] = {}
        mods = dict(model.named_modules())
        dense_names = [n for n, m in mods.items() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
                       and not any(n == e or n.startswith(e + ".") for e in self.layers)]
        hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, (tuple(i[0].shape), tuple(o.shape))))
                 for n in [*self.layers, *dense_names]]
        saved = {n: (w.mode, w.record) for n, w in wrapped(model).items()}
        set_mode(model, mode="open", record=False)
        try:
            with torch.no_grad():
                model.eval()(example[:1])
        finally:
            for h in hooks:
                h.remove()
            for n, (mode, rec) in saved.items():
                mods[n].mode, mods[n].record = mode, rec
        self.info = {}
        for n in self.layers:
            conv = mods[n].conv
            (_, c_in, ih, iw), (_, c_out, oh, ow) = shapes[n]
            dw = conv.groups > 1 and conv.groups == conv.in_channels
            self.info[n] = dict(c_in=c_in, c_out=c_out, hw=oh * ow, k=conv.kernel_size[0] * conv.kernel_size[1],
                                groups=conv.groups, dw=dw, pred=c_in * c_out + c_in * ih * iw)
        self.dense_other = 0
        for n in dense_names:
            m, (i, o) = mods[n], shapes.get(n, (None, None))
            if o is None:
                continue
            if isinstance(m, nn.Linear):
                self.dense_other += m.in_features * m.out_features * (math.prod(o[1:-1]) if len(o) > 2 else 1)
            else:
                self.dense_other += o[1] * math.prod(o[2:]) * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def per_input(self, masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(backbone FLOPs, predictor FLOPs) per input from the recorded masks (name -> N x C_out)."""
        backbone = None
        pred = 0
        for n, e in self.layers.items():
            inf = self.info[n]
            active_out = masks[n].sum(1).double()
            src = e.get("source")
            active_in = masks[src].sum(1).double() if src in masks else torch.full_like(active_out, inf["c_in"])
            per = inf["k"] if inf["dw"] else active_in / inf["groups"] * inf["k"]
            macs = active_out * inf["hw"] * per
            backbone = macs if backbone is None else backbone + macs
            pred += inf["pred"]
        backbone = backbone + self.dense_other
        return 2 * backbone, torch.full_like(backbone, 2.0 * pred)


def dynamic_flops(model: nn.Module, x: torch.Tensor, layers: list[dict], counter: DynamicFlops | None = None):
    """Run `model` on x and return (logits, backbone FLOPs per input, predictor FLOPs per input)."""
    counter = counter or DynamicFlops(model, layers, x)
    saved = {n: w.record for n, w in wrapped(model).items()}
    set_mode(model, record=True)
    try:
        with torch.no_grad():
            out = model(x)
        masks = {n: w.last["mask"] for n, w in wrapped(model).items()}
    finally:
        for n, w in wrapped(model).items():
            w.record = saved[n]
    b, p = counter.per_input(masks)
    return out, b, p


# ---- the method ----------------------------------------------------------------------------------------------

class FTWT(TargetedPruneMethod):
    name = "ftwt"
    needs_data = ("train",)
    summary = ("Fire Together Wire Together: per-input mask predictors trained on top-k heat-map targets; "
               "deployed as a static model from firing frequencies (Elkerdawy et al. 2022)")
    Config: ClassVar[type] = FTWTConfig
    uniform: ClassVar[bool] = False

    def score(self, model: nn.Module, cfg: FTWTConfig, ctx: Context, info: dict) -> dict[str, torch.Tensor]:
        log(NO_SPEEDUP + SAVED_FORM[bool(cfg.masked_dense)])
        example = ctx.spec.example(1, ctx.seed)
        dense_flops = count_flops(model, ctx.spec.shape)
        teacher = copy.deepcopy(model).eval() if cfg.distill else None
        layers = attach(model, cfg.predictor_pool, cfg.head_init)
        counter = DynamicFlops(model, layers, example)
        set_mode(model, decoupled=cfg.ftwt_mode == "decoupled")
        r = self._choose_r(model, layers, counter, dense_flops, cfg, ctx, info)
        set_mode(model, r=r)
        if cfg.head_init == "rate":
            self._init_from_rates(model, ctx)
        self._train(model, teacher, cfg, ctx, info)
        q = self._frequencies(model, layers, counter, dense_flops, cfg, ctx, info)
        info["_layers"] = layers
        info["r"] = r
        if cfg.masked_dense:
            return {}
        detach(model, layers)
        return q

    # r from the budget: the paper's estimate with ground-truth masks before training
    def _choose_r(self, model, layers, counter, dense_flops, cfg: FTWTConfig, ctx, info) -> float:
        if cfg.mthresh is not None:
            return cfg.mthresh
        goal = cfg.flops_target
        if goal is None and cfg.ratio is not None:
            goal = (1 - cfg.ratio) ** 2  # channels kept on both sides of a conv
        if goal is None and cfg.by_latency:
            goal = self._latency_flops(model, layers, cfg, ctx)
        if goal is None:
            return 1.0
        x = next(iter(calibration_batches(ctx, 256, 256, who="ftwt")))
        estimates = {}
        set_mode(model, mode="gt")
        try:
            for r in R_GRID:
                set_mode(model, r=r)
                _, b, _ = dynamic_flops(model, x, layers, counter)
                estimates[r] = float(b.mean()) / dense_flops
                if estimates[r] <= goal:
                    break
        finally:
            set_mode(model, mode="dynamic")
        r = next((r for r, f in estimates.items() if f <= goal), R_GRID[-1])
        info["r_estimates"] = {str(k): round(v, 4) for k, v in estimates.items()}
        log(f"ftwt: r = {r} (ground-truth masks before training keep {estimates[r]:.3f} of the FLOPs; budget {goal:.3f})")
        return r

    @torch.no_grad()
    def _init_from_rates(self, model, ctx) -> None:
        """Start every predictor as the best constant: bias = logit(target on-rate of its channel), weight 0."""
        x = next(iter(calibration_batches(ctx, 256, 256, seed_offset=7, who="ftwt")))
        set_mode(model, mode="gt", record=True)
        try:
            model.eval()(x)
            for w in wrapped(model).values():
                rate = w.last["gt"].mean(0).clamp(0.02, 0.98)
                w.predictor.fc.weight.zero_()
                w.predictor.fc.bias.copy_(torch.log(rate / (1 - rate)))
        finally:
            set_mode(model, mode="dynamic", record=False)

    def _latency_flops(self, model, layers, cfg, ctx) -> float:
        return latency_flops_budget(detach(copy.deepcopy(model), layers), ctx.spec, ctx.spec.example(1, ctx.seed), cfg)

    def _train(self, model, teacher, cfg: FTWTConfig, ctx: Context, info: dict) -> None:
        ds = ctx.dataset("train", required=True)
        if ds.labels is None and teacher is None:
            raise UserError("ftwt trains with a task loss: give labeled --data, or keep --distill")
        from compress.metrics import check_labels

        check_labels(ds, model, ctx.spec.example(batch=1))
        norm = ctx.normalizer()
        per_epoch = math.ceil(len(ds) / cfg.batch_size)
        total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
        preds = [p for m in wrapped(model).values() for p in m.predictor.parameters()]
        pred_ids = {id(p) for p in preds}
        backbone = [p for p in model.parameters() if id(p) not in pred_ids]
        opt = torch.optim.SGD([{"params": [p for p in backbone if p.ndim > 1], "weight_decay": 5e-4},
                               {"params": [p for p in backbone if p.ndim <= 1], "weight_decay": 0.0}],
                              lr=cfg.train_lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
        mopt = torch.optim.SGD(preds, lr=cfg.mlr, momentum=0.9, weight_decay=0.0)
        cool = int(cfg.cooldown * total)
        set_mode(model, record=True)
        step, trace_log = 0, []
        try:
            for epoch in range(cfg.epochs):
                model.train()
                data = batches(ds, norm, cfg.batch_size, shuffle=True, seed=ctx.seed + 2000 + epoch, augment=True)
                for x, y in track(data, f"ftwt {epoch + 1}/{cfg.epochs}", total=min(per_epoch, total - step)):
                    out = model(x)
                    task = _task_loss(out, x, y, teacher)
                    lmask = mask_loss(model)
                    w = 1.0 if step < cool else 0.0
                    loss = task + w * lmask
                    opt.zero_grad(set_to_none=True)
                    mopt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if w:
                        mopt.step()
                    sched.step()
                    step += 1
                    if step % max(1, total // 10) == 0 or step == total:
                        on = torch.cat([m.last["mask"].mean(0) for m in wrapped(model).values()]).mean()
                        trace_log.append({"step": step, "task": round(float(task.detach()), 4), "mask_loss": round(float(lmask.detach()), 4),
                                          "on_rate": round(float(on), 4)})
                    if step >= total:
                        break
                if step >= total:
                    break
        finally:
            set_mode(model, record=False)
        model.eval()
        info["training"] = {"steps": step, "mask_loss_off_after": cool, "trace": trace_log}

    @torch.no_grad()
    def _frequencies(self, model, layers, counter, dense_flops, cfg, ctx, info) -> dict[str, torch.Tensor]:
        model.eval()
        set_mode(model, record=True)
        masks: dict[str, list] = {n: [] for n in wrapped(model)}
        gts: dict[str, list] = {n: [] for n in wrapped(model)}
        flops, pflops, n_img = 0.0, 0.0, 0
        try:
            for x in calibration_batches(ctx, cfg.calib_images, 256, who="ftwt"):
                _, b, p = dynamic_flops(model, x, layers, counter)  # leaves each layer's masks and targets in .last
                for n, w in wrapped(model).items():
                    masks[n].append(w.last["mask"])
                    gts[n].append(w.last["gt"])
                flops, pflops, n_img = flops + float(b.sum()), pflops + float(p.sum()), n_img + len(x)
        finally:
            set_mode(model, record=False)
        q = {n: torch.cat(v).mean(0) for n, v in masks.items()}
        per_layer = {}
        for n in masks:
            m, g = torch.cat(masks[n]), torch.cat(gts[n])
            per_layer[n] = {"predicted_on": round(float(m.mean()), 4), "target_on": round(float(g.mean()), 4),
                            "mask_accuracy": round(float((m == g).float().mean()), 4),
                            "input_dependent": int(((q[n] > 0.01) & (q[n] < 0.99)).sum())}
        hist = _histogram(torch.cat(list(q.values())))
        dyn = flops / max(n_img, 1) / dense_flops
        info["dynamic"] = {"flops_fraction_backbone": round(dyn, 4),
                           "flops_fraction_with_predictors": round((flops + pflops) / max(n_img, 1) / dense_flops, 4),
                           "images": n_img, "per_layer": per_layer}
        info["firing_histogram"] = hist
        acc = sum(v["mask_accuracy"] for v in per_layer.values()) / len(per_layer)
        log(f"ftwt: dynamic FLOPs {dyn:.3f} of dense per input (+{pflops / max(n_img, 1) / dense_flops:.4f} for the "
            f"predictors), mask accuracy {acc:.3f}; channel firing: {hist['always_open(>=99%)']} always on, "
            f"{hist['never_open(<=1%)']} never on, {hist['input_dependent']} input-dependent of {hist['total']}")
        return q

    def plan(self, model, spec, example, scores, cfg: FTWTConfig, ctx, info) -> dict[str, list[int]]:
        layers = info.pop("_layers")
        wm = WidthModel(model, example)
        full = {m: torch.ones(wm.groups[g].channels) for g in wm.groups for m in wm.groups[g].members}
        q = {**full, **scores}
        freq = group_importance(wm, q, normalize=False, combine="max")  # a stream channel fires if any writer does
        budget = cfg.ratio is not None or cfg.flops_target is not None or cfg.by_latency
        if cfg.by_latency:
            keep, how = _plan_latency(model, spec, example, importance_scores(wm, freq), cfg, False, "max", None)
            info.update(how)
        elif budget:
            base = wm.flops(wm.full)
            goal = cfg.flops_target if cfg.flops_target is not None else None
            if goal is None:  # ratio: remove that fraction of the channels, least-firing first
                n_total = sum(wm.full.values())
                target_n = n_total * (1 - cfg.ratio)
                keep = greedy_keep(wm, freq, lambda w: sum(w.values()) / n_total, target_n / n_total)
            else:
                keep = greedy_keep(wm, freq, lambda w: wm.flops(w) / base, goal)
            info["allocation"] = "least-firing channels first, per unit of cost"
        else:
            keep = {}
            for g, f in freq.items():
                kept = [i for i in range(len(f)) if f[i] >= cfg.freq_threshold]
                if not kept:
                    kept = [int(f.argmax())]
                if len(kept) < len(f):
                    keep[g] = kept
            info["allocation"] = f"channels firing on at least {cfg.freq_threshold:g} of the inputs"
        if cfg.round_to and not cfg.by_latency:  # widths on the runtime's channel grid
            keep = snap_to_grid(wm, freq, keep, cfg, info)
        below = sum(int((freq[g][v] < cfg.freq_threshold).sum()) for g, v in keep.items())
        info["kept_below_threshold"] = below
        return keep

    def export_notes(self, entry: dict) -> list[str]:
        """The issue's deployment contract, repeated where the user exports: which form this is, and the firing
        histogram it was derived from (measured at prune time on the calibration images)."""
        hist = entry.get("firing_histogram")
        firing = (f"channel firing on {entry.get('dynamic', {}).get('images', '?')} calibration images: "
                  f"{hist['always_open(>=99%)']} always on, {hist['never_open(<=1%)']} never on, "
                  f"{hist['input_dependent']} input-dependent of {hist['total']}") if hist else None
        if entry.get("variant") == "masked-dense":
            return [f"ftwt masked-dense graph (predictors + masks over the dense convs), for parity checks: "
                    f"per-input sparsity gives no speed-up on dense runtimes, every channel is computed and then "
                    f"masked, so it is slower than the dense model; deploy the static model (compress prune -m ftwt "
                    f"without masked_dense)" + (f"; {firing}" if firing else "")]
        notes = ["ftwt static model: channels removed by their firing frequency "
                 f"({entry.get('allocation', 'firing frequencies')}); per-input sparsity gives no speed-up on "
                 f"dense runtimes, so this physically smaller network is what deploys"]
        return notes + ([firing] if firing else [])

    def result_model(self, model, lm: LoadedModel, cfg: FTWTConfig, ctx, info) -> LoadedModel | None:
        if not cfg.masked_dense:
            return None
        from dataclasses import asdict

        layers = info.pop("_layers")
        edit = {"kind": "ftwt", "layers": layers, "r": info.get("r", 1.0)}
        entry: dict[str, Any] = {"stage": "prune", "method": self.name, "config": asdict(cfg), "variant": "masked-dense",
                                 "params_after": count_params(model), **info,
                                 "note": "masked-dense: the dense convs run and are multiplied by the masks; no speed-up"}
        log("ftwt: saving the masked-dense network (predictors + masks) for parity checks; it is slower than the "
            "dense model on every dense runtime")
        return LoadedModel(model.eval(), lm.spec, "compress", lm.source, lm.arch, dict(lm.arch_kwargs),
                           [*lm.edits, edit], [*lm.history, entry])


def mask_loss(model: nn.Module) -> torch.Tensor:
    """BCE-with-logits against the recorded targets: mean over the batch, sum over channels, mean over layers."""
    terms = [F.binary_cross_entropy_with_logits(w.last["logits"], w.last["gt"], reduction="none").sum(1).mean(0)
             for w in wrapped(model).values() if w.last]
    return torch.stack(terms).mean() if terms else torch.zeros(())


METHODS.add("ftwt", FTWT())
