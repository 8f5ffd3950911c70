"""Atomic writes: an artifact appears under its final name complete, or not at all."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from compress.errors import UserError


def is_disk_full(e: BaseException) -> bool:
    """A full disk or an exhausted quota, as Python's writers (and disk_full_as_oserror below) report it."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def cache_dir() -> Path:
    """Where measurements worth keeping between runs live (latency tables, estimate:host's fit): $COMPRESS_CACHE,
    else ~/.cache/compress."""
    return Path(os.environ.get("COMPRESS_CACHE") or Path("~/.cache/compress").expanduser())


def ensure_writable_dir(path: Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {path}: {e.strerror or e}") from None
    # a real write, not os.access: root passes access checks on read-only mounts and pseudo file systems (/proc)
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"output folder is not writable: {path} ({e.strerror or e})") from None
    return path


def check_output_file(path: Path, create_parent: bool = True) -> Path:
    """Fail before any work if `path` cannot become a file: it is a folder, or its folder is not writable.
    create_parent=False: a folder that does not exist yet is left for the run to create (and to remove if it fails)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name")
    if path.exists() and not path.is_file():  # renaming the finished file over it would replace /dev/null itself
        raise UserError(f"{path} is not a regular file (a device or a pipe): outputs are written to a temporary file "
                        f"and renamed into place; give a file path, or leave -o out")
    if create_parent or path.parent.exists():
        ensure_writable_dir(path.parent)
    return path


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds."""
    final = check_output_file(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the user's usual mode
    try:
        with disk_full_as_oserror(final):
            yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Like atomic_path for a folder of files (OpenVINO IR, multi-file artifacts)."""
    final = Path(final)
    if final.exists() and not (final.is_dir() or final.is_file()):  # it would unlink a device node
        raise UserError(f"{final} is not a regular file or folder (a device or a pipe); give another path")
    ensure_writable_dir(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
    try:
        with disk_full_as_oserror(final):
            yield tmp
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def disk_full_as_oserror(final: Path) -> Iterator[None]:
    """C++ writers (torch's zip writer, OpenVINO's serializer) report a full disk as an opaque RuntimeError
    ("unexpected pos", "iostream error"); when the writer fails and the target's file system has no room left,
    say so as the OSError(ENOSPC) that Python writers raise. Checked before the partial file is removed."""
    try:
        yield
    except UserError:
        raise
    except OSError as e:  # a full disk is named by the artifact's path, not the temporary file's (or none)
        if is_disk_full(e) and e.filename != str(final):
            raise OSError(e.errno, e.strerror, str(final)) from e
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless the disk is full
        try:
            full = shutil.disk_usage(final.parent).free < (1 << 20)
        except OSError:
            full = False
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final)) from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path_size(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
