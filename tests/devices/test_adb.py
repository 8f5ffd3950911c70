"""--device adb: what can be checked without a phone.

- the REAL adb client (apt-get install adb) with no device attached: a clear one-line "no device" UserError;
- command construction, device listing, result-file and stdout parsing (a sample written from the format in
  onnxruntime's onnxruntime/test/perftest/performance_runner.cc: PerformanceResult::DumpToFile and Run());
- the whole push / describe / rounds / cleanup flow against a FAKE adb (a script that maps /data/local/tmp to a
  temp folder and runs `adb shell` commands with the local sh) and a fake perf tool that writes that format.
  This checks our orchestration, not a phone: no real Android device or onnxruntime_perf_test was available.
"""
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from compress.errors import UserError
from devices import get_device
from devices.adb import (AdbDevice, big_cluster_mask, parse_describe, parse_devices, parse_perf_test_stdout,
                         parse_result_file, parse_temperature, perf_test_command, split_iterations)
from devices.profile import validate_profile

# what onnxruntime_perf_test prints for `-m times -r 5 -e cpu -I -S 0 -s model.onnx result.txt`
# (PerformanceRunner::Run summary, then DumpToFile's statistics to stdout)
PERF_TEST_STDOUT = """\
Session creation time cost: 0.0412713 s
First inference time cost: 3 ms
Total inference time cost: 0.0107651 s
Total inference requests: 5
Average inference time cost: 2.15302 ms
Total inference run time: 0.0108012 s
Number of inferences per second: 462.911
Avg CPU usage: 12 %
Peak working set size: 28672000 bytes
Min Latency: 0.00201 s
Max Latency: 0.00241 s
P50 Latency: 0.00213 s
P90 Latency: 0.00241 s
P95 Latency: 0.00241 s
P99 Latency: 0.00241 s
P999 Latency: 0.00241 s
"""
# the result file: one `model_name,time_cost_s,peak_workingset,avg_cpu,run` line per run, a blank line, statistics
PERF_TEST_RESULT = """\
tmp,0.00241,28672000,12,0
tmp,0.00213,28672000,12,1
tmp,0.00201,28672000,12,2
tmp,0.00209,28672000,12,3
tmp,0.00212,28672000,12,4

Min Latency: 0.00201 s
Max Latency: 0.00241 s
P50 Latency: 0.00212 s
"""


def test_parse_perf_test_output():
    assert parse_result_file(PERF_TEST_RESULT) == pytest.approx([2.41, 2.13, 2.01, 2.09, 2.12])
    s = parse_perf_test_stdout(PERF_TEST_STDOUT)
    assert s["session_creation_s"] == pytest.approx(0.0412713) and s["first_inference_ms"] == 3
    assert s["peak_working_set_bytes"] == 28672000 and s["requests"] == 5 and s["p50_s"] == pytest.approx(0.00213)
    with pytest.raises(UserError, match="no timing summary.*failed to initialize"):
        parse_perf_test_stdout("some log\nfailed to initialize.\n")


def test_perf_test_command():
    cmd = perf_test_command("/data/local/tmp/c/onnxruntime_perf_test", "/data/local/tmp/c/my model.onnx",
                            "/data/local/tmp/c/result-0.txt", warmup=10, iterations=100, threads=2, seed=7, batch=4,
                            mask=0xF0, libdir="/data/local/tmp/c")
    assert cmd == ("LD_LIBRARY_PATH=/data/local/tmp/c taskset f0 /data/local/tmp/c/onnxruntime_perf_test -m times "
                   "-r 110 -e cpu -I -S 7 -o 99 -s -x 2 -y 1 -f batch:4 '/data/local/tmp/c/my model.onnx' "
                   "/data/local/tmp/c/result-0.txt")
    plain = perf_test_command("ptest", "m.onnx", "r.txt", warmup=0, iterations=5, threads=None, seed=0, batch=1, mask=None)
    assert plain == "ptest -m times -r 5 -e cpu -I -S 0 -o 99 -s m.onnx r.txt"


def test_devices_and_cluster_helpers():
    listing = "List of devices attached\nR58M123ABC\tdevice usb:1-1 product:x model:SM_S918B\n" \
              "192.168.1.5:5555\tunauthorized\n* daemon started successfully\n"
    assert parse_devices(listing) == {"R58M123ABC": "device", "192.168.1.5:5555": "unauthorized"}
    # Snapdragon 8 Gen 3: 2 x A520, 5 x A720, 1 x X4 -> the X4 alone; 3 threads -> X4 + two fastest A720s
    freqs = {0: 2265600, 1: 2265600, 2: 2956800, 3: 2956800, 4: 2956800, 5: 3148800, 6: 3148800, 7: 3302400}
    assert big_cluster_mask(freqs, None) == 0x80 and big_cluster_mask(freqs, 3) == 0xE0
    assert big_cluster_mask({}, 1) is None
    assert split_iterations(100, 3) == [34, 33, 33] and split_iterations(2, 5) == [1, 1]
    assert parse_temperature("41000\n38500\n-1\nfoo\n") == 41.0 and parse_temperature("") is None
    env = parse_describe("ro.product.manufacturer=samsung\nro.product.model=SM-S928B\nro.soc.model=SM8650\n"
                         "ro.build.version.release=14\nro.build.version.sdk=34\nro.product.cpu.abi=arm64-v8a\n"
                         "nproc=8\nfreq cpu0 2265600\nfreq cpu7 3302400\ngovernor=schedutil\n", "R58M")
    assert env["hostname"] == "samsung SM-S928B (R58M)" and env["cpu"] == "SM8650" and env["platform"] == "Android 14 (API 34)"
    assert env["cores_logical"] == 8 and env["_max_freqs"] == {0: 2265600, 7: 3302400}


def test_spec_parsing():
    d = get_device("adb:192.168.1.5:5555?benchmark=/data/local/tmp/onnxruntime_perf_test&rounds=2&cooldown_s=0")
    assert isinstance(d, AdbDevice) and d.serial == "192.168.1.5:5555" and d.rounds == 2 and d.cooldown_s == 0
    assert get_device("adb").serial is None
    for bad, message in [("adb?rounds=0", "rounds must be >= 1"), ("adb?colour=red", "unknown option"),
                         ("adb?rounds=many", "must be an integer")]:
        with pytest.raises(UserError, match=message):
            get_device(bad)


def test_needs_a_benchmark_binary_and_an_onnx_artifact(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "m.xml").write_bytes(b"x")
    with pytest.raises(UserError, match="needs a native benchmark binary"):
        get_device("adb").run_profile(tmp_path / "m.onnx")
    with pytest.raises(UserError, match="give a .onnx or .ort artifact"):
        get_device("adb?benchmark=x").run_profile(tmp_path / "m.xml")


def test_missing_adb_client_gives_the_install_hint(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(UserError, match="adb client.*apt-get install adb"):
        get_device("adb?benchmark=x&adb=/nonexistent/adb").run_profile(tmp_path / "m.onnx")


# ---- the real adb client, no phone ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_adb():
    """The real adb client on its own server port (killed afterwards); installed with apt-get when missing."""
    if not shutil.which("adb") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for pkg in ("adb", "android-tools-adb"):
            subprocess.run(["apt-get", "install", "-y", "-q", pkg], env=env, capture_output=True, timeout=600)
            if shutil.which("adb"):
                break
    adb = shutil.which("adb")
    if not adb:
        pytest.skip("the adb client is not installed and cannot be installed here (apt-get install adb)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    old = os.environ.get("ANDROID_ADB_SERVER_PORT")
    os.environ["ANDROID_ADB_SERVER_PORT"] = port  # our own adb server, on loopback, not a shared one
    yield adb
    subprocess.run([adb, "kill-server"], capture_output=True, timeout=30)
    if old is None:
        os.environ.pop("ANDROID_ADB_SERVER_PORT", None)
    else:
        os.environ["ANDROID_ADB_SERVER_PORT"] = old


def test_real_adb_without_a_device(real_adb, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "perf_test").write_bytes(b"x")
    with pytest.raises(UserError, match=r"^no Android device connected \(adb devices lists none\)") as e:
        get_device(f"adb?benchmark={tmp_path / 'perf_test'}").run_profile(tmp_path / "m.onnx")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"Android device 'R58M123ABC' is not connected"):
        get_device(f"adb:R58M123ABC?benchmark={tmp_path / 'perf_test'}").run_profile(tmp_path / "m.onnx")


def test_real_adb_cli_exit_code(real_adb, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "profile", str(tmp_path / "m.onnx"), "--device",
                           f"adb?benchmark={tmp_path / 'm.onnx'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: no Android device connected (adb devices lists none): plug one in with USB debugging on, "
        "or `adb connect HOST:PORT` for wireless debugging"]


# ---- the whole flow against a fake adb (see the module docstring) ----------------------------------------------

FAKE_ADB = r'''#!__PYTHON__
import os, shutil, subprocess, sys
ROOT = os.environ["FAKE_ADB_ROOT"]          # stands in for the phone's /
args = sys.argv[1:]
if args[:1] == ["-s"]:
    serial, args = args[1], args[2:]
    assert serial == "FAKE123", serial
def local(p): return p.replace("/data/local/tmp", ROOT + "/data/local/tmp")
with open(ROOT + "/adb.log", "a") as log: log.write(" ".join(args) + "\n")
if args[0] == "devices":
    print("List of devices attached\nFAKE123\tdevice\n")
elif args[0] == "push":
    os.makedirs(os.path.dirname(local(args[2])), exist_ok=True); shutil.copy(args[1], local(args[2]))
elif args[0] == "shell":
    env = {**os.environ, "PATH": ROOT + "/bin:" + os.environ["PATH"]}
    sys.exit(subprocess.run(["sh", "-c", local(args[1])], env=env).returncode)
'''
FAKE_PERF_TEST = r'''#!__PYTHON__
import sys, random
a = sys.argv[1:]
runs = int(a[a.index("-r") + 1]); model, result = a[-2], a[-1]
assert a[a.index("-e") + 1] == "cpu" and "-I" in a and open(model, "rb").read(4)
with open(result, "a") as f:
    for i in range(runs):
        f.write(f"tmp,{0.002 + random.random() * 1e-4:.6f},28672000,12,{i}\n")
print("Session creation time cost: 0.0412713 s\nFirst inference time cost: 3 ms\nTotal inference requests: %d\n"
      "Average inference time cost: 2.05 ms\nPeak working set size: 28672000 bytes" % runs)
'''
FAKE_GETPROP = "#!/bin/sh\ncase $1 in ro.product.model) echo Pixel-Fake;; ro.soc.model) echo SM8650;; " \
               "ro.build.version.release) echo 14;; ro.build.version.sdk) echo 34;; *) echo;; esac\n"


def _script(path: Path, text: str) -> Path:
    path.write_text(text.replace("__PYTHON__", sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_full_flow_with_fake_adb(tmp_path, monkeypatch):
    root = tmp_path / "phone"
    (root / "bin").mkdir(parents=True)
    _script(root / "bin" / "getprop", FAKE_GETPROP)
    adb = _script(tmp_path / "adb", FAKE_ADB)
    bench = _script(tmp_path / "onnxruntime_perf_test", FAKE_PERF_TEST)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"fake model bytes")
    monkeypatch.setenv("FAKE_ADB_ROOT", str(root))
    dev = get_device(f"adb:FAKE123?adb={adb}&benchmark={bench}&rounds=3&cooldown_s=0")
    p = dev.run_profile(model, None, {"warmup": 2, "iterations": 10, "threads": 1, "cpus": [0]})
    assert validate_profile(p) is p and p["target"] == "adb:FAKE123"
    assert p["latency_ms"]["n"] == 10 and 2.0 <= p["latency_ms"]["p50"] <= 2.1
    assert p["load_ms"] == pytest.approx(41.2713) and p["first_inference_ms"] == 3
    assert p["memory"]["peak_rss_bytes"] == 28672000 and p["environment"]["cpu"] == "SM8650"
    assert p["environment"]["cpu_affinity"] == [0] and len(p["environment"]["thermal_c_per_round"]) == 4
    assert "taskset 1 " in p["runtime"]["options"]["command"] and " -x 1 -y 1 " in p["runtime"]["options"]["command"]
    log = (root / "adb.log").read_text().splitlines()
    assert sum(line.startswith("shell taskset 1 ") for line in log) == 3  # three rounds, 4 + 3 + 3 (+2 warm-up) runs
    assert log[-1].startswith("shell rm -rf /data/local/tmp/compress-")
    assert list((root / "data" / "local" / "tmp").iterdir()) == []  # pushed files removed
