"""Depthwise NHWC convolution (any kernel size, stride, padding, channel multiplier) on CUDA.

Memory-bound: each thread computes one output pixel for one channel (by default; the
tuner also tries 2 or 4 channels per thread), its accumulator in a register across the
unrolled KHxKW window. Neighbouring threads take neighbouring channels of the same pixel,
so every warp's loads and stores are contiguous (coalesced); the window's overlap between
pixels is served by L1. The elementwise epilogue is fused into the write-back.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..analysis import DEPTHWISE, accumulate_locally, match_conv
from .gpu_info import gpu_info
from .rule import GPURule

VECTORS = (1, 2, 4)  # channels per thread


@dataclass(frozen=True)
class ThreadTile:
    """Threads per block; channels per thread (their stores are vectorized)."""

    threads: int = 256
    vector: int = 1


class ThreadDepthwise(GPURule):
    """Schedule rule: depthwise NHWC/HWIO convolution -> one thread per pixel and vector."""

    name = "xcompile.cuda.ThreadDepthwise"
    aliases = ("xcompile.cuda.Depthwise",)  # its name in earlier manifests and tuning logs
    config_type = ThreadTile

    def match(self, sch, target):
        return match_conv(sch, target, "cuda", (DEPTHWISE,))

    def configs(self, conv, target) -> list[ThreadTile]:
        channels = conv.out_shape[3]
        most = gpu_info(target).max_threads
        return [ThreadTile(t, v) for v in VECTORS if channels % v == 0
                for t in (256, 128, 512) if t <= most]

    def schedule(self, sch, conv, config: ThreadTile, target) -> None:
        block = conv.block
        wb = accumulate_locally(sch, conv)
        n, y, x, c, ry, rx, rc = sch.get_loops(block)
        co, cv = sch.split(c, [None, config.vector])
        bx, tx = sch.split(sch.fuse(n, y, x, co), [None, config.threads])
        sch.reorder(bx, tx, ry, rx, rc, cv)
        self.bind(sch, bx, "blockIdx.x")
        self.bind(sch, tx, "threadIdx.x")
        sch.reverse_compute_at(wb, tx)
        sch.unroll(ry)
        sch.unroll(rx)
        sch.unroll(cv)
        init = sch.decompose_reduction(block, ry)
        if config.vector > 1:
            # (The update itself cannot be vectorized under the grid's bounds predicate.)
            sch.vectorize(sch.get_loops(init)[-1])
            sch.vectorize(sch.get_loops(wb)[-1])
