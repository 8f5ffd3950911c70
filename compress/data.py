"""Data sources: CIFAR-style .npz, a folder of images (one subfolder per class), or random tensors.

A source is named by a spec string, the same on the CLI and in recipes:
  cifar10:PATH.npz      (x uint8 NHWC, y int64; `y` may be absent for unlabeled use)
  folder:PATH           (class subfolders of images, resized to the model's input size)
  random[:N]            (N standard-normal inputs, no labels; for smoke runs only)
  PATH.npz | PATH/      (same as cifar10: / folder:)
Normalization defaults to the model's own (its zoo entry or saved input spec).
"""
from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from compress.errors import UserError, first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class Dataset:
    """Images as uint8 NHWC (or already-float NCHW for random data), optional labels, and a provenance string."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str
    prenormalized: bool = False  # random tensors are used as-is

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int | None, seed: int = 0, indices: np.ndarray | None = None) -> "Dataset":
        if indices is None:
            if n is None or n >= len(self):
                return self
            indices = np.random.default_rng(seed).permutation(len(self))[:n]
        labels = None if self.labels is None else self.labels[indices]
        return Dataset(self.images[indices], labels, f"{self.source}[{len(indices)}]", self.prenormalized)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.images.tobytes())
        if self.labels is not None:
            h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


def load_dataset(spec: str, input_shape: tuple[int, ...] = (3, 32, 32), seed: int = 0) -> Dataset:
    kind, where = _resolve(spec)
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((where, *input_shape), generator=g).numpy()
        return Dataset(x, None, f"random:{where}", prenormalized=True)
    if kind == "npz":
        return _fits(_load_npz(where), input_shape)
    return _load_folder(where, input_shape)


def check_source(spec: str) -> None:
    """The errors load_dataset would raise for a bad spec or a missing file or folder, without reading any images
    (recipes check their data before the first stage runs)."""
    kind, where = _resolve(spec)
    if kind != "random":
        _check_exists(kind, where)


def has_labels(spec: str) -> bool | None:
    """Whether a data spec carries labels, without reading its images (None: cannot tell, e.g. a missing file)."""
    try:
        kind, where = _resolve(spec)
    except UserError:
        return None
    if kind == "random":
        return False
    if kind == "folder":
        return True
    try:
        with np.load(where, allow_pickle=False) as z:  # reads the archive's index only
            return "y" in z.files
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def _check_exists(kind: str, where: Path) -> None:
    """A data file (npz) or folder that is there and of the right kind; else what it is instead."""
    if not where.exists():
        raise UserError(f"data {'file' if kind == 'npz' else 'folder'} not found: {where}")
    if kind == "npz" and where.is_dir():
        raise UserError(f"data file {where} is a folder: cifar10: takes an .npz file, folder: a folder of class subfolders")
    if kind == "npz" and not where.is_file():
        raise UserError(f"data file {where} is not a regular file")
    if kind == "folder" and not where.is_dir():
        raise UserError(f"data folder {where} is a file: folder: takes a folder of class subfolders, cifar10: an .npz")


def _resolve(spec: str) -> tuple[str, Path | int]:
    """A data spec -> ("random", N) | ("npz", path) | ("folder", path); a UserError for a spec that names none."""
    kind, _, rest = spec.partition(":")
    if kind == "random":
        n = int(rest) if rest.isdigit() else -1 if rest else 64
        if n < 1:
            raise UserError(f"data {spec!r}: random:N takes a positive count of inputs, e.g. random:64")
        return "random", n
    if kind in ("cifar10", "npz", "folder") and not rest:
        raise UserError(f"data {spec!r} names no {'folder' if kind == 'folder' else 'file'}; give its path after the colon")
    if kind in ("cifar10", "npz"):
        return "npz", Path(rest)
    if kind == "folder":
        return "folder", Path(rest)
    path = Path(spec)
    if path.suffix == ".npz" and (rest == "" or path.exists()):
        return "npz", path
    if path.is_dir():
        return "folder", path
    if rest and not path.exists():
        raise UserError(f"data {spec!r}: unknown source {kind!r}; use cifar10:PATH.npz, folder:DIR or random[:N]")
    raise UserError(f"cannot read data {spec!r}: use cifar10:PATH.npz, folder:DIR or random[:N]")


def _fits(ds: Dataset, input_shape: tuple[int, ...]) -> Dataset:
    """.npz images are used as they are (a folder's are resized): their size must be the model's input size."""
    if len(input_shape) == 3:
        h, w, c = ds.images.shape[1:]
        if (c, h, w) != tuple(input_shape):
            raise UserError(f"{ds.source}: images are {h}x{w} with {c} channel(s), the model takes "
                            f"{input_shape[1]}x{input_shape[2]} with {input_shape[0]} (its input shape "
                            f"{','.join(map(str, input_shape))}; --input-shape sets it for custom models)")
    return ds


def _load_npz(path: Path) -> Dataset:
    _check_exists("npz", path)
    with open(path, "rb") as f:
        head = f.read(6)
    if not head.startswith((b"PK", b"\x93NUMPY")):  # numpy would call anything else a pickle it refuses to load
        raise UserError(f"{path}: not an .npz archive (numpy.savez writes one, with keys x and y)")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "x" not in keys:
                raise UserError(f"{path}: an image .npz needs key 'x' (uint8 NHWC) and optionally 'y'; found {sorted(keys)}")
            x = z["x"]
            y = z["y"] if "y" in keys else None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"{path}: 'x' must be N x H x W x C images, got shape {x.shape}")
    if x.dtype != np.uint8:  # float images in [0, 1] would be read as 0/255 pixel values: wrong, silently
        raise UserError(f"{path}: 'x' must be uint8 pixels (0-255), got {x.dtype}")
    if not len(x):
        raise UserError(f"{path}: holds no images")
    if y is not None and len(y) != len(x):
        raise UserError(f"{path}: 'y' has {len(y)} labels for {len(x)} images")
    if y is not None and not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{path}: 'y' must be class indices (integers >= 0), got {y.dtype} values")
    if y is not None and y.min() < 0:
        raise UserError(f"{path}: 'y' must be class indices (integers >= 0), got {y.dtype} from {y.min()} to {y.max()}")
    return Dataset(x, None if y is None else y.astype(np.int64), str(path))


def _load_folder(path: Path, input_shape: tuple[int, ...]) -> Dataset:
    from PIL import Image

    _check_exists("folder", path)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{path}: expected one subfolder of images per class")
    h, w = input_shape[1], input_shape[2]
    mode = {1: "L", 3: "RGB"}.get(input_shape[0])
    if mode is None:
        raise UserError(f"{path}: image folders feed 1- or 3-channel models; this one takes {input_shape[0]} channels")
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(f) as im:
                        pixels = np.asarray(im.convert(mode).resize((w, h), Image.BILINEAR))
                except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
                    raise UserError(f"{f}: not a readable image ({first_line(e)})") from None
                images.append(pixels[..., None] if pixels.ndim == 2 else pixels)
                labels.append(label)
    if not images:
        raise UserError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class subfolders")
    return Dataset(np.stack(images), np.asarray(labels, dtype=np.int64), str(path))


class Normalizer:
    """uint8 NHWC -> float NCHW in [0,1] -> (x - mean) / std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: np.ndarray, prenormalized: bool = False) -> torch.Tensor:
        if prenormalized:
            return torch.as_tensor(images, dtype=torch.float32)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std


def batches(ds: Dataset, norm: Normalizer, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
            augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield normalized (x, y) batches; `augment` applies the CIFAR flip + 4-pixel-pad random crop."""
    order = np.random.default_rng(seed).permutation(len(ds)) if shuffle else np.arange(len(ds))
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(ds), batch_size):
        idx = order[i:i + batch_size]
        x = norm(ds.images[idx], ds.prenormalized)
        if augment:
            x = _flip_crop(x, gen)
        y = None if ds.labels is None else torch.from_numpy(ds.labels[idx])
        yield x, y


def _flip_crop(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()  # one offset per batch: cheap on CPU
    return xp[:, :, dy:dy + h, dx:dx + w].contiguous()
