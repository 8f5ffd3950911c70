"""Measure one artifact where this process runs; print a compress.profile/1 JSON.

    python devices/agent.py --artifact m.onnx --runtime onnxruntime --threads 1 --warmup 10 --iterations 200

Order: import the runtime package, read RSS, open the session (load time), one first inference (timed apart:
it pays for lazy allocation and kernel selection), warm-up, then N timed runs, each with perf_counter_ns around
Session.run only, GC off, on one seeded random input. Peak RSS is the process's own high-water mark, so run it
in a fresh process (devices/local.py does) to make that the artifact's.

Shipped as-is to boards: needs only the standard library, numpy and the measured runtime's package. Nothing here
imports torch, rich, or compress.* beyond the stdlib-only compress.errors / compress.registry that runtimes/ and
devices/profile.py use (tests/devices/test_profile.py runs it with torch and rich blocked).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repo root first, so devices/profile.py can't shadow the stdlib's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402

from devices.profile import artifact_record, build_profile, host_environment  # noqa: E402
from runtimes import RUNTIMES, default_runtime_for  # noqa: E402
from runtimes.base import check_artifact  # noqa: E402


def measure(artifact: str | Path, runtime: str | None = None, threads: int | None = None, warmup: int = 10,
            iterations: int = 100, batch: int = 1, seed: int = 0, sample_shape: tuple[int, ...] | None = None,
            cpus: list[int] | None = None, isolated: bool = False) -> dict:
    """Profile `artifact` in this process. `isolated` says the process was started for this (peak RSS is the model's)."""
    if iterations < 1 or warmup < 0 or batch < 1:
        raise _error(f"need iterations >= 1, warmup >= 0, batch >= 1 (got {iterations}, {warmup}, {batch})")
    path = check_artifact(artifact)
    rt = RUNTIMES.get(runtime or default_runtime_for(path))
    if cpus:
        _pin(cpus)  # before the runtime starts its thread pools, so they inherit the mask
    rt.import_package()  # its own footprint is not the model's
    rss_before = current_rss_bytes()

    t0 = time.perf_counter_ns()
    session = rt.open(path, threads)
    load_ms = (time.perf_counter_ns() - t0) / 1e6
    x = session.example_input(batch, seed, sample_shape)
    t0 = time.perf_counter_ns()
    session.run(x)
    first_ms = (time.perf_counter_ns() - t0) / 1e6
    for _ in range(warmup):
        session.run(x)
    samples = timed_runs(session.run, x, iterations)
    peak, method = peak_rss_bytes()

    return build_profile(
        artifact=artifact_record(path),
        runtime={"name": rt.name, "version": session.version, "threads": threads, "options": session.options},
        settings={"warmup": warmup, "iterations": iterations, "batch": batch, "seed": seed,
                  "input": {"name": session.inputs[0].name, "shape": list(x.shape), "dtype": str(x.dtype),
                            "declared_shape": session.inputs[0].to_dict()["shape"]},
                  "timer": "perf_counter_ns around Session.run, gc disabled"},
        load_ms=load_ms, first_inference_ms=first_ms, samples_ms=samples,
        memory={"rss_before_load_bytes": rss_before, "peak_rss_bytes": peak,
                "model_peak_bytes": None if peak is None or rss_before is None else max(peak - rss_before, 0),
                "method": method, "isolated_process": isolated},
        environment=host_environment(),
    )


def timed_runs(run, x: np.ndarray, iterations: int) -> list[float]:
    """Latency of each call in ms. GC off while timing: a collection would land in one sample at random."""
    samples = [0.0] * iterations
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(iterations):
            t0 = time.perf_counter_ns()
            run(x)
            samples[i] = (time.perf_counter_ns() - t0) / 1e6
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def current_rss_bytes() -> int | None:
    status = _proc_status()
    return status.get("VmRSS")


def peak_rss_bytes() -> tuple[int | None, str]:
    """Peak RSS and how it was read.

    Linux: VmHWM, the high-water mark of this process's own address space. Not ru_maxrss: Linux carries the
    parent's peak across fork+exec into the child's ru_maxrss, so a child of a 400 MB pytest reports >= 400 MB.
    """
    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"], "VmHWM (/proc/self/status): peak RSS of this process"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unavailable"
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss (getrusage)"


def _proc_status() -> dict[str, int]:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _pin(cpus: list[int]) -> None:
    if not hasattr(os, "sched_setaffinity"):
        raise _error("CPU pinning needs Linux (os.sched_setaffinity)")
    try:
        os.sched_setaffinity(0, cpus)
    except (OSError, ValueError) as e:
        raise _error(f"cannot pin to CPUs {cpus}: {e}") from None


def _error(message: str) -> Exception:
    # agent.py itself imports nothing from compress at module level; runtimes/ has loaded this stdlib-only module
    from compress.errors import UserError

    return UserError(message)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="agent.py", description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--runtime", default=None, help="onnxruntime | openvino | torch (default: from the suffix)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", type=_ints, default=None, help="per-sample input shape, e.g. 3,32,32 (TorchScript)")
    ap.add_argument("--cpus", type=_ints, default=None, help="pin to these CPUs, e.g. 0,1 (Linux)")
    ap.add_argument("--json", default=None, help="also write the profile to this file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_emit(lambda: measure(args.artifact, args.runtime, args.threads, args.warmup, args.iterations,
                                        args.batch, args.seed, tuple(args.shape) if args.shape else None, args.cpus,
                                        isolated=True), args.json)


def run_and_emit(measure_fn, json_path: str | None) -> int:
    """Run one measurement and print its profile (and write it to json_path); the exit code for main().

    Shared by this agent and the CUDA agent (devices/gpu.py): errors with an exit code become one line.
    """
    try:
        profile = measure_fn()
    except Exception as e:  # noqa: BLE001 - one line for the caller; UserError carries exit code 2
        if not hasattr(e, "exit_code"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return int(e.exit_code)
    text = json.dumps(profile, indent=1)
    if json_path:
        out = Path(json_path)
        tmp = out.with_name(f".{out.name}.part")
        tmp.write_text(text)
        os.replace(tmp, out)  # a reader never sees half a profile
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
