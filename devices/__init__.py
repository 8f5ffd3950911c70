"""Devices: where a session runs. `local` today; `ssh`, `adb` and `estimate` register here the same way.

    profile = DEVICES.get("local")().run_profile("model.onnx", "onnxruntime", {"threads": 1, "iterations": 200})

Nothing here compresses or exports; every device returns the same compress.profile/1 dict (devices/profile.py).
"""
from __future__ import annotations

from compress.registry import Registry
from devices.base import Device, ProfileOptions
from devices.local import LocalDevice

DEVICES: Registry[type[Device]] = Registry("device")
DEVICES.add("local", LocalDevice)



def profile_artifact(artifact: str, runtime: str | None = None, device: str = "local", **options) -> dict:
    """Profile one artifact on a device by name (the form the CLI and the recipe runner use)."""
    return DEVICES.get(device)().run_profile(artifact, runtime, {k: v for k, v in options.items() if v is not None})


__all__ = ["DEVICES", "Device", "LocalDevice", "ProfileOptions", "profile_artifact"]
