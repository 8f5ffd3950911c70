"""Runtimes: an artifact file -> a Session. They do not know where they run (that is devices/).

    session = open_session("model.onnx", threads=1)    # runtime from the suffix, or name one
    logits = session.run(images)                         # any batch the artifact allows
"""
from __future__ import annotations

from pathlib import Path

from compress.registry import Registry
from runtimes.base import ARTIFACT_RUNTIMES, Runtime, Session, TensorInfo, artifact_files, default_runtime_for

RUNTIMES: Registry[Runtime] = Registry("runtime")
RUNTIMES.add("onnxruntime", Runtime("onnxruntime", "runtimes.onnxruntime", "onnxruntime", "pip install onnxruntime"))
RUNTIMES.add("openvino", Runtime("openvino", "runtimes.openvino", "openvino", "pip install openvino"))
RUNTIMES.add("torch", Runtime("torch", "runtimes.torch", "torch", "pip install torch"))
RUNTIMES.add("tensorrt", Runtime("tensorrt", "runtimes.tensorrt", "tensorrt",
                                  "pip install tensorrt (from NVIDIA's index) on a machine with an NVIDIA GPU"))


def open_session(path: str | Path, runtime: str | None = None, threads: int | None = None) -> Session:
    """Open `path` with `runtime` (default: by suffix). Only a named runtime reads a file whose suffix says nothing."""
    return RUNTIMES.get(runtime or default_runtime_for(path)).open(path, threads)


__all__ = ["ARTIFACT_RUNTIMES", "RUNTIMES", "Runtime", "Session", "TensorInfo", "artifact_files",
           "default_runtime_for", "open_session"]
