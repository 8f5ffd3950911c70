"""ONNX Runtime on CPU (.onnx, and .ort mobile-format files): one request at a time, all graph optimizations."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.errors import UserError
from runtimes.base import Session, TensorInfo, first_line, require

_ONNX_TO_NUMPY = {"float": "float32", "double": "float64"}  # the other ONNX type names are numpy's already


class OrtSession(Session):
    def __init__(self, sess, path: Path, threads: int | None, options: dict, version: str):
        super().__init__(path, threads, _infos(sess.get_inputs()), _infos(sess.get_outputs()),
                         "onnxruntime", version, options)
        self._sess = sess
        self.metadata = dict(sess.get_modelmeta().custom_metadata_map)
        self._feed, self._fetch = self.inputs[0].name, [self.outputs[0].name]

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._sess.run(self._fetch, {self._feed: x})[0]

    def close(self) -> None:
        self._sess = None


def open(path: Path, threads: int | None) -> OrtSession:  # noqa: A001 - the runtime interface's name
    ort = require("onnxruntime", "pip install onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0           # 0: ORT's default, one thread per physical core
    so.inter_op_num_threads = 1                      # sequential execution never uses the inter-op pool
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3                        # errors only: optimizer notes would land in every table
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for bad files
        raise UserError(f"{path}: onnxruntime cannot load it ({first_line(e)})") from None
    options = {"provider": "CPUExecutionProvider", "intra_op_threads": threads or 0, "inter_op_threads": 1,
               "execution_mode": "sequential", "graph_optimization": "all"}
    return OrtSession(sess, path, threads, options, ort.__version__)


def _infos(args) -> list[TensorInfo]:
    out = []
    for a in args:
        onnx_type = a.type.removeprefix("tensor(").removesuffix(")")
        out.append(TensorInfo(a.name, tuple(a.shape), _ONNX_TO_NUMPY.get(onnx_type, onnx_type)))
    return out
