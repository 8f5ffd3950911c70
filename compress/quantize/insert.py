"""Prepare a float model for quantization: fold BatchNorm, then place fake-quant modules with torch.fx.

Placement follows what integer runtimes fuse (ONNX Runtime's QDQ rules): DQ -> Conv -> Q becomes
QLinearConv, DQ + DQ -> Add -> Q becomes QLinearAdd, DQ -> GlobalAveragePool -> Q becomes
QLinearGlobalAveragePool, DQ -> Gemm becomes QGemm. So every tensor that feeds a Conv/Linear/Add/avg-pool
gets one activation quantizer, shared by all its consumers, placed where the tensor is produced, i.e.
after a ReLU (ORT then drops the ReLU: a uint8 grid with zero-point 0 already clips at 0). Every
Conv2d/Linear weight gets a weight quantizer. Pure data movement (flatten, max-pool, the option-A
shortcut) keeps its input's grid exactly, so its output reuses the input's quantizer (an exact no-op in
torch that gives ORT explicit Q/DQ around the op). The option-A shortcut itself becomes an exact strided
1x1 selection conv (SelectConv), so the whole residual stream stays int8 in ORT.

The result is deterministic (fx node names, module names), so `EDITS["quantize"]` rebuilds the same
structure from a fresh float model and a saved quantized model reloads from its state dict.
"""
from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from compress.errors import UserError, first_line
from compress.quantize.fakequant import ActQuantizer, FakeQuantizer, QuantConv2d, QuantLinear, WeightQuantizer
from compress.structure import EDITS
from compress.zoo.resnet_cifar import ShortcutA

ACT_CONTAINER = "act_quant"  # nn.ModuleDict holding the activation quantizers, keyed by producer node name


@dataclass(frozen=True)
class QuantScheme:
    """Where and how to quantize; JSON-safe, recorded in the "quantize" structure edit."""

    w_bits: int = 8
    a_bits: int = 8
    per_channel: bool = True          # per-output-channel weight scales
    symmetric_weights: bool = True    # zero-point 0, [-127, 127]: what ORT/TensorRT integer kernels take
    symmetric_acts: bool = False      # asymmetric uint8 activations by default
    first_last_bits: int = 8          # first conv and last linear (weights and their inputs); 0 = no exception

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantScheme":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"quantize edit has unknown field(s) {', '.join(sorted(unknown))}: "
                            f"saved by a newer version of this toolchain?")
        return cls(**d)


def parse_bits(text: str) -> tuple[int, int]:
    """'w4a8' -> (4, 8)."""
    m = re.fullmatch(r"w(\d)a(\d)", text.strip().lower())
    if not m or not all(2 <= int(b) <= 8 for b in m.groups()):
        raise UserError(f"bits {text!r}: expected wNaM with N, M from 2 to 8 (e.g. w8a8, w4a8, w4a4, w2a4)")
    return int(m.group(1)), int(m.group(2))


# --- tracing ----------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """Keeps the option-A shortcut one module (swapped for a SelectConv below) and quantizers opaque."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (ShortcutA, FakeQuantizer)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types for data-dependent control flow
        raise UserError(f"cannot trace {type(model).__name__} with torch.fx for quantization "
                        f"({type(e).__name__}: {first_line(e, 160)})") from None
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def _set_module(gm: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)


# --- BatchNorm folding --------------------------------------------------------------------------------
def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold every BatchNorm that directly follows a Conv2d/Linear (sole user) into it; returns the count.

    Uses the running statistics (eval-mode BN), so the folded model equals the original in eval mode.
    """
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer, bn = modules[prev.target], modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        if type(layer) is nn.Conv2d:
            w, b = fuse_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
        elif type(layer) is nn.Linear and isinstance(bn, nn.BatchNorm1d):
            w, b = fuse_linear_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                                          bn.weight, bn.bias)
        else:
            continue
        layer.weight, layer.bias = w, b
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        folded += 1
    gm.graph.lint()
    gm.recompile()
    return folded


# --- the option-A shortcut as a convolution -------------------------------------------------------------
class SelectConv(QuantConv2d):
    """ShortcutA (subsample, then gather channels or zeros) as a strided 1x1 conv with a 0/1 weight.

    Exactly equal in float and on any activation grid (each output is 1 * one input, or 0), and ORT runs it
    as one QLinearConv in the int8 NHWC stream instead of Slice/Concat/Gather in float, which also forced
    layout transposes around every residual add downstream.
    """

    @classmethod
    def from_shortcut(cls, sc: ShortcutA) -> "SelectConv":
        conv = sc.export_form()
        weight = conv.weight.detach().clone()
        wq = WeightQuantizer(8, per_channel=True, symmetric=True, channels=sc.out_channels)
        wq.init_minmax(weight)
        new = cls.from_float(conv, wq)
        del new.weight
        new.register_buffer("weight", weight)  # wiring, not a parameter: no optimizer may move it off 0/1
        return new


def _shortcuts_to_convs(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if isinstance(_module(gm, node), ShortcutA):
            _set_module(gm, node.target, SelectConv.from_shortcut(_module(gm, node)))


# --- which tensors need a grid ------------------------------------------------------------------------
_CONSUMER_FUNCTIONS = {operator.add, operator.iadd, torch.add, F.adaptive_avg_pool2d, F.avg_pool2d,
                       torch.matmul, operator.matmul}
_CONSUMER_MODULES = (nn.Conv2d, nn.Linear, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
# ops that move data without changing values: their output lies on their input's grid
_MOVE_FUNCTIONS = {torch.flatten, torch.reshape, F.max_pool2d, torch.squeeze, torch.unsqueeze}
_MOVE_METHODS = {"flatten", "view", "reshape", "contiguous", "permute", "transpose", "squeeze", "unsqueeze"}
_MOVE_MODULES = (SelectConv, nn.Flatten, nn.MaxPool2d, nn.Unflatten)  # SelectConv pads with 0: on every grid
_IDENTITY_MODULES = (nn.Identity, nn.Dropout)  # vanish in eval and in ONNX: no re-quantization needed
_NOT_TENSORS_METHODS = {"size", "dim", "numel"}


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _consumed_inputs(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """Tensor inputs of `node` that must arrive quantized."""
    mod = _module(gm, node)
    if mod is not None and isinstance(mod, _CONSUMER_MODULES):
        return [node.args[0]]
    if (node.op == "call_method" and node.target == "mean") or node.target is torch.mean:
        return [node.args[0]]  # x.mean((2, 3)): a global average pool written as a reduction
    if node.op == "call_function" and node.target in _CONSUMER_FUNCTIONS:
        if node.target in (F.adaptive_avg_pool2d, F.avg_pool2d):
            return [node.args[0]]
        args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        return args if len(args) == 2 and all(_is_tensor(a) for a in args) else []
    return []


def _is_tensor(node: fx.Node) -> bool:
    """False for shape arithmetic (x.size(1) + 1, x.shape[0]): such adds need no grid."""
    if node.op == "call_method" and node.target in _NOT_TENSORS_METHODS:
        return False
    if node.op == "call_function" and node.target is getattr:
        return False
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return _is_tensor(node.args[0])
    return True


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """'identity' | 'move' | 'other'."""
    mod = _module(gm, node)
    if mod is not None:
        return "identity" if isinstance(mod, _IDENTITY_MODULES) else "move" if isinstance(mod, _MOVE_MODULES) else "other"
    if node.op == "call_function" and node.target in _MOVE_FUNCTIONS:
        return "move"
    if node.op == "call_method" and node.target in _MOVE_METHODS:
        return "move"
    return "other"


# --- the pass -------------------------------------------------------------------------------------------
def prepare(model: nn.Module, scheme: QuantScheme) -> fx.GraphModule:
    """Fold BN and insert quantizers (in place on `model`'s modules; pass a copy to keep the float model)."""
    if any(isinstance(m, FakeQuantizer) for m in model.modules()):
        raise UserError("this model is already quantized; quantize the float model instead")
    model.eval()
    gm = trace(model)
    fold_batchnorm(gm)
    _shortcuts_to_convs(gm)
    weighted = [n for n in gm.graph.nodes
                if isinstance(_module(gm, n), (nn.Conv2d, nn.Linear)) and not isinstance(_module(gm, n), SelectConv)]
    if not weighted:
        raise UserError("the model has no Conv2d or Linear layer to quantize")
    edge = {weighted[0], weighted[-1]} if scheme.first_last_bits else set()

    for node in weighted:
        layer = _module(gm, node)
        bits = scheme.first_last_bits if node in edge else scheme.w_bits
        wq = WeightQuantizer(bits, scheme.per_channel, scheme.symmetric_weights, channels=layer.weight.shape[0])
        wq.init_minmax(layer.weight)
        wrap = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        _set_module(gm, node.target, wrap.from_float(layer, wq))

    roots: dict[fx.Node, int] = {}           # producer tensor -> bits of its quantizer
    requantize: dict[fx.Node, fx.Node] = {}  # data-movement output -> producer whose grid it keeps
    for node in list(gm.graph.nodes):
        for inp in _consumed_inputs(gm, node):
            bits = scheme.first_last_bits if node in edge else scheme.a_bits
            read = _through(gm, inp, ("identity",))        # what the consumer really reads
            src = _through(gm, read, ("identity", "move"))  # the producer whose grid that is
            roots[src] = max(roots.get(src, 0), bits)
            if read is not src:
                requantize[read] = src

    if ACT_CONTAINER in dict(gm.named_children()):
        raise UserError(f"the model already has a submodule named {ACT_CONTAINER!r}")
    container = nn.ModuleDict()
    gm.add_module(ACT_CONTAINER, container)
    key = {src: src.name + "_" if hasattr(nn.ModuleDict, src.name) else src.name for src in roots}  # not .keys etc.
    for src, bits in roots.items():
        container[key[src]] = ActQuantizer(bits, scheme.symmetric_acts)
        _insert_after(gm, src, f"{ACT_CONTAINER}.{key[src]}")
    for node, src in requantize.items():
        _insert_after(gm, node, f"{ACT_CONTAINER}.{key[src]}")
    gm.graph.lint()
    gm.recompile()
    return gm


def act_ceilings(gm: fx.GraphModule) -> dict[str, float]:
    """Activation quantizer key -> the upper clip of the op it quantizes (ReLU6: 6, Hardtanh: max_val).

    ONNX Runtime folds Conv + Clip + QuantizeLinear into one integer conv only when the quantized range ends at or
    below the clip (then the Clip is redundant); a grid reaching past it leaves the conv in float."""
    ceilings: dict[str, float] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith(ACT_CONTAINER + ".") or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node):
            continue
        mod = _module(gm, src)
        top = None
        if isinstance(mod, nn.Hardtanh):  # nn.ReLU6 is a Hardtanh(0, 6)
            top = float(mod.max_val)
        elif src.op == "call_function" and src.target is F.relu6:
            top = 6.0
        elif src.op == "call_function" and src.target is F.hardtanh:
            top = float(src.kwargs.get("max_val", src.args[2] if len(src.args) > 2 else 1.0))
        if top is not None:
            ceilings.setdefault(str(node.target).split(".", 1)[1], top)
    return ceilings


@torch.no_grad()
def cap_at_ceilings(gm: fx.GraphModule) -> int:
    """Shrink activation grids that reach past their op's clip (learned steps drift there: 255 x step = 6.02 after
    a ReLU6) so that the range ends at the clip: no representable value is lost, and the conv stays an integer
    kernel in ONNX Runtime. Returns how many grids changed."""
    container = gm.get_submodule(ACT_CONTAINER)
    changed = 0
    for key, top in act_ceilings(gm).items():
        q = container[key]
        levels = q.qmax - float(q.zero_point.reshape(-1)[0])
        if q.per_channel or levels <= 0 or float(q.scale.reshape(-1)[0]) * levels <= top:
            continue
        step = torch.tensor(top / levels, dtype=torch.float32)
        while float(step) * levels > top:  # float32 rounding must not land the top level a hair past the clip
            step = torch.nextafter(step, torch.tensor(0.0))
        q.scale.data.fill_(float(step))
        changed += 1
    return changed


def _through(gm: fx.GraphModule, node: fx.Node, kinds: tuple[str, ...]) -> fx.Node:
    while _kind(gm, node) in kinds and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _insert_after(gm: fx.GraphModule, node: fx.Node, target: str) -> None:
    with gm.graph.inserting_after(node):
        q = gm.graph.call_module(target, (node,))
    node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)


def _replay(model: nn.Module, edit: dict) -> nn.Module:
    return prepare(model, QuantScheme.from_dict(edit.get("scheme", {})))


def quantize_edit(scheme: QuantScheme) -> dict:
    """The structure edit recorded in LoadedModel.edits (and manifest.json)."""
    return {"kind": "quantize", "scheme": scheme.to_dict()}


EDITS.add("quantize", _replay)
