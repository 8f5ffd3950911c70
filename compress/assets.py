"""Where the shared real assets live: $COMPRESS_ASSETS, else ../shared/assets beside the project root."""
from __future__ import annotations

import os
from pathlib import Path

from compress.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def assets_dir() -> Path:
    candidates = [os.environ.get("COMPRESS_ASSETS"), PROJECT_ROOT.parent / "shared" / "assets",
                  Path.cwd().parent / "shared" / "assets", Path.cwd() / "shared" / "assets"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    raise UserError("shared assets not found: set COMPRESS_ASSETS to the folder holding models/ and data/")


def model_path(name: str) -> Path:
    return assets_dir() / "models" / name


def data_path(name: str) -> Path:
    return assets_dir() / "data" / name
