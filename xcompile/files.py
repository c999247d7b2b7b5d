"""Atomic outputs: every artifact is written under a temporary name and renamed into
place when complete, so an interrupted or failed command leaves nothing half-written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from xcompile.errors import XCompileError


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def writable_parent(path: Path) -> Path:
    parent = path.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise XCompileError(f"cannot create output location {parent}: {e.strerror}") from e
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise XCompileError(f"output location {parent} is not writable")
    return parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``."""
    path = Path(path)
    if path.is_dir():
        raise XCompileError(f"{path} is a folder; give a file name")
    parent = writable_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes it private; give it a plain file's mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path``
    (an existing folder there is swapped out and removed)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise XCompileError(f"output {path} exists and is not a folder")
    parent = writable_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise XCompileError(f"cannot write in {parent}: {e.strerror}") from e
    # mkdtemp makes the folder private; give it the mode a plain mkdir would.
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_dir() -> Path:
    """Where xcompile keeps what it generates between commands (built-in models, runner
    builds, the stub CUDA driver): ``$XCOMPILE_CACHE``, else ``$XDG_CACHE_HOME/xcompile``
    (``~/.cache/xcompile``)."""
    base = os.environ.get("XCOMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xcompile")
    return Path(base)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_npy(path: str | os.PathLike, array) -> None:
    """Write a .npy file atomically."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
