"""The runtime interface: an artifact file -> a Session that runs numpy arrays.

Import-light on purpose: devices/agent.py imports this package on boards that have only numpy and one runtime,
so nothing under runtimes/ imports torch or a runtime package at module level (each runtime module imports its
package inside `open`, through `require`, which turns a missing package into a one-line install hint).
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Union

import numpy as np

from compress.errors import UserError, first_line

Dim = Union[int, str, None]  # str or None: a dynamic dimension (str: its symbolic name in the artifact)

# artifact suffix -> runtime name; the runtime named here may not be registered yet (tensorrt comes later)
ARTIFACT_RUNTIMES = {
    ".onnx": "onnxruntime", ".ort": "onnxruntime",
    ".xml": "openvino",
    ".pt2": "torch", ".ts": "torch", ".pt": "torch", ".torchscript": "torch",
    ".engine": "tensorrt", ".plan": "tensorrt",
}


# the key under which `compress export` records the input spec (name, shape, mean, std) in the artifact itself:
# ONNX metadata_props, OpenVINO rt_info (["compress", "input"]); a JSON string
INPUT_METADATA_KEY = "compress.input"


def require(package: str, hint: str) -> ModuleType:
    """Import a runtime package, or fail with the one line that says how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise UserError(f"the {package} runtime is not available ({first_line(e, 80)}): {hint}") from None


@contextmanager
def native_stderr_dropped():
    """Drop what native code writes to fd 2 inside the block: OpenVINO's frontends probe a file they cannot read
    with TensorFlow's parser, which logs `E0000 ... text_format.cc` lines before our one-line error."""
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def default_runtime_for(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    try:
        return ARTIFACT_RUNTIMES[suffix]
    except KeyError:
        raise UserError(f"{path}: cannot tell the runtime from the suffix {suffix!r} "
                        f"(known: {', '.join(sorted(ARTIFACT_RUNTIMES))}); name one with --runtime") from None


def check_artifact(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"artifact not found: {path}")
    if not path.is_file():
        raise UserError(f"{path} is a folder; give the artifact file (.onnx, .xml, .pt2, ...)")
    return path


def artifact_files(path: str | Path) -> list[Path]:
    """The files a runtime reads for this artifact: its size and hash must cover the weights too."""
    path = Path(path)
    companions = {".xml": [path.with_suffix(".bin")], ".onnx": [Path(f"{path}.data"), path.with_suffix(".onnx_data")]}
    return [path] + [p for p in companions.get(path.suffix.lower(), []) if p.is_file()]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[Dim, ...] | None  # None: rank unknown (TorchScript keeps no input shapes)
    dtype: str = "float32"

    def concrete(self, batch: int = 1, sample_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The shape of `batch` samples: `sample_shape` (no batch dim) wins, else the artifact's, dynamic batch filled in."""
        if sample_shape is not None:
            return (batch, *sample_shape)
        if self.shape is None:
            raise UserError(f"input {self.name!r}: the artifact does not record its shape; give one with --input-shape C,H,W")
        head, rest = self.shape[0] if self.shape else None, self.shape[1:]
        if isinstance(head, int) and head != batch:
            raise UserError(f"input {self.name!r} has a fixed batch of {head}: use --batch {head}, or export with a dynamic "
                            f"batch for --batch {batch}")
        if any(not isinstance(d, int) for d in rest):
            raise UserError(f"input {self.name!r} has dynamic dimensions {list(self.shape)}; give one with --input-shape C,H,W")
        return (batch, *rest)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}


@dataclass(eq=False)  # sessions hold native handles: identity, not field equality
class Session(ABC):
    """An opened artifact. `run` feeds one input (any batch the artifact allows) and returns the first output."""

    path: Path
    threads: int | None            # as requested; None = the runtime's default
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    runtime: str = ""
    version: str = ""
    options: dict = field(default_factory=dict)  # the settings the session was opened with, for the profile
    metadata: dict = field(default_factory=dict)  # string key/values the artifact carries (INPUT_METADATA_KEY, ...)

    @abstractmethod
    def _run(self, x: np.ndarray) -> np.ndarray: ...

    def run(self, x: np.ndarray) -> np.ndarray:
        if len(self.inputs) != 1:
            raise UserError(f"{self.path.name} has {len(self.inputs)} inputs; Session.run feeds exactly one")
        # the artifact's input dtype: an FP16-IO model takes the float32 arrays every caller has
        x = np.ascontiguousarray(x, dtype=self.inputs[0].dtype)
        fixed = self.fixed_batch
        if fixed is not None and x.ndim and len(x) != fixed:
            return self._run_in_fixed_batches(x, fixed)
        try:
            return np.asarray(self._run(x))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - runtimes raise their own types; one line says what broke
            raise UserError(f"{self.runtime} could not run {self.path.name} on an input of shape {list(x.shape)} "
                            f"(expects {self.inputs[0].shape}): {first_line(e)}") from None

    @property
    def fixed_batch(self) -> int | None:
        """The batch size baked into the artifact (`compress export --batch N`), None when it is dynamic."""
        shape = self.inputs[0].shape if self.inputs else None
        return shape[0] if shape and isinstance(shape[0], int) else None

    def _run_in_fixed_batches(self, x: np.ndarray, fixed: int) -> np.ndarray:
        """Accuracy and parity feed any number of samples: chunks of the fixed batch, the last one zero-padded."""
        outs = []
        for i in range(0, len(x), fixed):
            chunk = x[i:i + fixed]
            n = len(chunk)
            if n < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self.run(chunk)[:n])
        return np.concatenate(outs)

    def example_input(self, batch: int = 1, seed: int = 0, sample_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Seeded standard-normal input: the same bytes on every machine for the same seed."""
        shape = self.inputs[0].concrete(batch, sample_shape)
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32).astype(self.inputs[0].dtype)

    def close(self) -> None:
        """Release the runtime's handles (subclasses drop theirs; the default keeps nothing)."""

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Runtime:
    """A registry entry: the runtimes.* module implementing it is imported on first use, its package on open."""

    name: str
    module: str
    package: str
    install: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def import_package(self) -> ModuleType:
        return require(self.package, self.install)

    def open(self, path: str | Path, threads: int | None = None) -> Session:
        if threads is not None and threads < 1:
            raise UserError(f"threads must be at least 1 (got {threads})")
        return self.load().open(check_artifact(path), threads)
