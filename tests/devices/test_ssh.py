"""--device ssh://: end to end against a real OpenSSH server on 127.0.0.1 (tests/devices/conftest.py), plus the
pieces that need no server (URL parsing, the remote script's quoting, the missing-paramiko hint)."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.errors import UserError
from devices import DEVICES, get_device, profile_artifact
from devices.profile import SCHEMA, validate_profile
from devices.ssh import AGENT_FILES, SSHDevice, agent_bundle, parse_url, remote_script

ROOT = Path(__file__).resolve().parents[2]


def _leftovers(server) -> list[str]:
    return sorted(p.name for p in server.remote_tmp.iterdir())


def _agent_pids(server) -> list[int]:
    """The board-side agent processes (Python running agent/devices/agent.py; not the shells whose script text
    mentions it)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            comm = (cmdline.parent / "comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("python") and "agent/devices/agent.py --artifact" in text and "sh -c" not in text:
            try:
                cwd = os.readlink(cmdline.parent / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(server.remote_tmp)):
                pids.append(int(cmdline.parent.name))
    return pids


# ---- against the real server ------------------------------------------------------------------------------------

def test_profile_over_ssh_end_to_end(sshd, resnet20_artifacts):
    onnx_path, _ = resnet20_artifacts
    p = profile_artifact(str(onnx_path), "onnxruntime", device=sshd.url(), threads=1, warmup=3, iterations=25)
    assert validate_profile(p) is p and p["schema"] == SCHEMA
    assert p["target"] == sshd.base_url  # the query (key paths) is not part of the recorded target
    lat = p["latency_ms"]
    assert lat["n"] == 25 == len(p["samples_ms"]) and 0.01 < lat["min"] <= lat["p50"] <= lat["max"] < 1000
    assert p["throughput_items_per_s"] > 1 and p["load_ms"] > 0 and p["first_inference_ms"] > 0
    assert p["runtime"]["name"] == "onnxruntime" and p["runtime"]["threads"] == 1
    assert p["memory"]["isolated_process"] and p["memory"]["peak_rss_bytes"] > 10 * 2**20
    # the artifact recorded is the local file; the board's copy hashed the same
    assert p["artifact"]["path"] == str(onnx_path.resolve())
    assert p["artifact"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert p["artifact"]["remote_path"].startswith(f"{sshd.remote_tmp}/compress-")
    assert p["environment"]["hostname"] == socket.gethostname()
    assert p["settings"]["input"]["shape"] == [1, 3, 32, 32]
    # same machine, same model: the remote number is the local one's order of magnitude
    local = DEVICES.get("local")().run_profile(onnx_path, "onnxruntime", {"threads": 1, "warmup": 3, "iterations": 25})
    assert 0.25 < lat["p50"] / local["latency_ms"]["p50"] < 4
    assert _leftovers(sshd) == []  # the remote folder is gone after success


def test_openvino_ir_ships_xml_and_bin(sshd, resnet20_artifacts):
    _, xml = resnet20_artifacts
    p = get_device(sshd.url()).run_profile(xml, None, {"threads": 1, "warmup": 1, "iterations": 5, "cpus": [0]})
    assert p["runtime"]["name"] == "openvino" and p["environment"]["cpu_affinity"] == [0]
    assert [f["name"] for f in p["artifact"]["files"]] == ["resnet20.xml", "resnet20.bin"]
    assert _leftovers(sshd) == []


def test_wrong_host_key_is_refused(sshd, resnet20_artifacts, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().split()
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    with pytest.raises(UserError, match=r"HOST KEY MISMATCH.*SHA256:.*refusing to connect") as e:
        profile_artifact(str(resnet20_artifacts[0]), device=sshd.url(known_hosts=str(tmp_path / "known_hosts")),
                         iterations=1)
    assert "\n" not in str(e.value)
    assert _leftovers(sshd) == []


def test_unknown_host_key_is_refused(sshd, resnet20_artifacts, tmp_path):
    (tmp_path / "empty_known_hosts").write_text("")
    with pytest.raises(UserError, match=r"unknown host key for \[127\.0\.0\.1\]:\d+ .*SHA256:.*ssh-keyscan"):
        profile_artifact(str(resnet20_artifacts[0]), device=sshd.url(known_hosts=str(tmp_path / "empty_known_hosts")),
                         iterations=1)


def test_wrong_identity_fails_authentication(sshd, resnet20_artifacts, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    with pytest.raises(UserError, match="authentication failed.*authorized_keys"):
        profile_artifact(str(resnet20_artifacts[0]), device=sshd.url(identity_file=str(tmp_path / "stranger")),
                         iterations=1)


def test_missing_remote_python_is_one_clear_line_and_cleans_up(sshd, resnet20_artifacts):
    with pytest.raises(UserError, match=r"no Python interpreter '/nonexistent/python3' on the board"):
        profile_artifact(str(resnet20_artifacts[0]), device=sshd.url(python="/nonexistent/python3"), iterations=1)
    assert _leftovers(sshd) == []


def test_connection_dropped_mid_profile(sshd, resnet20_artifacts):
    """Kill the server's processes for our connection while the agent runs: the CLI exits 2 with one line that
    says the connection was lost, and the board-side shell stops the agent and removes its folder."""
    env = {**os.environ, "COMPRESS_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "profile", str(resnet20_artifacts[0]),
                             "--device", sshd.url(), "--threads", "1", "--warmup", "0", "--iterations", "10000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 40
        while not _agent_pids(sshd) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert _agent_pids(sshd), f"the remote agent never started: {proc.communicate(timeout=5)}"
        assert _leftovers(sshd), "the remote folder should exist while the agent runs"
        time.sleep(0.5)
        for pid in sshd.session_pids():
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "connection lost while profiling" in lines[0], err
    assert str(sshd.remote_tmp) + "/compress-" in lines[0]  # the folder is named for the user
    deadline = time.monotonic() + 15
    while (_leftovers(sshd) or _agent_pids(sshd)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftovers(sshd) == [] and _agent_pids(sshd) == []


def test_command_timeout_stops_and_cleans_up_the_board(sshd, resnet20_artifacts):
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"took over 2 s; lower --iterations or raise timeout_s \(the board stops"):
        profile_artifact(str(resnet20_artifacts[0]), device=sshd.url(), threads=1, warmup=0, iterations=10**7,
                         timeout_s=2)
    assert time.monotonic() - t0 < 20
    deadline = time.monotonic() + 15
    while (_leftovers(sshd) or _agent_pids(sshd)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftovers(sshd) == [] and _agent_pids(sshd) == []


# ---- no server needed --------------------------------------------------------------------------------------------

def test_device_specs_and_option_routing():
    from devices import LocalDevice, device_kind, split_options

    assert [device_kind(s) for s in ("local", "ssh://pi@b:22?x=1", "adb:R58:5555", "estimate:rpi5", "cuda:1", "")] == \
        ["local", "ssh", "adb", "estimate", "cuda", "local"]
    assert isinstance(get_device("local"), LocalDevice)
    assert split_options({"threads": 1, "identity_file": "k", "warmup": None}) == ({"threads": 1}, {"identity_file": "k"})
    with pytest.raises(UserError, match="takes no option"):
        get_device("local", identity_file="k")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        get_device("tpu:0")


def test_parse_url():
    t, opts = parse_url("ssh://pi@raspberrypi.local:2222?python=/opt/venv/bin/python&identity_file=~/.ssh/pi")
    assert (t.user, t.host, t.port) == ("pi", "raspberrypi.local", 2222)
    assert opts == {"python": "/opt/venv/bin/python", "identity_file": "~/.ssh/pi"}
    assert parse_url("ssh://board")[0].port == 0  # 0 = not given: ~/.ssh/config's, then 22
    for bad, message in [("ssh://", "expected ssh://"), ("ssh://pi@host:port", "port is not a number"),
                         ("ssh://pi@host?colour=blue", "unknown option")]:
        with pytest.raises(UserError, match=message):
            parse_url(bad)


def test_device_spec_and_options(tmp_path):
    key = tmp_path / "id"
    key.write_text("x")
    dev = get_device(f"ssh://alice@10.0.0.7:2200", identity_file=str(key), python="python3.11", connect_timeout=3)
    assert isinstance(dev, SSHDevice) and dev.shown == "ssh://alice@10.0.0.7:2200"
    assert (dev.identity_file, dev.python, dev.connect_timeout) == (str(key), "python3.11", 3.0)
    with pytest.raises(UserError, match="identity file not found"):
        get_device("ssh://alice@10.0.0.7?identity_file=/nonexistent/key")
    with pytest.raises(UserError, match="known_hosts file not found"):
        get_device("ssh://alice@10.0.0.7", known_hosts=str(tmp_path / "none"))
    with pytest.raises(UserError, match="connect_timeout must be a number"):
        get_device("ssh://alice@10.0.0.7?connect_timeout=soon")


def test_unreachable_port_is_a_user_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        (tmp_path / "m.onnx").write_bytes(b"x")
        with pytest.raises(UserError, match=r"connection refused \(nothing listens on 127.0.0.1 port"):
            get_device(f"ssh://u@127.0.0.1:{port}?connect_timeout=3").run_profile(tmp_path / "m.onnx", "onnxruntime")


def test_remote_script_quotes_everything():
    script = remote_script("compress-abc", "/tmp/it's here", "'/opt/my python/bin/python3' -X utf8",
                           ["--artifact", "model/a b'; rm -rf ~.onnx", "--iterations", "5"])
    assert "d='/tmp/it'\"'\"'s here'/compress-abc" in script
    assert "set -- '/opt/my python/bin/python3' -X utf8" in script
    assert "'model/a b'\"'\"'; rm -rf ~.onnx'" in script
    proc = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)  # valid POSIX sh
    assert proc.returncode == 0, proc.stderr


def test_agent_bundle_is_what_the_agent_imports():
    bundle = agent_bundle()
    assert {f"agent/{f}" for f in AGENT_FILES if (ROOT / f).is_file()} <= set(bundle)
    assert bundle["agent/devices/__init__.py"].decode().count("import") == 0  # a stub, not the toolchain's
    assert "agent/compress/io.py" not in bundle


def test_missing_paramiko_gives_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "paramiko", None)
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(UserError, match=r"pip install 'edge-compress\[ssh\]'"):
        get_device("ssh://u@127.0.0.1:1").run_profile(tmp_path / "m.onnx", "onnxruntime")


# ---- the agent's CUDA branch (devices/gpu.py), locally and over ssh ------------------------------------------------

@pytest.fixture(scope="module")
def torchscript_model(tmp_path_factory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("ts") / "tiny.ts"
    torch.jit.trace(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval(), torch.randn(1, 8)).save(str(path))
    return path


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="this machine has a CUDA device: the refusal path does not apply")
def test_cuda_device_without_gpu_is_one_clear_line(torchscript_model):
    with pytest.raises(UserError, match=r"^no CUDA device: torch.cuda.is_available\(\) is False \(torch .*\)$"):
        profile_artifact(str(torchscript_model), device="cuda", iterations=3, shape=(8,))
    with pytest.raises(UserError, match="measures the torch runtime"):
        profile_artifact(str(torchscript_model), "onnxruntime", device="cuda:0", iterations=3)


@pytest.mark.skipif(_has_cuda(), reason="this machine has a CUDA device: the refusal path does not apply")
def test_cuda_over_ssh_runs_the_gpu_agent_on_the_board(sshd, torchscript_model):
    with pytest.raises(UserError, match=r"ssh://.*: profiling tiny.ts failed: no CUDA device: torch.cuda"):
        profile_artifact(str(torchscript_model), "torch", device=sshd.url(cuda="0"), iterations=3, shape=(8,))
    assert _leftovers(sshd) == []


@pytest.mark.skipif(not _has_cuda(), reason="no CUDA device on this machine (torch.cuda.is_available() is False): "
                                            "CUDA-event timing and device memory are not exercised here")
def test_cuda_profile_times_with_events_and_reports_device_memory(torchscript_model):
    p = profile_artifact(str(torchscript_model), device="cuda:0", warmup=3, iterations=20, shape=(8,))
    assert p["target"] == "cuda:0" and p["latency_ms"]["n"] == 20 and p["latency_ms"]["p50"] > 0
    assert p["memory"]["device_peak_bytes"] > 0 and "max_memory_allocated" in p["memory"]["method"]
    assert p["environment"]["gpu"] and "torch.cuda.Event" in p["settings"]["timer"]
