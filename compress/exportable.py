"""The form of a model that goes into an exported graph.

A module may define `export_form()`: an exactly equal module that runtimes execute better (e.g. the option-A
shortcut's gather as a 0/1 1x1 conv). Every ONNX export, and every latency measurement that stands in for one,
exports `exportable(model)`; training and evaluation in torch keep the original modules.
"""
from __future__ import annotations

import copy

import torch.nn as nn


def exportable(model: nn.Module) -> nn.Module:
    """`model` itself when no module has an export form, else a copy with each such module swapped for it."""
    if not any(hasattr(m, "export_form") for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    if hasattr(model, "export_form"):
        return model.export_form()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, "export_form"):
                setattr(parent, name, child.export_form())
    return model
