"""A remote Linux board over SSH: copy the artifact and the agent there, run the agent, bring the profile back.

    compress profile m.onnx --device 'ssh://pi@raspberrypi.local'
    compress profile m.xml  --device 'ssh://nvidia@10.0.0.7:2222?identity_file=~/.ssh/jetson&python=/opt/venv/bin/python3'

The board needs a POSIX sh, tar, Python 3 with numpy and the runtime being measured (`pip install
'edge-compress[agent]'`, or numpy + onnxruntime / openvino); not this toolchain. What runs there is the same
devices/agent.py that `--device local` runs, shipped with the few modules it imports (AGENT_FILES), so a profile
from a board and one from this machine come from the same code and the same compress.profile/1 schema.

Safety and hygiene:
- host keys are checked (known_hosts: the user's, or `known_hosts=FILE`); an unknown or changed key is refused
  with the offered key's fingerprint, never accepted silently;
- key authentication only: `identity_file=FILE` and/or a running ssh-agent (and ~/.ssh/id_* when no file is named);
- a unique remote folder `<remote_tmp>/compress-<12 hex>`, created by a remote shell that deletes it on exit. That
  shell also watches its stdin, which this side never closes: when the connection drops (cable, crash, Ctrl-C, a
  timeout here), it stops the agent and removes the folder itself, so nothing is left on the board, and the
  error names the folder.

Options (URL query or keyword arguments of SSHDevice / profile_artifact): identity_file, known_hosts, python
(remote interpreter, default python3), connect_timeout (s, default 10), remote_tmp (default $TMPDIR or /tmp),
cuda (a GPU index: run the agent's CUDA branch, devices/gpu.py, for the torch runtime on e.g. a Jetson).
The command timeout is the profile option timeout_s. Host aliases, users, ports and identity files from
~/.ssh/config apply as with `ssh`.
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import io
import json
import secrets
import shlex
import socket
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from compress.errors import UserError
from devices.base import Device, ProfileOptions
from devices.profile import artifact_record, validate_profile
from runtimes import RUNTIMES, default_runtime_for
from runtimes.base import artifact_files, check_artifact

ROOT = Path(__file__).resolve().parents[1]

# what devices/agent.py imports (tests/devices/test_ssh.py runs it from exactly this tree, without the project)
AGENT_FILES = ("compress/errors.py", "compress/registry.py", "runtimes/__init__.py", "runtimes/base.py",
               "runtimes/onnxruntime.py", "runtimes/openvino.py", "runtimes/torch.py", "devices/agent.py",
               "devices/profile.py", "devices/base.py", "devices/gpu.py", "compress/torch_device.py")
# package __init__ files that would pull in the whole toolchain are replaced by empty ones
AGENT_STUBS = {"compress/__init__.py": '"""compress: the stdlib-only modules devices/agent.py needs."""\n',
               "devices/__init__.py": '"""devices: the agent and its profile schema, as shipped to a board."""\n'}
OPTIONS = ("identity_file", "known_hosts", "python", "connect_timeout", "remote_tmp", "cuda")
_READY, _BEGIN = "@@compress-ready@@", "@@compress-profile@@"
# exit codes of the remote shell script (the agent itself exits 0, 1 (crash) or 2 (UserError))
_NO_DIR, _NO_GO, _NO_PYTHON = 97, 98, 96


@dataclass(frozen=True)
class SSHTarget:
    user: str
    host: str
    port: int = 22

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}" + (f":{self.port}" if self.port != 22 else "")


def parse_url(url: str) -> tuple[SSHTarget, dict]:
    """'ssh://user@host:port?k=v' -> (target, options). The user defaults to ~/.ssh/config's, then the local one."""
    parts = urlsplit(url)
    if parts.scheme != "ssh" or not parts.hostname:
        raise UserError(f"bad ssh device {url!r}: expected ssh://[user@]host[:port][?identity_file=...&python=...]")
    try:
        port = parts.port
    except ValueError:
        raise UserError(f"bad ssh device {url!r}: the port is not a number") from None
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise UserError(f"ssh device: unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(OPTIONS)})")
    user = unquote(parts.username) if parts.username else None
    return SSHTarget(user or "", parts.hostname, port or 0), options


class SSHDevice(Device):
    name = "ssh"

    def __init__(self, url: str, identity_file: str | None = None, known_hosts: str | None = None,
                 python: str | None = None, connect_timeout: float | str | None = None, remote_tmp: str | None = None,
                 cuda: int | str | None = None):
        target, query = parse_url(url)
        given = {"identity_file": identity_file, "known_hosts": known_hosts, "python": python,
                 "connect_timeout": connect_timeout, "remote_tmp": remote_tmp, "cuda": cuda}
        opts = {**query, **{k: v for k, v in given.items() if v is not None}}
        cfg = _ssh_config(target.host)
        self.target = SSHTarget(target.user or cfg.get("user") or getpass.getuser(), cfg.get("hostname", target.host),
                                target.port or int(cfg.get("port", 22)))
        self.shown = SSHTarget(self.target.user, target.host, self.target.port).url  # the name the user gave
        ident = opts.get("identity_file") or (cfg.get("identityfile") or [None])[0]
        self.identity_file = str(Path(ident).expanduser()) if ident else None
        self.known_hosts = str(Path(opts["known_hosts"]).expanduser()) if opts.get("known_hosts") else None
        self.python = opts.get("python") or "python3"
        self.remote_tmp = opts.get("remote_tmp") or None
        try:
            self.connect_timeout = float(opts.get("connect_timeout") or 10.0)
        except ValueError:
            raise UserError(f"{self.shown}: connect_timeout must be a number of seconds") from None
        cuda = opts.get("cuda")
        if cuda not in (None, "") and not str(cuda).isdigit():
            raise UserError(f"{self.shown}: cuda must be a GPU index (0, 1, ...)")
        self.cuda = None if cuda in (None, "") else int(cuda)
        if self.connect_timeout <= 0:
            raise UserError(f"{self.shown}: connect_timeout must be > 0")
        if self.identity_file and not Path(self.identity_file).is_file():
            raise UserError(f"{self.shown}: identity file not found: {self.identity_file}")
        if self.known_hosts and not Path(self.known_hosts).is_file():
            raise UserError(f"{self.shown}: known_hosts file not found: {self.known_hosts}")

    @classmethod
    def from_spec(cls, spec: str, **options) -> "SSHDevice":
        unknown = sorted(set(options) - set(OPTIONS))  # as keyword arguments (a recipe's keys), not only in the URL
        if unknown:
            raise UserError(f"ssh device: unknown option(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
        return cls(spec, **options)

    # ---- the profile ------------------------------------------------------------------------------------------
    def run_profile(self, artifact: str | Path, runtime: str | None = None,
                    options: ProfileOptions | dict | None = None) -> dict:
        opts = ProfileOptions.coerce(options)
        path = check_artifact(artifact).resolve()
        runtime = RUNTIMES.get(runtime or default_runtime_for(path)).name  # fail here, not on the board
        local = artifact_record(path)
        rdir = f"compress-{secrets.token_hex(6)}"
        agent_args = ["--artifact", f"model/{path.name}", "--runtime", runtime, *opts.agent_argv()]
        if self.cuda is not None:  # the agent's CUDA branch (torch runtime, CUDA events, allocator peak)
            agent_args = ["--cuda", str(self.cuda), *agent_args]
        script = remote_script(rdir, self.remote_tmp, self.python, agent_args,
                               entry="agent/devices/gpu.py" if self.cuda is not None else "agent/devices/agent.py")
        paramiko = _paramiko()
        client = self._connect(paramiko)
        run, where = None, {"dir": rdir}
        lost = lambda reason: self._lost(reason, where["dir"])  # noqa: E731
        try:
            transport = client.get_transport()
            transport.set_keepalive(5)
            run = transport.open_session(timeout=self.connect_timeout)
            run.exec_command("sh -c " + shlex.quote(script))
            out = _Reader(run)
            ready = out.line_starting(_READY, time.monotonic() + max(self.connect_timeout, 30.0), lost)
            if ready is None:
                code = run.recv_exit_status() if run.exit_status_ready() else None
                raise UserError(f"{self.shown}: could not create a folder under "
                                f"{self.remote_tmp or '$TMPDIR or /tmp'} on the board "
                                f"({_last_line(out.stderr_text()) or f'exit {code}'})")
            where["dir"] = ready.split(" ", 1)[1].strip()
            self._upload(transport, where["dir"], path, time.monotonic() + opts.timeout_s, lost)
            run.sendall(b"run\n")
            status = out.wait_exit(time.monotonic() + opts.timeout_s + 1.0, lost)
            if status is None:
                raise UserError(f"{self.shown}: profiling {path.name} took over {opts.timeout_s:g} s; lower --iterations "
                                f"or raise timeout_s (the board stops the agent and removes {where['dir']})")
            if status != 0:
                raise UserError(self._failure(status, out.stderr_text(), path.name))
            profile = _parse_profile(out.stdout_text(), self.shown)
        except UserError:
            raise
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise lost(f"{type(e).__name__}: {e}") from None
        finally:
            if run is not None:
                run.close()  # the remote shell sees EOF on stdin: it stops the agent and deletes the folder
            client.close()

        remote_files = {f["name"]: f["sha256"] for f in profile["artifact"]["files"]}
        if remote_files != {f["name"]: f["sha256"] for f in local["files"]}:
            raise UserError(f"{self.shown}: the artifact's sha256 on the board differs from {path.name}'s here "
                            f"(corrupted transfer?)")
        profile["artifact"] = {**local, "remote_path": f"{where['dir']}/{profile['artifact']['path']}"}
        profile["target"] = self.shown + (f"?cuda={self.cuda}" if self.cuda is not None else "")
        profile["notes"].append(f"measured on {profile['environment']['hostname']} over ssh; the artifact and the "
                                f"agent were copied to {where['dir']} and removed after the run")
        return validate_profile(profile, f"{self.shown} agent output")

    # ---- connection -------------------------------------------------------------------------------------------
    def _connect(self, paramiko):
        client = paramiko.SSHClient()
        if self.known_hosts:
            client.load_system_host_keys(self.known_hosts)  # read-only: nothing is ever written back
            source = self.known_hosts
        else:
            for f in ("/etc/ssh/ssh_known_hosts", "~/.ssh/known_hosts"):
                if Path(f).expanduser().is_file():
                    client.load_system_host_keys(str(Path(f).expanduser()))
            source = "~/.ssh/known_hosts"
        client.set_missing_host_key_policy(_reject_policy(paramiko, self, source))
        t = self.target
        try:
            client.connect(t.host, t.port, username=t.user, key_filename=self.identity_file,
                           allow_agent=True, look_for_keys=self.identity_file is None, timeout=self.connect_timeout,
                           banner_timeout=self.connect_timeout, auth_timeout=self.connect_timeout,
                           channel_timeout=self.connect_timeout)
        except UserError:
            client.close()
            raise
        except paramiko.BadHostKeyException as e:
            client.close()
            raise UserError(
                f"{self.shown}: HOST KEY MISMATCH: the server offered {e.key.get_name()} {fingerprint(e.key)} but "
                f"{source} has {fingerprint(e.expected_key)} for {_known_name(t)}; refusing to connect (someone may "
                f"be intercepting the connection, or the board was re-installed: then remove the old entry with "
                f"ssh-keygen -R '{_known_name(t)}')") from None
        except paramiko.PasswordRequiredException:
            client.close()
            raise UserError(f"{self.shown}: the identity file {self.identity_file} is passphrase-protected; load it "
                            f"into ssh-agent (ssh-add) and retry") from None
        except paramiko.AuthenticationException:
            client.close()
            tried = [f"identity file {self.identity_file}" if self.identity_file else "~/.ssh/id_*", "ssh-agent"]
            raise UserError(f"{self.shown}: authentication failed for user {t.user!r} (key only; tried "
                            f"{', '.join(tried)}); add the public key to the board's ~/.ssh/authorized_keys") from None
        except socket.timeout:
            client.close()
            raise UserError(f"{self.shown}: no answer within {self.connect_timeout:g} s (connect_timeout)") from None
        except paramiko.ssh_exception.NoValidConnectionsError:
            client.close()
            raise UserError(f"{self.shown}: connection refused (nothing listens on {t.host} port {t.port})") from None
        except (OSError, paramiko.SSHException) as e:
            client.close()
            reason = str(e) or type(e).__name__
            if "No authentication methods available" in reason:
                raise UserError(f"{self.shown}: no key to log in with (key authentication only): give "
                                f"?identity_file=PATH or load a key into ssh-agent") from None
            raise UserError(f"{self.shown}: cannot connect ({reason.splitlines()[0][:160]})") from None
        return client

    def _upload(self, transport, remote: str, path: Path, deadline: float, lost) -> None:
        """One tar stream over one exec channel: needs only tar on the board (no SFTP subsystem)."""
        chan = transport.open_session(timeout=self.connect_timeout)
        chan.exec_command(f"tar -x -f - -C {shlex.quote(remote)}")
        chan.settimeout(max(1.0, deadline - time.monotonic()))
        writer = _ChannelWriter(chan)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for arcname, data in agent_bundle().items():
                _add(tar, arcname, io.BytesIO(data), len(data), 0o644)
            for f in artifact_files(path):
                with open(f, "rb") as fh:
                    _add(tar, f"model/{f.name}", fh, f.stat().st_size, 0o644)
        chan.shutdown_write()
        reader = _Reader(chan)
        status = reader.wait_exit(deadline, lost)
        if status != 0:
            what = "timed out" if status is None else f"failed ({_last_line(reader.stderr_text()) or f'tar exit {status}'})"
            raise UserError(f"{self.shown}: copying {path.name} to the board {what}; is tar installed there?")
        chan.close()

    def _lost(self, reason: str, remote: str) -> UserError:
        where = f" its folder {remote}" if "/" in remote else f" its folder .../{remote}"
        return UserError(f"{self.shown}: connection lost while profiling ({reason}); the remote shell stops the "
                         f"agent and deletes{where} when it sees the connection close (if the board itself went "
                         f"down, remove it by hand)")

    def _failure(self, status: int, stderr: str, name: str) -> str:
        last = _last_line(stderr).removeprefix("error: ")
        if status == _NO_PYTHON:
            return (f"{self.shown}: no Python interpreter {self.python!r} on the board; install Python 3 with numpy "
                    f"and the runtime, or name one with ?python=/path/to/python3")
        if "ModuleNotFoundError" in last or "No module named" in last:
            return (f"{self.shown}: the board's Python lacks a module ({last}); on the board: "
                    f"pip install 'edge-compress[agent]' (numpy + onnxruntime) or numpy and the runtime you measure")
        if status in (124, 137, 143):
            return f"{self.shown}: the agent was stopped on the board (exit {status}) while profiling {name}"
        return f"{self.shown}: profiling {name} failed: {last or f'exit {status}'}"


# ---- the remote side -------------------------------------------------------------------------------------------

def remote_script(dirname: str, remote_tmp: str | None, python: str, agent_args: list[str],
                  entry: str = "agent/devices/agent.py") -> str:
    """The POSIX sh program the board runs. Its stdin is the lifeline: this side never closes it while the run
    lasts, so EOF on it means the connection is gone; then the agent is stopped and the folder removed (EXIT trap).
    Every value from this side is shell-quoted."""
    base = shlex.quote(remote_tmp) if remote_tmp else '"${TMPDIR:-/tmp}"'
    py = " ".join(shlex.quote(p) for p in shlex.split(python)) or "python3"
    args = " ".join(shlex.quote(a) for a in agent_args)
    return f"""set -u
d={base}/{shlex.quote(dirname)}
a= w=
cleanup() {{ [ -z "$a" ] || kill -TERM "$a" 2>/dev/null; [ -z "$w" ] || kill "$w" 2>/dev/null; rm -rf "$d"; }}
mkdir -m 700 "$d" || exit {_NO_DIR}
trap cleanup EXIT
trap 'exit 129' HUP INT TERM PIPE
echo "{_READY} $d"
read -r go || exit {_NO_GO}
[ "$go" = run ] || exit {_NO_GO}
set -- {py}
command -v "$1" >/dev/null 2>&1 || exit {_NO_PYTHON}
cd "$d" || exit {_NO_DIR}
PYTHONPATH="$d/agent" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 \\
  "$@" {shlex.quote(entry)} {args} --json "$d/profile.json" >"$d/agent.out" </dev/null &
a=$!
exec 3<&0
( while read -r _ <&3; do :; done; kill -TERM "$a" 2>/dev/null ) <&3 &
w=$!
wait "$a"
rc=$?
a=
[ "$rc" -eq 0 ] || exit "$rc"
echo "{_BEGIN}"
cat "$d/profile.json"
"""


def agent_bundle() -> dict[str, bytes]:
    """arcname -> bytes of the agent tree shipped to the board (under agent/)."""
    files = {f"agent/{rel}": (ROOT / rel).read_bytes() for rel in AGENT_FILES if (ROOT / rel).is_file()}
    files.update({f"agent/{rel}": text.encode() for rel, text in AGENT_STUBS.items()})
    return files


def _add(tar: tarfile.TarFile, arcname: str, fh, size: int, mode: int) -> None:
    info = tarfile.TarInfo(arcname)
    info.size, info.mode, info.mtime = size, mode, int(time.time())
    tar.addfile(info, fh)


# ---- helpers ---------------------------------------------------------------------------------------------------

def _paramiko():
    try:
        import paramiko
    except ImportError:
        raise UserError("the ssh device needs paramiko: pip install 'edge-compress[ssh]' (or pip install paramiko)") from None
    return paramiko


def _reject_policy(paramiko, device: SSHDevice, source: str):
    class RejectUnknown(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            raise UserError(
                f"{device.shown}: unknown host key for {hostname} (not in {source}); the server offered "
                f"{key.get_name()} {fingerprint(key)}. Check that fingerprint on the board (ssh-keygen -lf "
                f"/etc/ssh/ssh_host_{key.get_name().removeprefix('ssh-').split('-')[0]}_key.pub), then add it, e.g. "
                f"ssh-keyscan -p {device.target.port} {device.target.host} >> ~/.ssh/known_hosts, "
                f"or point ?known_hosts= at a file that has it")

    return RejectUnknown()


def fingerprint(key) -> str:
    """OpenSSH's SHA256:... fingerprint of a paramiko key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _known_name(t: SSHTarget) -> str:
    return t.host if t.port == 22 else f"[{t.host}]:{t.port}"


def _ssh_config(alias: str) -> dict:
    path = Path("~/.ssh/config").expanduser()
    if not path.is_file():
        return {}
    try:
        import paramiko

        found = paramiko.SSHConfig.from_path(str(path)).lookup(alias)
    except Exception:  # noqa: BLE001 - a config we can't read is one we don't use (ssh would say why)
        return {}
    return {k: v for k, v in found.items() if k in ("hostname", "user", "port", "identityfile")}


def _parse_profile(stdout: str, shown: str) -> dict:
    _, found, body = stdout.partition(_BEGIN)
    if not found:
        raise UserError(f"{shown}: the board's agent ended without a profile")
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise UserError(f"{shown}: the board's agent wrote an unreadable profile ({e})") from None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class _ChannelWriter:
    """A file-like sink for tarfile's stream mode."""

    def __init__(self, chan):
        self.chan = chan

    def write(self, data: bytes) -> int:
        self.chan.sendall(data)
        return len(data)


class _Reader:
    """Drains a channel's stdout and stderr without blocking past a deadline (paramiko's windows would stall a
    remote that writes more than 2 MiB to a stream nobody reads)."""

    def __init__(self, chan):
        self.chan, self.out, self.err = chan, bytearray(), bytearray()

    def _pump(self, wait: float) -> None:
        got = False
        while self.chan.recv_ready():
            data = self.chan.recv(1 << 16)
            if not data:
                break
            self.out += data
            got = True
        while self.chan.recv_stderr_ready():
            self.err += self.chan.recv_stderr(1 << 16)
            got = True
        if not got:
            time.sleep(wait)

    def _gone(self) -> bool:
        t = self.chan.get_transport()
        return t is None or not t.is_active()

    def line_starting(self, prefix: str, deadline: float, lost) -> str | None:
        while time.monotonic() < deadline:
            self._pump(0.02)
            text = self.out.decode(errors="replace")
            for line in text[:text.rfind("\n") + 1].splitlines():  # complete lines only
                if line.startswith(prefix):
                    return line
            if self.chan.exit_status_ready() and not self.chan.recv_ready():
                return None
            if self._gone():
                raise lost("the transport closed while starting the remote shell")
        raise lost("the remote shell did not start in time")

    def wait_exit(self, deadline: float, lost) -> int | None:
        """The exit status, None past the deadline; raises `lost` when the connection goes without one."""
        while time.monotonic() < deadline:
            self._pump(0.05)
            if self.chan.exit_status_ready():
                drain_until = time.monotonic() + 2.0  # the output that came before the status, up to EOF
                while time.monotonic() < drain_until and (self.chan.recv_ready() or self.chan.recv_stderr_ready()
                                                          or not self.chan.eof_received):
                    self._pump(0.01)
                    if self._gone() or (self.chan.closed and not self.chan.recv_ready()):
                        break
                status = self.chan.recv_exit_status()
                if status == -1:  # closed without an exit-status message: the server side went away
                    raise lost("the channel closed without an exit status")
                return status
            if self._gone():
                raise lost("the server closed the connection")
        return None

    def stdout_text(self) -> str:
        return self.out.decode(errors="replace")

    def stderr_text(self) -> str:
        self._pump(0)
        return self.err.decode(errors="replace")
