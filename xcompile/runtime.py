"""Load a build folder and run it, with nothing but the TVM runtime.

This module imports no TVM compiler component: it works with ``TVM_USE_RUNTIME_LIB=1`` or a
TVM package stripped of ``libtvm_compiler.so``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from xcompile.manifest import read_checked, read_manifest
from xcompile import targets
from xcompile.errors import XCompileError, first_line
from xcompile.manifest import TensorInfo
from xcompile.params_file import read_params

log = logging.getLogger(__name__)

_LOADED_LIBRARIES: set[str] = set()


def configure_threads() -> None:
    """Give TVM's CPU thread pool every core this process may use, unless the user chose.

    TVM halves ``hardware_concurrency()`` on x86 (it assumes hyper-threading), so on a
    2-vCPU machine it runs one thread; and it pins the calling thread to core 0, which
    threads started later in the process (ONNX Runtime's, PyTorch's) inherit. The pool
    reads these variables once, when it starts: this runs before a module is loaded.
    """
    from xcompile.targets import host_cores

    os.environ.setdefault("TVM_NUM_THREADS", str(host_cores()))
    os.environ.setdefault("TVM_BIND_THREADS", "0")


def use_cores(count: int) -> None:
    """Run TVM's CPU thread pool with ``count`` threads sharing this process's cores,
    unpinned: through the environment when the pool has not started, else by
    reconfiguring it (a process that ran TVM code first has one thread on 2 vCPUs)."""
    os.environ["TVM_NUM_THREADS"] = str(count)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    _tvm()  # the runtime library, which registers the pool's functions
    import tvm_ffi

    if tvm_ffi.get_global_func("runtime.NumThreads")() != count:
        cpus = sorted(os.sched_getaffinity(0))
        # Mode -3 (kSpecifyThreadShareAllCore): every thread may run on any listed core.
        tvm_ffi.get_global_func("runtime.config_threadpool")(-3, count, [str(c) for c in cpus])


def _tvm():
    """The ``tvm`` package. When this process has not imported PyTorch, tvm-ffi is kept
    from importing it (it does, when installed, to dodge a symbol clash seen on Windows):
    running a build needs none of it, and it cost 240 MiB of resident memory and a
    second of start-up (measured loading Xception here, 410 -> 209 MiB after a run)."""
    import sys

    blocked = "tvm" not in sys.modules and "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # import torch raises ImportError meanwhile
    try:
        import tvm
    except ImportError as e:
        raise XCompileError("the TVM runtime is not installed: pip install "
                            "apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1") from e
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]  # a later import torch works as usual
    return tvm


def load_device_runtime(device_name: str) -> None:
    """Register TVM's device API for ``device_name`` (a device other than the CPU lives
    in its own runtime library, loaded on demand, once)."""
    kind = targets.device(device_name)
    library = kind.runtime_library
    if library is None or library in _LOADED_LIBRARIES:
        return
    tvm = _tvm()
    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        load_lib_ctypes("tvm", library, "RTLD_LOCAL",
                        extra_lib_paths=tvm.libinfo.package_lib_paths())
    except (OSError, RuntimeError) as e:
        raise XCompileError(f"this module runs on {device_name}, but TVM's {library} cannot "
                            f"load here: {first_line(e)}") from e
    _LOADED_LIBRARIES.add(library)


def device_available(device_name: str) -> bool:
    """Whether this machine has a ``device_name`` device that TVM's runtime can use."""
    try:
        load_device_runtime(device_name)
        return bool(_tvm().device(device_name, 0).exist)
    except Exception:  # no driver, no runtime library, no device
        return False


LIFTED = "main_transform_params"  # each weight transform stage's function


def apply_transform(modules: list, weights: list) -> list:
    """Run weight transform stages (compiled, or loaded from a build folder) on this
    machine's CPU: raw weights in, the weights ``main`` takes out."""
    tvm = _tvm()
    from tvm.runtime import vm as tvm_vm

    for module in modules:
        vm = tvm_vm.VirtualMachine(module, tvm.cpu())
        weights = list(vm[LIFTED](weights))
    return weights


def transformed_weights(folder: Path, manifest: dict, raw) -> list:
    """``main``'s weights made from raw weights by the build's own transform: ``raw`` is
    a list of arrays in the order of the manifest's ``transform.raw``, or a folder of
    ``.npy`` files named by that order (``0000.npy``...). Names, shapes and dtypes must
    be the build's; the transform modules are checked like the build's module, and it
    must make as many weights as the module takes."""
    tvm = _tvm()
    spec = manifest.get("transform")
    if spec is None:
        raise XCompileError(f"{folder} keeps no weight transform (built by an earlier "
                            "xcompile); rebuild it to load raw weights")
    wanted = [TensorInfo.from_json(r) for r in spec["raw"]]
    if isinstance(raw, (str, os.PathLike)):
        raw = load_raw_weights(Path(raw), len(wanted))
    check_raw_weights(raw, wanted)
    modules = []
    arch = manifest["target"]["arch"]
    for name in spec["files"]:
        check_shared_object(folder / name, read_checked(folder, name, manifest), arch)
        modules.append(tvm.runtime.load_module(str(folder / name)))
    weights = apply_transform(modules,
                              [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in raw])
    names = manifest["params"]["names"]
    if len(weights) != len(names):
        raise XCompileError(f"{folder}'s transform makes {len(weights)} weights; its "
                            f"module takes {len(names)}")
    return weights


def load_raw_weights(folder: Path, count: int) -> list:
    """Raw weights saved as ``0000.npy``, ``0001.npy``... in ``folder``."""
    if not folder.is_dir():
        raise XCompileError(f"raw weights folder not found: {folder}")
    out = []
    for i in range(count):
        path = folder / f"{i:04d}.npy"
        if not path.is_file():
            raise XCompileError(f"{folder} lacks {path.name}: the build takes {count} "
                                "raw weights")
        try:
            out.append(np.load(path, allow_pickle=False))
        except (OSError, ValueError, EOFError) as e:
            raise XCompileError(f"{path} is not a .npy array ({first_line(e)})") from e
    return out


def check_raw_weights(raw: list, wanted: list) -> None:
    """One line naming the first weight whose shape or dtype is not the build's."""
    if len(raw) != len(wanted):
        raise XCompileError(f"{len(raw)} weights given; the build takes {len(wanted)}")
    for array, want in zip(raw, wanted):
        if tuple(array.shape) != want.shape or str(array.dtype) != want.dtype:
            raise XCompileError(f"weight {want.name!r} is {array.dtype} {tuple(array.shape)}; "
                                f"the build takes {want.dtype} {want.shape}")


_ELF_MACHINES = {"x86_64": 62, "aarch64": 183}


def check_shared_object(path: Path, data: bytes, arch: str) -> None:
    """Refuse a shared object whose ELF headers do not fit its size or its architecture:
    ``dlopen`` of a truncated one can kill the process (SIGBUS) before any error can be
    raised, even when its checksum was updated with it."""
    import struct

    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2:
        raise XCompileError(f"{path} is not a 64-bit ELF shared object")
    machine = struct.unpack_from("<H", data, 18)[0]
    if machine != _ELF_MACHINES.get(arch, -1):
        raise XCompileError(f"{path} was built for another architecture (ELF machine "
                            f"{machine}); this machine is {arch}")
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    size = len(data)
    if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
        raise XCompileError(f"{path} is truncated or damaged")
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD past the end
            raise XCompileError(f"{path} is truncated or damaged")


class Predictor:
    """A loaded build: call it with a numpy array, get the output(s) as numpy.

    Weights are uploaded to the device once, at load time.
    """

    def __init__(self, folder: str | Path, device_id: int = 0, raw_weights=None):
        tvm = _tvm()
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        m = self.manifest
        self.input = TensorInfo.from_json(m["inputs"][0])
        self.outputs = [TensorInfo.from_json(o) for o in m["outputs"]]
        device = m["target"]["device"]
        arch = m["target"]["arch"]
        if arch != targets.detect_arch():
            raise XCompileError(f"{self.folder} was built for {arch}; this machine is "
                                f"{targets.detect_arch()} (run it there, or under emulation)")
        kind = targets.device(device)
        configure_threads()
        load_device_runtime(device)
        # The manifest's file names are plain names inside the folder (read_manifest
        # checked them); both files are checked before either is used.
        module_path = self.folder / m["module"]
        params_path = self.folder / m["params"]["file"]
        check_shared_object(module_path, read_checked(self.folder, m["module"], m),
                            targets.detect_arch())
        names = m["params"]["names"]
        if raw_weights is None:  # read straight into the tensors, checked against the manifest
            if not params_path.exists():
                raise XCompileError(f"{self.folder} is incomplete: {params_path.name} is missing")
            params = read_params(params_path, m["sha256"].get(m["params"]["file"], ""))
        self.device = tvm.device(device, device_id)
        if not self.device.exist:
            raise XCompileError(f"no {device} device {device_id} on this machine")
        try:
            lib = tvm.runtime.load_module(str(module_path))
        except Exception as e:
            raise XCompileError(f"cannot load {module_path}: "
                                f"{first_line(e)}") from e
        if raw_weights is not None:  # the build's transform, on these raw weights
            params = dict(zip(names, transformed_weights(self.folder, m, raw_weights)))
        missing = [n for n in names if n not in params]
        if missing:
            raise XCompileError(f"{params_path} lacks {len(missing)} weights "
                                f"(first: {missing[0]})")
        # Imported explicitly: runtime-only TVM does not load the submodule by itself.
        from tvm.runtime import vm as tvm_vm

        self._vm = tvm_vm.VirtualMachine(lib, self.device)
        self._main = self._vm["main"]
        # The weights load on the CPU; other devices get a copy (no numpy round trip).
        self._params = [params[n] if kind.is_host else params[n].copyto(self.device)
                        for n in names]

    def check_input(self, x) -> np.ndarray:
        """``x`` as an array of the model's input shape and dtype, or a clear error."""
        x = np.asarray(x)
        want = self.input
        if tuple(x.shape) != want.shape:
            raise XCompileError(f"input shape {tuple(x.shape)} does not match the model's "
                                f"{want.name!r} {want.shape}")
        if str(x.dtype) != want.dtype:
            raise XCompileError(f"input dtype {x.dtype} does not match the model's "
                                f"{want.name!r} {want.dtype}")
        return np.ascontiguousarray(x)

    def run_device(self, x_dev):
        """Run on an input already on the device; returns device tensor(s)."""
        return self._main(x_dev, *self._params)

    def to_device(self, x):
        return _tvm().runtime.tensor(self.check_input(x), self.device)

    def sync(self) -> None:
        self.device.sync()

    def set_instrument(self, fn) -> None:
        """Call ``fn(func, symbol, before_run, ret, *args)`` around every VM call (see
        ``tvm.runtime.vm.VirtualMachine.set_instrument``); ``None`` removes it."""
        self._vm.set_instrument(fn)

    def __call__(self, x):
        out = self.run_device(self.to_device(x))
        if len(self.outputs) == 1:
            return out.numpy()
        return [o.numpy() for o in out]


def load(folder: str | Path, device_id: int = 0, raw_weights=None) -> Predictor:
    """Load a build folder made by ``xcompile build``; with ``raw_weights`` (see
    ``transformed_weights``) the build's own weight transform makes ``main``'s weights
    from them instead of reading ``params.bin``."""
    return Predictor(folder, device_id, raw_weights)
