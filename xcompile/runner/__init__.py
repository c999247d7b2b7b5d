"""The C++ runner (``xcompile_run.cc``): built per architecture against the TVM runtime
alone, and run natively or, for aarch64 builds on another machine, under qemu-aarch64.

The runtime libraries come from the apache-tvm and apache-tvm-ffi wheels of the target
architecture: the installed ones for this machine's, PyPI's aarch64 wheels (downloaded
once into the cache) for ARM.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from xcompile import targets
from xcompile.errors import XCompileError
from xcompile.files import atomic_path, cache_folder, ours

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("xcompile_run.cc")
RUNNER = "xcompile_run"  # its name in bundles and kits
WHEELS = {"apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post1"}
LIBS = {"tvm/lib/libtvm_runtime.so": "libtvm_runtime.so",
        "tvm_ffi/lib/libtvm_ffi.so": "libtvm_ffi.so"}


@dataclass(frozen=True)
class Toolchain:
    """How to build and run a program for one architecture."""

    arch: str
    cxx: str
    emulator: list[str]  # prefix for running on this machine; empty when native


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no message"


def toolchain(arch: str) -> Toolchain:
    """The compiler (and emulator) for ``arch``, with a clear error when missing."""
    if arch == targets.detect_arch():
        tc = Toolchain(arch, os.environ.get("CXX", "g++"), [])
    elif arch == "aarch64":
        tc = Toolchain(arch, "aarch64-linux-gnu-g++",
                       ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"])
    else:
        raise XCompileError(f"cannot build or run {arch} programs on this machine")
    for tool in [tc.cxx] + tc.emulator[:1]:
        if shutil.which(tool) is None:
            raise XCompileError(f"{tool} not found (Debian/Ubuntu: apt-get install "
                                f"g++-aarch64-linux-gnu qemu-user)")
    return tc


def _cache() -> Path:
    return cache_folder("runner")


def runtime_libs(arch: str) -> Path:
    """A folder holding libtvm_runtime.so and libtvm_ffi.so for ``arch``."""
    if arch == targets.detect_arch():
        import tvm
        import tvm_ffi

        folder = _cache() / arch / "lib"
        folder.mkdir(parents=True, exist_ok=True)
        for src in (Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so",
                    Path(tvm_ffi.__file__).parent / "lib" / "libtvm_ffi.so"):
            dst = folder / src.name
            if not dst.exists() or dst.stat().st_size != src.stat().st_size:
                shutil.copyfile(src, dst)
                dst.chmod(0o755)
        return folder
    return _foreign_libs(arch)


def device_libs(device_name: str) -> list[Path]:
    """What a build for ``device_name`` needs besides the CPU runtime: TVM's runtime
    library for the device and the libraries it links (for CUDA the CUDA runtime, from
    the toolkit; the driver comes with the GPU). None for the CPU."""
    import tvm

    kind = targets.device(device_name)
    if kind.runtime_library is None:
        return []
    found = [Path(tvm.__file__).parent / "lib" / f"lib{kind.runtime_library}.so"]
    nvcc = shutil.which("nvcc")
    roots = [Path(os.path.realpath(nvcc)).parent.parent] if nvcc else []
    roots += [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots += [Path("/usr/local/cuda")]
    for dependency in kind.runtime_dependencies:
        where = (root / sub / dependency for root in roots
                 for sub in ("lib", "lib64", "targets/x86_64-linux/lib"))
        path = next((p for p in where if p.is_file()), None)
        if path is None:
            raise XCompileError(f"{dependency} not found (it comes with the CUDA toolkit; set "
                                "CUDA_HOME)")
        found.append(path)
    return found


def _foreign_libs(arch: str) -> Path:
    folder = _cache() / arch / "lib"
    if all((folder / name).is_file() for name in LIBS.values()):
        return folder
    wheels = _cache() / arch / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading the %s wheels of %s", arch, ", ".join(WHEELS))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--platform", f"manylinux_2_28_{arch}", "--python-version", "3.11",
           "-d", str(wheels)] + [f"{k}=={v}" for k, v in WHEELS.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise XCompileError(f"cannot download the {arch} TVM runtime wheels: "
                            f"{_last_line(proc.stderr)}")
    folder.mkdir(parents=True, exist_ok=True)
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            for member, name in LIBS.items():
                if member in zf.namelist():
                    with atomic_path(folder / name, ours) as tmp:  # in the cache
                        tmp.write_bytes(zf.read(member))
                        tmp.chmod(0o755)  # mkstemp's 0600 would travel into bundles
    missing = [n for n in LIBS.values() if not (folder / n).is_file()]
    if missing:
        raise XCompileError(f"the {arch} wheels lack {', '.join(missing)}")
    return folder


def build_runner(arch: str) -> Path:
    """The runner executable for ``arch`` (built once per source version); it finds the
    runtime libraries in ``lib/`` beside itself."""
    import tvm_ffi

    tc = toolchain(arch)
    libs = runtime_libs(arch)
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    exe = libs.parent / f"xcompile_run-{digest}"
    if exe.is_file():
        return exe
    include = Path(tvm_ffi.__file__).parent / "include"
    with atomic_path(exe, ours) as tmp:  # in the cache
        cmd = [tc.cxx, "-std=c++17", "-O2", "-o", str(tmp), str(SOURCE),
               f"-I{include}", f"-I{include / 'dlpack'}", f"-L{libs}",
               "-ltvm_runtime", "-ltvm_ffi", "-ldl", "-Wl,-rpath,$ORIGIN/lib"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise XCompileError(f"building the {arch} runner failed: "
                                f"{_last_line(proc.stderr)}")
        tmp.chmod(0o755)
    return exe


def run(build_dir: str | os.PathLike, input_path: str, output_path: str | None = None,
        repeat: int = 1, outputs_dir: str | None = None) -> subprocess.CompletedProcess:
    """Run a build folder through the C++ runner of its architecture (under emulation
    when that is not this machine's); returns the finished process (text output).
    ``output_path`` receives the first output, ``outputs_dir`` every output."""
    from xcompile.manifest import read_manifest

    arch = read_manifest(build_dir)["target"]["arch"]
    exe = build_runner(arch)
    cmd = [*toolchain(arch).emulator, str(exe), str(build_dir), "--input", str(input_path),
           "--repeat", str(repeat)]
    if output_path:
        cmd += ["--output", str(output_path)]
    if outputs_dir:
        cmd += ["--outputs", str(outputs_dir)]
    return subprocess.run(cmd, capture_output=True, text=True)


def predict(build_dir: str | os.PathLike, x, repeat: int = 1):
    """Run ``x`` (a numpy array) through the runner; returns (every output, in order;
    the runner's latency line). A failure is an :class:`XCompileError` with the
    runner's message."""
    import tempfile

    import numpy as np

    from xcompile.files import save_npy
    from xcompile.manifest import read_manifest

    count = len(read_manifest(build_dir)["outputs"])
    with tempfile.TemporaryDirectory() as tmp:
        save_npy(f"{tmp}/x.npy", x)
        proc = run(build_dir, f"{tmp}/x.npy", repeat=repeat, outputs_dir=tmp)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise XCompileError(lines[-1].removeprefix("error: ") if lines else
                                f"the runner failed on {build_dir}")
        return [np.load(f"{tmp}/{i}.npy") for i in range(count)], proc.stdout.strip()
