"""A real OpenSSH server on 127.0.0.1 for tests/devices/test_ssh.py, and a real ResNet-20 ONNX / IR to send it.

The server is this machine's /usr/sbin/sshd (installed with apt-get when missing and possible), started on a
free port with its own host key, its own sshd_config and an authorized key generated for the test; key login
only. The "board's" Python is this venv's interpreter run with -S and only site-packages on PYTHONPATH: numpy and
the runtimes are there, the editable install of this project is not, so the remote agent can only use the files
devices/ssh.py ships.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest

SSHD = "/usr/sbin/sshd"


def _ensure_openssh() -> str | None:
    """None when sshd and ssh-keygen are there (installing them if we can), else the reason we can't."""
    if Path(SSHD).is_file() and shutil.which("ssh-keygen"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "openssh-server is not installed and cannot be installed here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server"], env=env, capture_output=True, timeout=600)
        if not Path(SSHD).is_file():
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server"], env=env, capture_output=True,
                           timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"installing openssh-server failed: {e}"
    if Path(SSHD).is_file() and shutil.which("ssh-keygen"):
        return None
    return "apt-get install openssh-server did not provide /usr/sbin/sshd and ssh-keygen"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "compress-test", "-f", str(path)],
                   check=True, capture_output=True)


@dataclass
class SSHServer:
    port: int
    user: str
    identity: Path
    known_hosts: Path
    python: Path          # the board's interpreter (see the module docstring)
    remote_tmp: Path      # where the device creates its compress-* folders
    proc: subprocess.Popen
    log: Path
    dir: Path

    @property
    def base_url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def url(self, **override) -> str:
        query = {"identity_file": str(self.identity), "known_hosts": str(self.known_hosts),
                 "python": str(self.python), "remote_tmp": str(self.remote_tmp), "connect_timeout": "10", **override}
        return f"{self.base_url}?{urlencode({k: v for k, v in query.items() if v is not None})}"

    def session_pids(self) -> list[int]:
        """sshd processes serving connections (descendants of the listener whose name is sshd*)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            pid, rest = int(text.split(" ", 1)[0]), text.rsplit(")", 1)[1].split()
            children.setdefault(int(rest[1]), []).append(pid)
        out, todo = [], list(children.get(self.proc.pid, []))
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip().startswith("sshd"):
                    out.append(pid)
            except OSError:
                pass
        return out


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> SSHServer:
    reason = _ensure_openssh()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o755)
    _keygen(d / "host_ed25519")
    _keygen(d / "client_ed25519")
    shutil.copy(d / "client_ed25519.pub", d / "authorized_keys")
    user = getpass.getuser()
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # OpenSSH's privilege-separation directory
    port = _free_port()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_ed25519
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
LogLevel VERBOSE
""")
    check = subprocess.run([SSHD, "-t", "-f", str(d / "sshd_config")], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"sshd rejects the test config: {check.stderr.strip()}")
    log = d / "sshd.log"
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"sshd exited at start: {log.read_text()[-300:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.skip("sshd did not listen within 15 s")
    host_pub = (d / "host_ed25519.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    site = os.pathsep.join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))
    board_python = d / "board-python"
    board_python.write_text(f'#!/bin/sh\nPYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site}" exec {sys.executable} -S "$@"\n')
    board_python.chmod(0o755)
    remote_tmp = d / "board-tmp"
    remote_tmp.mkdir()
    server = SSHServer(port, user, d / "client_ed25519", d / "known_hosts", board_python, remote_tmp, proc, log, d)
    yield server
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def resnet20_artifacts(tmp_path_factory) -> tuple[Path, Path]:
    """The real ResNet-20 as FP32 ONNX and OpenVINO IR (.xml + .bin), dynamic batch."""
    import openvino as ov
    import torch

    from compress.io import zoo_model

    d = tmp_path_factory.mktemp("artifacts")
    model = zoo_model("resnet20").model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(d / "resnet20.onnx"), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    # save_model stores FP16 weights by default: this is the FP32 IR
    ov.save_model(ov.convert_model(str(d / "resnet20.onnx")), str(d / "resnet20.xml"), compress_to_fp16=False)
    return d / "resnet20.onnx", d / "resnet20.xml"
