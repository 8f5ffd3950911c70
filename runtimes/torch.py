"""PyTorch on CPU, for .pt2 (torch.export) and TorchScript archives only.

Other .pt files (pickled modules, state dicts) are refused: unpickling runs code from the file, and a state dict
is not runnable without its architecture (load it with compress.io and export it first).
"""
from __future__ import annotations

import logging
import os
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
            program = load_export_program(path, torch)
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


def load_export_program(path: str | Path, torch):
    """torch.export.load without running code from the file.

    An archive's example inputs, pickled weights and constants go through torch.load, which falls back to full
    unpickling (weights_only=False) when the safe load fails: a crafted .pt2 runs code on load. Here every torch.load
    is forced to weights_only (TORCH_FORCE_WEIGHTS_ONLY_LOAD), and opaque or custom-class constants, which torch
    unpickles with pickle itself, are refused. torch's own tracebacks on a failed load are kept off the terminal;
    the error says why in one line."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a torch.export archive ({first_line(e)})") from None
    pickled = [n for n in names if "/data/constants/" in f"/{n}"
               and n.rsplit("/", 1)[-1].startswith(("custom_obj_", "opaque_obj_"))]
    if pickled:
        raise UserError(f"{path}: holds {len(pickled)} pickled object constant(s) ({pickled[0]}), which loading would "
                        f"unpickle (run code from the file); only tensors and graphs are loaded")
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    errors: list[BaseException] = []  # what torch logs (as a traceback) before its generic "see the warnings above"
    collect = logging.Handler(logging.WARNING)
    collect.emit = lambda record: errors.append(record.exc_info[1]) if record.exc_info else None  # type: ignore
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export")]  # torch gives them stderr handlers
    saved_state = [(lg.handlers[:], lg.propagate) for lg in loggers]
    try:
        for lg in loggers:
            lg.handlers, lg.propagate = [collect], False
        return torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged or crafted archive fails in many ways
        why = first_line(errors[-1] if errors else e)
        if why.startswith("Weights only load failed"):
            why = "it holds pickled Python objects, not only tensors; loading them would run code from the file"
        raise UserError(f"{path}: cannot load torch.export program ({why})") from None
    finally:
        for lg, (handlers, flag) in zip(loggers, saved_state):
            lg.handlers, lg.propagate = handlers, flag
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


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
