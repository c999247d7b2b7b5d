"""The build folder's contract: file names and ``manifest.json``, read and written here.

Pure Python (no TVM), so the runtime loader can read it where only the TVM runtime is
installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from xcompile.errors import XCompileError

MANIFEST = "manifest.json"
MODULE = "module.so"
PARAMS = "params.bin"
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


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``manifest`` into ``folder`` (a folder being built, not yet renamed)."""
    manifest = {"format": FORMAT, **manifest}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a build folder, with a clear error when the folder is not one."""
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
    return manifest
