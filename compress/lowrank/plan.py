"""Which layers to factorize and at what rank: the per-layer plan, shown before anything is changed.

Rules (`rank_rule`):
  ratio   one global rank ratio r = round(ratio · min(N, M)) for every layer (the FWSVD paper: "33% of ranks")
  energy  per layer, the smallest r whose (Fisher-weighted, for FWSVD) singular values keep `energy` of Σσ²
  params  a whole-model budget: keep `budget` × the model's parameters, ranks allocated across layers
  flops   the same for FLOPs (batch 1)
  latency the same for the predicted ORT time of the convs (latency_aware; measured per layer shape)

latency_aware (compress.lowrank.latency): every candidate conv is priced by measured ONNX Runtime time of
its dense form and of each split at each rank (the pruning code's cached per-layer-shape table); a rank is an
option only where it is predicted at most LATENCY_GAIN × the dense time. With a budget rule a conv then
chooses between dense, the channel split (k×k ▸ 1×1) and the spatial split (k×1 ▸ 1×k), so a FLOPs budget
is spent only on factorizations that also run faster.

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
from typing import TYPE_CHECKING

from compress.lowrank.factorize import (Decomposition, decompose, dense_cost, factorized_cost, layer_matrix,
                                        matrix_dims, row_importance, split_for)

if TYPE_CHECKING:
    from compress.lowrank.latency import LatencyCosts


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
    ms: tuple[float, float] | None = None  # predicted ORT time of the conv, dense / as planned (latency-aware)

    @property
    def factorized(self) -> bool:
        return self.rank is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"], d["flops"] = list(self.params), list(self.flops)
        d["ms"] = [round(v, 5) for v in self.ms] if self.ms is not None else None
        return d


@dataclass
class Plan:
    rule: str
    layers: list[LayerPlan]
    params: tuple[int, int]    # whole model, before / after
    flops: tuple[int, int]
    decompositions: dict[str, Decomposition] = field(default_factory=dict, repr=False)
    ms: tuple[float, float] | None = None  # predicted summed conv time, before / after (latency-aware)

    def factorized(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.factorized]

    def to_dict(self) -> dict:
        d = {"rule": self.rule, "params": list(self.params), "flops": list(self.flops),
             "layers": [p.to_dict() for p in self.layers]}
        if self.ms is not None:
            d["predicted_conv_ms"] = [round(v, 4) for v in self.ms]
        return d


FACTORIZABLE = (nn.Linear, nn.Conv2d)
BUDGET_RULES = ("params", "flops", "latency")


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


def _patterns(exclude: str, infos: list[LayerInfo]) -> list[str]:
    """The --exclude globs; one that matches no layer is a typo, not a no-op."""
    patterns = [p.strip() for p in exclude.split(",") if p.strip()]
    names = [i.name for i in infos if isinstance(i.module, FACTORIZABLE)]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise UserError(f"option exclude: {pat!r} matches no Linear or Conv2d layer (they are named like {shown})")
    return patterns


def candidates(infos: list[LayerInfo], skip_first_last: bool = True, exclude: str = "") -> list[LayerInfo]:
    """The layers a plan may factorize (before any rank rule): what needs a Fisher pass."""
    patterns = _patterns(exclude, infos)
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
              row_fisher: dict[tuple[str, str], torch.Tensor] | None = None,
              latency: "LatencyCosts | None" = None,
              model_params: int, model_flops: int) -> Plan:
    """The per-layer plan. `fisher` (name -> per-weight Fisher) makes it FWSVD; without it, plain SVD.

    row_fisher ((name, split) -> N×N full row Fisher) weights those layers with R^{1/2} instead of diag(√Î).
    latency (a LatencyCosts, its table filled for these layers): latency-aware. A conv is factorized only where
    a candidate is predicted at most LATENCY_GAIN × its dense time; the budget rules (params|flops|latency)
    then choose per conv between dense, the channel split and the spatial split at any rank; ratio and energy
    keep `conv_split` and leave dense the convs whose factorization is not predicted faster.
    """
    from compress.lowrank.latency import LATENCY_GAIN

    if rule == "latency" and latency is None:
        raise UserError("rank_rule latency needs the measured latency table (latency_aware)")
    patterns = _patterns(exclude, infos)
    if rule == "latency" and any(isinstance(i.module, nn.Linear) and not _skip_reason(i, skip_first_last, patterns)
                                 for i in infos):
        raise UserError("rank_rule latency prices convolutions only: leave the Linear layers out (--exclude)")
    if latency is not None:  # price every candidate conv's dense form and splits (measures what is not cached)
        for info in infos:
            m = info.module
            if _skip_reason(info, skip_first_last, patterns) or not isinstance(m, nn.Conv2d):
                continue
            need = _splits(m, rule, conv_split, True)
            if info.name not in latency.layers or not set(need) <= set(latency.layers[info.name].parts):
                latency.add(info.name, m, info.in_shape, info.out_shape, {s: min(matrix_dims(m, s)) for s in need})
        latency.measure()
    rows: list[LayerPlan] = []
    cands = []  # (row index, [Alt, ...], dense ms or None)
    decs: dict[tuple[str, str], Decomposition] = {}
    for info in infos:
        m = info.module
        p0, f0 = dense_cost(m, info.in_shape, info.out_shape) if isinstance(m, FACTORIZABLE) else (0, 0)
        reason = _skip_reason(info, skip_first_last, patterns)
        if reason:
            rows.append(LayerPlan(info.name, _layer_label(m), "", None, 0, None, (p0, p0), (f0, f0), None, reason))
            continue
        split = split_for(m, conv_split)
        splits = _splits(m, rule, conv_split, latency is not None)
        lc = latency.layers[info.name] if latency is not None and split != "linear" else None
        alts = []
        for sp in splits:
            n, mm = matrix_dims(m, sp)
            k = min(n, mm)
            imp = R = None
            if row_fisher is not None and (info.name, sp) in row_fisher:
                R = row_fisher[(info.name, sp)]
            elif fisher is not None:
                if info.name not in fisher:
                    raise UserError(f"no Fisher information for layer {info.name}")
                imp = row_importance(fisher[info.name], sp)
            dec = decompose(layer_matrix(m, sp), imp, R)
            decs[(info.name, sp)] = dec
            costs = np.array([factorized_cost(m, sp, r, info.in_shape, info.out_shape) for r in range(1, k + 1)])
            saves = (costs[:, 0] < p0) & (costs[:, 1] < f0)
            ms = None
            if lc is not None:
                ms = np.array([lc.factorized_ms(sp, r) for r in range(1, k + 1)])
                saves &= ms <= LATENCY_GAIN * lc.dense_ms()
            ok = np.nonzero(saves)[0] + 1  # the ranks that save (params, FLOPs and, latency-aware, time)
            scale = 1.0 / max(float((dec.S ** 2).sum()), 1e-30)
            alts.append(_Alt(sp, f"{n}x{mm}", k, dec, scale, ok, costs, ms))
        dense_ms = lc.dense_ms() if lc is not None else None
        a0 = alts[0]
        rows.append(LayerPlan(info.name, _layer_label(m), a0.matrix, a0.split, a0.k, None, (p0, p0), (f0, f0), None,
                              ms=(dense_ms, dense_ms) if dense_ms is not None else None))
        cands.append((len(rows) - 1, alts, dense_ms))

    def assign(row_i: int, alt: "_Alt", r: int | None, why: str = "") -> None:
        row = rows[row_i]
        if r is None:
            row.rank, row.energy = None, None
            row.reason = why
            return
        total = float((alt.dec.S ** 2).sum())
        row.split, row.matrix, row.full_rank, row.rank = alt.split, alt.matrix, alt.k, r
        row.params = (row.params[0], int(alt.costs[r - 1, 0]))
        row.flops = (row.flops[0], int(alt.costs[r - 1, 1]))
        if alt.ms is not None and row.ms is not None:
            row.ms = (row.ms[0], float(alt.ms[r - 1]))
        row.energy = float((alt.dec.S[:r] ** 2).sum()) / total if total > 0 else 1.0
        row.reason = ""

    def no_saving(alt: "_Alt", r: int, dense_ms: float | None) -> str:
        if alt.ms is not None and dense_ms is not None and alt.ms[r - 1] > LATENCY_GAIN * dense_ms:
            return (f"rank {r}: predicted {alt.ms[r - 1]:.3f} ms vs dense {dense_ms:.3f} ms "
                    f"(> {LATENCY_GAIN:g}×): no time saved")
        be = int(alt.ok.max()) if len(alt.ok) else 0
        return f"no rank below {alt.k} saves params and FLOPs" if be == 0 else f"rank {r} ≥ break-even {be + 1}: no saving"

    if rule in ("ratio", "energy"):
        for row_i, alts, dense_ms in cands:
            alt = alts[0]
            if rule == "ratio":
                r = max(1, int(round(ratio * alt.k)))
            else:
                e = torch.cumsum(alt.dec.S ** 2, 0)
                r = int(torch.searchsorted(e / e[-1].clamp_min(1e-300), torch.tensor(energy, dtype=e.dtype)).item()) + 1
                r = min(r, alt.k)
            good = r in set(alt.ok.tolist())
            why = "" if good else no_saving(alt, r, dense_ms)
            if not good and rule == "energy" and "break-even" in why:
                why = f"rank {r} for {energy:.0%} energy ≥ break-even: no saving"
            assign(row_i, alt, r if good else None, why)
    elif rule in BUDGET_RULES:
        col = {"params": 0, "flops": 1}.get(rule)
        dense_of = (lambda row, d: row.params[0]) if rule == "params" else \
            (lambda row, d: row.flops[0]) if rule == "flops" else (lambda row, d: d)
        total_before = model_params if rule == "params" else model_flops if rule == "flops" else None
        options = []  # per candidate: (choices [(alt, rank) or None for dense], cost, err)
        for row_i, alts, dense_ms in cands:
            choices, cost, err = [None], [float(dense_of(rows[row_i], dense_ms))], [0.0]
            for alt in alts:
                te = alt.dec.truncation_error().numpy() * alt.scale
                for r in alt.ok.tolist():
                    choices.append((alt, r))
                    cost.append(float(alt.ms[r - 1]) if col is None else float(alt.costs[r - 1, col]))
                    err.append(float(te[r]))
            options.append((choices, np.array(cost), np.array(err)))
        if rule == "latency":
            # the model's predicted time: every measured conv (dense where not a candidate) plus nothing for the
            # rest; the budget is a fraction of the candidates' summed dense time plus the fixed part
            total_before = sum(o[1][0] for o in options)
            fixed = 0.0
        else:
            fixed = total_before - sum(dense_of(rows[i], d) for i, _, d in cands)
        target = budget * total_before
        min_total = fixed + sum(c.min() for _, c, _ in options)
        if min_total > target:
            raise UserError(f"{rule} budget {budget:g} is out of reach: factorizing every eligible layer at its "
                            f"cheapest saving rank keeps {min_total / total_before:.3f} of the model's {rule}")

        def choose(lam: float) -> tuple[list[int], float]:
            picks, total = [], fixed
            for _, cost, e in options:
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
        for (row_i, alts, dense_ms), (choices, _, _), j in zip(cands, options, picks):
            if choices[j] is None:
                why = "kept dense by the budget allocation"
                if len(choices) == 1:
                    why = ("no split/rank is predicted faster than dense and saves params and FLOPs"
                           if dense_ms is not None else no_saving(alts[0], alts[0].k, None))
                assign(row_i, alts[0], None, why)
            else:
                assign(row_i, *choices[j])
    else:
        raise UserError(f"unknown rank rule {rule!r}")

    params_after = model_params - sum(r.params[0] - r.params[1] for r in rows)
    flops_after = model_flops - sum(r.flops[0] - r.flops[1] for r in rows)
    ms = None
    if latency is not None:
        timed = [r.ms for r in rows if r.ms is not None]
        ms = (sum(a for a, _ in timed), sum(b for _, b in timed))
    return Plan(rule, rows, (model_params, params_after), (model_flops, flops_after),
                {r.name: decs[(r.name, r.split)] for r in rows if r.factorized}, ms)


def _splits(m: nn.Module, rule: str, conv_split: str, latency_aware: bool) -> list[str]:
    """The factorizations a plan considers for a layer: latency-aware budget rules try both conv splits."""
    split = split_for(m, conv_split)
    if latency_aware and rule in BUDGET_RULES and split != "linear":
        return ["channel"] + (["spatial"] if split_for(m, "spatial") == "spatial" else [])
    return [split]


@dataclass
class _Alt:
    """One way to factorize a layer: a split, its (weighted) SVD, the ranks that save, and their costs."""

    split: str
    matrix: str
    k: int
    dec: Decomposition
    scale: float          # 1 / total (weighted) spectral energy: relative truncation error
    ok: np.ndarray        # ranks (1-based) that save params and FLOPs (and, latency-aware, time)
    costs: np.ndarray     # (k, 2): params, FLOPs at rank 1..k
    ms: np.ndarray | None  # (k,): predicted ms at rank 1..k (latency-aware)


def plan_table(plan: Plan, title: str = "low-rank plan"):
    """A rich table of the per-layer choice."""
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    timed = plan.ms is not None
    cols = [("layer", "left"), ("type", "left"), ("W (N×M)", "right"), ("split", "left"), ("rank", "right"),
            ("params", "right"), ("FLOPs", "right")] + ([("pred. ms", "right")] if timed else []) + \
        [("energy", "right"), ("note", "left")]
    for col, just in cols:
        t.add_column(col, justify=just)
    for p in plan.layers:
        style = None if p.factorized else "dim"
        ms = [_ms(p.ms)] if timed else []
        t.add_row(p.name, p.layer, p.matrix, p.split or "", f"{p.rank}/{p.full_rank}" if p.factorized else "dense",
                  _arrow(p.params), _arrow(p.flops), *ms, f"{p.energy:.3f}" if p.energy is not None else "", p.reason,
                  style=style)
    t.add_section()
    t.add_row("model", "", "", "", f"{len(plan.factorized())} factorized", _arrow(plan.params, True),
              _arrow(plan.flops, True), *([_ms(plan.ms, True) + " (convs)"] if timed else []), "", "")
    return t


def _ms(pair: tuple[float, float] | None, pct: bool = False) -> str:
    if pair is None:
        return ""
    a, b = pair
    if abs(a - b) < 1e-12 and not pct:
        return f"{a:.3f}"
    return f"{a:.3f}→{b:.3f}" + (f" ({b / a:.0%})" if pct and a else "")


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
