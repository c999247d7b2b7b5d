"""Bundles: a build folder made self-contained for its target machine.

A bundle holds the build's files (``module.so``, ``params.bin``, ``manifest.json``, so the
Python loader and ``xcompile run`` take it like any build folder), the C++ runner for the
target's architecture, the TVM runtime libraries for that architecture in ``lib/`` (for
CUDA builds also TVM's CUDA runtime and the CUDA runtime library; the GPU driver is the
machine's), and a README with the one command that runs it there.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from xcompile.manifest import BUILD, MANIFEST, read_checked, read_manifest
from xcompile import runner
from xcompile.runner import RUNNER
from xcompile.files import OutputKind, atomic_dir, check_output_folder

log = logging.getLogger(__name__)


_README = """xcompile bundle: {model} for {target} ({arch})

Run it on Linux on {arch}{gpu}; nothing else needs installing:

    ./{runner} . --input input.npy --output output.npy --repeat 10

input.npy: float32 {shape} (numpy.save). The runner prints the latency and writes the
first output. Files: module.so (compiled model), params.bin (weights), manifest.json
(what was built, how, and the SHA-256 of each file), lib/ (TVM runtime {tvm}).

From Python instead: pip install apache-tvm=={tvm} apache-tvm-ffi=={ffi} and xcompile,
then xcompile.runtime.load("path/to/bundle") (TVM_USE_RUNTIME_LIB=1 loads no compiler).
"""


def _is_bundle(folder: Path) -> bool:
    return BUILD.recognize(folder) and (folder / "README.txt").is_file() and \
        (folder / "README.txt").read_text(errors="replace").startswith("xcompile bundle")


BUNDLE = OutputKind("bundle", _is_bundle, BUILD.entries | {RUNNER, "lib", "README.txt"})


def package(build_dir: str | Path, out: str | Path) -> Path:
    """Write the bundle of ``build_dir`` to ``out`` (replacing it; written atomically)."""
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)  # its file names checked: plain names inside it
    check_output_folder(out, BUNDLE, inputs=[build_dir])
    target = manifest["target"]
    extra = runner.device_libs(target["device"])
    # The build's files, checked against the manifest's checksums before they are copied.
    files = {name: read_checked(build_dir, name, manifest)
             for name in (manifest["module"], manifest["params"]["file"])}
    arch = target["arch"]
    exe = runner.build_runner(arch)
    libs = runner.runtime_libs(arch)
    with atomic_dir(out, BUNDLE, inputs=[build_dir]) as tmp:
        shutil.copy2(build_dir / MANIFEST, tmp / MANIFEST)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        shutil.copy2(exe, tmp / RUNNER)
        (tmp / "lib").mkdir()
        for lib in [*sorted(libs.glob("*.so")), *extra]:
            shutil.copy2(lib, tmp / "lib" / lib.name)
        (tmp / "README.txt").write_text(_README.format(
            model=Path(manifest["model"]["path"]).name, target=target["name"], arch=arch,
            runner=RUNNER, shape=tuple(manifest["inputs"][0]["shape"]),
            gpu=" with an NVIDIA GPU and its driver" if extra else "",
            tvm=manifest["versions"]["tvm"], ffi=manifest["versions"]["tvm_ffi"]),
            encoding="utf-8")
    log.info("bundled %s (%s) into %s", build_dir, arch, out)
    return Path(out)
