"""This CPU's float32 FMA peak, measured rather than computed from a reported clock.

A VM's ``/proc/cpuinfo`` gives the nominal clock, not the one the cores run at: on a
2-core Emerald Rapids (Xeon, CPUID model 207) it said 2.10 GHz while a dependent chain
of integer multiplies ran at 3.5-3.7 GHz, so a peak computed from it (269 GFLOP/s) put
our GEMMs at 112-132% of "peak". The kernel here is what the peak is: every core runs
independent vector FMA chains, as many as the preset's registers hold, long enough to
hide the FMA latency, with nothing to load or store. Its rate is the ceiling our
kernels are measured against.
"""

from __future__ import annotations

import time

# Per-core accumulators: the register file less a few, which covers FMA latency x pipes
# (4-5 x 2) on every x86 and ARM core we target.
SPARE_REGISTERS = 4
STEPS = 400_000  # FMA steps per chain per call: ~3 ms on a 2-core Zen 4
# The recurrence: a contraction towards ADDEND / (1 - MULTIPLIER), finite for any steps.
MULTIPLIER = 0.999999
ADDEND = 1e-7


def chains(registers: int) -> int:
    """Independent FMA chains per core for a register file of ``registers`` vectors."""
    return max(1, registers - SPARE_REGISTERS)


def _kernel(lanes: int, count: int, cores: int):
    """The PrimFunc: ``cores`` parallel iterations, each ``n`` steps of ``count``
    independent ``lanes``-wide FMA chains, ``acc = acc * M + A``, every lane starting
    from its own value in ``out`` and ending there (so nothing is dead code).

    Two things keep the chains vectors. The seeds differ per lane: from a splat LLVM
    proves every lane equal and computes one. And the index is written out in each
    access, not bound with a ``let`` inside the vectorized loop: TVM 0.27's vectorizer
    read such an index as the last lane's, and the loop compiled to scalar FMAs (28
    ``vfmadd213ss`` for 28 chains of 16 lanes; the "peak" was the scalar FMA rate x 16:
    right by chance on a core with two 512-bit FMA pipes, twice the truth on a Zen 4)."""
    from tvm.script import tirx as T

    width = lanes * count

    @T.prim_func
    def fma_peak(out: T.Buffer((cores, width), "float32"), n: T.int32):
        T.func_attr({"global_symbol": "fma_peak", "tirx.noalias": True})
        for p in T.parallel(cores):
            acc = T.decl_buffer((width,), "float32", scope="local")
            for c in T.unroll(count):
                for j in T.vectorized(lanes):
                    acc[c * lanes + j] = out[p, c * lanes + j]
            for _ in range(n):
                for c in T.unroll(count):
                    for j in T.vectorized(lanes):
                        acc[c * lanes + j] = acc[c * lanes + j] * T.float32(MULTIPLIER) \
                            + T.float32(ADDEND)
            for c in T.unroll(count):
                for j in T.vectorized(lanes):
                    out[p, c * lanes + j] = acc[c * lanes + j]

    return fma_peak


def seeds(cores: int, width: int):
    """Each lane's start value: all different, in (0, 1]."""
    import numpy as np

    return ((np.arange(cores * width, dtype=np.float32) + 1)
            / np.float32(cores * width)).reshape(cores, width)


def _compiled(target: dict, lanes: int, registers: int, cores: int):
    """The kernel for ``target`` with the ``out`` array it starts from (its seeds)."""
    import tvm

    from xcompile import runtime

    runtime.use_cores(cores)
    count = chains(registers)
    lib = tvm.compile(tvm.IRModule({"fma_peak": _kernel(lanes, count, cores)}),
                      target=tvm.target.Target(target))
    return lib["fma_peak"], tvm.runtime.tensor(seeds(cores, lanes * count))


def can_compile() -> bool:
    """Whether this process has TVM's compiler (not so with ``TVM_USE_RUNTIME_LIB=1`` or
    a package without ``libtvm_compiler.so``, where ``tvm`` imports all the same)."""
    try:
        import tvm  # noqa: F401  (loads the libraries that register the globals)
        import tvm_ffi
    except ImportError:
        return False
    return tvm_ffi.get_global_func("target.Target", allow_missing=True) is not None


def compute(target: dict, lanes: int, registers: int, cores: int, steps: int):
    """What the kernel leaves in ``out`` after ``steps`` steps from ``seeds``: a
    ``(cores, lanes x chains)`` float32 array. Needs TVM's compiler."""
    fn, out = _compiled(target, lanes, registers, cores)
    fn(out, steps)
    return out.numpy()


def measure(target: dict, lanes: int, registers: int, cores: int,
            repeat: int = 15, pause_s: float = 0.01) -> float:
    """The best of ``repeat`` timed calls, in GFLOP/s, of the FMA kernel compiled for
    ``target`` (a TVM target dict) with ``lanes``-wide vectors on ``cores`` threads.
    Needs TVM's compiler (``can_compile``).

    The calls are ``pause_s`` apart, so the best spans ~0.2 s rather than the ~20 ms of
    back-to-back calls: once, in CI on 2 vCPUs, seven calls in a row all read half the
    peak (one core's worth: a core taken from the VM for that moment, or shared), while
    a BLAS product timed a moment later ran on both."""
    fn, out = _compiled(target, lanes, registers, cores)
    fn(out, 100)  # warm up: thread pool started, code paged in
    best = float("inf")
    for _ in range(repeat):
        time.sleep(pause_s)
        start = time.perf_counter()
        fn(out, STEPS)
        best = min(best, time.perf_counter() - start)
    return 2 * lanes * chains(registers) * cores * STEPS / best / 1e9
