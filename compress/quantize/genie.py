"""`genie`: zero-shot post-training quantization (Jeon et al., CVPR 2023; SamsungLabs/Genie).

Genie-M, as specified in research/quant-lowrank-methods.md §1.2, on the shared fake-quant modules:

* weights: per output channel, asymmetric (the reference) or symmetric, with a learnable step s and a
  learnable soft bit V over a base integer B = floor(W / s0) frozen at initialization:
      W_hat = s * (clip(B + h(V) + z, qmin, qmax) - z)      while reconstructing (soft)
      W_hat = s * (clip(B + [V >= 0] + z, qmin, qmax) - z)  afterwards (hard)
  h(V) = clip(sigmoid(V) * 1.2 - 0.1, 0, 1); s0, z from a clip-ratio grid search minimizing |W - Q(W)|^2.4;
* activations: LSQ, per tensor, symmetric (signed grid iff the first batch it sees has negatives), the step
  initialized by the same grid search on the first 32 images it sees; QDrop (keep the float value with
  probability 0.5) while reconstructing;
* block-wise reconstruction (BRECQ + QDrop) in network order: residual blocks, inverted residuals and lone
  Conv2d/Linear layers are found automatically on the torch.fx graph (see `find_units`). Each unit learns
  to reproduce the float unit's output on the float input from the quantized network's input (mixed with
  the float one by QDrop): mean_{n,h,w} sum_c (f_q - y)^2 + lambda * sum (1 - |2h(V) - 1|^beta), beta
  20 -> 2 after a 20% warm-up; Adam on the steps (weights 1e-4, activations 4e-5, cosine) and on V (1e-3);
* bit exceptions as the reference: first conv and last linear W8 with 8-bit inputs, and the second
  quantized layer's input at 8 bits (the "BRECQ setting", `second_input_bits`);
* the network input (the first conv's input; the reference leaves it in float, integer runtimes need it
  quantized): by default (`input_grid=spec`) its grid is the exact normalized [0, 1] pixel range, from the
  model's mean/std, and is not learned. Fitting it to the calibration images instead (`input_grid=calib`, what
  every other activation does) clips real images when they are Genie-D images, which span about +-1.3 after
  the generator's last BN where real CIFAR inputs span [-2.1, 2.6]: on ResNet-32 that alone cost W8A8 1.9 pt
  (93.38 -> 91.13) and min-max W8A8 3.8 pt (benchmarks/results/quantization.md, Diagnosis).

After reconstruction the rounding is made hard and *baked*: each weight is replaced by its hard-quantized
value (exactly on the learned grid) and the quantizers become the plain shared WeightQuantizer /
ActQuantizer with the learned steps, so the model exports to the same Q/DQ graph as `minmax` and a saved
model reloads through the "genie" structure edit (the shared "quantize" placement plus the bit exceptions).

Calibration data (`--calib`): `genie` (or none given) synthesizes it with Genie-D from the model's BatchNorm
statistics; `noise` uses Gaussian N(0, 1) images (ablation); anything else is a data spec (real images).
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from pathlib import Path
from dataclasses import asdict, dataclass, replace

import torch
import torch.fx as fx
import torch.nn as nn

from compress.errors import UserError
from compress.io import InputSpec, LoadedModel
from compress.progress import log, track
from compress.quantize import METHODS
from compress.quantize.fakequant import EPS, QUANT_LAYERS, ActQuantizer, FakeQuantizer, WeightQuantizer
from compress.quantize.genie_data import SynthesisConfig, load_calib, noise_dataset, synthesize, synthetic_dataset
from compress.quantize.insert import ACT_CONTAINER, QuantScheme, SelectConv, cap_at_ceilings, parse_bits, prepare
from compress.stages import Context, Method, MethodConfig, option
from compress.structure import EDITS
from compress.torch_device import CHOICES_HELP as TORCH_DEVICE_HELP
from compress.torch_device import resolve as resolve_torch_device

ZETA, GAMMA = 1.1, -0.1      # rectified sigmoid stretch (AdaRound / Genie)
LP_NORM = 2.4                # grid-search error norm of the reference
STEP_FLOOR = 1e-3            # learned weight steps never fall below this fraction of their initial value
RATIOS = torch.arange(100, 0, -1, dtype=torch.float32) / 100  # clip ratios 1.00, 0.99, ..., 0.01
GRID_SEARCH_MAX_VALUES = 1 << 21  # activation grid search on at most this many values (a seeded sample)
KNOWN_BLOCKS = ("BasicBlock", "Bottleneck", "ResBottleneckBlock", "InvertedResidual", "DwsConvBlock", "ConvBlock")
PLACEMENTS = ("auto", "runtime", "reference")
INPUT_GRIDS = ("spec", "calib")
CALIB_SOURCES = ("genie", "noise")


# --- the rectified sigmoid ------------------------------------------------------------------------------------
def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rectified_sigmoid_inverse(h: torch.Tensor) -> torch.Tensor:
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


# --- grid searches ------------------------------------------------------------------------------------------------
def search_weight_grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (scale, signed zero-point) minimizing mean |W - Q(W)|^2.4 over clip ratios.

    Asymmetric: the reference's unsigned grid [0, 2^b - 1] with z = round(-min / delta), returned shifted
    into the signed container (z - 2^(b-1)); the range is widened to include 0 so z stays on the grid.
    Symmetric: z = 0 on the narrow grid [-(2^(b-1) - 1), 2^(b-1) - 1] (what integer kernels take).
    """
    w = w.detach().float()
    flat = w.reshape(w.shape[0], -1)
    best = torch.full((flat.shape[0],), math.inf)
    scale = torch.full((flat.shape[0],), EPS)
    zp = torch.zeros(flat.shape[0])
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        absmax = flat.abs().amax(1)
        for r in RATIOS:
            s = (absmax * r / qmax).clamp_min(EPS)
            q = torch.clamp(torch.round(flat / s[:, None]), -qmax, qmax) * s[:, None]
            score = (flat - q).abs().pow(LP_NORM).mean(1)
            better = score < best
            scale, best = torch.where(better, s, scale), torch.minimum(score, best)
        return scale, zp
    levels = (1 << bits) - 1
    hi, lo = flat.amax(1).clamp_min(0.0), flat.amin(1).clamp_max(0.0)
    for r in RATIOS:
        s = ((hi - lo) * r / levels).clamp_min(EPS)
        z = torch.round(-lo * r / s)
        q = (torch.clamp(torch.round(flat / s[:, None]) + z[:, None], 0, levels) - z[:, None]) * s[:, None]
        score = (flat - q).abs().pow(LP_NORM).mean(1)
        better = score < best
        scale, zp, best = torch.where(better, s, scale), torch.where(better, z, zp), torch.minimum(score, best)
    return scale, zp - (1 << (bits - 1))


def search_act_grid(x: torch.Tensor, bits: int, seed: int = 0) -> tuple[float, bool]:
    """(step, signed) of a per-tensor symmetric grid minimizing mean |x - Q(x)|^2.4 over clip ratios.

    Signed data gets the grid [-2^(b-1), 2^(b-1) - 1] * step with step = 2 * r * absmax / (2^b - 1);
    non-negative data [0, 2^b - 1] * step with step = r * max / (2^b - 1) (the reference's formulas).
    """
    x = x.detach().float().reshape(-1)
    if x.numel() > GRID_SEARCH_MAX_VALUES:
        idx = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))[:GRID_SEARCH_MAX_VALUES]
        x = x[idx]
    signed = bool(x.min() < 0)
    absmax = float(x.abs().max())
    if absmax == 0.0:
        return EPS, signed
    levels = (1 << bits) - 1
    qn, qp = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, levels)
    best, step = math.inf, EPS
    for r in RATIOS.tolist():
        s = max((2.0 if signed else 1.0) * absmax * r / levels, EPS)
        score = float((x - torch.clamp(torch.round(x / s), qn, qp) * s).abs().pow(LP_NORM).mean())
        if score < best:
            best, step = score, s
    return step, signed


# --- learnable quantizers (reconstruction only; baked into the plain shared ones afterwards) ----------------------
class GenieWeightQuantizer(WeightQuantizer):
    """Per-channel weight grid with a learnable step (`scale`) and soft bits (`bit_logit`) over a frozen base."""

    def __init__(self, weight: torch.Tensor, bits: int, symmetric: bool):
        super().__init__(bits, per_channel=True, symmetric=symmetric, channels=weight.shape[0], axis=0)
        scale, zp = search_weight_grid(weight, bits, symmetric)
        self.set_qparams(scale, zp)
        self.make_learnable("scale")
        ratio = weight.detach().float() / self._broadcast(self.scale.detach(), weight)
        base = torch.floor(ratio)
        self.register_buffer("base", base)  # never recomputed from the learned step
        self.bit_logit = nn.Parameter(rectified_sigmoid_inverse(ratio - base))
        self.soft = False

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.bit_logit)

    def integers(self, soft: bool) -> torch.Tensor:
        """clip(B + rounding + z, qmin, qmax): the (soft) integer codes in the signed container."""
        rounding = self.h() if soft else (self.bit_logit >= 0).to(self.base.dtype)
        z = self._broadcast(self.zero_point, self.base).float()
        return torch.clamp(self.base + rounding + z, self.qmin, self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        z = self._broadcast(self.zero_point, self.base).float()
        return self._broadcast(self.scale, self.base) * (self.integers(self.soft) - z)

    def hard_weight(self) -> torch.Tensor:
        with torch.no_grad():
            z = self._broadcast(self.zero_point, self.base).float()
            return self._broadcast(self.scale, self.base) * (self.integers(False) - z)

    def round_loss(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def baked(self) -> WeightQuantizer:
        """The plain shared quantizer with this grid (the weight must be replaced by `hard_weight()`)."""
        wq = WeightQuantizer(self.bits, per_channel=True, symmetric=self.symmetric, channels=self.scale.numel())
        wq.set_qparams(self.scale.detach(), self.zero_point)
        return wq


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class LSQActQuantizer(ActQuantizer):
    """Per-tensor symmetric activation grid with a learnable step (LSQ, no gradient scale) and QDrop.

    mode "init": the next call sets the grid from its input (grid search), then quantizes;
    "train": LSQ forward with a straight-through round, returning the float value with probability `drop`;
    "eval": the shared fake-quant path (what export sees).
    """

    def __init__(self, bits: int, drop: float = 0.5):
        super().__init__(bits, symmetric=True)
        self.make_learnable("scale")
        self.mode, self.drop, self.initialized, self.seed = "eval", drop, False, 0

    def initialize(self, x: torch.Tensor) -> None:
        step, signed = search_act_grid(x, self.bits, self.seed)
        self.set_qparams(torch.tensor([step]), torch.tensor([1 << (self.bits - 1) if signed else 0]))
        self.initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None or not self.enabled:
            return super().forward(x)
        if self.mode == "init" and not self.initialized:
            self.initialize(x)
        if self.mode != "train":
            return self.fake_quant(x)
        z = self.zero_point.float()  # a tensor, not float(): no host sync per forward on a GPU
        xq = round_ste(torch.clamp(x / self.scale, self.qmin - z, self.qmax - z)) * self.scale
        return torch.where(torch.rand_like(x) < self.drop, xq, x) if self.drop > 0 else xq

    def baked(self) -> ActQuantizer:
        aq = ActQuantizer(self.bits, symmetric=True)
        aq.set_qparams(self.scale.detach(), self.zero_point)
        return aq


# --- structure: the shared placement plus Genie's bit exceptions (the "genie" edit) --------------------------------
@dataclass(frozen=True)
class GenieStructure:
    scheme: QuantScheme
    second_input_bits: int = 8    # 0: no exception
    placement: str = "runtime"

    def to_edit(self) -> dict:
        return {"kind": "genie", "scheme": self.scheme.to_dict(), "second_input_bits": self.second_input_bits,
                "placement": self.placement}

    @classmethod
    def from_edit(cls, edit: dict) -> "GenieStructure":
        placement = edit.get("placement", "runtime")
        if placement not in ("runtime", "reference"):
            raise UserError(f"genie edit: unknown placement {placement!r} (saved by a newer version?)")
        return cls(QuantScheme.from_dict(edit.get("scheme", {})), int(edit.get("second_input_bits", 8)), placement)


def _weighted_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), QUANT_LAYERS) and not isinstance(gm.get_submodule(n.target), SelectConv)]


def _act_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), ActQuantizer)


def _feeds_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does this tensor reach a Conv2d/Linear input, possibly through pure data movement and re-quantization?"""
    from compress.quantize.insert import _kind

    todo, seen = list(node.users), set()
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        if u.op == "call_module" and isinstance(gm.get_submodule(u.target), QUANT_LAYERS) \
                and not isinstance(gm.get_submodule(u.target), SelectConv) and u.args and u.args[0] is node:
            return True
        if _act_node(gm, u) or _kind(gm, u) in ("move", "identity"):
            if _feeds_layer(gm, u):
                return True
    return False


def build_structure(model: nn.Module, st: GenieStructure) -> fx.GraphModule:
    """prepare() with the shared placement, then the bit exceptions and the placement variant (deterministic)."""
    gm = prepare(model, st.scheme)
    container = gm.get_submodule(ACT_CONTAINER)
    weighted = _weighted_nodes(gm)
    if st.second_input_bits and len(weighted) > 1:
        src = weighted[1].args[0]
        if isinstance(src, fx.Node) and _act_node(gm, src):
            key = src.target.split(".", 1)[1]
            old = container[key]
            if old.bits < st.second_input_bits:
                container[key] = ActQuantizer(st.second_input_bits, old.symmetric)
    if st.placement == "reference":  # quantize only what a Conv2d/Linear reads (Genie/BRECQ); adds run in float
        keep = {n.target for n in gm.graph.nodes if _act_node(gm, n) and _feeds_layer(gm, n)}
        for n in gm.graph.nodes:
            if _act_node(gm, n) and n.target not in keep:
                gm.get_submodule(n.target).enabled = False
    return gm


def _replay(model: nn.Module, edit: dict) -> nn.Module:
    return build_structure(model, GenieStructure.from_edit(edit))


EDITS.add("genie", _replay)


# --- reconstruction units ---------------------------------------------------------------------------------------------
@dataclass
class Unit:
    name: str
    module: fx.GraphModule          # one tensor in (the raw output of the previous unit), one tensor out
    layers: list[str]               # weighted layers (module names)
    act_quantizers: list[str]       # activation quantizers it runs (module names), its input's first

    def weight_quantizers(self, gm: nn.Module) -> list[GenieWeightQuantizer]:
        return [gm.get_submodule(n).weight_quantizer for n in self.layers
                if isinstance(gm.get_submodule(n).weight_quantizer, GenieWeightQuantizer)]

    def activation_quantizers(self, gm: nn.Module) -> list[LSQActQuantizer]:
        qs = [gm.get_submodule(n) for n in self.act_quantizers]
        return [q for q in qs if isinstance(q, LSQActQuantizer) and q.enabled]


def _block_ancestor(node: fx.Node) -> str | None:
    """The innermost enclosing module of a known block type (BasicBlock, InvertedResidual, ...)."""
    found = None
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        if name.rsplit(".", 1)[-1] in KNOWN_BLOCKS:
            found = path
    return found


def find_units(gm: fx.GraphModule) -> list[Unit]:
    """Split the graph into reconstruction units, in network order.

    A cut is a point of the (topologically ordered) graph where exactly one tensor is alive: each unit runs
    from one cut to the next, so it reads one tensor and writes one. Layers that must share a unit: those
    inside one known block module, and those between two consecutive cuts with more than one live tensor in
    between (a residual block of any name). Every other Conv2d/Linear is a unit of its own. A unit ends just
    before the activation quantizer that feeds the next unit, so each unit quantizes its own input and its
    loss is taken on its raw output (as BRECQ/Genie).
    """
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    out_node = nodes[-1]
    if len(placeholders) != 1 or out_node.op != "output" or not isinstance(out_node.args[0], fx.Node):
        raise UserError("Genie reconstruction needs a model with one input tensor and one output tensor")
    pos = {n: i for i, n in enumerate(nodes)}
    tensor_nodes = [n for n in nodes if n.op not in ("get_attr", "output")]
    last_use = {n: max((pos[u] for u in n.users), default=-1) for n in tensor_nodes}
    live_count = [0] * len(nodes)
    for n in tensor_nodes:
        for i in range(pos[n], last_use[n]):
            live_count[i] += 1

    def live_at(i: int) -> fx.Node:
        alive = [n for n in tensor_nodes if pos[n] <= i < last_use[n]]
        return alive[0]

    cuts = [i for i in range(len(nodes) - 1) if live_count[i] == 1]
    weighted = _weighted_nodes(gm)
    if not weighted:
        raise UserError("the model has no Conv2d or Linear layer to reconstruct")

    parent = {n: n for n in weighted}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def union(a, b):
        parent[find(a)] = find(b)

    by_block: dict[str, fx.Node] = {}
    for n in weighted:
        anc = _block_ancestor(n)
        if anc is not None:
            if anc in by_block:
                union(n, by_block[anc])
            else:
                by_block[anc] = n
    for a, b in zip(cuts, cuts[1:]):
        if any(live_count[i] > 1 for i in range(a + 1, b)):
            inside = [n for n in weighted if a < pos[n] <= b]
            for n in inside[1:]:
                union(n, inside[0])

    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in weighted:
        groups.setdefault(find(n), []).append(n)
    spans = sorted([pos[g[0]], pos[g[-1]], g] for g in groups.values())
    merged: list[list] = []
    for first, last, members in spans:  # interleaved groups: one unit
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], last)
            merged[-1][2] = merged[-1][2] + members
        else:
            merged.append([first, last, list(members)])

    cutset = set(cuts)
    ends: list[int] = []
    keep: list[list] = []
    for k, (first, last, members) in enumerate(merged):
        if k == len(merged) - 1:
            keep.append([first, last, members])
            ends.append(len(nodes) - 2)
            break
        nxt = merged[k + 1][0]
        end = next((j - 1 for j in range(last + 1, nxt + 1) if _act_node(gm, nodes[j]) and j - 1 in cutset), None)
        if end is None:
            end = max((c for c in cuts if last <= c < nxt), default=None)
        if end is None:  # no single-tensor point between the groups: they become one unit
            merged[k + 1] = [first, merged[k + 1][1], members + merged[k + 1][2]]
            continue
        keep.append([first, last, members])
        ends.append(end)

    units, start, inp = [], 1, placeholders[0]
    for (first, last, members), end in zip(keep, ends):
        out = out_node.args[0] if end == len(nodes) - 2 else live_at(end)
        span = nodes[start:end + 1]
        names = [m.target for m in sorted(members, key=pos.get)]
        blocks = {_block_ancestor(m) for m in members}
        name = blocks.pop() if len(blocks) == 1 and None not in blocks else "+".join(names)
        acts = list(dict.fromkeys(n.target for n in span if _act_node(gm, n)))
        units.append(Unit(name, _subgraph(gm, span, inp, out), names, acts))
        start, inp = end + 1, out
    return units


def _subgraph(gm: fx.GraphModule, span: list[fx.Node], inp: fx.Node, out: fx.Node) -> fx.GraphModule:
    g = fx.Graph()
    env = {inp: g.placeholder("x")}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise UserError(f"internal: reconstruction unit reads {a.name} from outside its span")
            env[a] = g.node_copy(a)
        return env[a]

    for n in span:
        if n is inp:
            continue
        env[n] = g.node_copy(n, arg)
    g.output(env[out])
    return fx.GraphModule(gm, g)  # shares the modules (and parameters) of gm


# --- configuration ---------------------------------------------------------------------------------------------------
# budgets per preset: calibration images, Genie-D iterations per batch (and batch, generator width) and
# reconstruction iterations per unit
PRESETS: dict[str, dict] = {
    "paper": dict(samples=1024, distill_iters=4000, distill_batch=128, gen_width=128, recon_iters=20000),
    "fast": dict(samples=128, distill_iters=200, distill_batch=128, gen_width=64, recon_iters=200),
    "smoke": dict(samples=32, distill_iters=20, distill_batch=32, gen_width=32, recon_iters=20),
}
LR_BIT = 1e-3        # the paper's soft-bit learning rate, for its 20000 iterations
LR_BIT_TRAVEL = 10.0  # smaller budgets: V may travel about this far in all (|V| > 2.3 decides a bit) ...
LR_BIT_MAX = 0.05     # ... but Adam's sign-like steps must stay small: a big step flips bits at random


def auto_lr_bit(iters: int) -> float:
    """1e-3 (the paper's) from 10000 iterations up; 10 / iterations below, at most 0.05 (e.g. 0.05 at 200,
    0.033 at 300), so that the rounding still converges with small budgets (research note check (c))."""
    return min(LR_BIT_MAX, max(LR_BIT, LR_BIT_TRAVEL / max(iters, 1)))


@dataclass
class GenieConfig(MethodConfig):
    bits: str = option("w8a8", "weight and activation bits as wNaM: w8a8, w4a8, w4a4, w2a4 (the paper's W4A4/W2A4 "
                       "activations run as simulated fake-quant on today's CPU runtimes)")
    preset: str = option("paper", "budgets: paper (1024 images, 4000 Genie-D and 20000 reconstruction iterations: "
                         "ResNet-20 about 12 + 22 min on an H100 from its per-iteration times, hours on a CPU), fast "
                         "(128 images, 200 and 200: ResNet-20 in minutes on a CPU), smoke (tests)", tuple(PRESETS))
    samples: int | None = option(None, "calibration images: synthesized (calib genie/noise) or drawn from the data "
                                 "[from preset]")
    distill_iters: int | None = option(None, "Genie-D iterations per batch of synthetic images [from preset]")
    distill_batch: int | None = option(None, "Genie-D images per generator batch [from preset]")
    gen_width: int | None = option(None, "Genie-D generator width c1 (c2 = c1 / 2; the paper: 128) [from preset]")
    recon_iters: int | None = option(None, "reconstruction iterations per block [from preset]")
    recon_batch: int = option(32, "reconstruction batch size")
    round_weight: float = option(1.0, "weight of the rounding loss (a sum over weights; not AdaRound's 0.01)")
    lr_w_scale: float = option(1e-4, "Adam learning rate of the weight steps (cosine-annealed)")
    lr_a_scale: float = option(4e-5, "Adam learning rate of the activation steps (cosine-annealed)")
    lr_bit: float | None = option(None, "Adam learning rate of the soft bits V [default: 1e-3 (the paper's) from 10000 "
                                  "iterations up, 10 / recon_iters (at most 0.05) below, so that the rounding converges]")
    qdrop: float = option(0.5, "QDrop probability of keeping an activation in float while reconstructing")
    symmetric_weights: bool | None = option(None, "zero-point 0 weights on [-(2^(b-1)-1), 2^(b-1)-1]; default: symmetric "
                                            "with 8-bit activations (W8A8/W4A8 run as integer kernels, and OpenVINO "
                                            "runs zero-point weights in float), the reference's asymmetric grid at A4")
    second_input_bits: int = option(8, "bits of the second quantized layer's input (BRECQ setting; 0: none)")
    first_last_bits: int = option(8, "bits for the first conv and the last linear, weights and inputs (0: none)")
    input_grid: str = option("spec", "grid of the network input (the first conv's input): spec = the exact range "
                             "of [0, 1] pixels after the model's mean/std normalization, fixed (needs no data; Genie-D "
                             "images do not cover the real pixel range, which cost ResNet-32 W8A8 1.9 pt); calib = "
                             "fitted and learned on the calibration images like every other activation",
                             INPUT_GRIDS)
    placement: str = option("auto", "activation grids on every tensor integer runtimes need (runtime: also the "
                            "residual-add inputs and the pooled features), or on Conv/Linear inputs only (reference, as "
                            "Genie/BRECQ); auto: runtime at A8 (integer kernels), reference below (simulated anyway)",
                            PLACEMENTS)
    torch_device: str = option("auto", "where torch runs Genie-D and Genie-M (the machine compressing, not the target): "
                               f"{TORCH_DEVICE_HELP}; the model comes back on the CPU either way")

    def validate(self) -> None:
        parse_bits(self.bits)
        for name in ("samples", "distill_iters", "distill_batch", "gen_width", "recon_iters"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.recon_batch < 1:
            raise UserError(f"recon_batch must be at least 1, got {self.recon_batch}")
        if not 0.0 <= self.qdrop < 1.0:
            raise UserError(f"qdrop is a probability in [0, 1), got {self.qdrop}")
        for name in ("round_weight",):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be 0 or more")
        for name in ("lr_w_scale", "lr_a_scale"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be 0 or more")
        if self.lr_bit is not None and self.lr_bit < 0:
            raise UserError("lr_bit must be 0 or more")
        for name in ("second_input_bits", "first_last_bits"):
            value = getattr(self, name)
            if value != 0 and not 2 <= value <= 8:
                raise UserError(f"{name} must be 0 or 2..8, got {value}")
        resolve_torch_device(self.torch_device)  # `cuda` on a machine without one fails here, before any work

    def resolved(self) -> "GenieConfig":
        """A copy with every budget filled in from the preset (explicit options win)."""
        values = {k: (v if getattr(self, k) is None else getattr(self, k)) for k, v in PRESETS[self.preset].items()}
        _, a_bits = parse_bits(self.bits)
        sym = self.symmetric_weights if self.symmetric_weights is not None else a_bits == 8
        placement = self.placement if self.placement != "auto" else ("runtime" if a_bits == 8 else "reference")
        lr_bit = self.lr_bit if self.lr_bit is not None else auto_lr_bit(values["recon_iters"])
        return replace(self, symmetric_weights=sym, placement=placement, lr_bit=lr_bit,
                       torch_device=resolve_torch_device(self.torch_device), **values)

    def structure(self) -> GenieStructure:
        w, a = parse_bits(self.bits)
        scheme = QuantScheme(w_bits=w, a_bits=a, per_channel=True, symmetric_weights=bool(self.symmetric_weights),
                             symmetric_acts=True, first_last_bits=self.first_last_bits)
        return GenieStructure(scheme, self.second_input_bits, self.placement)

    def synthesis(self, seed: int) -> SynthesisConfig:
        return SynthesisConfig(samples=self.samples, batch=min(self.distill_batch, self.samples),
                               iters=self.distill_iters, gen_c1=self.gen_width, gen_c2=max(1, self.gen_width // 2),
                               seed=seed, device=self.torch_device)


# --- the algorithm ---------------------------------------------------------------------------------------------------
def to_genie_quantizers(gm: fx.GraphModule, drop: float, seed: int = 0) -> None:
    """Swap the plain quantizers for learnable ones (the SelectConv shortcuts keep their exact 0/1 grid)."""
    for name, m in gm.named_modules():
        if isinstance(m, QUANT_LAYERS) and not isinstance(m, SelectConv):
            old = m.weight_quantizer
            m.weight_quantizer = GenieWeightQuantizer(m.weight, old.bits, old.symmetric)
    container = gm.get_submodule(ACT_CONTAINER)
    for i, key in enumerate(list(container.keys())):
        old = container[key]
        new = LSQActQuantizer(old.bits, drop)
        new.enabled, new.seed = old.enabled, seed + i
        container[key] = new


def pixel_range(spec: InputSpec) -> tuple[float, float]:
    """[min, max] over channels of (p - mean) / std for pixels p in [0, 1]: every value the model can be fed."""
    mean, std = torch.tensor(spec.mean, dtype=torch.float64), torch.tensor(spec.std, dtype=torch.float64)
    return float(((0.0 - mean) / std).min()), float(((1.0 - mean) / std).max())


def fix_input_grids(gm: fx.GraphModule, spec: InputSpec) -> list[dict]:
    """Grid of each activation quantizer reading the network input: the whole normalized pixel range, fixed.

    Genie-D images are standardized per channel by the generator's last BN, so they span about +-1.3 where real
    normalized pixels span [-2.1, 2.6] (CIFAR): a grid fitted on them clips real inputs (ResNet-32 W8A8 on
    Genie-D data lost 1.9 pt, min-max 3.8 pt, all of it here). The reference leaves this input unquantized;
    integer runtimes need it quantized, and its true range is known without data, so it is set from the
    normalization (asymmetric, the 8-bit container's full grid) and excluded from learning.
    """
    lo, hi = pixel_range(spec)
    done = []
    for node in gm.graph.nodes:
        if not (_act_node(gm, node) and node.args and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder"):
            continue
        q = gm.get_submodule(node.target)
        if not isinstance(q, LSQActQuantizer) or not q.enabled:
            continue
        scale = (hi - lo) / (q.qmax - q.qmin)
        q.set_qparams(torch.tensor([scale]), torch.tensor([q.qmin - round(lo / scale)]))
        q.initialized = True
        q.scale.requires_grad_(False)
        done.append({"quantizer": node.target, "range": [round(lo, 6), round(hi, 6)], "bits": q.bits})
    return done


def bake(gm: nn.Module) -> None:
    """Hard rounding, for good: weights onto their learned grid, quantizers back to the plain shared ones."""
    for m in gm.modules():
        if isinstance(m, QUANT_LAYERS) and isinstance(m.weight_quantizer, GenieWeightQuantizer):
            with torch.no_grad():
                m.weight.copy_(m.weight_quantizer.hard_weight())
            m.weight_quantizer = m.weight_quantizer.baked()
    container = gm.get_submodule(ACT_CONTAINER)
    for key in list(container.keys()):
        old = container[key]
        if isinstance(old, LSQActQuantizer):
            new = old.baked()
            new.enabled = old.enabled
            container[key] = new


def _set_modes(unit: Unit, gm: nn.Module, soft: bool, act_mode: str) -> None:
    for q in unit.weight_quantizers(gm):
        q.soft = soft
    for q in unit.activation_quantizers(gm):
        q.mode = act_mode


@torch.no_grad()
def _run(module: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([module(x[i:i + batch]) for i in range(0, len(x), batch)])


class TempDecay:
    """beta: constant `start` during the warm-up, then linear to `end` at the last iteration."""

    def __init__(self, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
        self.iters, self.warm, self.start, self.end = iters, warmup * iters, start, end

    def __call__(self, it: int) -> float:
        if it < self.warm:
            return self.start
        rel = (it - self.warm) / max(self.iters - self.warm, 1)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)


def reconstruct_unit(unit: Unit, gm: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor, y: torch.Tensor,
                     cfg: GenieConfig, what: str = "reconstruct") -> dict:
    """Minimize the unit's output error (+ rounding loss) with QDrop-mixed inputs; ends in hard rounding."""
    wqs, aqs = unit.weight_quantizers(gm), unit.activation_quantizers(gm)
    groups = [g for g in ({"params": [q.scale for q in wqs], "lr": cfg.lr_w_scale},
                          {"params": [q.scale for q in aqs if q.scale.requires_grad], "lr": cfg.lr_a_scale})
              if g["params"]]
    opt_scale = torch.optim.Adam(groups) if groups else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_scale, T_max=cfg.recon_iters) if opt_scale else None
    opt_bit = torch.optim.Adam([q.bit_logit for q in wqs], lr=cfg.lr_bit) if wqs else None
    decay = TempDecay(cfg.recon_iters)
    # a step driven to <= 0 flips or erases its channel, and a near-zero one overflows the int32 bias of the
    # exported integer conv (bias / (s_in * s_w)); calibration data unlike the real inputs (noise) does that
    floors = [q.scale.detach().abs() * STEP_FLOOR for q in wqs]
    n, batch = len(x_fp), min(cfg.recon_batch, len(x_fp))
    first_rec = last_rec = last_round = None
    _set_modes(unit, gm, soft=True, act_mode="train")
    unit.module.train()
    try:
        order, cursor = torch.randperm(n), 0
        for it in track(range(1, cfg.recon_iters + 1), what, total=cfg.recon_iters):
            if cursor + batch > n:
                order, cursor = torch.randperm(n), 0
            idx = order[cursor:cursor + batch]
            cursor += batch
            x_mix = torch.where(torch.rand_like(x_fp[idx]) < cfg.qdrop, x_q[idx], x_fp[idx]) if cfg.qdrop > 0 else x_q[idx]
            out = unit.module(x_mix)
            rec = (out - y[idx]).pow(2).sum(1).mean()
            loss = rec
            round_loss = None
            if it >= decay.warm and wqs:
                beta = decay(it)
                round_loss = sum(q.round_loss(beta) for q in wqs)
                loss = loss + cfg.round_weight * round_loss
            for opt in (opt_scale, opt_bit):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            for opt in (opt_scale, opt_bit):
                if opt is not None:
                    opt.step()
            with torch.no_grad():
                for q, floor in zip(wqs, floors):
                    q.scale.copy_(torch.maximum(q.scale, floor))
            if sched is not None:
                sched.step()
            # kept as tensors (read once at the end): a float() here would sync a GPU every iteration
            last_rec = rec.detach()
            first_rec = last_rec if first_rec is None else first_rec
            last_round = None if round_loss is None else round_loss.detach()
    finally:
        _set_modes(unit, gm, soft=False, act_mode="eval")
        unit.module.eval()
    soft_bits = torch.cat([q.h().detach().reshape(-1) for q in wqs]) if wqs else torch.zeros(0)
    undecided = float(((soft_bits > 0.01) & (soft_bits < 0.99)).float().mean()) if len(soft_bits) else 0.0
    at_floor = sum(int((q.scale.detach() <= f * (1 + 1e-6)).sum()) for q, f in zip(wqs, floors))
    return {"unit": unit.name, "layers": len(unit.layers), "iters": cfg.recon_iters, "steps_at_floor": at_floor,
            "first_rec_loss": None if first_rec is None else float(first_rec),
            "last_rec_loss": None if last_rec is None else float(last_rec),
            "last_round_loss": None if last_round is None else float(last_round), "undecided_bits": round(undecided, 5)}


def soft_hard_gap(unit: Unit, gm: nn.Module, x: torch.Tensor) -> float:
    """Relative MSE between the unit's soft- and hard-rounded outputs (activations deterministic)."""
    _set_modes(unit, gm, soft=True, act_mode="eval")
    soft = _run(unit.module, x)
    _set_modes(unit, gm, soft=False, act_mode="eval")
    hard = _run(unit.module, x)
    return float((soft - hard).pow(2).mean() / hard.pow(2).mean().clamp_min(1e-12))


def genie_quantize(model: nn.Module, images: torch.Tensor, cfg: GenieConfig, seed: int = 0,
                   keep_learnable: bool = False, spec: InputSpec | None = None) -> tuple[fx.GraphModule, dict]:
    """Genie-M on `model` (float, untouched) with calibration `images` (normalized N x C x H x W).

    `spec`: the model's input normalization; with `cfg.input_grid == "spec"` the network-input grid covers the
    normalized [0, 1] pixel range (without a spec: the default CIFAR normalization of InputSpec).
    Returns the quantized GraphModule (baked unless `keep_learnable`) and a summary.
    """
    cfg = cfg.resolved()
    start = time.perf_counter()
    structure = cfg.structure()
    gm = build_structure(copy.deepcopy(model), structure)
    to_genie_quantizers(gm, cfg.qdrop, seed)
    fixed_inputs = fix_input_grids(gm, spec or InputSpec()) if cfg.input_grid == "spec" else []
    units = find_units(gm)
    # grids are searched and quantizers built on the CPU above; the reconstruction loop runs on cfg.torch_device
    device = torch.device(cfg.torch_device)
    gm.to(device)
    for unit in units:
        unit.module.to(device)
    init_n = min(32, len(images))
    stats = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        x_fp = x_q = images.float().to(device)
        for k, unit in enumerate(units):
            for q in unit.activation_quantizers(gm):  # grids from the first 32 images the quantizer sees
                q.mode = "init"
            _run(unit.module, x_q[:init_n])
            _set_modes(unit, gm, soft=False, act_mode="eval")
            with float_mode(gm):
                y = _run(unit.module, x_fp)       # the float unit on the float input: the target
            stats.append(reconstruct_unit(unit, gm, x_fp, x_q, y, cfg, f"Genie-M {k + 1}/{len(units)} {unit.name}"))
            x_q, x_fp = _run(unit.module, x_q), y  # the quantized network's input to the next unit
    gm.to("cpu")
    capped = cap_at_ceilings(gm)  # learned steps past a ReLU6's 6 would keep those convs in float in ONNX Runtime
    if not keep_learnable:
        bake(gm)
    summary = {"units": [u.name for u in units], "reconstruction": stats, "structure": structure.to_edit(),
               "input_grids": fixed_inputs,
               "undecided_bits_max": max((s["undecided_bits"] for s in stats), default=0.0),
               "grids_capped_at_clip": capped,
               "seconds": round(time.perf_counter() - start, 2)}
    return gm.eval(), summary


@contextmanager
def float_mode(gm: nn.Module):
    """Every quantizer off (the float network), restored on exit (placement-disabled ones stay off)."""
    quantizers = [m for m in gm.modules() if isinstance(m, FakeQuantizer)]
    states = [m.enabled for m in quantizers]
    for m in quantizers:
        m.enabled = False
    try:
        yield
    finally:
        for m, on in zip(quantizers, states):
            m.enabled = on


# --- the method ------------------------------------------------------------------------------------------------------
def calibration_images(lm: LoadedModel, cfg: GenieConfig, ctx: Context) -> tuple[torch.Tensor, dict]:
    """The calibration tensor for `cfg` (resolved) from ctx's calib spec: genie (default), noise, or real data."""
    spec = ctx.data.get("calib") or ctx.data.get("train") or "genie"
    # a recipe rebases data specs into paths (recipe_dir/genie): recognize the source by its last component
    kind, _, rest = (spec if Path(spec).exists() else Path(spec).name).partition(":")
    n = cfg.samples
    if kind in CALIB_SOURCES and (not rest or rest.isdigit()) and not Path(spec).exists():
        n = int(rest) if rest else n
        if kind == "genie":
            x, summary = synthesize(lm.model, lm.spec.shape, replace(cfg, samples=n).synthesis(ctx.seed))
            ds = synthetic_dataset(x, f"genie:{n}")
            info = {"source": "genie", "synthesis": summary}
        else:
            ds = noise_dataset(n, lm.spec.shape, ctx.seed)
            info = {"source": "noise"}
        ctx._cache[spec] = ds  # the pipeline's manifest fingerprints ctx.dataset("calib")
    else:
        ds = load_calib(spec, lm.spec.shape, ctx.seed).subset(n, ctx.seed)
        info = {"source": ds.source}
    images = ctx.normalizer()(ds.images, ds.prenormalized)
    if len(images) < 2:
        raise UserError(f"calibration data {ds.source} has {len(images)} image(s); Genie needs at least 2")
    info.update({"images": int(len(images)), "fingerprint": ds.fingerprint()})
    return images, info


class Genie(Method):
    name = "genie"
    family = "quantize"
    Config = GenieConfig
    summary = "zero-shot PTQ: Genie-D synthetic data from BN statistics + Genie-M block reconstruction (CVPR 2023)"

    def apply(self, lm: LoadedModel, cfg: GenieConfig, ctx: Context) -> LoadedModel:
        lm.require_compressible("quantize")
        start = time.perf_counter()
        cfg = cfg.resolved()
        images, calib = calibration_images(lm, cfg, ctx)
        log(f"Genie-M {cfg.bits} on {calib['images']} {calib['source']} images, {cfg.recon_iters} iterations per unit, "
            f"on {cfg.torch_device}")
        gm, summary = genie_quantize(lm.model, images, cfg, ctx.seed, spec=lm.spec)
        edit = summary["structure"]
        entry = {"stage": "quantize", "method": self.name, "config": asdict(cfg), "calibration": calib,
                 "genie": summary, "seconds": round(time.perf_counter() - start, 3)}
        return LoadedModel(gm, lm.spec, "compress", lm.source, lm.arch, dict(lm.arch_kwargs),
                           [*lm.edits, edit], [*lm.history, entry], lm.sha256)


METHODS.add(Genie.name, Genie())
