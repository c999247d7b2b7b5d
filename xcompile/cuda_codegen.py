"""CUDA builds carry compiled GPU code.

TVM 0.27's CUDA codegen hands the generated CUDA source to the global
``tvm_callback_cuda_compile`` and wraps the result in a CUDA module, but only when TVM's
CUDA runtime library is loaded; otherwise the exported module keeps the source and
compiles it when it loads (through NVRTC and TVM's Python compiler stack), which a
deployment with the runtime alone cannot do. Here the callback runs nvcc at build time,
for each requested architecture, into one fatbin, so the exported ``module.so`` loads
with the TVM runtime and the CUDA driver only.

The CUDA runtime library links against the driver (``libcuda.so.1``). A build machine
without a GPU has no driver; it gets a stub driver (every entry point returns
CUDA_ERROR_STUB_LIBRARY, as the CUDA toolkit's own stub does) so the library loads:
compiling needs none of the driver's functions.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from xcompile.errors import XCompileError

log = logging.getLogger(__name__)

# The driver functions libtvm_runtime_cuda.so imports (nm -D --undefined-only).
DRIVER_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName",
                  "cuGetErrorString", "cuLaunchKernelEx", "cuModuleGetFunction",
                  "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled")
CUDA_ERROR_STUB_LIBRARY = 34
FATBIN_MAGIC = bytes.fromhex("50ed55ba")  # a fatbin's first word, 0xBA55ED50, little-endian
_STUB_HANDLE = None


def parse_archs(text: str | None, default: str) -> tuple[str, ...]:
    """``sm_80,sm_90`` -> ("sm_80", "sm_90"); None -> (default,)."""
    if not text:
        return (default,)
    archs = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in archs if not (a.startswith("sm_") and a[3:].rstrip("a").isdigit())]
    if bad or not archs:
        raise XCompileError(f"--cuda-arch takes sm_XX names separated by commas, got {text!r}")
    return archs


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _stub_driver(folder: Path) -> Path:
    """Compile (once) the stub ``libcuda.so.1`` into ``folder``."""
    path = folder / "libcuda.so.1"
    if path.is_file():
        return path
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")
    if cc is None:
        raise XCompileError("a C compiler is needed to prepare a CUDA build on a machine "
                            "without a CUDA driver")
    folder.mkdir(parents=True, exist_ok=True)
    source = "".join(f"int {s}(void) {{ return {CUDA_ERROR_STUB_LIBRARY}; }}\n"
                     for s in DRIVER_SYMBOLS)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        c_file = Path(tmp) / "stub.c"
        c_file.write_text(source)
        out = Path(tmp) / "libcuda.so.1"
        proc = subprocess.run([cc, "-x", "c", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1",
                               "-o", str(out), str(c_file)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise XCompileError(f"cannot build the stub CUDA driver: {proc.stderr.strip()[:200]}")
        os.replace(out, path)
    return path


def load_cuda_runtime_for_build(cache: Path) -> None:
    """Load TVM's CUDA runtime library, with a stub driver when there is no driver."""
    global _STUB_HANDLE
    from xcompile import runtime

    if _STUB_HANDLE is None and not _driver_present():
        stub = _stub_driver(cache / "cuda-stub")
        _STUB_HANDLE = ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
        log.info("no CUDA driver here: building against a stub driver")
    runtime._load_cuda_runtime()


def nvcc_fatbin(code: str, archs: tuple[str, ...], nvcc: str) -> bytes:
    """CUDA source -> one fatbin holding SASS for each of ``archs``."""
    with tempfile.TemporaryDirectory(prefix="xcompile-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        cmd = [nvcc, "--fatbin", "-O3", "-std=c++17", "-o", str(out), str(src)]
        for arch in archs:
            cmd += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if "error" in ln),
                         proc.stderr.strip()[:200])
            raise XCompileError(f"nvcc failed on the generated CUDA code: {first}")
        return out.read_bytes()


@contextlib.contextmanager
def fatbin_codegen(archs: tuple[str, ...], cache: Path):
    """While active, CUDA codegen compiles kernels with nvcc into fatbins for ``archs``."""
    import tvm_ffi

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise XCompileError("CUDA builds compile GPU code with nvcc at build time; install "
                            "the CUDA toolkit or put nvcc on PATH")
    load_cuda_runtime_for_build(cache)
    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)

    def compile_cuda(code, *_target):
        return nvcc_fatbin(str(code), archs, nvcc)

    tvm_ffi.register_global_func(name, compile_cuda, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
        else:
            tvm_ffi.remove_global_func(name)


def embedded_code(so_path: str | os.PathLike) -> dict:
    """What GPU code an exported module carries: its fatbins, the architectures of their
    SASS (cubin) and PTX entries, and whether CUDA source is embedded instead."""
    import struct

    data = Path(so_path).read_bytes()
    sass, ptx, fatbins = set(), set(), 0
    start = data.find(FATBIN_MAGIC)
    while start != -1:
        # Header: magic u32, version u16, header size u16, payload size u64; then entries
        # of kind u16 (1 PTX, 2 ELF), version u16, header size u32, payload size u64, ...,
        # and the SM number at byte 28 of the entry header.
        try:
            _, _, head, size = struct.unpack_from("<IHHQ", data, start)
            off, end = start + head, start + head + size
            while off < end:
                kind, _, entry_head, payload = struct.unpack_from("<HHIQ", data, off)
                arch = struct.unpack_from("<I", data, off + 28)[0]
                (sass if kind == 2 else ptx).add(f"sm_{arch}")
                off += entry_head + payload
            fatbins += 1
        except struct.error:  # not a fatbin after all (the magic inside other data)
            pass
        start = data.find(FATBIN_MAGIC, start + 4)
    return {"fatbins": fatbins, "sass": sorted(sass), "ptx": sorted(ptx),
            "cuda_source": b"__global__" in data}
