"""Run compiled kernels with every buffer placed against unmapped guard pages.

Each argument buffer of a kernel gets its own mapping ``[guard page][data][guard page]``,
the guards ``PROT_NONE``. A kernel is run twice: once with each buffer starting right
after its leading guard (a read or write before the buffer faults), once with each
buffer ending at its trailing guard (one past the end faults; the start is rounded
down to 64 bytes, the alignment TVM's kernels assume, so an overrun of less than 64
bytes past a buffer whose size is not a multiple of 64 is not seen). A fault kills the
process with SIGSEGV, so the harness runs in a child process (``python guard_pages.py``)
and prints the kernel it is about to run first: the parent names the culprit.

    python tests/guard_pages.py MODEL.onnx PRESET [BATCH] [--fuse-separable]
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

PAGE = mmap.PAGESIZE
ALIGN = 64  # what TVM assumes of a buffer's data pointer

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
PROT_NONE, PROT_RW = 0x0, 0x1 | 0x2


class GuardedBuffer:
    """A numpy array whose bytes sit between two ``PROT_NONE`` pages."""

    def __init__(self, shape, dtype, at_end: bool):
        dtype = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        nbytes = count * dtype.itemsize
        data_pages = max(1, -(-nbytes // PAGE))
        self.size = (data_pages + 2) * PAGE
        base = _libc.mmap(None, self.size, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        self.base = base
        for guard in (base, base + (data_pages + 1) * PAGE):
            if _libc.mprotect(guard, PAGE, PROT_NONE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")
        start = base + PAGE
        if at_end:
            start = (base + (data_pages + 1) * PAGE - nbytes) // ALIGN * ALIGN
        raw = (ctypes.c_uint8 * nbytes).from_address(start)
        self.array = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def close(self) -> None:
        self.array = None
        _libc.munmap(self.base, self.size)


def fill(array: np.ndarray, rng) -> None:
    if array.dtype.kind == "f":
        array[...] = rng.standard_normal(array.shape).astype(array.dtype)
    else:
        array[...] = 0


def run_guarded(lib, func, rng, at_end: bool) -> None:
    """Call ``lib['main']`` on guarded copies of ``func``'s parameters."""
    import tvm_ffi

    buffers = [GuardedBuffer(tuple(int(s) for s in p.shape), str(p.dtype), at_end)
               for p in func.params]
    try:
        for b in buffers:
            fill(b.array, rng)
        tensors = [tvm_ffi.from_dlpack(b.array, require_alignment=ALIGN) for b in buffers]
        lib["main"](*tensors)
        del tensors
    finally:
        for b in buffers:
            b.close()


def kernels_of(model_path: str, preset_name: str, batch: int | None, fuse: bool):
    """``(name, rule, PrimFunc)`` of every kernel of the model's build for the preset,
    scheduled as a build schedules them (without a tuning log)."""
    import tvm

    from xcompile import targets
    from xcompile import frontend, pipeline

    preset = targets.resolve(preset_name)
    imported = frontend.import_onnx(frontend.load_onnx(model_path), batch=batch)
    opt = pipeline.optimize(imported.mod, preset, fuse_separable=fuse)
    return preset, [(gv.name_hint, opt.kernels[gv.name_hint], f)
                    for gv, f in opt.mod.functions_items()
                    if isinstance(f, tvm.tirx.PrimFunc)]


def main(argv: list[str]) -> int:
    import tvm

    from xcompile import schedules

    fuse = "--fuse-separable" in argv
    argv = [a for a in argv if a != "--fuse-separable"]
    model, preset_name = argv[0], argv[1]
    batch = int(argv[2]) if len(argv) > 2 else None
    preset, kernels = kernels_of(model, preset_name, batch, fuse)
    rng = np.random.default_rng(0)
    for name, rule, func in kernels:
        # As a build compiles it: with the passes that finish scheduled kernels (their
        # clamped padded-row reads and prefetches run against the guard pages too).
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        lib = tvm.compile(schedules.finish_kernels()(mod), target=preset.tvm_target(),
                          tir_pipeline=schedules.tir_pipeline())
        for at_end in (False, True):
            print(f"running {name} ({rule}) {'end' if at_end else 'start'}", flush=True)
            run_guarded(lib, func, rng, at_end)
        print(f"ok {name}", flush=True)
    print(f"all {len(kernels)} kernels ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
