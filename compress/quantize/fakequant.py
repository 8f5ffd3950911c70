"""Fake-quant modules shared by every quantization method (min-max PTQ, Genie, EQ-Net, AQT).

A quantizer holds its grid as tensors: `scale` (float32) and `zero_point` (int32), per tensor (shape (1,))
or per output channel (shape (C,)). They live in the state dict, so a saved model reloads with
weights_only=True; bit-width, signedness and granularity are structure, rebuilt by the "quantize" edit.

The forward pass is torch.fake_quantize_per_{tensor,channel}_affine, which both ONNX exporters lower to
QuantizeLinear/DequantizeLinear. Those exporters only accept 8-bit integer ranges, so grids narrower than
their 8-bit container (4/2-bit, or the [-127, 127] symmetric weight range) clamp the input to the grid
first and then fake-quantize over the container range: identical values, and still plain Q/DQ in ONNX.

Extension points for learned quantizers: `make_learnable("scale")` turns a grid tensor into a Parameter
under the same state-dict key; subclasses override `forward` (e.g. soft rounding while training) and
call `fake_quant` for the exportable hard path.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.errors import UserError

EPS = 1e-8  # smallest scale: a constant-zero channel still gets a valid (tiny) step


def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise UserError(f"quantizer bits must be an integer from 2 to 8, got {bits!r}")
    return bits


class FakeQuantizer(nn.Module):
    """x -> scale * (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point).

    `signed` picks the integer container (int8 vs uint8 in ONNX); `narrow` drops the most negative signed
    level so that a symmetric grid is symmetric ([-127, 127] at 8 bits, [-7, 7] at 4 bits).
    """

    def __init__(self, bits: int, signed: bool, narrow: bool = False, channels: int | None = None, axis: int = 0):
        super().__init__()
        self.bits = _check_bits(bits)
        self.signed = signed
        self.narrow = narrow and signed
        self.axis = axis
        self.per_channel = channels is not None
        n = channels if channels is not None else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        self.enabled = True

    # --- the integer grid -------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) + int(self.narrow) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def container(self) -> tuple[int, int]:
        """The 8-bit range the exporters accept: the grid is a sub-range of it."""
        return (-128, 127) if self.signed else (0, 255)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Write the grid in place (keeps Parameter-ness and identity; resizes after pruning)."""
        scale = scale.detach().float().reshape(-1).clamp_min(EPS)
        zero_point = zero_point.detach().float().round().reshape(-1).to(torch.int32).clamp(self.qmin, self.qmax)
        with torch.no_grad():
            for name, value in (("scale", scale), ("zero_point", zero_point)):
                current = getattr(self, name)
                if current.shape != value.shape:
                    current.data = torch.empty_like(value, dtype=current.dtype, device=current.device)
                current.copy_(value)

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor, symmetric: bool) -> None:
        """Grid covering [lo, hi] (per channel or scalar); the range is widened to include 0 (exact zeros)."""
        lo, hi = torch.as_tensor(lo).float().reshape(-1), torch.as_tensor(hi).float().reshape(-1)
        lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
        if symmetric:
            absmax = torch.maximum(-lo, hi)
            if self.signed:
                scale, zp = absmax / self.qmax, torch.zeros_like(absmax)
            elif bool((lo < 0).any()):  # unsigned container holding signed data: centre the zero point
                half = 1 << (self.bits - 1)
                scale, zp = absmax / (half - 1), torch.full_like(absmax, half)
            else:                       # non-negative data (after ReLU): the whole grid on [0, max]
                scale, zp = hi / self.qmax, torch.zeros_like(hi)
        else:
            scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(EPS)
            zp = self.qmin - torch.round(lo / scale)
        self.set_qparams(scale, zp)

    def make_learnable(self, *names: str) -> None:
        """Turn grid tensors (e.g. "scale") into Parameters; the state-dict keys stay the same."""
        for name in names:
            value = self._buffers.pop(name)
            if not value.is_floating_point():
                raise TypeError(f"{name} is {value.dtype}: only float grid tensors can be learned")
            self.register_parameter(name, nn.Parameter(value.detach().clone()))

    # --- forward ----------------------------------------------------------------------------------
    def _broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.per_channel:
            return t
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return t.view(shape)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        lo_c, hi_c = self.container
        if (self.qmin, self.qmax) != (lo_c, hi_c):
            # grid narrower than the 8-bit container: clamp to the grid's float range, then quantize
            s, z = self._broadcast(self.scale, x), self._broadcast(self.zero_point, x).float()
            x = torch.clamp(x, (self.qmin - z) * s, (self.qmax - z) * s)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, lo_c, hi_c)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, lo_c, hi_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake_quant(x) if self.enabled else x

    def extra_repr(self) -> str:
        kind = f"per_channel(axis={self.axis}, n={self.scale.numel()})" if self.per_channel else "per_tensor"
        return f"bits={self.bits}, {'int' if self.signed else 'uint'}[{self.qmin}, {self.qmax}], {kind}"


class WeightQuantizer(FakeQuantizer):
    """Weight grid: signed container; symmetric = zero-point 0 and narrow range (what integer kernels accept)."""

    def __init__(self, bits: int = 8, per_channel: bool = True, symmetric: bool = True, channels: int | None = None,
                 axis: int = 0):
        if per_channel and channels is None:
            raise ValueError("a per-channel weight quantizer needs the channel count")
        super().__init__(bits, signed=True, narrow=symmetric, channels=channels if per_channel else None, axis=axis)
        self.symmetric = symmetric

    def init_minmax(self, w: torch.Tensor) -> None:
        """Grid from the weight's min/max (per output channel when per-channel)."""
        w = w.detach()
        if self.per_channel:
            flat = w.transpose(0, self.axis).reshape(w.shape[self.axis], -1)
            lo, hi = flat.min(1).values, flat.max(1).values
        else:
            lo, hi = w.min(), w.max()
        self.set_range(lo, hi, self.symmetric)


class ActQuantizer(FakeQuantizer):
    """Activation grid, per tensor: asymmetric uint8 by default (ORT's fast u8 x s8 path).

    Symmetric keeps the unsigned container: zero-point 0 for non-negative data, 2^(bits-1) otherwise, so the
    grid's signedness is state (zero_point) rather than structure. While `observer` is set the quantizer
    only records what flows through (calibration) and returns its input unchanged.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False):
        super().__init__(bits, signed=False)
        self.symmetric = symmetric
        self.observer = None  # set by compress.quantize.calibrate; any object with update(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x.detach())
            return x
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", symmetric" if self.symmetric else "")


class QuantConv2d(nn.Conv2d):
    """Conv2d whose weight passes through `weight_quantizer` (still an nn.Conv2d: pruning, FLOPs and resizing work)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, wq: WeightQuantizer) -> "QuantConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        new.weight, new.bias = conv.weight, conv.bias  # the same Parameters: no copy
        new.train(conv.training)
        new.weight_quantizer = wq
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """Linear whose weight passes through `weight_quantizer`."""

    @classmethod
    def from_float(cls, linear: nn.Linear, wq: WeightQuantizer) -> "QuantLinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        new.weight_quantizer = wq
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def weight_bits(model: nn.Module) -> list[int]:
    """The distinct bit-widths of the model's enabled weight quantizers (empty for a float model)."""
    return sorted({m.bits for m in model.modules() if isinstance(m, WeightQuantizer) and m.enabled})


def act_bits(model: nn.Module) -> list[int]:
    return sorted({m.bits for m in model.modules() if isinstance(m, ActQuantizer) and m.enabled})


def set_quant_enabled(model: nn.Module, weights: bool | None = None, acts: bool | None = None) -> None:
    """Switch weight and/or activation fake-quant on or off (e.g. float reference runs, calibration)."""
    for m in model.modules():
        if isinstance(m, WeightQuantizer) and weights is not None:
            m.enabled = weights
        elif isinstance(m, ActQuantizer) and acts is not None:
            m.enabled = acts
