"""Where a session runs. A Device measures an artifact with a runtime and returns a compress.profile/1 dict."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from compress.errors import UserError, is_whole


@dataclass
class ProfileOptions:
    """How to measure; every field is a CLI option and a recipe key of the same name."""

    threads: int | None = None             # intra-op threads; None = the runtime's default
    warmup: int = 10
    iterations: int = 100
    batch: int = 1
    seed: int = 0
    cpus: tuple[int, ...] | None = None    # pin the measuring process to these CPUs (Linux)
    shape: tuple[int, ...] | None = None   # per-sample input shape, for artifacts that don't record one (TorchScript)
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("threads", "warmup", "iterations", "batch", "seed"):  # a recipe's `iterations: ten`
            value = getattr(self, name)
            if not (is_whole(value) or (name == "threads" and value is None)):
                raise UserError(f"profile options: {name} must be a whole number, got {value!r}")
        for name in ("cpus", "shape"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (list, tuple)) and all(is_whole(v) for v in value)):
                raise UserError(f"profile options: {name} must be a list of whole numbers, got {value!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or not math.isfinite(self.timeout_s):
            raise UserError(f"profile options: timeout_s must be a number of seconds, got {self.timeout_s!r}")
        checks = [(self.threads is None or self.threads >= 1, "threads must be at least 1"),
                  (self.warmup >= 0, "warmup must be >= 0"), (self.iterations >= 1, "iterations must be >= 1"),
                  (self.batch >= 1, "batch must be >= 1"), (self.timeout_s > 0, "timeout_s must be > 0"),
                  (not self.cpus or all(c >= 0 for c in self.cpus), "cpus must be CPU numbers >= 0")]
        for ok, message in checks:
            if not ok:
                raise UserError(f"profile options: {message}")
        self.cpus = tuple(self.cpus) if self.cpus else None
        self.shape = tuple(self.shape) if self.shape else None

    @classmethod
    def coerce(cls, options: "ProfileOptions | dict | None") -> "ProfileOptions":
        if options is None or isinstance(options, cls):
            return options or cls()
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown profile option(s): {', '.join(sorted(unknown))}")
        return cls(**options)

    def agent_argv(self) -> list[str]:
        """The same options as devices/agent.py arguments (local and remote devices run the same agent)."""
        argv = ["--warmup", str(self.warmup), "--iterations", str(self.iterations), "--batch", str(self.batch),
                "--seed", str(self.seed)]
        if self.threads is not None:
            argv += ["--threads", str(self.threads)]
        if self.cpus:
            argv += ["--cpus", ",".join(map(str, self.cpus))]
        if self.shape:
            argv += ["--shape", ",".join(map(str, self.shape))]
        return argv

    def to_dict(self) -> dict:
        return asdict(self)


class Device(ABC):
    name: str = ""

    @abstractmethod
    def run_profile(self, artifact: str | Path, runtime: str | None = None,
                    options: ProfileOptions | dict | None = None) -> dict:
        """Measure `artifact` with `runtime` (default: by suffix); return a validated compress.profile/1 dict."""
