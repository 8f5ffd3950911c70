"""Exporters: torch module -> artifact file(s), each checked for parity against torch before it is kept.

Registry entries are callables `(model, spec, out_path, precision, parity_images, check) -> Artifact`.
"""
from __future__ import annotations

from compress.registry import Registry
from exporters.base import Artifact
from exporters.onnx import export_onnx
from exporters.openvino import export_openvino

EXPORTERS: Registry = Registry("export format")
EXPORTERS.add("onnx", export_onnx)
EXPORTERS.add("openvino", export_openvino)

SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}

__all__ = ["Artifact", "EXPORTERS", "SUFFIX"]
