"""PyTorch on CPU, for .pt2 (torch.export) and TorchScript archives only.

Other .pt files (pickled modules, state dicts) are refused: unpickling runs code from the file, and a state dict
is not runnable without its architecture (load it with compress.io and export it first).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from compress.errors import UserError
from runtimes.base import Session, TensorInfo, first_line, require


class TorchSession(Session):
    def __init__(self, module, path: Path, threads: int | None, inputs: list[TensorInfo], options: dict, torch):
        super().__init__(path, threads, inputs, [TensorInfo("output", None)], "torch", torch.__version__, options)
        self._module, self._torch = module, torch

    def _run(self, x: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            out = self._module(self._torch.from_numpy(x))
        if isinstance(out, dict):
            out = next(iter(out.values()))
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().cpu().numpy()

    def close(self) -> None:
        self._module = None


def open(path: Path, threads: int | None) -> TorchSession:  # noqa: A001 - the runtime interface's name
    torch = require("torch", "pip install torch")
    if threads:
        torch.set_num_threads(threads)  # process-wide: a profiled session owns its process (devices/local.py)
    kind = _sniff(path)
    try:
        if kind == "export":
            program = torch.export.load(str(path))
            module, inputs = program.module(), _export_inputs(program)
        elif kind == "torchscript":
            module, inputs = torch.jit.load(str(path), map_location="cpu").eval(), [TensorInfo("input", None)]
        else:
            raise UserError(f"{path}: not a torch.export program (.pt2) or TorchScript archive, which is what the torch "
                            f"runtime runs; it does not unpickle other files: `compress eval` takes a state dict or saved model "
                            f"as it is, and an .onnx / .xml runs on --runtime onnxruntime / openvino")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged archive fails in many ways
        raise UserError(f"{path}: torch cannot load this {kind} archive ({first_line(e)})") from None
    options = {"format": kind, "num_threads": torch.get_num_threads()}
    return TorchSession(module, path, threads, inputs, options, torch)


def _sniff(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "unknown"
    if any(n.endswith("serialized_exported_program.json") or ("/models/" in n and n.endswith(".json")) for n in names):
        return "export"
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    return "unknown"


def _export_inputs(program) -> list[TensorInfo]:
    """User inputs of an exported program, with symbolic dims (e.g. a dynamic batch) as their names."""
    from torch.export.graph_signature import InputKind

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    infos = []
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        val = placeholders[spec.arg.name].meta.get("val")
        shape = None if val is None else tuple(d if isinstance(d, int) else str(d) for d in val.shape)
        dtype = "float32" if val is None else str(val.dtype).removeprefix("torch.")
        infos.append(TensorInfo(spec.arg.name, shape, dtype))
    return infos
