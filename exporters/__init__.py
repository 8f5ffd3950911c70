"""Exporters: torch module -> artifact file(s), each checked for parity against torch before it is kept.

Registry entries are callables `(model, spec, out_path, precision, parity_images, check) -> Artifact`.
"""
from __future__ import annotations

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

__all__ = ["Artifact", "EXPORTERS", "SUFFIX"]
