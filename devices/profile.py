"""One result schema for every device and runtime: `compress.profile/1`.

A profile is a plain JSON object (so a board without this toolchain can write one, and any tool can read it):

    schema, created, target                      "compress.profile/1", UTC time, where it ran ("local", "ssh://...")
    artifact      path, size_bytes, sha256, files[{name, size_bytes, sha256}]   (size covers .bin / external data)
    runtime       name, version, threads (null = runtime default), options (what the session was opened with)
    environment   hostname, os, platform, machine, cpu, cores_logical, cores_physical, cpu_affinity,
                  cpu_governor, load_avg_1m, python, numpy
    settings      warmup, iterations, batch, seed, input{name, shape, dtype, declared_shape}, timer
    load_ms, first_inference_ms
    latency_ms    n, mean, std, min, max, p50, p90, p99, ci95_mean[lo, hi], ci95_p50[lo, hi] (null if n too small)
    throughput_items_per_s    batch / mean latency, one request at a time
    memory        rss_before_load_bytes, peak_rss_bytes, model_peak_bytes (= peak - before), method, isolated_process
    samples_ms    every timed run, in order (later comparisons test distributions, not just means)
    layers        per-layer times when a runtime provides them, else null
    notes         caveats a reader should see (e.g. "p99 from 50 samples is the max")

Only numpy and the standard library at module level: devices/agent.py builds profiles on boards.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from compress.errors import UserError
from runtimes.base import artifact_files

if TYPE_CHECKING:
    from rich.table import Table

SCHEMA = "compress.profile/1"

# two-sided 95% Student t quantiles for df = 1..30; beyond, a Cornish-Fisher expansion is accurate to 1e-4
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z95 = 1.959964


def t_critical_95(df: int) -> float:
    """Two-sided 95% quantile of Student's t (no scipy: the agent runs with numpy only)."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if df <= len(_T95):
        return _T95[df - 1]
    z = _Z95
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def median_ci95(sorted_samples: np.ndarray) -> list[float] | None:
    """Distribution-free 95% CI of the median from order statistics (binomial, exact up to n = 5000).

    Latency samples are skewed and heavy-tailed, so no normal assumption; None when n < 6 (no pair of order
    statistics reaches 95% coverage).
    """
    x, n = sorted_samples, len(sorted_samples)
    if n > 5000:  # normal approximation to Binomial(n, 1/2): exact sums get slow, and the two agree here
        j = int(math.floor((n - _Z95 * math.sqrt(n)) / 2))
    else:
        # largest j with P(B <= j - 1) <= 2.5%, B ~ Binomial(n, 1/2); integers, so no float underflow at large n
        total, cum, c, j = 1 << n, 0, 1, 0
        for i in range(n // 2 + 1):
            cum += c
            if 40 * cum > total:
                break
            j = i + 1
            c = c * (n - i) // (i + 1)
    if j < 1:
        return None
    return [float(x[j - 1]), float(x[n - j])]


def latency_stats(samples_ms: Sequence[float]) -> dict:
    x = np.sort(np.asarray(samples_ms, dtype=np.float64))
    n = len(x)
    if n == 0:
        raise ValueError("no latency samples")
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    half = t_critical_95(n - 1) * std / math.sqrt(n) if n > 1 else None
    p50, p90, p99 = (float(v) for v in np.percentile(x, [50, 90, 99]))
    return {"n": n, "mean": mean, "std": std, "min": float(x[0]), "max": float(x[-1]),
            "p50": p50, "p90": p90, "p99": p99,
            "ci95_mean": None if half is None else [mean - half, mean + half],
            "ci95_p50": median_ci95(x),
            "percentiles": "linear interpolation (numpy default)", "ci95_mean_method": "student t",
            "ci95_p50_method": "binomial order statistics"}


def host_environment() -> dict:
    """What the numbers depend on besides the artifact: the machine, its OS, and how busy it was."""
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "hostname": socket.gethostname(),
        "os": platform.system(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": _physical_cores(),
        "cpu_affinity": affinity,
        "cpu_governor": _read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # others' work skews latency
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def artifact_record(path: str | Path) -> dict:
    files = [{"name": p.name, "size_bytes": p.stat().st_size, "sha256": _sha256(p)} for p in artifact_files(path)]
    return {"path": str(path), "size_bytes": sum(f["size_bytes"] for f in files), "sha256": files[0]["sha256"],
            "files": files}


def build_profile(*, artifact: dict, runtime: dict, settings: dict, load_ms: float | None, first_inference_ms: float,
                  samples_ms: Sequence[float], memory: dict, environment: dict | None = None, target: str = "local",
                  layers: list | None = None) -> dict:
    stats = latency_stats(samples_ms)
    notes = []
    if stats["n"] < 100:
        notes.append(f"p99 from {stats['n']} samples is an interpolation near the max; use >= 100 iterations")
    if stats["ci95_p50"] is None:
        notes.append("fewer than 6 samples: no 95% CI of the median")
    environment = environment if environment is not None else host_environment()
    notes += _busy_note(environment, runtime.get("threads"))
    profile = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": target,
        "artifact": artifact,
        "runtime": runtime,
        "environment": environment,
        "settings": settings,
        "load_ms": None if load_ms is None else float(load_ms),  # None: not measured (a prediction)
        "first_inference_ms": float(first_inference_ms),
        "latency_ms": stats,
        "throughput_items_per_s": settings["batch"] * 1000.0 / stats["mean"] if stats["mean"] > 0 else 0.0,
        "memory": memory,
        "samples_ms": [round(float(s), 6) for s in samples_ms],
        "layers": layers,
        "notes": notes,
    }
    return validate_profile(profile)


def _busy_note(environment: dict, threads: int | None) -> list[str]:
    """More runnable work than CPUs while the runtime ran a thread per CPU: its threads wait on each other (a torch
    .pt2 measured 3 ms alone and 500 ms so on a loaded 2-CPU host)."""
    load, cores = environment.get("load_avg_1m"), environment.get("cores_logical")
    if load is None or not cores or load <= cores or (threads is not None and threads < cores) or "gpu" in environment:
        return []
    used = "its default thread count" if threads is None else f"{threads} threads"
    return [f"the machine was busy (load average {load:.1f} on {cores} CPUs) while the runtime used {used}: threads "
            f"that wait on each other can make latency many times the idle one; --threads 1 measures steadier"]


# ---- validation: a hand-written spec (no jsonschema dependency on boards) -------------------------------------

_NUM, _INT, _OPT_INT, _OPT_LIST = (int, float), int, (int, type(None)), (list, type(None))
_SPEC: dict[str, Any] = {
    "schema": str, "created": str, "target": str,
    "artifact": {"path": str, "size_bytes": _INT, "sha256": str, "files": list},
    "runtime": {"name": str, "version": str, "threads": _OPT_INT, "options": dict},
    "environment": {"hostname": str, "os": str, "cpu": str, "cores_logical": _OPT_INT, "python": str},
    "settings": {"warmup": _INT, "iterations": _INT, "batch": _INT, "seed": _INT, "input": dict},
    "load_ms": (int, float, type(None)), "first_inference_ms": _NUM,
    "latency_ms": {"n": _INT, "mean": _NUM, "std": _NUM, "min": _NUM, "max": _NUM, "p50": _NUM, "p90": _NUM,
                   "p99": _NUM, "ci95_mean": _OPT_LIST, "ci95_p50": _OPT_LIST},
    "throughput_items_per_s": _NUM,
    "memory": {"rss_before_load_bytes": _OPT_INT, "peak_rss_bytes": _OPT_INT, "model_peak_bytes": _OPT_INT,
               "method": str, "isolated_process": bool},
    "samples_ms": list, "layers": _OPT_LIST, "notes": list,
}


def validate_profile(profile: Any, source: str = "profile") -> dict:
    """Return `profile` if it is a well-formed compress.profile/1 object, else raise UserError naming the problem."""
    def fail(problem: str) -> UserError:
        return UserError(f"{source}: not a valid {SCHEMA} profile ({problem})")

    if not isinstance(profile, dict):
        raise fail(f"a JSON {type(profile).__name__}, not an object")
    if profile.get("schema") != SCHEMA:
        raise fail(f"schema is {profile.get('schema')!r}; this version reads {SCHEMA!r}")
    _check(profile, _SPEC, "", fail)
    lat, samples = profile["latency_ms"], profile["samples_ms"]
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in samples):
        raise fail("samples_ms holds non-numbers")
    if lat["n"] < 1 or lat["n"] != len(samples) or lat["n"] != profile["settings"]["iterations"]:
        raise fail(f"latency_ms.n = {lat['n']}, {len(samples)} samples, {profile['settings']['iterations']} iterations")
    if not lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]:
        raise fail("percentiles out of order")
    return profile


def _check(obj: dict, spec: dict, where: str, fail) -> None:
    for key, want in spec.items():
        path = f"{where}{key}"
        if key not in obj:
            raise fail(f"missing {path}")
        value = obj[key]
        if isinstance(want, dict):
            if not isinstance(value, dict):
                raise fail(f"{path} is not an object")
            _check(value, want, f"{path}.", fail)
        elif not isinstance(value, want) or (isinstance(value, bool) and bool not in _as_tuple(want)):
            raise fail(f"{path} is {type(value).__name__}")


def _as_tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def load_profile(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: give a profile JSON (compress profile ... -o FILE.json writes one)")
    if path.exists() and not path.is_file():  # a FIFO would block forever, /dev/zero read without end
        raise UserError(f"{path} is not a regular file: give a profile JSON")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"profile not found: {path}") from None
    except UnicodeDecodeError:  # e.g. the artifact itself where its profile was meant
        raise UserError(f"{path}: not a JSON profile (binary data; compress profile ... -o FILE.json writes one)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a JSON profile ({e})") from None
    return validate_profile(data, str(path))


# ---- the human view ------------------------------------------------------------------------------------------

def render_table(profiles: Sequence[dict], title: str | None = "Latency (ms)") -> Table:
    """A rich Table, one row per profile; the JSON keeps everything else (rich is imported here: boards never render)."""
    from rich.table import Table

    predicted = [p for p in profiles if "prediction" in p]  # --device estimate:NAME (devices/estimate.py)
    measured = [p for p in profiles if "prediction" not in p]
    caption = []
    if measured:
        counts = sorted({p["latency_ms"]["n"] for p in measured})
        caption.append(f"n = {', '.join(map(str, counts))} timed runs; ±: 95% CI of the median, as % of it; "
                       f"(+): the model's share, peak RSS minus RSS before loading")
    if predicted:
        targets = ", ".join(sorted({str(p.get("target")) for p in predicted}))
        caption.append(f"{targets}: PREDICTED, not measured (roofline over the ONNX graph): one value, no spread; "
                       f"memory ~: weights + peak live activations")
    table = Table(title=title, title_justify="left", caption="\n".join(caption), caption_justify="left")
    table.add_column("artifact", overflow="fold", min_width=8)
    table.add_column("runtime", overflow="fold", min_width=8)
    for name in ("thr×b", "p50", "p90", "p99", "items/s", "load / first", "peak RSS MiB", "size"):
        table.add_column(name, justify="right", overflow="fold")
    for p in profiles:
        lat, mem, rt = p["latency_ms"], p["memory"], p["runtime"]
        ci = lat.get("ci95_p50")
        spread = f" ±{max(lat['p50'] - ci[0], ci[1] - lat['p50']) / lat['p50']:.1%}" if ci and lat["p50"] > 0 else ""
        peak, model = mem.get("peak_rss_bytes"), mem.get("model_peak_bytes")
        if "prediction" in p:
            table.add_row(Path(p["artifact"]["path"]).name, f"{rt['name']} ({p.get('target')})",
                          f"{'def' if rt.get('threads') is None else rt['threads']}×{p['settings']['batch']}",
                          "~" + _ms(lat["p50"]), "-", "-", f"~{p['throughput_items_per_s']:.0f}", "- / -",
                          "~" + _mib(model), _size(p["artifact"]["size_bytes"]))
            continue
        table.add_row(
            Path(p["artifact"]["path"]).name,
            f"{rt['name']} {rt['version'].split('-')[0].split('+')[0]}",
            f"{'def' if rt.get('threads') is None else rt['threads']}×{p['settings']['batch']}",
            _ms(lat["p50"]) + spread, _ms(lat["p90"]), _ms(lat["p99"]),
            f"{p['throughput_items_per_s']:.0f}", f"{_ms(p['load_ms'])} / {_ms(p['first_inference_ms'])}",
            _mib(peak) + ("" if model is None else f" (+{_mib(model)})"),
            _size(p["artifact"]["size_bytes"]),
        )
    return table


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _mib(b: int | None) -> str:
    return "?" if b is None else f"{b / 2**20:.1f}"


def _size(b: int) -> str:  # powers of 1000, as export / run tables and --budget size= read sizes
    return f"{b / 1e3:.1f} kB" if b < 1e6 else f"{b / 1e6:.2f} MB"


# ---- host details ---------------------------------------------------------------------------------------------

def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (x86, and the keys ARM boards use), else what platform says."""
    info = _read_text("/proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware", "Processor"):  # x86, then Raspberry Pi / other ARM boards
        for line in info.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == key and v.strip():
                return v.strip()
    return platform.processor() or platform.machine() or "unknown"


def _physical_cores() -> int | None:
    cores, phys = set(), "0"
    for line in (_read_text("/proc/cpuinfo") or "").splitlines():
        k, _, v = line.partition(":")
        if k.strip() == "physical id":
            phys = v.strip()
        elif k.strip() == "core id":
            cores.add((phys, v.strip()))
    return len(cores) or None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
