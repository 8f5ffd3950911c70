"""Where torch runs a method's own compute (Genie-D synthesis, Genie-M reconstruction): cpu, cuda[:N] or auto.

This is the machine doing the compressing, not the deployment target (`compress profile --device`). Inputs and
the returned model stay on the CPU; only the heavy loop moves. `auto` takes the first CUDA GPU torch sees.
"""
from __future__ import annotations

import re

from compress.errors import UserError

CHOICES_HELP = "auto (a CUDA GPU when torch sees one, else cpu) | cpu | cuda | cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def cuda_unavailable_reason(torch) -> str | None:
    """None when a CUDA device can be used, else why not (one line)."""
    if not torch.cuda.is_available():
        build = getattr(torch.version, "cuda", None)
        return (f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"{'CUDA ' + build + ' build' if build else 'a CPU-only build'})")
    return None


def check_spec(spec: str, option: str = "--torch-device") -> None:
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise UserError(f"{option} {spec!r}: give {CHOICES_HELP}")


def resolve(spec: str, option: str = "--torch-device") -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> 'cpu' or 'cuda:N' that exists here; one-line error otherwise."""
    import torch

    check_spec(spec, option)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return "cpu"
    reason = cuda_unavailable_reason(torch)
    if reason:
        raise UserError(f"{option} {spec}: {reason}")
    index = int(spec.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"{option} {spec}: cuda:{index} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return f"cuda:{index}"
