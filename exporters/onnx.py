"""torch module -> ONNX: FP32, FP16, or QDQ (QuantizeLinear/DequantizeLinear) for quantized models.

Quantized models export as QDQ with int8/uint8 integers. Models quantized to 4 bits or fewer store their
narrow grids as ONNX int4/uint4 (opset 21, `exporters.qdq.pack_int4`) when ONNX Runtime can run that graph
(same values, weights packed two per byte); when it cannot (ORT's QDQ fusion rejects uint4 activations in
front of a conv), or with `--precision int8`, they keep int8 containers. Either way the artifact's notes say
what ORT's CPU provider executes as integer kernels and what it computes in float on dequantized values
(simulated quantization): stock runtimes have no 4-bit conv kernels.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from compress.errors import UserError, first_line
from compress.exportable import exportable
from compress.fileio import atomic_path, is_disk_full
from compress.io import InputSpec
from exporters.base import Artifact, check_parity, parity_inputs

OPSET = 17
OUTPUT_NAME = "logits"


def model_precision(model: nn.Module) -> str:
    """'fp32', or 'int8'/'int4'/'int2' after the narrowest weight grid of the model's fake-quant modules."""
    from compress.quantize.fakequant import weight_bits

    bits = weight_bits(model)
    return f"int{min(bits)}" if bits else "fp32"


NARROW = ("int4", "int2")  # grids that fit ONNX int4/uint4


def resolve_precision(model: nn.Module, precision: str) -> tuple[str, str]:
    """(the model's own precision, the one asked for with auto resolved); a UserError when the two do not fit."""
    native = model_precision(model)
    precision = native if precision == "auto" else precision
    if precision.startswith("int") and native == "fp32":
        raise UserError(f"--precision {precision} needs a quantized model: run `compress quantize` first")
    if native != "fp32" and not precision.startswith("int"):
        raise UserError(f"this model is quantized ({native}); export it with --precision {native} (or auto)")
    if precision in NARROW and native not in NARROW:
        raise UserError(f"--precision {precision} needs a model quantized to 4 bits or fewer; this one is {native} "
                        f"(quantize with e.g. --bits w4a8)")
    if precision == "int2" and native != "int2":
        raise UserError(f"--precision int2 needs a 2-bit model; this one is {native}")
    return native, precision


def export_onnx(model: nn.Module, spec: InputSpec, out: Path, precision: str = "auto",
                parity_images: torch.Tensor | None = None, check: bool = True, opset: int = OPSET,
                int4: bool | None = None) -> Artifact:
    """Export and (with `check`) parity-check against torch in ONNX Runtime.

    `int4`: store a 4/2-bit model's narrow grids as ONNX int4/uint4 (opset 21). None (auto): yes for the final
    artifact (`check`) of a model quantized to 4 bits or fewer, unless `precision` is "int8" or ONNX Runtime
    rejects the int4 graph (then int8 containers, and a note says why); intermediates for other formats
    (`check=False`: OpenVINO, ORT format, TensorRT) keep the int8 containers every converter reads. True:
    int4 or a UserError saying why not.
    """
    out = Path(out)
    native, precision = resolve_precision(model, precision)
    if int4 and native not in NARROW:
        raise UserError(f"int4 storage needs a model quantized to 4 bits or fewer; this one is {native}")
    want_int4 = bool(int4) if int4 is not None else (check and native in NARROW and precision != "int8")
    tolerance = native if native in NARROW else precision  # the values are the narrow grid in either container
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
        record_input(proto, spec)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        if want_int4:
            notes += _store_int4(proto, tmp, explicit=int4 is True)
        art = Artifact(str(out), "onnx", precision, _input_dict(spec), [OUTPUT_NAME], notes=notes)
        if native != "fp32" and check:
            art.notes.append(_execution_note(tmp))
        if check:
            from runtimes import open_session

            session = open_session(tmp, "onnxruntime")
            art.parity = check_parity(model, session.run, parity_inputs(spec, parity_images), tolerance, f"ONNX {out.name}")
    return art.finalize()


def _store_int4(proto: onnx.ModelProto, path: Path, explicit: bool) -> list[str]:
    """Rewrite `path` (holding `proto`, int8 containers) with int4/uint4 grids if ONNX Runtime runs that graph."""
    from exporters.qdq import ort_rejects, pack_int4

    packed, counts = pack_int4(proto)
    if not counts["int4_weight_tensors"] and not counts["uint4_activation_grids"]:
        return []
    int8_bytes = path.stat().st_size
    trial = path.with_name(path.name + ".int4")
    try:
        try:  # an op the opset-21 rewrite does not know yet: fall back to int8 containers, not a crash
            onnx.checker.check_model(packed)
            reason = None
        except onnx.checker.ValidationError as e:
            reason = f"the opset-21 graph fails ONNX's checker: {first_line(e, 120)}"
        if reason is None:
            onnx.save(packed, str(trial))
            reason = ort_rejects(trial)
        if reason is not None:
            if explicit:
                raise UserError(f"ONNX Runtime cannot run the int4 (opset 21) graph of this model ({reason[:160]}); "
                                f"export with --precision int8 to keep int8 containers")
            return [f"int8 containers for the 4/2-bit grids: ONNX Runtime rejects the int4/uint4 (opset 21) graph "
                    f"at its default optimizations ({reason[:160]})"]
        trial.replace(path)
    finally:
        trial.unlink(missing_ok=True)
    return [f"4/2-bit grids stored as ONNX int4/uint4 (opset {packed.opset_import[0].version}): "
            f"{counts['int4_weight_tensors']} int4 weight tensors (two per byte), {counts['uint4_activation_grids']} "
            f"uint4 activation grids; {int8_bytes} -> {path.stat().st_size} bytes vs int8 containers "
            f"(--precision int8 keeps int8 containers)"]


def _execution_note(path: Path) -> str:
    """What ONNX Runtime's CPU provider executes: integer kernels, or float on dequantized values (simulated)."""
    from exporters.qdq import integer_kernel_report, ort_rejects

    if ort_rejects(path) is not None:
        return "ONNX Runtime CPU: does not load this graph at its default optimizations"
    rep = integer_kernel_report(path)
    convs = rep["convs"]
    if rep["all_convs_integer"] or not convs["float"]:
        return f"ONNX Runtime CPU executes integer kernels: {rep['summary']}"
    return (f"ONNX Runtime CPU: simulated quantization for {convs['float']} of {convs['integer'] + convs['float']} "
            f"convs (float compute on dequantized values, no faster than FP32): {rep['summary']}")


def _torch_to_onnx(model: nn.Module, spec: InputSpec, path: Path, opset: int) -> None:
    x = spec.example(batch=spec.batch or 1)
    # a fixed batch (edge apps run one shape) lets runtimes plan for it: OpenVINO's CPU plugin is 10-20% faster
    dynamic = None if spec.batch else {spec.name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # the TorchScript-based exporter: fast, and it lowers fake-quant ops to Q/DQ pairs
            torch.onnx.export(exportable(model).eval(), (x,), str(path), dynamo=False, opset_version=opset,
                              input_names=[spec.name], output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic)
    except Exception as e:  # noqa: BLE001 - exporter failures come in many types; report the first line
        if is_disk_full(e):
            raise  # the CLI's own one-line answer to a full disk
        raise UserError(f"ONNX export failed: {type(e).__name__}: {first_line(e, 200)}") from None


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


def record_input(proto: onnx.ModelProto, spec: InputSpec) -> None:
    """Write the input spec (normalization included) into the model's metadata: `compress eval` / `profile
    --accuracy-data` and apps read it from the artifact itself (ORT: session.get_modelmeta().custom_metadata_map)."""
    import json

    from runtimes.base import INPUT_METADATA_KEY

    props = {p.key: p.value for p in proto.metadata_props}
    props[INPUT_METADATA_KEY] = json.dumps(_input_dict(spec))
    onnx.helper.set_model_props(proto, props)


def _input_dict(spec: InputSpec) -> dict:
    return {"name": spec.name, "shape": [spec.batch, *spec.shape], "mean": list(spec.mean), "std": list(spec.std)}
