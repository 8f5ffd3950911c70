"""Which layers to factorize and at what rank: the per-layer plan, shown before anything is changed.

Rules (`rank_rule`):
  ratio   one global rank ratio r = round(ratio · min(N, M)) for every layer (the FWSVD paper: "33% of ranks")
  energy  per layer, the smallest r whose (Fisher-weighted, for FWSVD) singular values keep `energy` of Σσ²
  params  a whole-model budget: keep `budget` × the model's parameters, ranks allocated across layers
  flops   the same for FLOPs (batch 1)

Budget allocation is a Lagrangian relaxation: each layer picks the option (dense, or rank r) minimizing
err_l(r) + λ·cost_l(r), and λ is bisected to the smallest value that meets the budget. err_l(r) is the
truncated spectral energy Σ_{i>r} σ_i² relative to the layer's total Σσ² (of the Fisher-weighted matrix
for FWSVD). Relative, because weights behind BatchNorm have arbitrary scales; and not the absolute Fisher
estimate ½ Σ_ij F_ij ΔW_ij² of the loss increase, which is a second-order estimate that badly
underestimates large truncations: on ResNet-20 it sent whole layers to rank 1 and cost 30 points of
accuracy at the same FLOPs (benchmarks/lowrank.py, notes).

A layer is factorized only where the two-layer form has fewer parameters *and* fewer FLOPs than the dense
one; grouped/depthwise convolutions and layers the user excluded are left dense, each with its reason.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn

from compress.errors import UserError
from compress.lowrank.factorize import (Decomposition, decompose, dense_cost, factorized_cost, layer_matrix,
                                        matrix_dims, row_importance, split_for)


@dataclass
class LayerInfo:
    """One Linear/Conv layer as seen in a probe forward pass (batch 1)."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    reads_input: bool    # its input is the model's input tensor (a stem)
    writes_output: bool  # its output is the model's output tensor (a classifier head)


@dataclass
class LayerPlan:
    name: str
    layer: str                 # "linear" | "conv3x3" ...
    matrix: str                # N×M of the paper's W
    split: str | None
    full_rank: int
    rank: int | None           # None: left dense
    params: tuple[int, int]    # before, after
    flops: tuple[int, int]
    energy: float | None       # fraction of (weighted) spectral energy kept
    reason: str = ""

    @property
    def factorized(self) -> bool:
        return self.rank is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"], d["flops"] = list(self.params), list(self.flops)
        return d


@dataclass
class Plan:
    rule: str
    layers: list[LayerPlan]
    params: tuple[int, int]    # whole model, before / after
    flops: tuple[int, int]
    decompositions: dict[str, Decomposition] = field(default_factory=dict, repr=False)

    def factorized(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.factorized]

    def to_dict(self) -> dict:
        return {"rule": self.rule, "params": list(self.params), "flops": list(self.flops),
                "layers": [p.to_dict() for p in self.layers]}


FACTORIZABLE = (nn.Linear, nn.Conv2d)


def probe(model: nn.Module, example) -> list[LayerInfo]:
    """Run one forward pass and record every Linear/Conv layer's input/output shapes, in execution order."""
    seen: dict[str, LayerInfo] = {}
    x = example

    def hook(name):
        def fn(module, inputs, output):
            if name not in seen:
                seen[name] = LayerInfo(name, module, tuple(inputs[0].shape), tuple(output.shape),
                                       any(inputs[0] is t for t in _tensors(x)), False)
            seen[name].out_tensor = output  # type: ignore[attr-defined]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*x) if isinstance(x, (tuple, list)) else model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    outs = _tensors(out)
    infos = list(seen.values())
    for info in infos:
        info.writes_output = any(info.out_tensor is t for t in outs)  # type: ignore[attr-defined]
        del info.out_tensor  # type: ignore[attr-defined]
    return infos


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _skip_reason(info: LayerInfo, skip_first_last: bool, exclude: list[str]) -> str:
    m = info.module
    if not info.name:
        return "the model is a single layer: nothing to replace it in"
    if not isinstance(m, FACTORIZABLE):
        return f"{type(m).__name__}: only Linear and Conv2d are factorized"
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        if m.groups == m.in_channels:
            return "depthwise conv: already one filter per channel, a factorization cannot save"
        return f"grouped conv (groups={m.groups}): not factorized"
    for pat in exclude:
        if fnmatch.fnmatchcase(info.name, pat):
            return f"excluded ({pat})"
    if skip_first_last and info.reads_input:
        return "reads the model input (skip_first_last)"
    if skip_first_last and info.writes_output:
        return "produces the model output (skip_first_last)"
    return ""


def candidates(infos: list[LayerInfo], skip_first_last: bool = True, exclude: str = "") -> list[LayerInfo]:
    """The layers a plan may factorize (before any rank rule): what needs a Fisher pass."""
    patterns = [p.strip() for p in exclude.split(",") if p.strip()]
    return [i for i in infos if not _skip_reason(i, skip_first_last, patterns)]


def _layer_label(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.conv._ConvNd):
        k = "x".join(map(str, m.kernel_size))
        kind = "dwconv" if getattr(m, "groups", 1) > 1 and m.groups == m.in_channels else "conv"
        return f"{kind}{k}"
    return type(m).__name__


def make_plan(infos: list[LayerInfo], rule: str, *, ratio: float = 0.33, energy: float = 0.9,
              budget: float = 0.5, conv_split: str = "channel", skip_first_last: bool = True,
              exclude: str = "", fisher: dict[str, torch.Tensor] | None = None,
              model_params: int, model_flops: int) -> Plan:
    """The per-layer plan. `fisher` (name -> per-weight Fisher) makes it FWSVD; without it, plain SVD."""
    patterns = [p.strip() for p in exclude.split(",") if p.strip()]
    rows: list[LayerPlan] = []
    cands = []  # (row index, info, split, decomposition, error scale, saving ranks, costs per rank)
    decs: dict[str, Decomposition] = {}
    for info in infos:
        m = info.module
        p0, f0 = dense_cost(m, info.in_shape, info.out_shape) if isinstance(m, FACTORIZABLE) else (0, 0)
        reason = _skip_reason(info, skip_first_last, patterns)
        if reason:
            rows.append(LayerPlan(info.name, _layer_label(m), "", None, 0, None, (p0, p0), (f0, f0), None, reason))
            continue
        split = split_for(m, conv_split)
        n, mm = matrix_dims(m, split)
        k = min(n, mm)
        imp = None
        if fisher is not None:
            if info.name not in fisher:
                raise UserError(f"no Fisher information for layer {info.name}")
            imp = row_importance(fisher[info.name], split)
        dec = decompose(layer_matrix(m, split), imp)
        decs[info.name] = dec
        costs = np.array([factorized_cost(m, split, r, info.in_shape, info.out_shape) for r in range(1, k + 1)])
        saves = (costs[:, 0] < p0) & (costs[:, 1] < f0)
        break_even = int(np.nonzero(saves)[0].max() + 1) if saves.any() else 0
        scale = 1.0 / max(float((dec.S ** 2).sum()), 1e-30)
        rows.append(LayerPlan(info.name, _layer_label(m), f"{n}x{mm}", split, k, None, (p0, p0), (f0, f0), None))
        cands.append((len(rows) - 1, info, split, dec, scale, break_even, costs))

    def assign(row_i: int, info: LayerInfo, split: str, dec: Decomposition, r: int | None, break_even: int,
               costs: np.ndarray, why: str = "") -> None:
        row = rows[row_i]
        total = float((dec.S ** 2).sum())
        if r is None:
            row.rank, row.energy = None, None
            row.reason = why or (f"no rank below {row.full_rank} saves params and FLOPs" if break_even == 0
                                 else f"rank would be ≥ break-even {break_even + 1}")
            return
        row.rank = r
        row.params = (row.params[0], int(costs[r - 1, 0]))
        row.flops = (row.flops[0], int(costs[r - 1, 1]))
        row.energy = float((dec.S[:r] ** 2).sum()) / total if total > 0 else 1.0
        row.reason = ""

    if rule == "ratio":
        for row_i, info, split, dec, _, be, costs in cands:
            r = max(1, int(round(ratio * rows[row_i].full_rank)))
            assign(row_i, info, split, dec, r if r <= be else None, be, costs,
                   "" if r <= be else f"rank {r} ≥ break-even {be + 1}: no saving")
    elif rule == "energy":
        for row_i, info, split, dec, _, be, costs in cands:
            e = torch.cumsum(dec.S ** 2, 0)
            r = int(torch.searchsorted(e / e[-1].clamp_min(1e-300), torch.tensor(energy, dtype=e.dtype)).item()) + 1
            r = min(r, rows[row_i].full_rank)
            assign(row_i, info, split, dec, r if r <= be else None, be, costs,
                   "" if r <= be else f"rank {r} for {energy:.0%} energy ≥ break-even {be + 1}: no saving")
    elif rule in ("params", "flops"):
        col = 0 if rule == "params" else 1
        total_before = model_params if rule == "params" else model_flops
        target = budget * total_before
        fixed = total_before - sum(r.params[0] if col == 0 else r.flops[0] for r in rows if r.split is not None)
        options = []  # per candidate: (ranks array incl. 0 for dense, cost, err)
        for row_i, info, split, dec, scale, be, costs in cands:
            dense = rows[row_i].params[0] if col == 0 else rows[row_i].flops[0]
            err = dec.truncation_error().numpy() * scale  # err[r], r = 0..K
            ranks = np.arange(0, be + 1)  # 0 stands for "dense"
            cost = np.concatenate([[dense], costs[:be, col]]).astype(np.float64)
            e = np.concatenate([[0.0], err[1:be + 1]])
            options.append((ranks, cost, e))
        min_total = fixed + sum(c.min() for _, c, _ in options)
        if min_total > target:
            raise UserError(f"{rule} budget {budget:g} is out of reach: factorizing every eligible layer at rank 1 "
                            f"keeps {min_total / total_before:.3f} of the model's {rule}")

        def choose(lam: float) -> tuple[list[int], float]:
            picks, total = [], fixed
            for ranks, cost, e in options:
                j = int(np.argmin(e + lam * cost))
                picks.append(j)
                total += cost[j]
            return picks, total

        picks, total = choose(0.0)
        if total > target:
            lo, hi = -60.0, 40.0  # log10 λ
            while choose(10 ** hi)[1] > target:
                hi += 10
            for _ in range(80):
                mid = (lo + hi) / 2
                if choose(10 ** mid)[1] > target:
                    lo = mid
                else:
                    hi = mid
            picks, total = choose(10 ** hi)
        for (row_i, info, split, dec, _, be, costs), j in zip(cands, picks):
            # option j is rank j (0: dense)
            assign(row_i, info, split, dec, j if j > 0 else None, be, costs,
                   "" if j > 0 else "kept dense by the budget allocation")
    else:
        raise UserError(f"unknown rank rule {rule!r}")

    params_after = model_params - sum(r.params[0] - r.params[1] for r in rows)
    flops_after = model_flops - sum(r.flops[0] - r.flops[1] for r in rows)
    return Plan(rule, rows, (model_params, params_after), (model_flops, flops_after),
                {r.name: decs[r.name] for r in rows if r.factorized})


def plan_table(plan: Plan, title: str = "low-rank plan"):
    """A rich table of the per-layer choice."""
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for col, just in (("layer", "left"), ("type", "left"), ("W (N×M)", "right"), ("split", "left"),
                      ("rank", "right"), ("params", "right"), ("FLOPs", "right"), ("energy", "right"),
                      ("note", "left")):
        t.add_column(col, justify=just)
    for p in plan.layers:
        style = None if p.factorized else "dim"
        t.add_row(p.name, p.layer, p.matrix, p.split or "", f"{p.rank}/{p.full_rank}" if p.factorized else "dense",
                  _arrow(p.params), _arrow(p.flops), f"{p.energy:.3f}" if p.energy is not None else "", p.reason,
                  style=style)
    t.add_section()
    t.add_row("model", "", "", "", f"{len(plan.factorized())} factorized", _arrow(plan.params, True),
              _arrow(plan.flops, True), "", "")
    return t


def _arrow(pair: tuple[int, int], pct: bool = False) -> str:
    a, b = pair
    if a == b and not pct:
        return _si(a)
    s = f"{_si(a)}→{_si(b)}"
    return f"{s} ({b / a:.0%})" if pct and a else s


def _si(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return str(int(v))


__all__ = ["LayerInfo", "LayerPlan", "Plan", "candidates", "probe", "make_plan", "plan_table"]
