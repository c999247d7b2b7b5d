"""Register-sized local buffers stay on the stack (``schedules.stack_locals``): kernels
compiled with our TIR pipeline allocate them without TVM's workspace pool, compute what
they computed, and larger buffers keep the pool."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import HOST, assert_computes_the_same, conv_kernel, finished


def compiled(mod, pipeline: str, target=None):
    import tvm

    return tvm.compile(mod, target=target or HOST.tvm_target(), tir_pipeline=pipeline)


def workspace_allocations(lib) -> int:
    """The calls of ``TVMBackendAllocWorkspace`` in ``lib``'s LLVM IR (each loads the
    function pointer once)."""
    return lib.mod.inspect_source("ll").count("load ptr, ptr @__TVMBackendAllocWorkspace")


def local_buffer_kernel(n: int):
    """A parallel kernel whose rows go through a local buffer of ``n`` floats, read back
    reversed (so that it is not a copy LLVM could fold away)."""
    from tvm.script import tirx as T

    @T.prim_func
    def main(a: T.Buffer((4, n), "float32"), b: T.Buffer((4, n), "float32")):
        for i in T.parallel(4):
            acc = T.alloc_buffer((n,), "float32", scope="local")
            for j in range(n):
                acc[j] = a[i, j] * T.float32(2)
            for j in range(n):
                b[i, j] = acc[n - 1 - j]

    return main


@pytest.mark.parametrize("floats", [16, 1024, 1025])
def test_local_buffers_up_to_the_limit_stay_on_the_stack(floats):
    import tvm

    from xcompile import schedules
    from xcompile.schedules.stack_locals import MAX_STACK_BYTES

    mod = tvm.IRModule({"main": local_buffer_kernel(floats)})
    ours = compiled(mod, schedules.tir_pipeline(), {"kind": "llvm"})
    # TVM's own lowering puts every local buffer into the pool: what the pass changes.
    assert workspace_allocations(compiled(mod, "default", {"kind": "llvm"})) == 1
    assert workspace_allocations(ours) == (0 if floats * 4 <= MAX_STACK_BYTES else 1)
    a = np.random.default_rng(0).standard_normal((4, floats)).astype("float32")
    b = tvm.runtime.tensor(np.zeros_like(a))
    ours["main"](tvm.runtime.tensor(a), b)
    np.testing.assert_array_equal(b.numpy(), (a * 2)[:, ::-1])


def test_gemm_accumulators_leave_the_pool():
    """Our GEMM rule's accumulator tile (14 x 2 vectors on AVX-512, 6 x 2 on AVX2) is
    a stack buffer; the packed input panel, a global buffer of several KB, stays in
    the pool; the kernel computes what the unscheduled one does."""
    import tvm

    from xcompile import schedules
    from xcompile.schedules.cpu.conv_gemm import PackedConvGEMM

    func = conv_kernel(64, 64, 14, act=None)
    sch = PackedConvGEMM().apply(func, HOST.tvm_target())
    mod = tvm.IRModule({"main": finished(sch.mod["main"].with_attr("global_symbol", "main"))})
    default = workspace_allocations(compiled(mod, "default"))
    ours = workspace_allocations(compiled(mod, schedules.tir_pipeline()))
    assert ours == default - 1 >= 1
    assert_computes_the_same(func, sch.mod["main"])
