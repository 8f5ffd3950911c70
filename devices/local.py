"""This machine: the agent runs in a fresh Python process, so the peak RSS it reports is the artifact's own
(not the torch and data the calling process holds) and one profile's threads or pinning can't leak into the next."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from compress.errors import UserError
from devices.base import Device, ProfileOptions
from devices.profile import validate_profile
from runtimes.base import check_artifact

ROOT = Path(__file__).resolve().parents[1]


class LocalDevice(Device):
    name = "local"

    def run_profile(self, artifact: str | Path, runtime: str | None = None,
                    options: ProfileOptions | dict | None = None) -> dict:
        opts = ProfileOptions.coerce(options)
        path = check_artifact(artifact).resolve()
        with tempfile.TemporaryDirectory(prefix="compress-profile-") as tmp:
            out = Path(tmp) / "profile.json"
            # the JSON comes back through a file: a runtime that prints to stdout can't corrupt it
            cmd = [sys.executable, "-m", "devices.agent", "--artifact", str(path), "--json", str(out),
                   *(["--runtime", runtime] if runtime else []), *opts.agent_argv()]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            try:
                proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      timeout=opts.timeout_s, env=env)
            except subprocess.TimeoutExpired:
                raise UserError(f"profiling {path.name} took over {opts.timeout_s:g} s; "
                                f"lower --iterations or raise timeout_s") from None
            if proc.returncode != 0:
                raise UserError(f"profiling {path.name} failed: {_last_line(proc.stderr)}")
            try:
                profile = json.loads(out.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"profiling {path.name}: the agent wrote no readable profile ({e})") from None
        profile["target"] = self.name
        return validate_profile(profile, "agent output")


def _last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1].removeprefix("error: ") if lines else "no error message"
