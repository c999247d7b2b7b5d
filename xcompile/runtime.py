"""Load a build folder and run it, with nothing but the TVM runtime.

This module imports no TVM compiler component: it works with ``TVM_USE_RUNTIME_LIB=1`` or a
TVM package stripped of ``libtvm_compiler.so``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from xcompile.manifest import read_manifest
from xcompile import targets
from xcompile.errors import XCompileError, first_line
from xcompile.files import sha256_file
from xcompile.manifest import TensorInfo

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


def _tvm():
    try:
        import tvm
    except ImportError as e:
        raise XCompileError("the TVM runtime is not installed: pip install "
                            "apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1") from e
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


class Predictor:
    """A loaded build: call it with a numpy array, get the output(s) as numpy.

    Weights are uploaded to the device once, at load time.
    """

    def __init__(self, folder: str | Path, device_id: int = 0):
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
        module_path = self.folder / m["module"]
        params_path = self.folder / m["params"]["file"]
        sums = m.get("sha256")
        if not isinstance(sums, dict):
            raise XCompileError(f"{self.folder} has no file checksums (an older build?); "
                                f"rebuild it")
        for p in (module_path, params_path):
            if not p.is_file():
                raise XCompileError(f"{self.folder} is incomplete: {p.name} is missing")
        # A truncated or damaged .so can kill the process inside dlopen (SIGBUS). The
        # weights are read once: the bytes hashed are the bytes loaded.
        params_bytes = params_path.read_bytes()
        for p, digest in ((module_path, sha256_file(module_path)),
                          (params_path, hashlib.sha256(params_bytes).hexdigest())):
            if digest != sums.get(p.name):
                raise XCompileError(f"{p} is damaged or was changed after the build "
                                    f"(SHA-256 differs from the manifest)")
        self.device = tvm.device(device, device_id)
        if not self.device.exist:
            raise XCompileError(f"no {device} device {device_id} on this machine")
        try:
            lib = tvm.runtime.load_module(str(module_path))
        except Exception as e:
            raise XCompileError(f"cannot load {module_path}: "
                                f"{first_line(e)}") from e
        try:
            params = tvm.runtime.load_param_dict(params_bytes)
        except Exception as e:
            raise XCompileError(f"cannot read {params_path}: "
                                f"{first_line(e)}") from e
        names = m["params"]["names"]
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


def load(folder: str | Path, device_id: int = 0) -> Predictor:
    """Load a build folder made by ``xcompile build``."""
    return Predictor(folder, device_id)
