"""Rebuild a compressed model's structure from its saved description, without unpickling code.

A saved model is: the architecture (a zoo name or `package.module:factory`), an ordered list of
structure edits (each stage that changes module types records one: quantize wraps layers, lowrank splits
them), and a state dict. Pruning records nothing: smaller tensors in the state dict say it all, and
`conform_to_state_dict` resizes layers to match before the weights are loaded.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from compress.registry import Registry

# name -> fn(model, edit_dict) -> model ; registered by the method families (quantize, lowrank, ...)
EDITS: Registry[Callable[[nn.Module, dict], nn.Module]] = Registry("structure edit")


def replay(model: nn.Module, edits: list[dict]) -> nn.Module:
    if edits:  # the families register their edits on import; a fresh process may not have imported them yet
        import compress.lowrank  # noqa: F401
        import compress.prune  # noqa: F401
        import compress.quantize  # noqa: F401
    for edit in edits:
        model = EDITS.get(edit["kind"])(model, edit)
    return model


def conform_to_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize parameters and buffers whose saved shape differs (a pruned layer), and fix layer attributes."""
    for prefix, module in model.named_modules():
        changed = False
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                key = f"{prefix}.{name}" if prefix else name
                if tensor is None or key not in state or state[key].shape == tensor.shape:
                    continue
                new = torch.empty(state[key].shape, dtype=state[key].dtype)
                store[name] = nn.Parameter(new, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new
                changed = True
        if changed:
            _fix_layer_attributes(module)


def _fix_layer_attributes(m: nn.Module) -> None:
    if isinstance(m, nn.modules.conv._ConvNd):
        depthwise = m.groups > 1 and m.groups == m.in_channels and m.weight.shape[1] == 1
        m.out_channels = m.weight.shape[0]
        m.groups = m.out_channels if depthwise else m.groups
        m.in_channels = m.weight.shape[1] * m.groups
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.num_features = m.weight.shape[0] if m.weight is not None else m.running_mean.shape[0]
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    if hasattr(m, "conform"):  # modules with derived attributes (e.g. ShortcutA) fix themselves
        m.conform()
