"""Exporters: torch module -> artifact file(s), each checked for parity against torch before it is kept.

Registry entries are callables `(model, spec, out_path, precision, parity_images, check) -> Artifact`.
"""
from __future__ import annotations

from pathlib import Path

from compress.registry import Registry
from exporters.base import Artifact
from exporters.onnx import export_onnx
from exporters.openvino import export_openvino
from exporters.ort import export_ort
from exporters.tensorrt import export_tensorrt

EXPORTERS: Registry = Registry("export format")
EXPORTERS.add("onnx", export_onnx)
EXPORTERS.add("openvino", export_openvino)
EXPORTERS.add("ort", export_ort)            # ONNX Runtime mobile format + ops config + model.json
EXPORTERS.add("tensorrt", export_tensorrt)  # needs tensorrt + an NVIDIA GPU; imported on use

SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "ort": ".ort", "tensorrt": ".engine"}
_OTHER = {".onnx", ".xml", ".bin", ".ort", ".engine", ".plan"}


def format_of(path: Path | None, default: str = "onnx") -> str:
    """The export format an output path's suffix names (.xml -> openvino, .plan -> tensorrt), else `default`."""
    suffix = path.suffix.lower() if path is not None else ""
    named = {v: k for k, v in SUFFIX.items()} | {".plan": "tensorrt", ".bin": "openvino"}
    return named.get(suffix, default)


def artifact_path(path: Path, fmt: str) -> Path:
    """The file an export to `fmt` writes for `path`: runtimes, eval and profile tell the format by its suffix, so
    a suffix-less name gets it appended, another format's suffix is replaced, and .plan stays for TensorRT."""
    suffix = SUFFIX.get(fmt, "." + fmt)
    if path.is_dir():  # left as given: the output check refuses a folder with its own message
        return path
    if path.suffix.lower() == suffix or (fmt == "tensorrt" and path.suffix.lower() == ".plan"):
        return path
    return path.with_suffix(suffix) if path.suffix.lower() in _OTHER else path.with_name(path.name + suffix)


__all__ = ["Artifact", "EXPORTERS", "SUFFIX", "artifact_path", "format_of"]
