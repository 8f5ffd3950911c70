"""torch module -> ONNX: FP32, FP16, or QDQ (QuantizeLinear/DequantizeLinear) for quantized models."""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from compress.errors import UserError
from compress.fileio import atomic_path
from compress.io import InputSpec
from exporters.base import Artifact, check_parity, parity_inputs

OPSET = 17
OUTPUT_NAME = "logits"


def model_precision(model: nn.Module) -> str:
    """'fp32', or 'int8'/'int4'/'int2' after the narrowest weight grid of the model's fake-quant modules."""
    from compress.quantize.fakequant import weight_bits

    bits = weight_bits(model)
    return f"int{min(bits)}" if bits else "fp32"


def export_onnx(model: nn.Module, spec: InputSpec, out: Path, precision: str = "auto",
                parity_images: torch.Tensor | None = None, check: bool = True, opset: int = OPSET) -> Artifact:
    out = Path(out)
    native = model_precision(model)
    precision = native if precision == "auto" else precision
    if precision.startswith("int") and native == "fp32":
        raise UserError(f"--precision {precision} needs a quantized model: run `compress quantize` first")
    if native != "fp32" and not precision.startswith("int"):
        raise UserError(f"this model is quantized ({native}); export it with --precision {native} (or auto)")
    model = model.eval()
    with atomic_path(out) as tmp:
        _torch_to_onnx(model, spec, tmp, opset)
        proto = onnx.load(str(tmp))
        notes: list[str] = []
        if native != "fp32":
            from exporters.qdq import fold_weight_quantizers

            proto = fold_weight_quantizers(proto)
        if precision == "fp16":
            proto = _to_fp16(proto)
            notes.append("FP16 weights; inputs and outputs stay FP32; FP16 compute only where the runtime has FP16 kernels")
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        art = Artifact(str(out), "onnx", precision, _input_dict(spec), [OUTPUT_NAME], notes=notes)
        if check:
            from runtimes import open_session

            session = open_session(tmp, "onnxruntime")
            art.parity = check_parity(model, session.run, parity_inputs(spec, parity_images), precision, f"ONNX {out.name}")
    return art.finalize()


def _torch_to_onnx(model: nn.Module, spec: InputSpec, path: Path, opset: int) -> None:
    x = spec.example(batch=1)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # the TorchScript-based exporter: fast, and it lowers fake-quant ops to Q/DQ pairs
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                              input_names=[spec.name], output_names=[OUTPUT_NAME],
                              dynamic_axes={spec.name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as e:  # noqa: BLE001 - exporter failures come in many types; report the first line
        raise UserError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def _to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    return _topological_sort(proto)  # the converter appends its input Casts after their consumers


def _topological_sort(proto: onnx.ModelProto) -> onnx.ModelProto:
    graph = proto.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        progressed = False
        for node in list(pending):
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
                pending.remove(node)
                progressed = True
        if not progressed:
            raise UserError("FP16 conversion produced a graph with a cycle or a missing input")
    del graph.node[:]
    graph.node.extend(ordered)
    return proto


def _input_dict(spec: InputSpec) -> dict:
    return {"name": spec.name, "shape": [None, *spec.shape], "mean": list(spec.mean), "std": list(spec.std)}
