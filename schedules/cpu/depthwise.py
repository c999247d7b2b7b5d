"""Depthwise NHWC convolution (any kernel size, stride, padding, channel multiplier).

Memory-bound: one pass over the input, vectorized over channels (contiguous in NHWC),
one accumulator vector per output pixel and channel block held in a register across the
KHxKW window, the elementwise epilogue (batch norm, activation) fused into its
write-back, rows of output pixels in parallel.
"""

from __future__ import annotations

from .analysis import fuse_epilogue, match_cpu_conv
from .target_info import cpu_info


class Depthwise:
    """Schedule rule: depthwise NHWC/HWIO convolution -> channel-vectorized direct conv."""

    name = "xcompile.cpu.Depthwise"

    def apply(self, func, target, _tunable=False):
        from tvm import s_tir

        found = match_cpu_conv(func, target, depthwise=True)
        if found is None:
            return None
        sch, conv = found
        info = cpu_info(target)
        if conv.out_shape[3] % info.lanes:
            return None
        try:
            self._schedule(sch, conv, info.lanes)
        except s_tir.ScheduleError:
            return None
        return sch

    @staticmethod
    def _schedule(sch, conv, lanes: int) -> None:
        block = conv.block
        if conv.pad_block is not None:
            # Zero padding read in place: a select on the border, no padded copy.
            sch.compute_inline(conv.pad_block)
        wb = sch.cache_write(block, 0, "local")
        fuse_epilogue(sch, conv.epilogues)
        n, y, x, c, ry, rx, rc = sch.get_loops(block)
        rows = sch.fuse(n, y)
        co, cv = sch.split(c, [None, lanes])
        sch.reorder(rows, x, co, ry, rx, rc, cv)
        sch.reverse_compute_at(wb, co)
        sch.unroll(ry)
        sch.unroll(rx)
        sch.vectorize(cv)
        sch.parallel(rows)
        init = sch.decompose_reduction(block, ry)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(wb)[-1])
