"""Genie-D: calibration images synthesized from a trained model's BatchNorm statistics (zero real data).

Jeon et al., "Genie: Show Me the Data for Quantization", CVPR 2023 (SamsungLabs/Genie, distill.py), as
specified in research/quant-lowrank-methods.md §1.1:

* per batch, a fresh generator G (Linear -> BN -> up x2 -> conv3x3 -> BN -> LeakyReLU -> up x2 -> conv3x3
  -> tanh -> BN(affine=False)) and a fresh learnable latent batch z ~ N(0, I); the output is G(z);
* loss, no labels: for every BatchNorm2d l, ||mu_l - mean(a_l)||^2 / C + ||sigma_l - std(a_l)||^2 / C on
  the BN *input* a_l (sigma = sqrt(running_var + 1e-6), unbiased std over N, H, W), plus the per-image
  input statistics ||0 - mean_HW(x)||^2 / B + ||1 - std_HW(x)||^2 / B;
* swing convolution: every conv with stride != 1 of a *copy* of the model reads its input shifted by a
  random (u, v) in {0, 1, 2}^2 of a reflect-padded copy (one draw per forward), during synthesis only;
* two Adam optimizers with the reference's effective values: z at lr 0.1 with ReduceLROnPlateau
  (patience 100, min_lr 1e-4, stepped every iteration on the loss), G at lr 0.01 with ExponentialLR(0.95)
  stepped every 100 iterations. (The reference names them the other way round; the values are these.)

The images come out in the model's *normalized* input space (the generator's last BN standardizes each
channel), i.e. what the model reads after (x - mean) / std. `save_npz` writes them twice: `x` as uint8
NHWC (de-normalized and clipped to [0, 255], readable by every data loader) and `x_normalized` as float32
NCHW (lossless; `load_calib` prefers it).
"""
from __future__ import annotations

import copy
import math
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.data import Dataset, load_dataset
from compress.errors import UserError
from compress.progress import track

BN_EPS = 1e-6  # sigma = sqrt(running_var + 1e-6), as the reference
FLOAT_KEY = "x_normalized"


@dataclass
class SynthesisConfig:
    samples: int = 1024          # images in total (the reference: 1024 = 8 batches of 128)
    batch: int = 128             # images per generator; each batch has its own G and z
    iters: int = 4000            # iterations per batch
    lr_latent: float = 0.1       # Adam on z (reference's `lr_g`, fed to the latent optimizer)
    lr_generator: float = 0.01   # Adam on G's parameters (reference's `lr_z`)
    latent_dim: int = 256
    gen_c1: int = 128            # generator widths (reference: 128, 64)
    gen_c2: int = 64
    jitter: int = 1              # swing-conv shift range: reflect pad 1, shifts in {0, 1, 2}
    input_stats: bool = True     # the per-image mean-0 / std-1 input terms
    seed: int = 0
    device: str = "cpu"          # where torch runs the loop (compress.torch_device); the images come back on the CPU

    def validate(self) -> None:
        for name in ("samples", "batch", "iters", "latent_dim", "gen_c1", "gen_c2"):
            if getattr(self, name) < 1:
                raise UserError(f"synthesis {name} must be at least 1, got {getattr(self, name)}")
        if self.jitter < 0:
            raise UserError(f"synthesis jitter must be 0 or more, got {self.jitter}")
        if self.lr_latent <= 0 or self.lr_generator <= 0:
            raise UserError("synthesis learning rates must be positive")


# --- the generator ---------------------------------------------------------------------------------------
class Generator(nn.Module):
    """z (B x latent) -> image (B x C x H x W), standardized per channel over the batch by its last BN."""

    def __init__(self, shape: tuple[int, int, int], latent_dim: int = 256, c1: int = 128, c2: int = 64):
        super().__init__()
        channels, h, w = shape
        self.c1, self.out_hw = c1, (h, w)
        self.init_hw = (max(1, math.ceil(h / 4)), max(1, math.ceil(w / 4)))
        self.linear = nn.Linear(latent_dim, c1 * self.init_hw[0] * self.init_hw[1])
        self.bn0 = nn.BatchNorm2d(c1)
        self.conv1 = nn.Conv2d(c1, c2, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(c2)
        self.conv2 = nn.Conv2d(c2, channels, 3, 1, 1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.linear(z).view(z.shape[0], self.c1, *self.init_hw)
        x = F.interpolate(self.bn0(x), scale_factor=2, mode="nearest")
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if tuple(x.shape[-2:]) != self.out_hw:  # input sizes that are not multiples of 4
            x = F.interpolate(x, size=self.out_hw, mode="bilinear", align_corners=False)
        return self.bn_out(torch.tanh(self.conv2(x)))


# --- swing convolution --------------------------------------------------------------------------------------
class SwingConv2d(nn.Module):
    """A strided conv that reads its input shifted by a random (u, v) in {0..2*jitter}^2 (reflect padding).

    One shift per forward call, for the whole batch. With jitter 0 it is the wrapped conv, bit for bit.
    """

    def __init__(self, conv: nn.Conv2d, jitter: int = 1, generator: torch.Generator | None = None):
        super().__init__()
        self.conv, self.jitter, self.generator = conv, jitter, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        j = self.jitter
        if j == 0:
            return self.conv(x)
        u, v = torch.randint(0, 2 * j + 1, (2,), generator=self.generator).tolist()
        h, w = x.shape[-2:]
        padded = F.pad(x, (j, j, j, j), mode="reflect")
        return self.conv(padded[:, :, v:v + h, u:u + w])


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None]


def check_synthesizable(model: nn.Module, shape: tuple[int, ...]) -> None:
    if len(shape) != 3:
        raise UserError(f"Genie-D synthesizes images: the model's input must be C x H x W, got {tuple(shape)}")
    if not bn_layers(model):
        raise UserError("this model has no BatchNorm2d layer with running statistics, and Genie-D synthesizes "
                        "data from them (a quantized or BN-folded model has none: use the float model); "
                        "quantize with real calibration data instead (compress quantize --calib DATA.npz, or --calib noise)")


def distillation_copy(model: nn.Module, jitter: int, generator: torch.Generator | None = None) -> nn.Module:
    """A frozen eval-mode copy whose strided convs swing (the caller's model is never touched)."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # only the generator and the latents learn: no weight gradients to compute
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1):
            _set_module(model, name, SwingConv2d(m, jitter, generator))
    return model


class BNStatsLoss:
    """Records every BatchNorm2d input on the forward pass; `__call__` is the Genie-D loss of that pass."""

    def __init__(self, model: nn.Module, input_stats: bool = True):
        self.input_stats = input_stats
        self.targets, self.inputs, self.handles = [], [], []
        for _, bn in bn_layers(model):
            self.targets.append((bn.running_mean.detach().clone(), torch.sqrt(bn.running_var.detach() + BN_EPS)))
            self.handles.append(bn.register_forward_pre_hook(self._hook(len(self.inputs))))
            self.inputs.append(None)

    def _hook(self, i: int):
        def hook(_module, args):
            self.inputs[i] = args[0]
        return hook

    @staticmethod
    def l2(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return (target - value).pow(2).sum() / value.shape[0]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, BN-statistics part, input-statistics part)."""
        bn = x.new_zeros(())
        for (mu, sigma), a in zip(self.targets, self.inputs):
            std, mean = torch.std_mean(a, dim=[0, 2, 3])
            bn = bn + self.l2(mu, mean) + self.l2(sigma, std)
        inp = x.new_zeros(())
        if self.input_stats:
            std, mean = torch.std_mean(x, dim=[2, 3])  # per image, per channel: B x C
            inp = self.l2(torch.zeros_like(mean[:1]), mean) + self.l2(torch.ones_like(std[:1]), std)
        return bn + inp, bn, inp

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def synthesize(model: nn.Module, shape: tuple[int, ...], cfg: SynthesisConfig) -> tuple[torch.Tensor, dict]:
    """`cfg.samples` images (normalized space, float32 N x C x H x W) and a summary of the run."""
    from compress.torch_device import resolve

    cfg.validate()
    check_synthesizable(model, shape)
    device = torch.device(resolve(cfg.device))
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        shift_rng = torch.Generator().manual_seed(cfg.seed + 1)  # CPU: the swing shifts are drawn per forward
        net = distillation_copy(model, cfg.jitter, shift_rng).to(device)
        loss_fn = BNStatsLoss(net, cfg.input_stats)
        images, batches = [], []
        n_batches = math.ceil(cfg.samples / cfg.batch)
        try:
            for b in range(n_batches):
                size = min(cfg.batch, cfg.samples - b * cfg.batch)
                x, stats = _synthesize_batch(net, loss_fn, tuple(shape), size, cfg, device,
                                             f"Genie-D batch {b + 1}/{n_batches}")
                images.append(x.cpu())
                batches.append(stats)
        finally:
            loss_fn.remove()
    x = torch.cat(images)
    summary = {"images": int(len(x)), "config": {**asdict(cfg), "device": str(device)}, "batches": batches,
               "bn_layers": len(loss_fn.targets), "seconds": round(time.perf_counter() - start, 2)}
    return x, summary


def _synthesize_batch(net: nn.Module, loss_fn: BNStatsLoss, shape: tuple[int, int, int], size: int,
                      cfg: SynthesisConfig, device: torch.device, what: str) -> tuple[torch.Tensor, dict]:
    if size < 2:
        raise UserError("Genie-D needs at least 2 images per batch (batch statistics)")
    # G and z are drawn on the CPU and then moved, so a seed gives the same start on every device
    gen = Generator(shape, cfg.latent_dim, cfg.gen_c1, cfg.gen_c2).train().to(device)
    z = torch.randn(size, cfg.latent_dim).to(device).requires_grad_()
    opt_z = torch.optim.Adam([z], lr=cfg.lr_latent)
    sched_z = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, patience=100, min_lr=1e-4)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_generator)
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=0.95)
    first = last = None
    x = None
    for it in track(range(cfg.iters), what, total=cfg.iters):
        opt_z.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        x = gen(z)
        net(x)
        loss, bn, inp = loss_fn(x)
        loss.backward()
        opt_z.step()
        opt_g.step()
        value = float(loss.detach())
        sched_z.step(value)
        if (it + 1) % 100 == 0:
            sched_g.step()
        if first is None:
            first = {"loss": value, "bn": float(bn.detach()), "input": float(inp.detach())}
        last = {"loss": value, "bn": float(bn.detach()), "input": float(inp.detach())}
    return x.detach().clone(), {"images": size, "first": first, "last": last}


# --- files and datasets ---------------------------------------------------------------------------------------
def to_uint8(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, float]:
    """Normalized N x C x H x W -> uint8 N x H x W x C (de-normalized, clipped); also the clipped fraction."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (x.float() * s + m) * 255.0
    clipped = float(((pixels < 0) | (pixels > 255)).float().mean())
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy(), clipped


def save_npz(path: str | Path, x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], source: str) -> dict:
    """Write `x` (uint8 NHWC) and `x_normalized` (float32 NCHW, the lossless copy) plus provenance."""
    from compress.fileio import atomic_path

    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"synthetic data is written as .npz, got {path.name}")
    images, clipped = to_uint8(x, mean, std)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=images, **{FLOAT_KEY: x.detach().float().numpy()}, mean=np.asarray(mean, np.float32),
                     std=np.asarray(std, np.float32), source=np.asarray(source))
    return {"path": str(path), "images": int(len(images)), "uint8_clipped_fraction": round(clipped, 5)}


def synthetic_dataset(x: torch.Tensor, source: str) -> Dataset:
    return Dataset(x.detach().float().numpy(), None, source, prenormalized=True)


def noise_dataset(n: int, shape: tuple[int, ...], seed: int = 0) -> Dataset:
    """Gaussian N(0, 1) images in normalized space (the ablation's calibration source)."""
    ds = load_dataset(f"random:{n}", tuple(shape), seed)
    return Dataset(ds.images, None, f"noise:{n}", prenormalized=True)


def load_calib(spec: str, shape: tuple[int, ...], seed: int = 0) -> Dataset:
    """A calibration data spec; an .npz written by `save_npz` is read from its lossless float copy.

    (compress.data reads the uint8 `x` of such a file; reading `x_normalized` there too is a one-line change.)
    """
    kind, sep, rest = spec.partition(":")
    path = Path(rest if sep and kind in ("cifar10", "npz") else spec)
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if FLOAT_KEY in z.files:
                    x = z[FLOAT_KEY].astype(np.float32)
                    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
                        raise UserError(f"{path}: {FLOAT_KEY} has shape {x.shape}, the model reads N x {tuple(shape)}")
                    return Dataset(x, None, str(path), prenormalized=True)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise UserError(f"{path}: not a readable .npz file ({e})") from None
    return load_dataset(spec, tuple(shape), seed)
