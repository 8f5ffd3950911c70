"""What the data-driven pruning methods need to know about a network's wiring, read from its torch.fx graph.

For every conv layer: the module that normalizes its output (the BatchNorm that is its only consumer), whether
an elementwise ReLU follows that directly, the first ReLU downstream of it (possibly after a residual add: what
HRank ranks), and which other conv feeds it through channel-preserving ops only (so a per-channel mask on that
conv's output also switches off this conv's input channels: FTWT's FLOPs counter needs that).

Only tracing is done here (no arithmetic); models fx cannot trace get a one-line error naming the method.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from compress.errors import UserError, first_line
from compress.zoo.resnet_cifar import ShortcutA

CONV = nn.modules.conv._ConvNd
NORM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
RELU_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
RELU_FUNCS = {F.relu, torch.relu, F.relu6, F.hardtanh, torch.relu_}
# ops that keep channel c of their input in channel c of their output (and zero stays zero)
PASS_MODULES = (nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                *RELU_MODULES, *NORM)
PASS_FUNCS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, *RELU_FUNCS}
ADD_FUNCS = {operator.add, torch.add, operator.iadd}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ShortcutA) or super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class ConvSite:
    conv: str                 # the conv layer's module name
    norm: str | None          # its normalization module (sole consumer of the conv output), if any
    act: bool                 # a ReLU directly follows norm (or the conv): the layer's output is act(norm(conv))
    relu_node: str | None     # fx node of the first ReLU reached from norm/conv, through residual adds
    source: str | None        # conv whose output reaches this conv's input through channel-preserving ops only
    residual: bool            # the layer's output (after norm) is added to another tensor before any ReLU


def trace(model: nn.Module, who: str = "this method") -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types for data-dependent control flow
        raise UserError(f"{who} needs a model torch.fx can trace ({type(e).__name__}: "
                        f"{first_line(e, 120)})") from None
    return fx.GraphModule(model, graph)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), RELU_MODULES)
    if node.op == "call_function":
        return node.target in RELU_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_pass(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), PASS_MODULES)
    if node.op == "call_function":
        return node.target in PASS_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_", "contiguous")


def conv_sites(model: nn.Module, who: str = "this method") -> dict[str, ConvSite]:
    """Conv module name -> its ConvSite, in execution order."""
    gm = trace(model, who)
    modules = dict(model.named_modules())
    convs = {n: n.target for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(modules.get(n.target), CONV)}
    sites: dict[str, ConvSite] = {}
    for node, name in convs.items():
        tail, norm = node, None
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules.get(users[0].target), NORM):
            tail, norm = users[0], users[0].target
        users = list(tail.users)
        act = len(users) == 1 and _is_relu(users[0], modules)
        residual = len(users) == 1 and users[0].op == "call_function" and users[0].target in ADD_FUNCS
        relu_node = None
        cur = tail
        for _ in range(4):  # follow single consumers through adds to the first ReLU
            nxt = list(cur.users)
            if len(nxt) != 1:
                break
            cur = nxt[0]
            if _is_relu(cur, modules):
                relu_node = cur.name
                break
            if not (cur.op == "call_function" and cur.target in ADD_FUNCS):
                break
        src = node.args[0] if node.args else None
        source = None
        while isinstance(src, fx.Node):
            if src in convs:
                source = convs[src]
                break
            if not _is_pass(src, modules) or not src.args:
                break
            src = src.args[0]
        sites[name] = ConvSite(name, norm, act, relu_node, source, residual)
    return sites


class Capture(fx.Interpreter):
    """Run the traced model and keep the values of the named nodes (e.g. ReLU outputs for HRank)."""

    def __init__(self, gm: fx.GraphModule, keep: set[str]):
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = out.detach()
        return out
