"""Pruning's fine-tuning recipe options (distill_alpha, distill_temperature) and channel-grid alignment
(round_to) of the gate methods' free allocations."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import compress.prune.targets as targets
from compress.errors import UserError
from compress.io import LoadedModel
from compress.prune import METHODS
from compress.prune.baselines import l1_scores
from compress.prune.targets import WidthModel, aligned_keep, group_importance
from compress.stages import Context, build_config
from tests.compress.test_prune_methods import _small_vgg, _spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_distill_options_validate_and_reach_finetune(monkeypatch):
    seen = []

    def fake_finetune(model, ctx, epochs, lr, batch_size, **kw):
        seen.append({"epochs": epochs, "lr": lr, "batch_size": batch_size, **kw})
        return model.eval()

    monkeypatch.setattr(targets, "finetune", fake_finetune)
    method = METHODS.get("l1")
    cfg = build_config(method, {"flops_target": 0.6, "finetune_epochs": 2, "distill_alpha": 0.3,
                                "distill_temperature": 2.0, "bn_recalibration": 0})
    lm = LoadedModel(_small_vgg(), _spec(), "compress", "t", "x:y")
    out = method.apply(lm, cfg, Context(spec=_spec(), data={"train": "random:32"}))
    assert seen and seen[0]["alpha"] == 0.3 and seen[0]["temperature"] == 2.0 and seen[0]["epochs"] == 2
    assert out.history[-1]["config"]["distill_alpha"] == 0.3
    defaults = build_config(method, {"flops_target": 0.6})
    assert 0 <= defaults.distill_alpha <= 1 and defaults.distill_temperature > 0
    for bad in ({"distill_alpha": 1.5}, {"distill_alpha": -0.1}, {"distill_temperature": 0}):
        with pytest.raises(UserError, match="distill_"):
            build_config(method, {"flops_target": 0.6, **bad})


def test_aligned_keep_snaps_to_the_grid_and_meets_the_budget(resnet20):
    model, x = copy.deepcopy(resnet20.model).eval(), resnet20.spec.example(1)
    wm = WidthModel(model, x)
    imp = group_importance(wm, l1_scores(model), "share", "sum")
    # a free allocation with odd widths (what the gate methods' extraction gives)
    free = {g: sorted(torch.argsort(imp[g], descending=True)[:full * 6 // 10 + 1].tolist())
            for g, full in wm.full.items()}
    assert any(len(v) % 8 for v in free.values())
    base = wm.flops(wm.full)
    frac = lambda w: wm.flops(w) / base  # noqa: E731
    snapped = aligned_keep(wm, imp, free, 8)
    assert all(len(v) % 8 == 0 for v in snapped.values())
    for g, kept in snapped.items():  # each group keeps its most important channels
        top = set(torch.argsort(imp[g], descending=True)[:len(kept)].tolist())
        assert set(kept) == top
    target = frac(wm.widths_of(free))
    fit = aligned_keep(wm, imp, free, 8, frac, target)
    assert all(len(v) % 8 == 0 for v in fit.values()) and frac(wm.widths_of(fit)) <= target + 1e-9
    assert aligned_keep(wm, imp, free, 1) == free


@pytest.mark.parametrize("method", ["polarization", "ftwt"])
def test_gate_methods_respect_round_to(method):
    m = METHODS.get(method)
    ctx = Context(spec=_spec(), data={"train": "random:64"})
    lm = LoadedModel(_small_vgg(), _spec(), "compress", "t", "x:y")
    cfg = build_config(m, {"flops_target": 0.6, "max_steps": 2, "batch_size": 32, "calib_images": 64,
                           "round_to": 4})
    out = m.apply(lm, cfg, ctx)
    h = out.history[-1]
    assert h["aligned_to"] == 4 and h["flops_after"] <= 0.6 * h["flops_before"] + 1
    assert all(c.out_channels % 4 == 0 for c in out.model.modules() if isinstance(c, nn.Conv2d))


def test_polarization_latency_plan_thins_from_full_widths_least_open_first(monkeypatch):
    """With a latency / speed-up budget, polarization hands the latency allocator its open frequencies and the full
    widths, not the consensus as a starting point: starting from the consensus kept its free widths (5 of 8, 9 of
    12 ...) in every group the allocator did not touch, and could not give back what the gates over-pruned.
    Closed channels (q < 0.5) must rank below every open one, so the allocator removes them first."""
    import compress.prune.polarization as pol

    model = _small_vgg()
    example = _spec().example(1)
    wm = WidthModel(model, example)
    q = {}  # free-width consensus sets: k channels of each group open, k not a multiple of the grid
    for g, full in wm.full.items():
        k = full - 3 if full > 8 else 5
        q[g] = torch.tensor([0.9 - 0.01 * i if i < k else 0.1 + 0.01 * i for i in range(full)])
    seen = {}

    def fake_plan(model, spec, example, scores, cfg, normalize, combine, start):
        seen.update(start=start, scores=scores)
        return {}, {"rounds": []}

    monkeypatch.setattr(pol, "_plan_latency", fake_plan)
    cfg = build_config(METHODS.get("polarization"), {"latency_target": 1.0, "round_to": 4})
    info = {"_wm": wm, "_pbar": {g: v.clone() for g, v in q.items()}}
    scores = {m: q[g] for g in q for m in wm.groups[g].members}
    METHODS.get("polarization").plan(model, _spec(), example, scores, cfg, None, info)
    assert not seen["start"]
    assert info["consensus_flops_fraction"] < 1
    for g, v in q.items():
        s = seen["scores"][wm.groups[g].members[0]]
        assert float(s[v < 0.5].max()) < float(s[v > 0.5].min())  # every closed channel below every open one
        assert torch.equal(torch.argsort(s), torch.argsort(v))  # the gates' own order, nothing re-ranked


def test_polarization_holds_a_channel_ratio():
    """--ratio is a budget like --flops-target: a consensus that kept every channel (a short pass whose gates all
    stayed open) used to be returned as it was, a silent 0% prune; now the least-open channels go."""
    model = _small_vgg()
    example = _spec().example(1)
    wm = WidthModel(model, example)
    q = {g: torch.linspace(0.99, 0.6, full) for g, full in wm.full.items()}  # every channel open
    cfg = build_config(METHODS.get("polarization"), {"ratio": 0.5})
    info = {"_wm": wm, "_pbar": {g: v.clone() for g, v in q.items()}}
    scores = {m: q[g] for g in q for m in wm.groups[g].members}
    keep = METHODS.get("polarization").plan(model, _spec(), example, scores, cfg, None, info)
    kept = sum(len(keep.get(g, range(full))) for g, full in wm.full.items())
    assert kept <= 0.5 * sum(wm.full.values()) + 1e-9 and "adjusted" in info, info
    for g, idx in keep.items():  # the least-open channels are the ones removed
        assert idx == list(range(len(idx)))
