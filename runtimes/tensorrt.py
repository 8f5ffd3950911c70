"""TensorRT (.engine / .plan) on an NVIDIA GPU: TensorRT 10's name-based API, torch for CUDA memory and streams.

One request at a time on a private CUDA stream: pinned host staging buffers and device buffers sized for the
engine's largest profile shape are allocated once; `run` copies the input host->device, sets the input shape and
every I/O tensor's address (set_input_shape / set_tensor_address), enqueues execute_async_v3, copies the first
output back and synchronizes. So a `run` is end-to-end latency (H2D + compute + D2H), what the profiler's host
timer measures; the GPU time of the enqueued work alone is taken with CUDA events around execute_async_v3 and kept
in `last_compute_ms` / `compute_ms` (trtexec's "GPU Compute" split).

Nothing imported at module level beyond runtimes.base (the agent imports runtimes/ on boards without torch).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.errors import UserError
from runtimes.base import Session, TensorInfo, first_line, require

INSTALL_HINT = "pip install tensorrt (from NVIDIA's index) on a machine with an NVIDIA GPU"


class TensorRTSession(Session):
    def __init__(self, trt, torch, engine, path: Path, threads: int | None, version: str):
        self._trt, self._torch, self._engine = trt, torch, engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._in_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._out_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        super().__init__(path, threads, [self._info(n) for n in self._in_names],
                         [self._info(n) for n in self._out_names], "tensorrt", version, {})
        self._context = engine.create_execution_context()
        if self._context is None:
            raise UserError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(device=self._device)
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        self.last_compute_ms: float | None = None
        self.compute_ms: list[float] = []
        self._allocate()
        self.options = {"device": torch.cuda.get_device_name(self._device), "stream": "private, one request at a time",
                        "max_batch": self._max_batch, "timer": "host wall time per run; CUDA events around "
                        "execute_async_v3 in compute_ms", "threads": "n/a (GPU)",
                        "engine_device_memory_bytes": _device_memory(engine)}

    def _info(self, name: str) -> TensorInfo:
        shape = tuple(int(d) if d >= 0 else None for d in self._engine.get_tensor_shape(name))
        return TensorInfo(name, shape, np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name))).name)

    def _allocate(self) -> None:
        """Buffers for the largest shape profile 0 allows (a smaller batch uses a leading slice of each)."""
        torch, engine, ctx = self._torch, self._engine, self._context
        self._max_batch = 1
        for name in self._in_names:
            shape = tuple(engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                shape = tuple(engine.get_tensor_profile_shape(name, 0)[2])  # (min, opt, max)
            if not ctx.set_input_shape(name, shape):
                raise UserError(f"{self.path.name}: TensorRT rejected the profile's largest shape {shape} for {name!r}")
            self._max_batch = max(self._max_batch, int(shape[0]) if shape else 1)
        self._host, self._dev = {}, {}
        for name in self._in_names + self._out_names:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, np.dtype(self._trt.nptype(engine.get_tensor_dtype(name))))).dtype
            self._dev[name] = torch.empty(shape, dtype=dtype, device=self._device)
            self._host[name] = torch.empty(shape, dtype=dtype, pin_memory=True)

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch, ctx = self._torch, self._context
        if len(self._in_names) != 1:
            raise UserError(f"{self.path.name} has {len(self._in_names)} inputs; Session.run feeds exactly one")
        name, b = self._in_names[0], int(x.shape[0]) if x.ndim else 1
        if b > self._max_batch:
            raise UserError(f"{self.path.name}: batch {b} is over the engine's profile maximum {self._max_batch}; "
                            f"rebuild with a larger max_batch")
        if not ctx.set_input_shape(name, tuple(x.shape)):
            raise UserError(f"{self.path.name}: TensorRT rejected input shape {list(x.shape)} "
                            f"(expects {self.inputs[0].shape})")
        host_in, dev_in = self._host[name][:b], self._dev[name][:b]
        host_in.copy_(torch.from_numpy(x))
        with torch.cuda.stream(self._stream):
            dev_in.copy_(host_in, non_blocking=True)
            ctx.set_tensor_address(name, dev_in.data_ptr())
            for out in self._out_names:
                ctx.set_tensor_address(out, self._dev[out].data_ptr())
            self._start.record(self._stream)
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise UserError(f"{self.path.name}: TensorRT execute_async_v3 failed (its log above says why)")
            self._end.record(self._stream)
            first = self._out_names[0]
            shape = tuple(int(d) for d in ctx.get_tensor_shape(first))
            n = int(np.prod(shape)) if shape else 1
            # outputs are written densely for the current shape: the first n elements of the max-shape buffer
            host_out = self._host[first].view(-1)[:n]
            host_out.copy_(self._dev[first].view(-1)[:n], non_blocking=True)
        self._stream.synchronize()
        self.last_compute_ms = float(self._start.elapsed_time(self._end))
        self.compute_ms.append(self.last_compute_ms)
        return host_out.numpy().reshape(shape).copy()

    def close(self) -> None:
        self._context = self._engine = None
        self._host, self._dev = {}, {}


def open(path: Path, threads: int | None) -> TensorRTSession:  # noqa: A001 - the runtime interface's name
    trt = require("tensorrt", INSTALL_HINT)
    torch = require("torch", "pip install torch (a CUDA build) for the tensorrt runtime's buffers and streams")
    if not torch.cuda.is_available():
        raise UserError(f"{path}: the tensorrt runtime needs an NVIDIA GPU; torch sees no CUDA device here")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    try:
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    except Exception as e:  # noqa: BLE001 - TensorRT raises its own types for bad plans
        raise UserError(f"{path}: TensorRT cannot load it ({first_line(e)})") from None
    if engine is None:
        raise UserError(f"{path}: TensorRT cannot deserialize it (built by another TensorRT version or for another "
                        f"GPU? engines are specific to both)")
    session = TensorRTSession(trt, torch, engine, Path(path), threads, trt.__version__)
    session._runtime = runtime  # the engine must not outlive its runtime
    return session


def _device_memory(engine) -> int | None:
    for attr in ("device_memory_size_v2", "device_memory_size"):  # _v2 from TensorRT 10.1; the other deprecated
        if hasattr(engine, attr):
            try:
                return int(getattr(engine, attr))
            except Exception:  # noqa: BLE001 - informative only
                return None
    return None
