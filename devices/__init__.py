"""Devices: where a session runs. Every device returns the same compress.profile/1 dict (devices/profile.py).

    profile = profile_artifact("model.onnx", "onnxruntime", device="local", threads=1, iterations=200)

Device specs (the CLI's --device and a recipe's `device:` key):

    local                           this machine, a fresh agent process (devices/local.py)
    ssh://user@host[:port][?k=v]    a Linux board over SSH, the same agent run there (devices/ssh.py);
                                    options identity_file, known_hosts, python, connect_timeout, remote_tmp
    adb  |  adb:SERIAL[?k=v]        an Android device through the adb client and a native benchmark binary
                                    (devices/adb.py); options benchmark, libs, rounds, cooldown_s, adb
    estimate:NAME[?k=v]             a prediction from devices/catalog.yaml and the ONNX graph, no device needed
                                    (devices/estimate.py); NAME = host (this machine, calibrated) or a catalog entry
    cuda[:INDEX]                    this machine's NVIDIA GPU, torch runtime, CUDA-event timing (devices/gpu.py)

Device options may also be given as keyword arguments (a recipe's profile stage passes its keys here): those
that are not ProfileOptions fields go to the device. Nothing here compresses or exports.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields
from urllib.parse import parse_qsl

from compress.errors import UserError
from compress.registry import Registry
from devices.base import Device, ProfileOptions
from devices.adb import AdbDevice
from devices.estimate import EstimateDevice
from devices.gpu import CudaDevice
from devices.local import LocalDevice
from devices.ssh import SSHDevice

# `python -m devices.estimate calibrate ...` imports this package first, which imports devices.estimate, so runpy
# then runs the module a second time as __main__ and warns; that second copy only parses arguments and calls the
# same functions, so the warning says nothing to a user
warnings.filterwarnings("ignore", message=r"'devices\.estimate' found in sys\.modules", category=RuntimeWarning)

DEVICES: Registry[type[Device]] = Registry("device")
DEVICES.add("local", LocalDevice)


# each imports its heavy dependency (paramiko, onnx, torch) only when used; none imports compress.* beyond
# compress.errors / compress.registry (devices/agent.py runs with this package on boards without the toolchain)
DEVICES.add("ssh", SSHDevice)
DEVICES.add("adb", AdbDevice)
DEVICES.add("estimate", EstimateDevice)
DEVICES.add("cuda", CudaDevice)

_PROFILE_FIELDS = {f.name for f in fields(ProfileOptions)}


def device_kind(spec: str) -> str:
    """'ssh://pi@board' -> 'ssh', 'adb:R58M' -> 'adb', 'estimate:rpi5' -> 'estimate', 'local' -> 'local'."""
    spec = (spec or "local").strip()
    if "://" in spec:
        return spec.split("://", 1)[0]
    return spec.split("?", 1)[0].split(":", 1)[0]


def get_device(spec: str = "local", **device_options) -> Device:
    """A Device instance from a spec string (see the module docstring) and device-specific options."""
    spec = (spec or "local").strip()
    kind = device_kind(spec)
    cls = DEVICES.get(kind)
    if hasattr(cls, "from_spec"):
        return cls.from_spec(spec, **device_options)
    rest = spec[len(kind):]
    if rest.startswith("?"):
        device_options = {**dict(parse_qsl(rest[1:], keep_blank_values=True)), **device_options}
    elif rest:
        raise UserError(f"device {spec!r}: {kind!r} takes no argument after ':'")
    if device_options:
        raise UserError(f"device {kind!r} takes no option(s) {', '.join(sorted(device_options))}")
    return cls()


def split_options(options: dict) -> tuple[dict, dict]:
    """(ProfileOptions fields, device options); None values are dropped (an unset CLI option)."""
    options = {k: v for k, v in options.items() if v is not None}
    return ({k: v for k, v in options.items() if k in _PROFILE_FIELDS},
            {k: v for k, v in options.items() if k not in _PROFILE_FIELDS})


def profile_artifact(artifact: str, runtime: str | None = None, device: str = "local", **options) -> dict:
    """Profile one artifact on a device by spec (the form the CLI and the recipe runner use)."""
    profile_opts, device_opts = split_options(options)
    return get_device(device, **device_opts).run_profile(artifact, runtime, profile_opts)


def profile_interleaved(artifacts: Sequence[tuple[str, str | None]], rounds: int,
                        announce: Callable[[int, int], None] | None = None, **options) -> list[list[dict]]:
    """Profile each (artifact, runtime) `rounds` times, interleaved (round 1 of every artifact, then round 2 ...),
    each run in a fresh process: load drift on a shared machine then hits every artifact alike. Returns each
    artifact's profiles in round order; announce(artifact index, round index) is called before each run."""
    out: list[list[dict]] = [[] for _ in artifacts]
    for r in range(rounds):
        for i, (artifact, runtime) in enumerate(artifacts):
            if announce:
                announce(i, r)
            out[i].append(profile_artifact(artifact, runtime=runtime, **options))
    return out


__all__ = ["DEVICES", "AdbDevice", "CudaDevice", "Device", "EstimateDevice", "LocalDevice", "ProfileOptions",
           "SSHDevice", "device_kind", "get_device", "profile_artifact", "profile_interleaved", "split_options"]
