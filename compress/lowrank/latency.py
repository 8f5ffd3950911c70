"""Measured ONNX Runtime cost of a conv layer's low-rank candidates (latency-aware rank allocation).

At batch 1 a small CNN in ONNX Runtime is bound by per-layer overhead and memory traffic, not MACs: the channel
split (k×k conv to r channels, then 1×1) adds a second op and an r-channel intermediate map, and on large
feature maps with few channels it runs slower than the dense conv it replaces even at a third of its FLOPs.
So the latency-aware plan prices every candidate by measurement: for each conv, the dense layer, the channel
split (k×k C_in→r ▸ 1×1 r→C_out) and the spatial split (k×1 C_in→r ▸ 1×k r→C_out), each half exported alone
and timed by the per-layer-shape ORT cost table of the pruning code (compress.prune.targets.LatencyTable:
Conv+ReLU at a grid of widths, multiples of 8, cached as JSON under $COMPRESS_CACHE or ~/.cache/compress keyed
by runtime, version, threads and CPU; a rank between two measured widths costs the next one up, as SIMD
padding makes it). A candidate's predicted time is the sum of its two halves. The plan then only factorizes a
layer where a candidate is predicted at most LATENCY_GAIN × the dense layer's time.
"""
from __future__ import annotations

import torch.nn as nn

from compress.errors import UserError

# a factorization must be predicted at least this much faster than the dense layer to be an option (the
# per-layer table misses some whole-graph effects, e.g. the extra intermediate map's memory traffic)
LATENCY_GAIN = 0.9


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # type: ignore[return-value]


class LayerCosts:
    """Predicted ms of one conv: dense, and each split at each rank (from the shared cached latency table)."""

    def __init__(self, table, name: str, conv: nn.Conv2d, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 full_ranks: dict[str, int]):
        from compress.prune.targets import Layer

        if isinstance(conv.padding, str):
            raise UserError(f"latency-aware low-rank: {name} uses padding={conv.padding!r}; only explicit "
                            "padding is measured (export the model with numeric padding, or --exclude it)")
        self.table = table
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(conv.kernel_size), _pair(conv.stride), _pair(conv.padding),
                                                  _pair(conv.dilation))
        ci, co = conv.in_channels, conv.out_channels
        hin, win = in_shape[2], in_shape[3]
        ho, wo = out_shape[2], out_shape[3]
        # prune's Layer: in_group/out_group name the dimension the table varies over (here the rank)
        self.dense = Layer(name, False, ci, co, None, None, (kh, kw), (sh, sw), (ph, pw), (dh, dw), False, 1,
                           (hin, win), (ho, wo))
        self.parts: dict[str, tuple] = {}
        if "channel" in full_ranks:
            k = full_ranks["channel"]
            self.parts["channel"] = (
                Layer(name + ":a", False, ci, k, None, "rank", (kh, kw), (sh, sw), (ph, pw), (dh, dw), False, 1,
                      (hin, win), (ho, wo)),
                Layer(name + ":b", False, k, co, "rank", None, (1, 1), (1, 1), (0, 0), (1, 1), False, 1,
                      (ho, wo), (ho, wo)))
        if "spatial" in full_ranks:
            k = full_ranks["spatial"]
            self.parts["spatial"] = (
                Layer(name + ":a", False, ci, k, None, "rank", (kh, 1), (sh, 1), (ph, 0), (dh, 1), False, 1,
                      (hin, win), (ho, win)),
                Layer(name + ":b", False, k, co, "rank", None, (1, kw), (1, sw), (0, pw), (1, dw), False, 1,
                      (ho, win), (ho, wo)))

    def layers(self) -> list:
        return [self.dense, *(lay for pair in self.parts.values() for lay in pair)]

    def dense_ms(self) -> float:
        return self.table.layer_ms(self.dense, self.dense.c_in, self.dense.c_out)

    def factorized_ms(self, split: str, rank: int) -> float:
        first, second = self.parts[split]
        return self.table.layer_ms(first, first.c_in, rank) + self.table.layer_ms(second, rank, second.c_out)


class LatencyCosts:
    """Per-layer candidate costs for a plan; measures what the cache lacks (once per CPU/runtime/threads)."""

    def __init__(self, threads: int = 1, table=None):
        from compress.prune.targets import LatencyTable

        self.table = table if table is not None else LatencyTable(threads)
        self.layers: dict[str, LayerCosts] = {}

    def add(self, name: str, conv: nn.Conv2d, in_shape, out_shape, full_ranks: dict[str, int]) -> LayerCosts:
        self.layers[name] = LayerCosts(self.table, name, conv, in_shape, out_shape, full_ranks)
        return self.layers[name]

    def measure(self) -> int:
        """Fill the table for every registered candidate shape; returns how many new measurements were taken."""
        before = self.table.measured
        self.table.ensure([lay for lc in self.layers.values() for lay in lc.layers()])
        return self.table.measured - before

    @property
    def path(self):
        return self.table.path


__all__ = ["LATENCY_GAIN", "LatencyCosts", "LayerCosts"]
