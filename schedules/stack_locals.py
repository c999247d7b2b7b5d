"""Register-sized local buffers on the stack, not in TVM's workspace pool.

TVM 0.27's ``LowerTVMBuiltin`` keeps a CPU allocation on the stack only when its scope is
``"global"`` and it takes under 1 KiB; every ``"local"`` buffer, however small, becomes a
``TVMBackendAllocWorkspace`` call. That is where our rules keep a tile's accumulators
(``cache_write(..., "local")``): a GEMM's 14 x 2 vectors, a depthwise or pooling
kernel's few. Behind the pool's opaque pointer LLVM cannot promote the buffer to
registers: the zeroing of the accumulators stays a ``memset`` call per tile (1.2% of
the samples of legacy_xception's 19x19x728 GEMMs on a 2-core Zen 4, 8-18% in the
entry flow's GEMMs of 128-256 input channels; 1.5% of the model), and each part of a
reduction that prefetches (``prefetch``) stores them back.

This pass, run on the host code just before ``LowerTVMBuiltin``, marks each ``"local"``
CPU buffer of constant size up to MAX_STACK_BYTES with TVM's own
``disable_lower_builtin`` annotation, under which the allocation stays an ``alloca``.
Measured on the Zen 4, legacy_xception interleaved with the build before (medians of
the paired ratios): batch 1 0.985x (100 rounds), batch 8 0.978x (16); the pooling
kernels 0.60 -> 0.48 ms. The memsets left (1% of the model) are those of the four GEMMs
whose write-back loop reads the accumulators at run-time offsets: that loop unrolled
removed them too, but its channel guard became shuffles, and the model timed alike.
"""

from __future__ import annotations

from .tir_walk import map_stmt

# The largest local buffer kept on the stack: a register tile's accumulators are at most
# 32 vectors of 64 bytes (2 KiB); twice that leaves room and bounds what one kernel adds
# to a thread's stack.
MAX_STACK_BYTES = 4096

# TVM's annotation (``tirx::transform::kDisableLowerTVMBuiltin``) that leaves an
# allocation to the code generator, which makes it an ``alloca``.
DISABLE_LOWER_BUILTIN = "disable_lower_builtin"


def local_bytes(buffer) -> int | None:
    """The bytes a ``"local"`` buffer of constant shape takes, else None."""
    from tvm import tirx

    if buffer.scope() != "local":
        return None
    size = 1
    for extent in buffer.shape:
        if not isinstance(extent, tirx.IntImm):
            return None
        size *= int(extent)
    return size * buffer.dtype.bits * buffer.dtype.lanes // 8


def keep_locals_on_stack():
    """A PrimFunc pass for lowered CPU host code (before ``LowerTVMBuiltin``): local
    buffers of at most MAX_STACK_BYTES are annotated to stay on the stack; other
    allocations, and functions for other devices, are left as they are."""
    import tvm
    from tvm import tirx
    from tvm_ffi import DLDeviceType

    def mark(stmt):
        if not isinstance(stmt, tirx.AllocBuffer):
            return None
        size = local_bytes(stmt.buffer)
        if size is None or size > MAX_STACK_BYTES or DISABLE_LOWER_BUILTIN in stmt.annotations:
            return None
        return tirx.AllocBuffer(stmt.buffer, {**stmt.annotations,
                                              DISABLE_LOWER_BUILTIN: tirx.IntImm("bool", 1)})

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="xcompile.KeepLocalsOnStack")
    def _pass(func, _mod, _ctx):
        target = func.attrs.get("target") if func.attrs else None
        if target is None or target.get_target_device_type() != DLDeviceType.kDLCPU:
            return func
        body = map_stmt(func.body, mark)
        return func if body.same_as(func.body) else func.with_body(body)

    return _pass
