"""An Android device through the real `adb` client and a native benchmark binary (onnxruntime_perf_test).

    compress profile m.onnx --device 'adb?benchmark=build/android/onnxruntime_perf_test'
    compress profile m.ort  --device 'adb:R58M123ABC?benchmark=/data/local/tmp/onnxruntime_perf_test&rounds=5'

No Python on the phone: the measuring process is ONNX Runtime's own C++ perf tool, built for Android
(onnxruntime's build.sh --android ... builds onnxruntime_perf_test). It writes one line per timed run to its
result file, so the profile carries every sample, like the Python agent's.

What a profile does, in order:
  1. `adb devices`: exactly one ready device, or the SERIAL given (a clear error for none / unauthorized / offline);
  2. push the artifact (and the binary and `libs`, when they are paths on this machine) to
     /data/local/tmp/compress-<12 hex>/;
  3. read the device: model, SoC, Android version, ABI, cores and their max frequencies, governors, temperature;
  4. `rounds` runs of `taskset MASK onnxruntime_perf_test -m times -r WARMUP+N -e cpu -I -S SEED [-x THREADS -y 1]
     [-f batch:B] model result.txt`, sleeping `cooldown_s` between rounds (thermal throttling is the largest error
     on phones); MASK = the `cpus` option, else the cores with the highest max frequency (the big cluster);
     each round drops its first WARMUP samples;
  5. remove the folder (also after an error; if the device went away, the error names the folder).

Options (URL query or keyword arguments): benchmark (path on this machine, pushed; or on the device),
libs (comma-separated host paths pushed next to it, LD_LIBRARY_PATH set), rounds (default 3), cooldown_s
(default 5), adb (the client binary, default `adb` on PATH), command_timeout_s (per adb call, default 120).
"""
from __future__ import annotations

import re
import secrets
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qsl

from compress.errors import UserError
from devices.base import Device, ProfileOptions
from devices.profile import artifact_record, build_profile
from runtimes.base import artifact_files, check_artifact, default_runtime_for

OPTIONS = ("benchmark", "libs", "rounds", "cooldown_s", "adb", "command_timeout_s")
REMOTE_BASE = "/data/local/tmp"
INSTALL_HINT = "apt-get install adb (Debian/Ubuntu; older releases: android-tools-adb) or Android SDK platform-tools"


class AdbDevice(Device):
    name = "adb"

    def __init__(self, serial: str | None = None, benchmark: str | None = None, libs: str | list[str] | None = None,
                 rounds: int | str = 3, cooldown_s: float | str = 5.0, adb: str | None = None,
                 command_timeout_s: float | str = 120.0):
        self.serial = serial or None
        self.benchmark = benchmark
        self.libs = [s for s in (libs.split(",") if isinstance(libs, str) else (libs or [])) if s]
        try:
            self.rounds, self.cooldown_s = int(rounds), float(cooldown_s)
            self.command_timeout_s = float(command_timeout_s)
        except ValueError:
            raise UserError("adb device: rounds must be an integer, cooldown_s and command_timeout_s numbers") from None
        if self.rounds < 1 or self.cooldown_s < 0 or self.command_timeout_s <= 0:
            raise UserError("adb device: rounds must be >= 1, cooldown_s >= 0, command_timeout_s > 0")
        self.adb = adb or "adb"

    @classmethod
    def from_spec(cls, spec: str, **options) -> "AdbDevice":
        """'adb', 'adb:SERIAL', 'adb?benchmark=...', 'adb:SERIAL?k=v' (a serial may itself hold ':', e.g. ip:port)."""
        head, _, query = spec.partition("?")
        if head != "adb" and not head.startswith("adb:"):
            raise UserError(f"bad adb device {spec!r}: expected adb or adb:SERIAL")
        opts = dict(parse_qsl(query, keep_blank_values=True))
        unknown = (set(opts) | set(options)) - set(OPTIONS)
        if unknown:
            raise UserError(f"adb device: unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(OPTIONS)})")
        return cls(head[4:] or None, **{**opts, **options})

    # ---- adb calls ------------------------------------------------------------------------------------------------
    def adb_path(self) -> str:
        found = shutil.which(self.adb)
        if not found:
            raise UserError(f"the adb device needs the adb client ({self.adb!r} not found): {INSTALL_HINT}")
        return found

    def _adb(self, *args: str, serial: str | None = None, timeout: float | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.adb_path(), *(["-s", serial] if serial else []), *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or self.command_timeout_s,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise UserError(f"adb {' '.join(args[:2])} took over {timeout or self.command_timeout_s:g} s") from None
        if check and proc.returncode != 0:
            msg = _last_line(proc.stderr) or _last_line(proc.stdout) or f"exit {proc.returncode}"
            raise UserError(f"adb {' '.join(args[:2])} failed: {msg}")
        return proc

    def pick_device(self) -> str:
        """The serial to use: the one given (if it is ready), else the only ready device."""
        proc = self._adb("devices", timeout=60)
        devices = parse_devices(proc.stdout)
        ready = [s for s, state in devices.items() if state == "device"]
        if self.serial:
            state = devices.get(self.serial)
            if state is None:
                listed = ", ".join(f"{s} ({st})" for s, st in devices.items()) or "none"
                raise UserError(f"Android device {self.serial!r} is not connected (adb devices lists: {listed})")
            if state != "device":
                raise UserError(_state_message(self.serial, state))
            return self.serial
        if not ready:
            if devices:
                serial, state = next(iter(devices.items()))
                raise UserError(_state_message(serial, state))
            raise UserError("no Android device connected (adb devices lists none): plug one in with USB debugging on, "
                            "or `adb connect HOST:PORT` for wireless debugging")
        if len(ready) > 1:
            raise UserError(f"{len(ready)} Android devices connected ({', '.join(ready)}); pick one with adb:SERIAL")
        return ready[0]

    def shell(self, serial: str, command: str, timeout: float | None = None, check: bool = True):
        return self._adb("shell", command, serial=serial, timeout=timeout, check=check)

    # ---- the profile ----------------------------------------------------------------------------------------------
    def run_profile(self, artifact: str | Path, runtime: str | None = None,
                    options: ProfileOptions | dict | None = None) -> dict:
        opts = ProfileOptions.coerce(options)
        path = check_artifact(artifact).resolve()
        runtime = runtime or default_runtime_for(path)
        if runtime != "onnxruntime":
            raise UserError(f"the adb device measures with onnxruntime_perf_test: give a .onnx or .ort artifact "
                            f"(got {path.name}, runtime {runtime})")
        if not self.benchmark:
            raise UserError("the adb device needs a native benchmark binary: ?benchmark=PATH to an Android build of "
                            "onnxruntime_perf_test (on this machine: pushed; or already on the device)")
        local_bench = Path(self.benchmark).expanduser()
        push_bench = local_bench.is_file()
        for lib in self.libs:
            if not Path(lib).expanduser().is_file():
                raise UserError(f"adb device: library not found: {lib}")
        serial = self.pick_device()
        rdir = f"{REMOTE_BASE}/compress-{secrets.token_hex(6)}"
        target = f"adb:{serial}"
        try:
            self.shell(serial, f"mkdir -p {shlex.quote(rdir)}")
            for f in artifact_files(path):
                self._adb("push", str(f), f"{rdir}/{f.name}", serial=serial, timeout=max(self.command_timeout_s, 600))
            bench = self.benchmark
            if push_bench:
                bench = f"{rdir}/{local_bench.name}"
                self._adb("push", str(local_bench), bench, serial=serial, timeout=max(self.command_timeout_s, 600))
                self.shell(serial, f"chmod 755 {shlex.quote(bench)}")
            for lib in self.libs:
                self._adb("push", str(Path(lib).expanduser()), f"{rdir}/{Path(lib).name}", serial=serial)
            env = self.describe(serial)
            mask = cpu_mask(opts.cpus) if opts.cpus else big_cluster_mask(env.pop("_max_freqs", {}), opts.threads)
            env.pop("_max_freqs", None)
            env["cpu_affinity"] = mask_cpus(mask) if mask else None
            input_info = _input_info(path, opts.batch)
            declared = input_info.get("declared_shape") or [None]
            batch_dim = declared[0] if isinstance(declared[0], str) else "batch"
            samples, stdouts, thermal = [], [], []
            for r, n in enumerate(split_iterations(opts.iterations, self.rounds)):
                if r:
                    time.sleep(self.cooldown_s)
                thermal.append(self.temperature(serial))
                result = f"{rdir}/result-{r}.txt"
                cmd = perf_test_command(bench, f"{rdir}/{path.name}", result, warmup=opts.warmup, iterations=n,
                                        threads=opts.threads, seed=opts.seed, batch=opts.batch, mask=mask,
                                        libdir=rdir if self.libs else None, batch_dim=batch_dim)
                proc = self.shell(serial, cmd, timeout=opts.timeout_s, check=False)
                if proc.returncode != 0:
                    raise UserError(f"{target}: onnxruntime_perf_test failed (exit {proc.returncode}): "
                                    f"{_last_line(proc.stderr) or _last_line(proc.stdout)}")
                run_samples = parse_result_file(self.shell(serial, f"cat {shlex.quote(result)}").stdout)
                if len(run_samples) != opts.warmup + n:
                    raise UserError(f"{target}: onnxruntime_perf_test wrote {len(run_samples)} runs, expected "
                                    f"{opts.warmup + n}")
                samples += run_samples[opts.warmup:]
                stdouts.append(parse_perf_test_stdout(proc.stdout))
            thermal.append(self.temperature(serial))
        except UserError as e:
            if not self._still_there(serial):
                raise UserError(f"{target}: the device went away while profiling ({e}); remove {rdir} on it by hand "
                                f"(adb shell rm -rf {rdir})") from None
            raise
        finally:
            if self._still_there(serial):
                self.shell(serial, f"rm -rf {shlex.quote(rdir)}", check=False)
        first = stdouts[0]
        env["thermal_c_per_round"] = thermal
        profile = build_profile(
            artifact=artifact_record(path),
            runtime={"name": "onnxruntime", "version": first.get("version") or "unknown (onnxruntime_perf_test)",
                     "threads": opts.threads,
                     "options": {"tool": "onnxruntime_perf_test", "provider": "cpu", "execution_mode": "sequential",
                                 "inter_op_threads": 1, "intra_op_threads": opts.threads or 0, "graph_optimization": "all",
                                 "rounds": self.rounds, "cooldown_s": self.cooldown_s,
                                 "taskset_mask": f"{mask:x}" if mask else None, "command": cmd}},
            settings={"warmup": opts.warmup, "iterations": opts.iterations, "batch": opts.batch, "seed": opts.seed,
                      "input": input_info,
                      "timer": "onnxruntime_perf_test: std::chrono::high_resolution_clock per Session::Run (result file)"},
            load_ms=first["session_creation_s"] * 1000.0, first_inference_ms=first["first_inference_ms"],
            samples_ms=samples,
            memory={"rss_before_load_bytes": None,
                    "peak_rss_bytes": max((s["peak_working_set_bytes"] for s in stdouts), default=None),
                    "model_peak_bytes": None, "method": "onnxruntime_perf_test peak working set (whole process)",
                    "isolated_process": True},
            environment=env, target=target)
        profile["notes"].append(f"{self.rounds} round(s) of onnxruntime_perf_test, {self.cooldown_s:g} s cool-down "
                                f"between them; first inference time has 1 ms resolution (the tool prints whole ms)")
        return profile

    def describe(self, serial: str) -> dict:
        """The device half of the profile's environment, from getprop and sysfs (one adb shell call)."""
        script = ("for p in ro.product.manufacturer ro.product.model ro.soc.model ro.board.platform "
                  "ro.build.version.release ro.build.version.sdk ro.product.cpu.abi; do echo \"$p=$(getprop $p)\"; "
                  "done; echo \"nproc=$(nproc 2>/dev/null)\"; "
                  "for c in /sys/devices/system/cpu/cpu[0-9]*; do "
                  "echo \"freq ${c##*/} $(cat $c/cpufreq/cpuinfo_max_freq 2>/dev/null)\"; done; "
                  "echo \"governor=$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null)\"")
        return parse_describe(self.shell(serial, script, timeout=60).stdout, serial)

    def temperature(self, serial: str) -> float | None:
        proc = self.shell(serial, "cat /sys/class/thermal/thermal_zone*/temp 2>/dev/null", timeout=30, check=False)
        return parse_temperature(proc.stdout)

    def _still_there(self, serial: str) -> bool:
        try:
            return parse_devices(self._adb("devices", timeout=30, check=False).stdout).get(serial) == "device"
        except UserError:
            return False


# ---- pure functions (unit-tested without a phone) -----------------------------------------------------------------

def perf_test_command(binary: str, model: str, result: str, *, warmup: int, iterations: int, threads: int | None,
                      seed: int, batch: int, mask: int | None, libdir: str | None = None,
                      batch_dim: str = "batch") -> str:
    """The `adb shell` command line for one onnxruntime_perf_test round (every value shell-quoted)."""
    argv = [binary, "-m", "times", "-r", str(warmup + iterations), "-e", "cpu", "-I", "-S", str(seed), "-o", "99", "-s"]
    if threads:
        argv += ["-x", str(threads), "-y", "1"]
    if batch != 1:
        argv += ["-f", f"{batch_dim}:{batch}"]
    argv += [model, result]
    cmd = " ".join(shlex.quote(a) for a in argv)
    if mask:
        cmd = f"taskset {mask:x} {cmd}"
    if libdir:
        cmd = f"LD_LIBRARY_PATH={shlex.quote(libdir)} {cmd}"
    return cmd


def parse_devices(text: str) -> dict[str, str]:
    """`adb devices [-l]` -> {serial: state} (device, unauthorized, offline, ...)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*")):
            continue
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = parts[1]
    return out


def parse_result_file(text: str) -> list[float]:
    """onnxruntime_perf_test's result file: one `model,seconds,peak_bytes,cpu%,run_index` line per run (then a
    blank line and the statistics). Returns the per-run latencies in ms, in run order."""
    samples = []
    for line in text.splitlines():
        parts = line.strip().split(",")
        if len(parts) == 5 and parts[4].strip().isdigit():
            try:
                samples.append(float(parts[1]) * 1000.0)
            except ValueError:
                continue
    return samples


_STDOUT_PATTERNS = {
    "session_creation_s": r"Session creation time cost:\s*([\d.eE+-]+)\s*s",
    "first_inference_ms": r"First inference time cost:\s*([\d.eE+-]+)\s*ms",
    "average_ms": r"Average inference time cost:\s*([\d.eE+-]+)\s*ms",
    "requests": r"Total inference requests:\s*(\d+)",
    "peak_working_set_bytes": r"Peak working set size:\s*(\d+)\s*bytes",
    "p50_s": r"P50 Latency:\s*([\d.eE+-]+)\s*s",
}


def parse_perf_test_stdout(text: str) -> dict:
    """The summary onnxruntime_perf_test prints (performance_runner.cc); missing lines are None."""
    out: dict = {}
    for key, pattern in _STDOUT_PATTERNS.items():
        m = re.search(pattern, text)
        out[key] = None if m is None else (int(m.group(1)) if key in ("requests", "peak_working_set_bytes")
                                          else float(m.group(1)))
    if out["session_creation_s"] is None or out["first_inference_ms"] is None:
        raise UserError(f"onnxruntime_perf_test printed no timing summary: {_last_line(text) or 'no output'}")
    version = re.search(r"onnxruntime(?: version)?[:\s]+v?(\d+\.\d+\.\d+)", text, re.I)
    out["version"] = version.group(1) if version else None
    return out


def parse_describe(text: str, serial: str) -> dict:
    props, freqs = {}, {}
    for line in text.splitlines():
        if line.startswith("freq "):
            parts = line.split()
            if len(parts) == 3 and parts[2].isdigit():
                freqs[int(parts[1].removeprefix("cpu"))] = int(parts[2])
        elif "=" in line:
            k, _, v = line.partition("=")
            props[k.strip()] = v.strip()
    model = " ".join(filter(None, [props.get("ro.product.manufacturer"), props.get("ro.product.model")])) or serial
    soc = props.get("ro.soc.model") or props.get("ro.board.platform") or "unknown"
    release, sdk = props.get("ro.build.version.release", "?"), props.get("ro.build.version.sdk", "?")
    cores = int(props["nproc"]) if props.get("nproc", "").isdigit() else (len(freqs) or None)
    return {"hostname": f"{model} ({serial})", "os": "Android", "platform": f"Android {release} (API {sdk})",
            "machine": props.get("ro.product.cpu.abi") or "unknown", "cpu": soc, "cores_logical": cores,
            "cores_physical": cores, "cpu_max_freq_khz": {str(k): v for k, v in sorted(freqs.items())},
            "cpu_governor": props.get("governor") or None, "load_avg_1m": None,
            "python": "n/a (native benchmark binary)", "numpy": None, "_max_freqs": freqs}


def parse_temperature(text: str) -> float | None:
    """The hottest thermal zone in °C (sysfs reports millidegrees; some zones report degrees)."""
    temps = []
    for tok in text.split():
        try:
            v = float(tok)
        except ValueError:
            continue
        v = v / 1000.0 if abs(v) > 200 else v
        if -30 < v < 150:
            temps.append(v)
    return max(temps) if temps else None


def cpu_mask(cpus) -> int:
    return sum(1 << c for c in cpus)


def mask_cpus(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def big_cluster_mask(max_freqs: dict[int, int], threads: int | None) -> int | None:
    """taskset mask of the fastest cores (highest cpuinfo_max_freq), at least `threads` of them."""
    if not max_freqs:
        return None
    order = sorted(max_freqs, key=lambda c: (-max_freqs[c], c))
    top = max(max_freqs.values())
    chosen = [c for c in order if max_freqs[c] == top]
    if threads and threads > len(chosen):
        chosen = order[:threads]
    return cpu_mask(chosen)


def split_iterations(total: int, rounds: int) -> list[int]:
    """`total` timed runs over at most `rounds` rounds, sizes differing by at most one."""
    rounds = max(1, min(rounds, total))
    base, extra = divmod(total, rounds)
    return [base + (i < extra) for i in range(rounds)]


def _input_info(path: Path, batch: int) -> dict:
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - .ort files and unreadable graphs: the tool still runs them
        return {"note": "input generated by onnxruntime_perf_test -I (free dimensions = 1, batch via -f)"}
    inits = {i.name for i in graph.initializer}
    inp = next((i for i in graph.input if i.name not in inits), None)
    if inp is None:
        return {}
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in inp.type.tensor_type.shape.dim]
    shape = [batch if i == 0 and not isinstance(d, int) else (d if isinstance(d, int) else 1) for i, d in enumerate(dims)]
    return {"name": inp.name, "shape": shape, "dtype": "float32", "declared_shape": dims,
            "note": "random input generated by onnxruntime_perf_test -I -S SEED"}


def _state_message(serial: str, state: str) -> str:
    if state == "unauthorized":
        return f"Android device {serial} is unauthorized: accept the USB debugging prompt on the phone"
    if state == "offline":
        return f"Android device {serial} is offline: reconnect it (or adb kill-server; adb devices)"
    return f"Android device {serial} is in state {state!r}, not ready"


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""
