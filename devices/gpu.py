"""NVIDIA GPU profiles for the torch runtime: CUDA-event timing and the CUDA allocator's peak memory.

    compress profile model.pt2 --device cuda        # or cuda:1; .pt2 (torch.export) and TorchScript archives

The agent's CUDA branch: `python -m devices.gpu` takes devices/agent.py's arguments plus `--cuda INDEX` and prints
the same compress.profile/1 JSON, in a fresh process (CudaDevice runs it like LocalDevice runs the agent), so
the allocator's high-water mark is this artifact's. Per timed run: the input already resident on the GPU (no
host-to-device copy), torch.cuda.Event(enable_timing=True) recorded before and after the forward on the current
stream, then end.synchronize() and start.elapsed_time(end) (GPU time between the events, ms). Memory:
torch.cuda.reset_peak_memory_stats() before loading, torch.cuda.max_memory_allocated() after the runs (tensors
the caching allocator handed out; not the CUDA context, cuDNN workspaces outside the allocator or other processes),
and the process's host peak RSS as on CPU.

Over SSH (a Jetson): `--device 'ssh://user@board?cuda=0'` runs this file on the board instead of agent.py.

Run on an NVIDIA H100 (torch 2.11 + CUDA 13.0) in one session with a lent GPU: the timing test in
tests/devices/test_ssh.py passed there, and `compress profile resnet20.pt2 --device cuda` measured p50 1.75 ms at
batch 1 (launch-bound: ResNet-20's kernels are shorter than their launches). Without CUDA it refuses with one line
(tested, locally and over ssh); the timing test skips with the reason when torch.cuda.is_available() is False.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script on a board: the shipped tree's root first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from compress.errors import UserError  # noqa: E402
from devices.base import Device, ProfileOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class CudaDevice(Device):
    name = "cuda"

    def __init__(self, index: int | str = 0):
        try:
            self.index = int(index)
        except ValueError:
            raise UserError(f"cuda device index must be an integer, got {index!r}") from None

    @classmethod
    def from_spec(cls, spec: str, **options) -> "CudaDevice":
        head = spec.split("?", 1)[0]
        if options or "?" in spec:
            raise UserError("the cuda device takes no options (cuda or cuda:INDEX)")
        return cls(head.partition(":")[2] or 0)

    def run_profile(self, artifact: str | Path, runtime: str | None = None,
                    options: ProfileOptions | dict | None = None) -> dict:
        from devices.profile import validate_profile
        from runtimes.base import check_artifact

        opts = ProfileOptions.coerce(options)
        path = check_artifact(artifact).resolve()
        if (runtime or "torch") != "torch":
            raise UserError(f"the cuda device measures the torch runtime (got {runtime}); ONNX Runtime / TensorRT on "
                            f"GPUs go through their own runtimes")
        with tempfile.TemporaryDirectory(prefix="compress-cuda-") as tmp:
            out = Path(tmp) / "profile.json"
            cmd = [sys.executable, "-m", "devices.gpu", "--artifact", str(path), "--json", str(out),
                   "--cuda", str(self.index), *opts.agent_argv()]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            try:
                proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      timeout=opts.timeout_s, env=env)
            except subprocess.TimeoutExpired:
                raise UserError(f"profiling {path.name} on cuda:{self.index} took over {opts.timeout_s:g} s") from None
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                raise UserError((lines[-1].removeprefix("error: ") if lines else "no error message"))
            profile = json.loads(out.read_text())
        profile["target"] = f"cuda:{self.index}"
        return validate_profile(profile, "cuda agent output")


def measure_cuda(artifact: str | Path, index: int = 0, warmup: int = 10, iterations: int = 100, batch: int = 1,
                 seed: int = 0, sample_shape: tuple[int, ...] | None = None, threads: int | None = None,
                 cpus: list[int] | None = None) -> dict:
    """The agent's measurement on a CUDA device (see the module docstring)."""
    from devices.agent import _pin, current_rss_bytes, peak_rss_bytes
    from devices.profile import artifact_record, build_profile, host_environment
    from compress.torch_device import cuda_unavailable_reason
    from runtimes import RUNTIMES
    from runtimes.base import check_artifact

    path = check_artifact(artifact)
    if cpus:
        _pin(cpus)
    rt = RUNTIMES.get("torch")
    torch = rt.import_package()
    reason = cuda_unavailable_reason(torch)
    if reason:
        raise UserError(reason)
    if index >= torch.cuda.device_count():
        raise UserError(f"cuda:{index} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    dev = torch.device("cuda", index)
    torch.cuda.set_device(dev)
    torch.cuda.init()
    rss_before = current_rss_bytes()
    torch.cuda.reset_peak_memory_stats(dev)
    dev_before = torch.cuda.memory_allocated(dev)

    t0 = time.perf_counter_ns()
    session = rt.open(path, threads)  # loads on the CPU; then the module moves to the GPU
    module = session._module.to(dev)
    torch.cuda.synchronize(dev)
    load_ms = (time.perf_counter_ns() - t0) / 1e6
    x_host = session.example_input(batch, seed, sample_shape)
    x = torch.from_numpy(x_host).to(dev)
    torch.cuda.synchronize(dev)
    with torch.inference_mode():
        t0 = time.perf_counter_ns()
        module(x)
        torch.cuda.synchronize(dev)
        first_ms = (time.perf_counter_ns() - t0) / 1e6
        for _ in range(warmup):
            module(x)
        torch.cuda.synchronize(dev)
        samples = cuda_event_times(torch, module, x, iterations)
    dev_peak = torch.cuda.max_memory_allocated(dev)
    peak, method = peak_rss_bytes()
    props = torch.cuda.get_device_properties(dev)
    env = host_environment()
    env.update({"gpu": props.name, "gpu_index": index, "gpu_memory_bytes": int(props.total_memory),
                "gpu_compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version()})
    return build_profile(
        artifact=artifact_record(path),
        runtime={"name": "torch", "version": torch.__version__, "threads": threads,
                 "options": {**session.options, "device": f"cuda:{index}", "inference_mode": True}},
        settings={"warmup": warmup, "iterations": iterations, "batch": batch, "seed": seed,
                  "input": {"name": session.inputs[0].name, "shape": list(x.shape), "dtype": str(x_host.dtype),
                            "declared_shape": session.inputs[0].to_dict()["shape"], "resident_on_device": True},
                  "timer": "torch.cuda.Event pairs around the forward on the current stream, synchronized per run"},
        load_ms=load_ms, first_inference_ms=first_ms, samples_ms=samples,
        memory={"rss_before_load_bytes": rss_before, "peak_rss_bytes": peak,
                "model_peak_bytes": None if peak is None or rss_before is None else max(peak - rss_before, 0),
                "method": f"host: {method}; device: torch.cuda.max_memory_allocated (caching allocator)",
                "isolated_process": True, "device_peak_bytes": int(dev_peak),
                "device_model_peak_bytes": int(dev_peak - dev_before)},
        environment=env,
    )


def cuda_event_times(torch, module, x, iterations: int) -> list[float]:
    """GPU time of each forward in ms: an event pair per run on the current stream, synchronized on the end event."""
    stream = torch.cuda.current_stream()
    samples = [0.0] * iterations
    for i in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        module(x)
        end.record(stream)
        end.synchronize()
        samples[i] = float(start.elapsed_time(end))
    return samples


def main(argv: list[str] | None = None) -> int:
    from devices.agent import parse_args, run_and_emit

    argv = list(sys.argv[1:] if argv is None else argv)
    index = 0
    if "--cuda" in argv:
        i = argv.index("--cuda")
        index = int(argv[i + 1])
        del argv[i:i + 2]
    args = parse_args(argv)
    if args.runtime not in (None, "torch"):
        print(f"error: the CUDA agent measures the torch runtime, not {args.runtime}", file=sys.stderr)
        return 2
    return run_and_emit(lambda: measure_cuda(args.artifact, index, args.warmup, args.iterations, args.batch,
                                             args.seed, tuple(args.shape) if args.shape else None, args.threads,
                                             args.cpus), args.json)

if __name__ == "__main__":
    sys.exit(main())
