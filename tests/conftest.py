"""Shared fixtures: the real assets (../shared/assets) and a CLI runner that goes through main()."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("COMPRESS_NO_PROGRESS", "1")


def _assets() -> Path:
    for c in (os.environ.get("COMPRESS_ASSETS"), ROOT.parent / "shared" / "assets"):
        if c and Path(c).is_dir():
            return Path(c)
    pytest.exit("shared assets not found: set COMPRESS_ASSETS", returncode=2)


ASSETS = _assets()
RESNET20 = ASSETS / "models" / "resnet20-12fca82f.th"
RESNET32 = ASSETS / "models" / "resnet32-d509ac18.th"
TEST_LOSSLESS = ASSETS / "data" / "cifar10_test_lossless846.npz"
TEST_JPEG = ASSETS / "data" / "cifar10_test_jpeg.npz"
TRAIN20K = ASSETS / "data" / "cifar10_train20k_jpeg.npz"
CALIB1000 = ASSETS / "data" / "cifar10_calib1000_jpeg.npz"


def load_benchmark(filename: str):
    """A benchmark script under benchmarks/ imported as a module (its bookkeeping is tested without model runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{Path(filename).stem}", ROOT / "benchmarks" / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess: exit codes and stderr exactly as a user sees them."""
    env = {**os.environ, "COMPRESS_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "compress.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def resnet20():
    from compress.io import load_model

    return load_model(RESNET20, arch="resnet20")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module: on a CPU shared with other jobs two threads run several times
    slower, not faster. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
