"""The build folder's contract: file names and ``manifest.json``, read and written here.

Pure Python (no TVM), so the runtime loader can read it where only the TVM runtime is
installed. A manifest is checked as it is read: a damaged one (missing fields, wrong
types, a file name that is not a plain name inside the folder) is refused before any
file it names is opened.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from xcompile.errors import XCompileError
from xcompile.files import OutputKind, read_regular

MANIFEST = "manifest.json"
MODULE = "module.so"
PARAMS = "params.bin"
MAX_TRANSFORM_STAGES = 4


def transform_file(stage: int) -> str:
    """The file of the weight transform's stage ``stage`` (a CPU module: raw weights in,
    the next stage's or ``main``'s weights out)."""
    return f"weights_transform_{stage}.so"


FORMAT = 1


@dataclass(frozen=True)
class TensorInfo:
    """Name, static shape and dtype of a model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> TensorInfo:
        return cls(d["name"], tuple(int(v) for v in d["shape"]), d["dtype"])

    @property
    def nbytes(self) -> int:
        import numpy as np

        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``manifest`` into ``folder`` (a folder being built, not yet renamed)."""
    manifest = {"format": FORMAT, **manifest}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


class _Damaged(XCompileError):
    pass


def plain_name(name, path: Path) -> str:
    """``name`` when it is a plain file name inside a folder (no path, no '..')."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or "\0" in name):
        raise _Damaged(f"{path} is damaged: {name!r} is not a file name inside the build")
    return name


def _tensor(d, path: Path, what: str) -> TensorInfo:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str) \
            or not isinstance(d.get("dtype"), str) or not isinstance(d.get("shape"), list):
        raise _Damaged(f"{path} is damaged: {what} is not a tensor description")
    shape = d["shape"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise _Damaged(f"{path} is damaged: {what} has a shape of non-positive or "
                       "non-integer sizes")
    try:
        import numpy as np

        np.dtype(d["dtype"])
    except TypeError:
        raise _Damaged(f"{path} is damaged: {what} has an unknown dtype {d['dtype']!r}") from None
    return TensorInfo(d["name"], tuple(shape), d["dtype"])


def _check(manifest, path: Path) -> dict:
    """``manifest`` when it has what the loader, runner and tools read, else an error."""
    def need(obj, key, kind, where="the manifest"):
        if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
            raise _Damaged(f"{path} is damaged: {where} has no valid {key!r}")
        return obj[key]

    plain_name(need(manifest, "module", str), path)
    params = need(manifest, "params", dict)
    plain_name(need(params, "file", str, "params"), path)
    names = need(params, "names", list, "params")
    if not all(isinstance(n, str) for n in names):
        raise _Damaged(f"{path} is damaged: params.names holds a non-string")
    inputs = need(manifest, "inputs", list)
    if len(inputs) != 1:
        raise _Damaged(f"{path} is damaged: expected one input, found {len(inputs)}")
    _tensor(inputs[0], path, "inputs[0]")
    outputs = need(manifest, "outputs", list)
    if not outputs:
        raise _Damaged(f"{path} is damaged: no outputs")
    for i, o in enumerate(outputs):
        _tensor(o, path, f"outputs[{i}]")
    target = need(manifest, "target", dict)
    for key in ("name", "device", "arch"):
        need(target, key, str, "target")
    sums = need(manifest, "sha256", dict)
    for name in (manifest["module"], params["file"]):
        if not isinstance(sums.get(name), str):
            raise _Damaged(f"{path} is damaged: no checksum of {name}")
    for key in ("model", "options", "versions"):
        need(manifest, key, dict)
    transform = manifest.get("transform")
    if transform is not None:
        files = need(transform, "files", list, "transform")
        for name in files:
            plain_name(name, path)
            if not isinstance(sums.get(name), str):
                raise _Damaged(f"{path} is damaged: no checksum of {name}")
        for i, raw in enumerate(need(transform, "raw", list, "transform")):
            _tensor(raw, path, f"transform.raw[{i}]")
    return manifest


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a build folder, checked; a clear error when the folder is not one
    or its manifest is damaged."""
    folder = Path(folder)
    if not folder.is_dir():
        raise XCompileError(f"build folder not found: {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise XCompileError(f"{folder} is not an xcompile build (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise XCompileError(f"{path} is unreadable: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise XCompileError(f"{path} has an unknown format (expected format {FORMAT})")
    return _check(manifest, path)


def is_build(folder: Path) -> bool:
    """Whether ``folder`` is a build (or a bundle) xcompile wrote: its manifest reads."""
    try:
        read_manifest(folder)
        return True
    except XCompileError:
        return False


def read_checked(folder: Path, name: str, manifest: dict) -> bytes:
    """The bytes of the build's file ``name``, read once: the bytes checked against the
    manifest's SHA-256 are the bytes used."""
    path = folder / name
    if not path.exists():
        raise XCompileError(f"{folder} is incomplete: {name} is missing")
    data = read_regular(path, "build file")
    if hashlib.sha256(data).hexdigest() != manifest["sha256"].get(name):
        raise XCompileError(f"{path} is damaged or was changed after the build "
                            f"(SHA-256 differs from the manifest)")
    return data


BUILD = OutputKind("build", is_build, frozenset(
    {MANIFEST, MODULE, PARAMS, *(transform_file(i) for i in range(MAX_TRANSFORM_STAGES))}))
