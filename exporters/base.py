"""What an exporter returns, and the parity check every export runs before its artifact is kept."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from compress.errors import GateFailed
from compress.fileio import path_size, sha256_file
from compress.io import InputSpec

# max |torch - runtime| relative to the logits' range, and the share of inputs whose top-1 must agree
# Sub-8-bit grids: graphs with identical integer values still differ by float rounding order between torch
# and a runtime (measured up to 2.9 logits, ~95% agreement with 4-bit activations), hence the wider bounds.
PRECISIONS = ("auto", "fp32", "fp16", "int8", "int4", "int2")  # what `compress export --precision` (and recipes) take
TOLERANCES = {"fp32": (1e-4, 1.0), "fp16": (2e-2, 0.97), "int8": (0.1, 0.95), "int4": (0.25, 0.9), "int2": (0.25, 0.9)}


@dataclass
class Artifact:
    path: str                      # the file a runtime opens (.onnx, .xml, .ort, .engine)
    format: str                    # onnx | openvino | ort | tensorrt
    precision: str                 # fp32 | fp16 | int8 | int4 | int2
    input: dict                    # name, shape (batch dim None = dynamic), mean, std
    output_names: list[str]
    files: list[str] = field(default_factory=list)  # every file that belongs to the artifact
    size_bytes: int = 0
    sha256: str = ""
    parity: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. "runs as integer kernels: 21 QLinearConv"

    def finalize(self) -> "Artifact":
        self.files = self.files or [self.path]
        self.size_bytes = sum(path_size(Path(f)) for f in self.files)
        self.sha256 = sha256_file(Path(self.path))
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def parity_inputs(spec: InputSpec, images: torch.Tensor | None, n: int = 256) -> torch.Tensor:
    """Real normalized images when the caller has them (top-1 agreement means something), else seeded noise.

    256 of them: an INT8 model legitimately flips ~1% of low-margin inputs, and 64 were too few to tell that
    from a broken artifact (4 flips in 64 read as 94% agreement where 846 images gave 99%)."""
    if images is not None and len(images):
        return images[:n].float()
    return spec.example(batch=n)


def check_parity(reference: nn.Module | Callable, run: Callable[[np.ndarray], np.ndarray], x: torch.Tensor,
                 precision: str, what: str) -> dict:
    """Run torch and the artifact on the same inputs; raise GateFailed past the precision's tolerance."""
    with torch.no_grad():
        ref = np.asarray(reference(x).detach().float().numpy() if isinstance(reference, nn.Module) else reference(x))
    got = np.concatenate([np.asarray(run(x[i:i + 8].numpy())) for i in range(0, len(x), 8)]).astype(np.float32)
    scale = float(np.abs(ref).max()) or 1.0
    max_abs = float(np.abs(ref - got).max())
    agree = float((ref.argmax(1) == got.argmax(1)).mean()) if ref.ndim == 2 else float("nan")
    result = {"n": int(len(x)), "max_abs_err": max_abs, "max_rel_err": max_abs / scale, "top1_agreement": agree}
    rel_tol, agree_tol = TOLERANCES.get(precision, (0.1, 0.95))
    if max_abs / scale > rel_tol or (ref.ndim == 2 and agree < agree_tol):
        raise GateFailed(f"{what}: parity check failed (max abs error {max_abs:.3g}, "
                         f"top-1 agreement {agree:.1%}; tolerance {rel_tol:g} relative, {agree_tol:.0%})")
    result["tolerance"] = {"max_rel_err": rel_tol, "top1_agreement": agree_tol}
    return result
