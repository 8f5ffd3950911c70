"""torch module -> OpenVINO IR (.xml + .bin), through our ONNX export so QDQ models keep their quantization."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from compress.errors import UserError
from compress.fileio import disk_full_as_oserror, ensure_writable_dir
from compress.io import InputSpec
from exporters.base import Artifact, check_parity, parity_inputs
from exporters.onnx import export_onnx, resolve_precision
from runtimes.base import INPUT_METADATA_KEY


def export_openvino(model: nn.Module, spec: InputSpec, out: Path, precision: str = "auto",
                    parity_images: torch.Tensor | None = None, check: bool = True) -> Artifact:
    """`out` names the .xml; the .bin lands beside it. fp16 = OpenVINO's FP16 weight compression."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError("OpenVINO export needs the openvino package: pip install openvino") from None
    out = Path(out).with_suffix(".xml")
    resolve_precision(model, precision)  # fp16 here is OpenVINO's weight compression, checked like ONNX's fp16
    onnx_precision = "auto" if precision == "fp16" else precision
    with tempfile.TemporaryDirectory() as tmp_onnx:
        onnx_art = export_onnx(model, spec, Path(tmp_onnx) / "model.onnx", onnx_precision, parity_images, check=False)
        ov_model = ov.convert_model(onnx_art.path)
    # the IR keeps no ONNX metadata: the input spec goes into its rt_info (runtimes/openvino.py reads it back)
    ov_model.set_rt_info(json.dumps(onnx_art.input), INPUT_METADATA_KEY.split("."))
    final_precision = "fp16" if precision == "fp16" else onnx_art.precision
    notes = ["weights compressed to FP16; CPU plugin computes in its own inference precision"] if precision == "fp16" else []
    if final_precision.startswith("int"):
        notes.append("QDQ pairs lowered to OpenVINO FakeQuantize ops")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", suffix=".part", dir=ensure_writable_dir(out.parent)))
    try:
        with disk_full_as_oserror(out):
            ov.save_model(ov_model, str(tmp / out.name), compress_to_fp16=(precision == "fp16"))
        art = Artifact(str(out), "openvino", final_precision, onnx_art.input, onnx_art.output_names, notes=notes)
        if check:
            from runtimes import open_session

            session = open_session(tmp / out.name, "openvino")
            art.parity = check_parity(model, session.run, parity_inputs(spec, parity_images), final_precision,
                                      f"OpenVINO {out.name}")
        # moved out only once parity passed; the .bin first, so an .xml never points at a missing .bin
        (tmp / out.with_suffix(".bin").name).replace(out.with_suffix(".bin"))
        (tmp / out.name).replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    art.files = [str(out), str(out.with_suffix(".bin"))]
    return art.finalize()
