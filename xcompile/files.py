"""Outputs that are safe to write: every artifact is written under a temporary name and
moved into place when complete, so an interrupted or failed command leaves nothing
half-written; and an output replaces only what xcompile itself wrote there before.

Every command checks its outputs before any work (``check_output_folder``,
``check_output_file``): an empty name, a symbolic link, a name too long, an input of the
same command or a folder holding one, the current folder, an existing folder that is not
an earlier xcompile output of the same kind, an existing file xcompile would not have
written: each is one error, before anything is compiled.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from xcompile.errors import XCompileError

NAME_MAX = 255
PATH_MAX = 4096
# Temporary names beside an output: ".NAME.xc<pid>-<random>.tmp" (".old" for a folder
# moved aside); the pid tells a stale one (its process is gone) from one in use.
_TEMP = re.compile(r"^\.(?P<name>.+)\.xc(?P<pid>\d+)-[0-9a-f]+\.(?:tmp|old)$")
_TEMP_SUFFIX_LEN = len(".xc4194304-0123456789ab.tmp") + 1


@dataclass(frozen=True)
class OutputKind:
    """A kind of folder xcompile writes. ``recognize(folder)`` tells whether a folder is
    an earlier one of this kind (the file xcompile writes into it that marks it);
    ``entries`` are the names xcompile writes there: a folder holding anything else holds
    something of the user's and is not replaced."""

    name: str
    recognize: Callable[[Path], bool]
    entries: frozenset[str]


def ours(_path: Path) -> bool:
    """For a file inside a folder already known to be xcompile's own (a tuning log
    checked as one, the cache): any file there is xcompile's."""
    return True


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _absolute(path: Path) -> Path:
    """``path`` made absolute without resolving symbolic links in its last part."""
    return Path(os.path.abspath(path))


def _within(inner: Path, outer: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (both resolved)."""
    try:
        inner.relative_to(outer)
        return True
    except ValueError:
        return False


def _check_common(path, what: str, inputs: Iterable) -> Path:
    text = os.fspath(path)
    if not text:
        raise XCompileError(f"{what}: an empty path")
    path = Path(text)
    absolute = _absolute(path)
    if len(path.name) + _TEMP_SUFFIX_LEN > NAME_MAX or len(str(absolute)) + _TEMP_SUFFIX_LEN > PATH_MAX:
        raise XCompileError(f"{what} {text!r}: the name is too long")
    if path.is_symlink():
        raise XCompileError(f"{what} {text} is a symbolic link; give the path itself")
    resolved = absolute.resolve()
    if resolved == Path(resolved.anchor):
        raise XCompileError(f"{what} {text} is the root folder")
    if _within(Path.cwd().resolve(), resolved):
        raise XCompileError(f"{what} {text} is the current folder or holds it; give a folder "
                            "of its own")
    for item in inputs:
        if item is None:
            continue
        source = _absolute(Path(item)).resolve()
        if _within(source, resolved):
            raise XCompileError(f"{what} {text} is or holds an input of this command "
                                f"({item}); give another")
    _check_parent(resolved, what, text)
    return path


def _check_parent(resolved: Path, what: str, text: str) -> None:
    """The nearest existing folder above ``resolved`` is a writable folder."""
    parent = resolved.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link on the way
            raise XCompileError(f"cannot create output location for {text}: {parent} is a "
                                "dangling link")
        parent = parent.parent
    if not parent.is_dir():
        raise XCompileError(f"cannot create output location for {text}: {parent} is not a "
                            "folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise XCompileError(f"output location {parent} is not writable")


def check_output_folder(path, kind: OutputKind, inputs: Iterable = ()) -> Path:
    """Check, before any work, that ``path`` may receive an output folder of ``kind``
    (see the module docstring); returns it as a Path."""
    what = f"output {kind.name} folder"
    path = _check_common(path, what, inputs)
    if path.exists():
        if not path.is_dir():
            raise XCompileError(f"output {path} exists and is not a folder")
        if not kind.recognize(path):
            raise XCompileError(f"{path} exists and is not an xcompile {kind.name}; xcompile "
                                "replaces only its own outputs: give a new folder")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in kind.entries)
        if foreign:
            raise XCompileError(f"{path} holds files xcompile did not write "
                                f"({', '.join(foreign[:3])}); it replaces only its own "
                                "outputs: give a new folder")
    return path


def check_output_file(path, recognize: Callable[[Path], bool] | None = None,
                      inputs: Iterable = (), what: str = "output file") -> Path:
    """Check, before any work, that ``path`` may receive an output file: an existing one
    is replaced only when ``recognize`` says it is of the kind the command writes."""
    path = _check_common(path, what, inputs)
    if path.exists() or path.is_symlink():
        if path.is_dir():
            raise XCompileError(f"{what} {path} is a folder; give a file name")
        if not path.is_file():
            raise XCompileError(f"{what} {path} exists and is not a regular file")
        if recognize is None or not recognize(path):
            raise XCompileError(f"{what} {path} exists and is not a file this command "
                                "writes; xcompile replaces only its own outputs")
    return path


def _stale_temps(parent: Path, name: str) -> None:
    """Remove the temporaries of ``name`` that killed runs left in ``parent``."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or m.group("name") != name:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # its process lives: in use
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; returns those created, deepest first."""
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for folder in reversed(created):
        try:
            folder.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            _remove_empty(created)
            raise XCompileError(f"cannot create output location {folder}: {e.strerror}") from e
    return created


def _remove_empty(created: list[Path]) -> None:
    for folder in created:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


def _temp_name(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.xc{os.getpid()}-{secrets.token_hex(6)}.{suffix}"


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_path(path, recognize: Callable[[Path], bool] | None = None,
                inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (checked by ``check_output_file``); on
    success it is renamed to ``path``; on failure it is removed, with any folder made
    for it."""
    path = check_output_file(path, recognize, inputs)
    created = _make_parents(path)
    _stale_temps(path.parent, path.name)
    tmp = _temp_name(path, "tmp")
    ok = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
        ok = True
    except OSError as e:
        raise XCompileError(f"cannot write {path}: {e.strerror}") from e
    finally:
        tmp.unlink(missing_ok=True)
        if not ok:
            _remove_empty(created)


@contextlib.contextmanager
def atomic_dir(path, kind: OutputKind, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` (checked by
    ``check_output_folder``); on success it takes ``path``'s place in one atomic swap
    (an earlier output of the same kind there is then removed); on failure it is
    removed, with any folder made for it."""
    path = check_output_folder(path, kind, inputs)
    created = _make_parents(path)
    _stale_temps(path.parent, path.name)
    tmp = _temp_name(path, "tmp")
    ok = False
    try:
        try:
            tmp.mkdir(mode=0o777 & ~_umask())
        except OSError as e:
            raise XCompileError(f"cannot write in {path.parent}: {e.strerror}") from e
        yield tmp
        check_output_folder(path, kind, inputs)  # still ours (nothing came in meanwhile)
        try:
            if not path.exists():
                os.rename(tmp, path)
            elif _exchange(tmp, path):
                pass  # tmp now holds the earlier output
            else:  # no atomic exchange here: two renames
                old = _temp_name(path, "old")
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            raise XCompileError(f"cannot write {path}: {e.strerror}") from e
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            _remove_empty(created)


def cache_dir() -> Path:
    """Where xcompile keeps what it generates between commands (built-in models, runner
    builds, the stub CUDA driver): ``$XCOMPILE_CACHE``, else ``$XDG_CACHE_HOME/xcompile``
    (``~/.cache/xcompile``)."""
    base = os.environ.get("XCOMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xcompile")
    return Path(base)


def cache_folder(*parts: str) -> Path:
    """The cache's sub-folder ``parts``, created; a clear error when the cache cannot
    hold it (``XCOMPILE_CACHE`` naming a file, an unwritable place)."""
    folder = cache_dir().joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise XCompileError(f"the cache folder {folder} cannot be created ({e.strerror}); "
                            "set XCOMPILE_CACHE to a writable folder") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise XCompileError(f"the cache folder {folder} is not writable; set XCOMPILE_CACHE "
                            "to a writable folder")
    return folder


def sha256_file(path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_regular(path, what: str) -> bytes:
    """The bytes of a regular file (a FIFO or a device would block or never end)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise XCompileError(f"{what} {path} is not a regular file")
        return path.read_bytes()
    except OSError as e:
        raise XCompileError(f"cannot read {what} {path}: {e.strerror}") from e


def is_npy(path: Path) -> bool:
    """Whether ``path`` holds a .npy array (what a command's ``--output`` writes)."""
    try:
        with open(path, "rb") as f:
            return f.read(6) == b"\x93NUMPY"
    except OSError:
        return False


def save_npy(path, array, inputs: Iterable = ()) -> None:
    """Write a .npy file atomically (replacing only an earlier .npy file)."""
    import numpy as np

    with atomic_path(path, is_npy, inputs) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
