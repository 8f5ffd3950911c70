"""torch module -> TensorRT engine (.engine), built from our ONNX export with the TensorRT Python API.

Written against TensorRT 10.x (the name-based tensor API); needs the tensorrt package and an NVIDIA GPU, both
imported/checked on use with a one-line install hint, before any file is written.

    network    OnnxParser on a network from Builder.create_network (explicit batch: the only mode in 10.x; the
               EXPLICIT_BATCH flag is passed only to TensorRT < 10, where it had to be)
    precision  fp32: no flag. fp16: BuilderFlag.FP16 on the FP32 ONNX. int8 (and int4/int2 grids, which live in
               int8 containers): the QDQ ONNX *is* the quantization (explicit quantization): no calibrator;
               BuilderFlag.INT8 is set so the Q/DQ layers are honoured. TensorRT runs symmetric INT8 only, so a
               QDQ graph with uint8 / nonzero zero-points is refused up front (explicit_int8_problems).
               TensorRT >= 11 removed the precision flags (strongly typed networks only): there the network is
               created STRONGLY_TYPED and fp16 comes from an FP16 ONNX (types in the graph decide).
    shapes     one optimization profile over the dynamic batch axis: min 1, opt 1 (edge latency), max 32
    cache      a timing cache file is loaded before and saved after every build (per TensorRT version and GPU),
               so rebuilding a variant skips most tactic timing
    output     the serialized engine is written atomically and kept only if it matches torch (parity check run
               with runtimes/tensorrt.py); <name>.engine.json beside it holds the input spec (normalization), which
               an engine cannot carry

An engine is specific to the GPU model and TensorRT version that built it: build on the target (or its twin).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from compress.errors import UserError
from compress.fileio import atomic_path
from compress.io import InputSpec
from exporters.base import Artifact, check_parity, parity_inputs
from exporters.onnx import export_onnx

INSTALL_HINT = "pip install tensorrt (from NVIDIA's index) on a machine with an NVIDIA GPU"
MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 1, 32
WORKSPACE_BYTES = 1 << 30


def import_tensorrt():
    """The tensorrt module, or a one-line UserError (exit 2) saying how to get it."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer / the CUDA driver is not
        reason = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise UserError(f"TensorRT export needs the tensorrt package ({reason}): {INSTALL_HINT}") from None
    return trt


def require_gpu() -> str:
    if not torch.cuda.is_available():
        raise UserError("TensorRT builds and runs engines on an NVIDIA GPU; torch sees no CUDA device here "
                        f"(a CUDA build of torch and a driver are needed): {INSTALL_HINT}")
    return torch.cuda.get_device_name(0)


def export_tensorrt(model: nn.Module, spec: InputSpec, out: Path, precision: str = "auto",
                    parity_images: torch.Tensor | None = None, check: bool = True, max_batch: int = MAX_BATCH,
                    timing_cache: Path | None = None, workspace_bytes: int = WORKSPACE_BYTES) -> Artifact:
    trt = import_tensorrt()  # first: a machine without TensorRT fails before any work or file
    gpu = require_gpu()
    out = Path(out).with_suffix(".engine")
    strongly_typed = not hasattr(trt.BuilderFlag, "FP16")
    # TensorRT 10: FP32 ONNX + the FP16 flag (TensorRT picks FP16 per layer); >= 11: an FP16 graph, strongly typed
    onnx_precision = "auto" if precision == "fp16" and not strongly_typed else precision
    cache = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__, gpu)
    with tempfile.TemporaryDirectory(prefix="compress-trt-") as d:
        onnx_art = export_onnx(model, spec, Path(d) / "model.onnx", onnx_precision, parity_images, check=False)
        final = "fp16" if precision == "fp16" else onnx_art.precision
        if final.startswith("int"):
            problems = explicit_int8_problems(onnx.load(onnx_art.path))
            if problems:
                raise UserError(f"TensorRT runs symmetric INT8 only (int8, zero-point 0); {len(problems)} quantizer(s) "
                                f"here are not, e.g. {problems[0]}: quantize activations symmetrically for TensorRT")
        plan = build_engine(trt, Path(onnx_art.path), final, spec, max_batch, cache, strongly_typed, workspace_bytes)
    notes = [f"built for {gpu} with TensorRT {trt.__version__}; engines do not move across GPU models or versions",
             f"dynamic batch {MIN_BATCH}..{max_batch} (optimized for {OPT_BATCH})"]
    if final.startswith("int"):
        notes.append("explicit quantization: the QDQ graph's scales, no calibrator")
    art = Artifact(str(out), "tensorrt", final, onnx_art.input, onnx_art.output_names, notes=notes)
    with atomic_path(out) as tmp:
        tmp.write_bytes(plan)
        if check:
            from runtimes import open_session

            with open_session(tmp, "tensorrt") as session:  # the .part suffix says nothing: name the runtime
                art.parity = check_parity(model, session.run, parity_inputs(spec, parity_images), final,
                                          f"TensorRT {out.name}")
    # an engine carries no metadata: the input spec (normalization) goes beside it, where eval/profile look
    sidecar = Path(f"{out}.json")
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps({"input": art.input}, indent=2) + "\n")
    art.files = [str(out), str(sidecar)]
    return art.finalize()


def build_engine(trt, onnx_path: Path, precision: str, spec: InputSpec, max_batch: int, cache_path: Path | None,
                 strongly_typed: bool, workspace_bytes: int = WORKSPACE_BYTES) -> bytes:
    """ONNX file -> serialized engine bytes (TensorRT 10 API; see the module docstring)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif _major(trt.__version__) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["no error recorded"]
        raise UserError(f"TensorRT cannot parse the ONNX model ({len(errors)} error(s)): {errors[0].splitlines()[0][:200]}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if not strongly_typed:
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision.startswith("int"):
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: honour Q/DQ layers; no int8_calibrator

    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = list(t.shape)
        if dims and dims[0] < 0:
            dynamic = True
            rest = [d if d > 0 else s for d, s in zip(dims[1:], spec.shape)]
            profile.set_shape(t.name, (MIN_BATCH, *rest), (OPT_BATCH, *rest), (max_batch, *rest))
    if dynamic:
        config.add_optimization_profile(profile)

    _load_timing_cache(config, cache_path)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT built no engine for {onnx_path.name} at {precision} (its log above says why)")
    _save_timing_cache(config, cache_path)
    return bytes(plan)


def _load_timing_cache(config, path: Path | None) -> None:
    if path is None:
        return
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # another GPU's or version's cache: start afresh
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(config, path: Path | None) -> None:
    if path is None:
        return
    cache = config.get_timing_cache()
    if cache is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(bytes(cache.serialize()))


def default_timing_cache(trt_version: str, gpu: str) -> Path:
    """$COMPRESS_TRT_TIMING_CACHE, else one cache per TensorRT version and GPU model under the user cache dir."""
    if os.environ.get("COMPRESS_TRT_TIMING_CACHE"):
        return Path(os.environ["COMPRESS_TRT_TIMING_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-compress" / "tensorrt"
    return base / f"timing-trt{trt_version}-{re.sub(r'[^A-Za-z0-9.]+', '_', gpu)}.cache"


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 10


# ---- explicit-quantization preflight (no TensorRT needed) -------------------------------------------------------

def explicit_int8_problems(model: onnx.ModelProto) -> list[str]:
    """Q/DQ nodes TensorRT would reject: TensorRT's INT8 is symmetric (int8 container, zero-point 0)."""
    consts = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    problems = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(n.input) < 3 or not n.input[2]:
            continue  # no zero-point: uint8 by the ONNX default for QuantizeLinear
        zp = consts.get(n.input[2])
        if zp is None:
            problems.append(f"{n.name or n.op_type}: zero-point computed at run time")
            continue
        if zp.data_type != onnx.TensorProto.INT8:
            problems.append(f"{n.name or n.op_type}: {onnx.TensorProto.DataType.Name(zp.data_type).lower()} zero-point")
        elif numpy_helper.to_array(zp).any():
            problems.append(f"{n.name or n.op_type}: nonzero zero-point")
    # a QuantizeLinear without a zero-point outputs uint8 (ONNX default): not TensorRT's int8
    problems += [f"{n.name or n.op_type}: no zero-point (uint8 by default)" for n in model.graph.node
                 if n.op_type == "QuantizeLinear" and (len(n.input) < 3 or not n.input[2])]
    return problems
