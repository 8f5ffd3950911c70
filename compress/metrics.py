"""What a compressed model is measured by: parameters, FLOPs, size on disk, top-1 accuracy."""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from compress.data import Dataset, Normalizer, batches
from compress.progress import track


def count_params(model: nn.Module) -> int:
    """Parameters plus learnable-looking buffers excluded: what a user means by 'model size in params'."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass at batch 1 (torch's FlopCounterMode: 2 x multiply-accumulates)."""
    x = torch.zeros(1, *input_shape)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def state_dict_bytes(model: nn.Module) -> int:
    """Size of the torch file (torch.save of the state dict): fake-quant weights are still float32 here."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as an export stores them: float tensors at their dtype; a weight under an
    enabled weight quantizer at its bit-width (int4 ONNX packs two per byte); each quantizer's grid as a float32
    scale and an 8-bit zero-point per channel. Quantizer internals used only while learning (Genie's rounding
    variables, ...) are not counted; neither is the export's graph structure."""
    from compress.quantize.fakequant import QUANT_LAYERS, FakeQuantizer

    inside_quantizer = {id(sub) for m in model.modules() if isinstance(m, FakeQuantizer) for sub in m.modules()}
    total = 0
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            total += m.scale.numel() * 5
            continue
        if id(m) in inside_quantizer:
            continue
        quantized = isinstance(m, QUANT_LAYERS) and m.weight_quantizer.enabled
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if quantized and name == "weight":
                total += -(-t.numel() * m.weight_quantizer.bits // 8)
            else:
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def predict(forward: Callable[[torch.Tensor], torch.Tensor], ds: Dataset, norm: Normalizer,
            batch_size: int = 256, description: str = "evaluate") -> np.ndarray:
    """Logits for every image of `ds`, through any callable (a torch module or a runtime session)."""
    outs = []
    steps = (len(ds) + batch_size - 1) // batch_size
    for x, _ in track(batches(ds, norm, batch_size), description, total=steps):
        outs.append(np.asarray(forward(x)))
    return np.concatenate(outs)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    _check_label_range(labels, logits.shape[1])  # else every such image counts as a silent miss
    return float((logits.argmax(1) == labels).mean() * 100.0)


def _check_label_range(labels: np.ndarray, outputs: int, source: str = "") -> None:
    if len(labels) and labels.max() >= outputs:
        from compress.errors import UserError
        raise UserError(f"{source + ': ' if source else ''}the labels go up to {labels.max()} but the model has "
                        f"{outputs} outputs: data and model do not match")


@torch.no_grad()
def check_labels(ds: Dataset, model: nn.Module, example: torch.Tensor) -> None:
    """Before training on `ds`: labels past the model's outputs would stop cross-entropy mid-run with a traceback."""
    if ds.labels is None:
        return
    was_training = model.training
    out = model.eval()(example)
    model.train(was_training)
    if out.ndim == 2:
        _check_label_range(ds.labels, out.shape[1], ds.source)


def evaluate(model: nn.Module, ds: Dataset, norm: Normalizer, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of a torch model on a labeled dataset."""
    if ds.labels is None:
        from compress.errors import UserError
        raise UserError(f"{ds.source} has no labels ('y'): accuracy needs labeled data")
    model.eval()
    return top1(predict(lambda x: model(x).numpy(), ds, norm, batch_size), ds.labels)
