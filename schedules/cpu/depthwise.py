"""Depthwise NHWC convolution (any kernel size, stride, padding, channel multiplier).

Memory-bound: one pass over the input, vectorized over channels (contiguous in NHWC;
whole vectors of the widest width that divides the channels, see ``channel_vector``),
one accumulator vector per output pixel and channel block held in a register across the
KHxKW window, the elementwise epilogue (batch norm, activation) fused into its
write-back, rows of output pixels in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..rule import ConfigRule
from ..analysis import DEPTHWISE, accumulate_locally, match_conv
from .generic import schedule_tail
from .target_info import channel_vector, cpu_info


@dataclass(frozen=True)
class DepthwiseTile:
    """``vectors`` channel vectors x ``pixels`` output pixels of a row per register tile."""

    vectors: int = 1
    pixels: int = 1


class VectorDepthwise(ConfigRule):
    """Schedule rule: depthwise NHWC/HWIO convolution -> channel-vectorized direct conv."""

    name = "xcompile.cpu.VectorDepthwise"
    aliases = ("xcompile.cpu.Depthwise",)  # its name in earlier manifests and tuning logs
    config_type = DepthwiseTile

    def match(self, sch, target):
        return match_conv(sch, target, "llvm", (DEPTHWISE,), tail=True)

    def configs(self, conv, target) -> list[DepthwiseTile]:
        """One vector x one pixel (the default) first, then wider register tiles that
        divide the channels and the row."""
        _, _, width, channels = conv.out_shape
        lanes = channel_vector(channels, cpu_info(target).lanes)
        return [DepthwiseTile(v, p) for v in (1, 2, 4) for p in (1, 2, 4)
                if channels % (v * lanes) == 0 and width % p == 0]

    def schedule(self, sch, conv, config: DepthwiseTile, target) -> None:
        lanes = channel_vector(conv.out_shape[3], cpu_info(target).lanes)
        self._schedule(sch, conv, lanes, config)

    @staticmethod
    def _schedule(sch, conv, lanes: int, config: DepthwiseTile = DepthwiseTile()) -> None:
        block = conv.block
        wb = accumulate_locally(sch, conv)
        n, y, x, c, ry, rx, rc = sch.get_loops(block)
        rows = sch.fuse(n, y)
        xo, xi = sch.split(x, [None, config.pixels])
        co, cu, cv = sch.split(c, [None, config.vectors, lanes])
        sch.reorder(rows, xo, co, ry, rx, rc, xi, cu, cv)
        sch.reverse_compute_at(wb, co)
        for loop in (ry, rx, xi, cu):
            sch.unroll(loop)
        # (One lane: an odd channel count, scalar code; TVM refuses a 1-lane vector.)
        vectorize = sch.vectorize if lanes > 1 else sch.unroll
        vectorize(cv)
        sch.parallel(rows)
        init = sch.decompose_reduction(block, ry)
        vectorize(sch.get_loops(init)[-1])
        vectorize(sch.get_loops(wb)[-1])
        schedule_tail(sch, conv, lanes)
