"""The versions a build or a tuning log records: TVM, tvm-ffi, xcompile, onnx."""

from __future__ import annotations

import importlib.metadata


def _dist(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """The installed versions of what compiled (imports TVM)."""
    import tvm

    return {"tvm": tvm.__version__, "tvm_ffi": _dist("apache-tvm-ffi"),
            "xcompile": _dist("xcompile"), "onnx": _dist("onnx")}
