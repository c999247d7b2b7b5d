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

from xcompile.errors import InternalError, XCompileError

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
    runtime.load_device_runtime("cuda")


def gencode_flags(archs: tuple[str, ...]) -> list[str]:
    """nvcc's ``-gencode`` flags: SASS for each of ``archs``, and PTX for the highest one
    in its plain form (``compute_90``, not ``compute_90a``, whose PTX newer GPUs cannot
    JIT), so that a GPU newer than all of them JIT-compiles the PTX when it loads."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    newest = max(int(a[3:].rstrip("a")) for a in archs)
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


def nvcc_fatbin(code: str, archs: tuple[str, ...], nvcc: str, keep: Path) -> bytes:
    """CUDA source -> one fatbin holding SASS for each of ``archs`` and PTX for the
    newest (``gencode_flags``). When nvcc rejects
    the source (our bug: the source is generated), the source is kept under ``keep``
    and the error names the kernel nvcc stopped in."""
    with tempfile.TemporaryDirectory(prefix="xcompile-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        cmd = [nvcc, "--fatbin", "-O3", "-std=c++17", "-o", str(out), str(src)]
        cmd += gencode_flags(archs)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise _nvcc_failure(code, proc.stderr, keep)
        return out.read_bytes()


def _nvcc_failure(code: str, stderr: str, keep: Path) -> InternalError:
    """The error for nvcc rejecting generated ``code``: the kernel and line it stopped
    at, nvcc's message, and where the source is kept."""
    import hashlib
    import re

    keep.mkdir(parents=True, exist_ok=True)
    kept = keep / f"kernels-{hashlib.sha256(code.encode()).hexdigest()[:12]}.cu"
    kept.write_text(code)
    found = re.search(r"kernels\.cu\((\d+)\): (?:error|catastrophic error): (.*)", stderr)
    if found is None:
        first = stderr.strip().splitlines()[0] if stderr.strip() else "no message"
        return InternalError(f"nvcc rejected the generated CUDA code ({first}); "
                             f"source kept in {kept}")
    line = int(found.group(1))
    kernel = "?"
    for text in code.splitlines()[:line]:
        m = re.search(r"__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\(", text)
        if m:
            kernel = m.group(1)
    return InternalError(f"nvcc rejected the generated CUDA code of kernel {kernel} "
                         f"(line {line}: {found.group(2).strip()}); source kept in {kept}")


class _Codegen:
    """What ``fatbin_codegen`` yields: ``error`` is the failure of a compile callback
    (TVM reports it as its own error type, losing ours)."""

    error: Exception | None = None


@contextlib.contextmanager
def fatbin_codegen(archs: tuple[str, ...], cache: Path):
    """While active, CUDA codegen compiles kernels with nvcc into fatbins for ``archs``.
    Yields an object whose ``error`` holds a compile failure, to re-raise as is."""
    import tvm_ffi

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise XCompileError("CUDA builds compile GPU code with nvcc at build time; install "
                            "the CUDA toolkit or put nvcc on PATH")
    load_cuda_runtime_for_build(cache)
    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    state = _Codegen()

    def compile_cuda(code, *_target):
        try:
            return nvcc_fatbin(str(code), archs, nvcc, cache / "nvcc-rejected")
        except Exception as e:
            state.error = e
            raise

    tvm_ffi.register_global_func(name, compile_cuda, override=True)
    try:
        yield state
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
