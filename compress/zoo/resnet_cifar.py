"""CIFAR ResNets (He et al. 2016) with option-A shortcuts, matching the akamaster checkpoints.

Parameter names follow akamaster/pytorch_resnet_cifar10: conv1, bn1, layer{1,2,3}.{i}.conv1|bn1|conv2|bn2,
linear. The option-A shortcut (subsample by 2, zero-pad channels) is a ShortcutA module holding a gather
index instead of a lambda, so that channel pruning can remap it (see compress/prune/engine.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShortcutA(nn.Module):
    """Parameter-free shortcut: out[:, j] = x[:, index[j], ::stride, ::stride], or 0 where index[j] == in_channels.

    With the default index this equals akamaster's `F.pad(x[:, :, ::2, ::2], (0,0,0,0,p,p))`, p = out//4.
    The index is a persistent buffer so that a pruned model (fewer in/out channels) saves and reloads.
    """

    structural_buffers = ("index", "n_in")  # absent from akamaster checkpoints: rebuilt from the architecture

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        pad = (out_channels - in_channels) // 2
        index = torch.full((out_channels,), in_channels, dtype=torch.long)
        index[pad:pad + in_channels] = torch.arange(in_channels)
        self.register_buffer("index", index)
        self.register_buffer("n_in", torch.tensor(in_channels))  # saved, so a pruned shortcut reloads
        self.stride = stride

    @property
    def in_channels(self) -> int:
        return int(self.n_in)

    @property
    def out_channels(self) -> int:
        return int(self.index.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        # one zero channel appended, so "no source" is an ordinary gather (a single ONNX Gather)
        x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
        return x.index_select(1, self.index)

    def export_form(self) -> nn.Conv2d:
        """The same map as a strided 1x1 conv with a 0/1 weight, exact in float (each output is 1 * one input
        or 0). Exported graphs use it: ONNX Runtime's CPU provider keeps a ResNet's whole residual stream in its
        blocked (NCHWc) layout and fuses each residual add and ReLU into the conv before them, where the
        Slice/Concat/Gather form runs in plain layout with layout reorders, adds and ReLUs around it (ResNet-20
        FP32, 1 thread: about 6% faster dense, 8% faster at -57% FLOPs)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, 1, self.stride, bias=False)
        weight = torch.zeros_like(conv.weight)
        rows = torch.nonzero(self.index < self.in_channels).flatten()
        weight[rows, self.index[rows], 0, 0] = 1.0
        conv.weight = nn.Parameter(weight, requires_grad=False)
        return conv

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int = 10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1)
        self.layer2 = self._make_layer(32, num_blocks[1], 2)
        self.layer3 = self._make_layer(64, num_blocks[2], 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar([3, 3, 3], num_classes)


def resnet32(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar([5, 5, 5], num_classes)


def resnet44(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar([7, 7, 7], num_classes)


def resnet56(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar([9, 9, 9], num_classes)
