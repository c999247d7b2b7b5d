"""Kinds of device a build runs on, and what each needs and can do. A preset names one
(``Preset.device``, as does a build's manifest); the rest of xcompile asks it rather
than comparing device names."""

from __future__ import annotations

from dataclasses import dataclass

from xcompile.errors import XCompileError


@dataclass(frozen=True)
class Device:
    """A kind of device: TVM's name for it and what the code around kernels must do."""

    name: str  # TVM's device name: tvm.device(name)
    # The TVM runtime library that registers the device, loaded on demand (None: built in),
    # and the shared libraries it links that a bundle carries (the driver is the machine's).
    runtime_library: str | None
    # The CPU itself: weights and inputs need no copy, kernels return when done.
    is_host: bool
    # Kernel launches can be captured once and replayed as one graph (static shapes).
    captures_graphs: bool
    # Kernels are compiled into device binaries at build time (nvcc, into a fatbin).
    compiles_device_code: bool
    runtime_dependencies: tuple[str, ...] = ()
    torch_device: str = "cpu"  # where PyTorch runs the reference model for comparison
    relax_backend: str = "cpu_generic"  # the tvm.relax.backend package compiling for it
    # The modules of tvm.s_tir.tensor_intrin whose intrinsics MetaSchedule may use here;
    # ``tensorizes``: the default schedules use them too (DLight's tensor-core matmul),
    # so builds register them before scheduling.
    # (Modules a later one imports come first: they are run in this order.)
    tensor_intrinsics: tuple[str, ...] = ("x86", "dot_product_common", "arm_cpu")
    tensorizes: bool = False
    # exp, erf, tanh are scalar library calls here (LLVM's, one call per vector lane), so
    # kernels get vectorizable polynomials instead (xcompile.polynomial_math).
    scalar_transcendentals: bool = True


DEVICES = {
    "cpu": Device("cpu", runtime_library=None, is_host=True, captures_graphs=False,
                  compiles_device_code=False),
    # libtvm_runtime_cuda.so of apache-tvm 0.27 links the CUDA 13 runtime.
    "cuda": Device("cuda", runtime_library="tvm_runtime_cuda", is_host=False,
                   captures_graphs=True, compiles_device_code=True,
                   runtime_dependencies=("libcudart.so.13",), torch_device="cuda",
                   relax_backend="cuda", tensor_intrinsics=("cuda",),
                   tensorizes=True, scalar_transcendentals=False),
}


def device(name: str) -> Device:
    """The device called ``name`` (a preset's or a manifest's ``device``)."""
    try:
        return DEVICES[name]
    except KeyError:
        raise XCompileError(f"unknown device {name!r} (known: {', '.join(DEVICES)})") from None
