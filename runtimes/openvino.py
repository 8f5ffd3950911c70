"""OpenVINO on CPU (.xml IR, or any model file OpenVINO reads): latency hint, one stream, FP32 compute."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.errors import UserError
from runtimes.base import INPUT_METADATA_KEY, Session, TensorInfo, first_line, native_stderr_dropped, require


class OpenVINOSession(Session):
    def __init__(self, compiled, path: Path, threads: int | None, options: dict, version: str, metadata: dict):
        super().__init__(path, threads, _infos(compiled.inputs), _infos(compiled.outputs), "openvino", version, options,
                         metadata)
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._out = compiled.output(0)

    def _run(self, x: np.ndarray) -> np.ndarray:
        # bind the input without a copy and call the bare infer(): the infer([x]) convenience wrapper costs ~6%
        # at ResNet-20 size (measured against benchmark_app); the output is copied, the caller may keep it
        import openvino as ov

        self._request.set_input_tensor(ov.Tensor(np.ascontiguousarray(x), shared_memory=True))
        self._request.infer()
        return self._request.get_output_tensor(0).data.copy()

    def close(self) -> None:
        self._request = self._compiled = None


def open(path: Path, threads: int | None) -> OpenVINOSession:  # noqa: A001 - the runtime interface's name
    ov = require("openvino", "pip install openvino")
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        # the CPU plugin defaults to bf16 on CPUs with AVX512-BF16/AMX: the artifact's FP32 would not be what runs
        "INFERENCE_PRECISION_HINT": "f32",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    core = ov.Core()
    try:
        with native_stderr_dropped():  # the frontends that fail to read it first would print to the terminal
            model = core.read_model(str(path))
        metadata = _metadata(model, path)
        compiled = core.compile_model(model, "CPU", config)
    except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError with multi-line C++ traces
        raise UserError(f"{path}: OpenVINO cannot load it ({first_line(e)})") from None
    options = {"device": "CPU", "performance_hint": "latency", "num_streams": 1, "inference_precision": "f32",
               "inference_num_threads": int(compiled.get_property("INFERENCE_NUM_THREADS"))}
    return OpenVINOSession(compiled, path, threads, options, ov.__version__, metadata)


def _metadata(model, path: Path) -> dict:
    """INPUT_METADATA_KEY from the IR's rt_info, where `compress export` writes it (rt_info path compress/input);
    for an .onnx file from its metadata_props, which OpenVINO's ONNX reader does not carry over."""
    if Path(path).suffix.lower() == ".onnx":
        try:
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception:  # noqa: BLE001 - onnx not installed (a board), or a graph OpenVINO reads and onnx cannot
            return {}
        return {INPUT_METADATA_KEY: props[INPUT_METADATA_KEY]} if INPUT_METADATA_KEY in props else {}
    key = INPUT_METADATA_KEY.split(".")
    try:
        return {INPUT_METADATA_KEY: model.get_rt_info(key).astype(str)} if model.has_rt_info(key) else {}
    except Exception:  # noqa: BLE001 - an older OpenVINO on a board: the metadata is optional, running is not
        return {}


def _infos(ports) -> list[TensorInfo]:
    out = []
    for i, port in enumerate(ports):
        names = port.get_names()
        ps = port.get_partial_shape()
        shape = None if ps.rank.is_dynamic else tuple(d.get_length() if d.is_static else None for d in ps)
        out.append(TensorInfo(port.get_any_name() if names else f"#{i}", shape, port.get_element_type().to_dtype().name))
    return out
