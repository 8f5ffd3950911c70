"""`minmax`: post-training quantization baseline (fold BN, round-to-nearest weights, calibrated activations).

Weights get min-max grids per output channel (symmetric by default: zero-point 0, what ORT/TensorRT
integer kernels take); activations get per-tensor grids from calibration data (min-max or a percentile).
W8A8 runs as INT8 kernels on ONNX Runtime; narrower grids are simulated (see exporters/qdq.py).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

from compress.errors import UserError
from compress.io import LoadedModel
from compress.quantize import METHODS
from compress.quantize.calibrate import OBSERVERS, calibrate
from compress.quantize.insert import QuantScheme, parse_bits, prepare, quantize_edit
from compress.stages import Context, Method, MethodConfig, option


@dataclass
class MinMaxConfig(MethodConfig):
    bits: str = option("w8a8", "weight and activation bits as wNaM: w8a8, w4a8, w4a4, w2a4 (below 8 bits is simulated)")
    observer: str = option("minmax", "activation range: observed min/max, or a percentile of the values", OBSERVERS)
    percentile: float = option(99.99, "upper percentile for observer=percentile (the lower one is 100 minus it)")
    calib_size: int = option(512, "calibration images drawn from the calib data")
    symmetric_weights: bool = option(True, "zero-point 0 weights in [-127, 127] (integer kernels need this)")
    per_channel: bool = option(True, "one weight scale per output channel (else one per layer)")
    first_last_bits: int = option(8, "bits for the first conv and the last linear (0: same as the rest)")

    def validate(self) -> None:
        parse_bits(self.bits)
        if not 50.0 < self.percentile <= 100.0:
            raise UserError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.calib_size < 1:
            raise UserError(f"calib_size must be at least 1, got {self.calib_size}")
        if self.first_last_bits != 0 and not 2 <= self.first_last_bits <= 8:
            raise UserError(f"first_last_bits must be 0 or 2..8, got {self.first_last_bits}")

    def scheme(self) -> QuantScheme:
        w, a = parse_bits(self.bits)
        return QuantScheme(w_bits=w, a_bits=a, per_channel=self.per_channel,
                           symmetric_weights=self.symmetric_weights, first_last_bits=self.first_last_bits)


class MinMax(Method):
    name = "minmax"
    needs_data = ("calib",)
    family = "quantize"
    Config = MinMaxConfig
    summary = "post-training quantization: BN folding, min-max weights, calibrated (min-max/percentile) activations"

    def apply(self, lm: LoadedModel, cfg: MinMaxConfig, ctx: Context) -> LoadedModel:
        lm.require_compressible("quantize")
        start = time.perf_counter()
        data = ctx.dataset("calib", required=True).subset(cfg.calib_size, ctx.seed)
        scheme = cfg.scheme()
        model = prepare(copy.deepcopy(lm.model), scheme)  # the caller's float model stays untouched
        stats = calibrate(model, data, ctx.normalizer(), cfg.observer, cfg.percentile, ctx.batch_size)
        entry = {"stage": "quantize", "method": self.name, "config": asdict(cfg), "scheme": scheme.to_dict(),
                 "calibration": stats, "seconds": round(time.perf_counter() - start, 3)}
        return LoadedModel(model.eval(), lm.spec, "compress", lm.source, lm.arch, dict(lm.arch_kwargs),
                           [*lm.edits, quantize_edit(scheme)], [*lm.history, entry], lm.sha256)


METHODS.add(MinMax.name, MinMax())
