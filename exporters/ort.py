"""torch module -> ONNX Runtime mobile format (.ort) + required-operators config + model.json, for apps.

    model.ort                              what onnxruntime-android / -objc / -mobile loads (flatbuffer, pre-optimized)
    model.required_operators.config        ops the model uses: `build.py --include_ops_by_config` for a reduced ORT build
    model.json                             what an app reads: inputs, outputs, normalization, labels, precision, sha256

The companions are named after the artifact's stem (`-o assets/model.ort` gives exactly the three names above;
`resnet20.ort` gives `resnet20.required_operators.config` and `resnet20.json`), so several variants can share a
folder. Conversion is ONNX Runtime's own tool (onnxruntime.tools.convert_onnx_models_to_ort), "fixed" optimization
style at level "all" for an ARM target (what phones run; no x86-only NCHWc layout). The .ort is checked against
torch by loading it in this machine's ONNX Runtime, which reads .ort files directly. Nothing is kept unless every
file was written and parity passed.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from compress import __version__
from compress.errors import UserError
from compress.fileio import disk_full_as_oserror, ensure_writable_dir, is_disk_full, sha256_file
from compress.io import InputSpec
from exporters.base import Artifact, check_parity, parity_inputs
from exporters.onnx import export_onnx

MANIFEST_SCHEMA = "compress.ort-model/1"
# torchvision's order, the one the CIFAR-10 .npz labels (0..9) follow
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TARGET_PLATFORM = "arm"      # "arm": phones and most boards; "amd64" would bake x86-only layouts into the file
OPTIMIZATION = {"style": "fixed", "level": "all", "target_platform": TARGET_PLATFORM}
# measured: ResNet-20's fp16 .ort came out 1.16 MB against 1.12 MB for fp32, with Casts added
FP16_REFUSAL = ("--precision fp16 is not available for .ort: the converter optimizes for this machine's ONNX Runtime "
                "CPU provider, which has no FP16 kernels for these ops, so it stores FP32 weights plus Casts (a bigger "
                "file than fp32). Use fp32, or int8 after `compress quantize`")


def companion_paths(out: Path) -> dict[str, Path]:
    """The files an .ort export writes, by role."""
    out = Path(out).with_suffix(".ort")
    return {"ort": out, "config": out.with_suffix(".required_operators.config"), "manifest": out.with_suffix(".json")}


def export_ort(model: nn.Module, spec: InputSpec, out: Path, precision: str = "auto",
               parity_images: torch.Tensor | None = None, check: bool = True,
               labels: list[str] | None = None) -> Artifact:
    """`out` names the .ort; the ops config and the app manifest land beside it (see companion_paths)."""
    try:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
    except ImportError as e:
        raise UserError(f"ORT-format export needs onnxruntime's tools ({e}): pip install onnxruntime") from None
    if precision == "fp16":
        raise UserError(FP16_REFUSAL)
    paths = companion_paths(out)
    out = paths["ort"]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", suffix=".part", dir=ensure_writable_dir(out.parent)))
    try:
        # the ONNX keeps the artifact's stem, so ORT's tool names the config <stem>.required_operators.config
        with disk_full_as_oserror(out):  # named by the artifact, not the intermediate ONNX
            onnx_art = export_onnx(model, spec, tmp / "onnx" / f"{out.stem}.onnx", precision, parity_images, check=False)
        _convert(convert_onnx_models_to_ort, OptimizationStyle.Fixed, Path(onnx_art.path), tmp / "ort", out)
        made = {"ort": tmp / "ort" / out.name, "config": tmp / "ort" / paths["config"].name}
        for role, p in made.items():
            if not p.is_file():
                raise UserError(f"ORT-format conversion wrote no {role} file ({p.name})")
        _tidy_config(made["config"], out.name)

        from runtimes import open_session

        art = Artifact(str(out), "ort", onnx_art.precision, onnx_art.input, onnx_art.output_names,
                       notes=[*onnx_art.notes, f"ORT format, optimization {OPTIMIZATION['style']}/{OPTIMIZATION['level']} "
                              f"for {TARGET_PLATFORM}; load with an onnxruntime-mobile/-android of the converter's "
                              f"version or newer"])
        with open_session(made["ort"], "onnxruntime") as session:
            if check:
                art.parity = check_parity(model, session.run, parity_inputs(spec, parity_images), art.precision,
                                          f"ORT format {out.name}")
            manifest = build_manifest(session, spec, art, made["ort"], paths, labels if labels is not None
                                      else known_labels(model, session))
        made["manifest"] = tmp / paths["manifest"].name
        made["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
        # moved out only once everything exists and parity passed; the .ort last, so its presence means complete
        for role in ("config", "manifest", "ort"):
            made[role].replace(paths[role])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    art.files = [str(paths["ort"]), str(paths["config"]), str(paths["manifest"])]
    return art.finalize()


def _convert(convert, style, onnx_path: Path, out_dir: Path, artifact: Path) -> None:
    """Run ORT's converter quietly (it prints progress and logs at INFO); one line if it fails.
    `artifact`: the final .ort path, named if the disk fills up."""
    log = logging.getLogger("ort_format_model.utils")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), disk_full_as_oserror(artifact):
            convert(onnx_path, output_dir=out_dir, optimization_styles=[style], target_platform=TARGET_PLATFORM)
    except Exception as e:  # noqa: BLE001 - the converter raises whatever the ORT session raised
        if is_disk_full(e):
            raise  # the CLI's own one-line answer to a full disk
        line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UserError(f"ORT-format conversion failed: {line[:200]}") from None
    finally:
        log.setLevel(level)


def _tidy_config(path: Path, ort_name: str) -> None:
    """The tool's header names the temporary .ort it read; name the shipped file instead (byte-stable builds)."""
    lines = path.read_text().splitlines()
    ops = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    path.write_text("\n".join(["# Generated from model/s:", f"# - {ort_name}", *ops]) + "\n")


def required_operators(config: Path) -> dict[str, list[str]]:
    """`domain;opset;Op1,Op2` lines -> {"domain;opset": [ops]} (what a reduced build will include)."""
    out: dict[str, list[str]] = {}
    for line in Path(config).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            domain, opset, ops = line.split(";", 2)
            out[f"{domain};{opset}"] = [o.split("{")[0] for o in ops.split(",") if o]
    return out


def known_labels(model: nn.Module, session) -> list[str] | None:
    """CIFAR-10 class names for this toolchain's CIFAR zoo models (10 outputs); None when nothing says."""
    module = type(model).__module__
    out_shape = session.outputs[0].shape or ()
    if module.startswith("compress.zoo.") and "cifar" in module and out_shape and out_shape[-1] == 10:
        return list(CIFAR10_CLASSES)
    return None


def _dims(shape) -> list[int]:
    """-1 for a dynamic dimension, as ONNX Runtime's Java/Kotlin/ObjC APIs report it."""
    return [d if isinstance(d, int) and d >= 0 else -1 for d in (shape or [])]


def build_manifest(session, spec: InputSpec, art: Artifact, ort_file: Path, paths: dict[str, Path],
                   labels: list[str] | None) -> dict:
    import onnxruntime

    return {
        "schema": MANIFEST_SCHEMA,
        "model": paths["ort"].name,
        "format": "ort",
        "sha256": sha256_file(ort_file),
        "size_bytes": ort_file.stat().st_size,
        "precision": art.precision,
        "inputs": [{"name": t.name, "shape": _dims(t.shape), "dtype": t.dtype,
                    **({"layout": "NCHW"} if len(t.shape or ()) == 4 else {})} for t in session.inputs],
        "outputs": [{"name": t.name, "shape": _dims(t.shape), "dtype": t.dtype} for t in session.outputs],
        "normalization": {
            "mean": list(spec.mean), "std": list(spec.std), "scale": 1.0 / 255.0,
            "channel_order": "RGB" if spec.shape[:1] == (3,) else "GRAY" if spec.shape[:1] == (1,) else None,
            "formula": "x = (pixel * scale - mean[c]) / std[c], pixel in 0..255",
        },
        "labels": labels,
        "required_operators_config": paths["config"].name,
        "converter": {"onnxruntime": onnxruntime.__version__, "optimization": dict(OPTIMIZATION)},
        "created_by": {"tool": "edge-compress", "version": __version__},
        "parity": art.parity or None,
    }
