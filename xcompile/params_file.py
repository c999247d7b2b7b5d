"""Reading ``params.bin`` (TVM's parameter-dict format, as ``save_param_dict`` writes it)
straight into the tensors a module runs on.

``tvm.runtime.load_param_dict`` takes the file as one ``bytes`` object and copies it on
its way to the tensors: loading the 92 MB of Xception's weights peaked at 359 MB above
the bytes (measured with ``/proc/self/status``' VmHWM). Here each tensor is allocated
by TVM (aligned as its kernels expect) and the file is read into it, hashing as it goes:
the peak is the weights themselves, and the bytes checked against the manifest's SHA-256
are the bytes used. Runtime only: numpy and the TVM runtime.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from pathlib import Path

from xcompile.errors import XCompileError

LIST_MAGIC = 0xF7E58D4F05049CB7  # kTVMTensorListMagic
TENSOR_MAGIC = 0xDD5E40F096B4A13F  # kTVMTensorMagic
_DTYPE_CODES = {0: "int", 1: "uint", 2: "float"}  # DLDataTypeCode
_MAX_NDIM = 32
_CHUNK = 1 << 20


class _Reader:
    """A file read in order, every byte hashed, never past its end."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.left, self.path = f, size, path
        self.sha = hashlib.sha256()

    def damaged(self, why: str) -> XCompileError:
        return XCompileError(f"{self.path} is damaged or not a weights file ({why})")

    def take(self, n: int) -> bytes:
        if n > self.left:
            raise self.damaged("it ends early")
        data = self.f.read(n)
        if len(data) != n:
            raise self.damaged("it ends early")
        self.left -= n
        self.sha.update(data)
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def into(self, buffer: memoryview) -> None:
        """Fill ``buffer`` (bytes) from the file, in chunks."""
        if buffer.nbytes > self.left:
            raise self.damaged("it ends early")
        done = 0
        while done < buffer.nbytes:
            got = self.f.readinto(buffer[done:done + _CHUNK])
            if not got:
                raise self.damaged("it ends early")
            self.sha.update(buffer[done:done + got])
            done += got
        self.left -= done


def read_params(path: str | os.PathLike, sha256: str) -> dict:
    """The tensors of ``path`` (on the CPU) by name, after checking that the file's
    SHA-256 is ``sha256``; a damaged file is one line naming it, before anything it
    declares is allocated beyond the file's size."""
    import numpy as np
    import tvm

    path = Path(path)
    try:
        if not path.is_file():
            raise XCompileError(f"weights file {path} is not a regular file")
        f = open(path, "rb")
    except OSError as e:
        raise XCompileError(f"cannot read weights file {path}: {e.strerror}") from e
    with f:
        r = _Reader(f, os.fstat(f.fileno()).st_size, path)
        magic, _ = r.unpack("QQ")
        if magic != LIST_MAGIC:
            raise r.damaged("no parameter-list header")
        (count,) = r.unpack("Q")
        names = []
        for _ in range(count):
            (length,) = r.unpack("Q")
            names.append(r.take(length).decode("utf-8", "replace"))
        if r.unpack("Q")[0] != count:
            raise r.damaged("names and tensors differ in number")
        tensors = {}
        for name in names:
            magic, _, device_type, _, ndim = r.unpack("QQiii")
            code, bits, lanes = r.unpack("BBH")
            if magic != TENSOR_MAGIC or device_type != 1 or not 0 <= ndim <= _MAX_NDIM:
                raise r.damaged(f"tensor {name!r} has a bad header")
            if code not in _DTYPE_CODES or lanes != 1 or bits % 8:
                raise r.damaged(f"tensor {name!r} has an unsupported type")
            shape = r.unpack(f"{ndim}q") if ndim else ()
            (nbytes,) = r.unpack("q")
            if min(shape, default=0) < 0 or nbytes != math.prod(shape) * bits // 8:
                # (math.prod: Python ints, so a crafted shape cannot overflow past it)
                raise r.damaged(f"tensor {name!r} has a bad size")
            if nbytes > r.left:
                raise r.damaged("it ends early")
            tensor = tvm.runtime.empty(shape, f"{_DTYPE_CODES[code]}{bits}", tvm.cpu())
            if nbytes:
                r.into(memoryview(np.from_dlpack(tensor)).cast("B"))
            tensors[name] = tensor
        if r.left:
            raise r.damaged("it has bytes after its last tensor")
    if r.sha.hexdigest() != sha256:
        raise XCompileError(f"{path} is damaged or was changed after the build "
                            f"(SHA-256 differs from the manifest)")
    return tensors
