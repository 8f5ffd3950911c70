"""Activation calibration: observe every ActQuantizer's input over calibration batches, then set its grid.

Statistics are collected in float activations (every ActQuantizer passes its input through while it
observes) with the weights already on their grids, i.e. from the network the activations will come from.
Observers:
  minmax      the observed [min, max]
  percentile  [p_low, p_high] of all observed values (p_high = `percentile`, p_low = 100 - percentile),
              from a histogram over the min-max range (a second pass): clips rare outliers, which spends the
              256 levels on the bulk of the distribution instead
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn as nn

from compress.data import Dataset, Normalizer, batches
from compress.errors import UserError
from compress.progress import track
from compress.quantize.fakequant import ActQuantizer

OBSERVERS = ("minmax", "percentile")


class MinMaxObserver:
    def __init__(self) -> None:
        self.lo, self.hi = math.inf, -math.inf

    def update(self, x: torch.Tensor) -> None:
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise UserError("an activation quantizer saw no data during calibration (is it on the forward path?)")
        return self.lo, self.hi


class HistogramObserver:
    """Histogram over a known [lo, hi] (from a min-max pass); percentiles interpolate inside a bin."""

    def __init__(self, lo: float, hi: float, bins: int = 4096) -> None:
        self.lo, self.hi = lo, max(hi, lo + 1e-12)
        self.hist = torch.zeros(bins, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        self.hist += torch.histc(x.float(), len(self.hist), self.lo, self.hi).double()

    def quantile(self, q: float) -> float:
        cdf = torch.cumsum(self.hist, 0)
        target = q * float(cdf[-1])
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64)).clamp_max(len(cdf) - 1))
        below = float(cdf[i - 1]) if i else 0.0
        frac = (target - below) / max(float(self.hist[i]), 1e-12)
        width = (self.hi - self.lo) / len(self.hist)
        return self.lo + (i + min(max(frac, 0.0), 1.0)) * width

    def range(self, percentile: float) -> tuple[float, float]:
        return self.quantile(1.0 - percentile / 100.0), self.quantile(percentile / 100.0)


def _run(model: nn.Module, make_batches: Callable[[], Iterable[torch.Tensor]], steps: int, what: str) -> None:
    with torch.no_grad():
        for x in track(make_batches(), what, total=steps):
            model(x)


def calibrate(model: nn.Module, ds: Dataset, norm: Normalizer, observer: str = "minmax",
              percentile: float = 99.99, batch_size: int = 128) -> dict:
    """Set the grid of every ActQuantizer of `model` from `ds`; returns a summary for the history entry."""
    if observer not in OBSERVERS:
        raise UserError(f"observer {observer!r}: choose one of {', '.join(OBSERVERS)}")
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    if not quantizers:
        return {"images": 0, "quantizers": 0}
    if len(ds) == 0:
        raise UserError(f"calibration data {ds.source} is empty")
    steps = (len(ds) + batch_size - 1) // batch_size

    def make_batches() -> Iterable[torch.Tensor]:
        return (x for x, _ in batches(ds, norm, batch_size))

    was_training = model.training
    model.eval()
    try:
        minmax = {q: MinMaxObserver() for q in quantizers}
        for q, obs in minmax.items():
            q.observer = obs
        _run(model, make_batches, steps, "calibrate (min-max)")
        ranges = {q: obs.range() for q, obs in minmax.items()}
        if observer == "percentile":
            hists = {q: HistogramObserver(*ranges[q]) for q in quantizers}
            for q, obs in hists.items():
                q.observer = obs
            _run(model, make_batches, steps, f"calibrate (percentile {percentile:g})")
            ranges = {q: obs.range(percentile) for q, obs in hists.items()}
    finally:
        for q in quantizers:
            q.observer = None
        model.train(was_training)
    for q, (lo, hi) in ranges.items():
        q.set_range(torch.tensor(lo), torch.tensor(hi), q.symmetric)
    return {"images": len(ds), "source": ds.source, "fingerprint": ds.fingerprint(), "observer": observer,
            **({"percentile": percentile} if observer == "percentile" else {}), "quantizers": len(quantizers)}
