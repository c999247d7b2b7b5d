"""Fused separable convolution (depthwise, then a 1x1 stride-1 conv of its output) in one
kernel, from ``xcompile.separable_fusion``.

The pointwise conv is scheduled as ``PackedConvGEMM`` does it: chunks of output pixels in
parallel, each chunk's input rows packed into a panel, then register-tiled. Here the
panel's rows come straight from the depthwise conv: it is computed per chunk, for exactly
the chunk's pixels (both convs are indexed by pixel row, ``n*H*W + y*W + x``), into a
chunk-sized buffer that stays in cache, so the depthwise output never goes to main
memory. Its schedule within the chunk is ``VectorDepthwise``'s: channel vectors, the window
unrolled, accumulators in registers.
"""

from __future__ import annotations

from ..analysis import accumulate_locally, index_by_pixel_row, match_separable
from ..rule import ConfigRule
from .conv_gemm import PackedConvGEMM, GEMMTile
from .target_info import channel_vector, cpu_info


class SeparableConv(ConfigRule):
    """Schedule rule: a fused depthwise -> pointwise PrimFunc -> one parallel loop over
    pixel chunks, each computing its depthwise rows and then its GEMM tiles."""

    name = "xcompile.cpu.SeparableConv"
    config_type = GEMMTile

    def match(self, sch, target):
        return match_separable(sch) if target.kind.name == "llvm" else None

    def configs(self, sep, target) -> list[GEMMTile]:
        # Chunks of pixels in parallel only: a channel group would recompute the chunk's
        # depthwise rows.
        return [c for c in PackedConvGEMM().configs(sep.pointwise, target) if c.groups == 1]

    def searchable(self, sep, config, target) -> bool:
        return PackedConvGEMM().searchable(sep.pointwise, config, target)

    def schedule(self, sch, sep, config: GEMMTile, target) -> None:
        self._schedule(sch, sep, config, cpu_info(target).lanes)

    @staticmethod
    def _schedule(sch, sep, config: GEMMTile, lanes: int) -> None:
        """``lanes``: the target's vector width; the GEMM pads channels to it, the
        depthwise rows use the widest whole vectors that divide their channels."""
        from tvm.s_tir import ScheduleError

        dw, pw = sep.depthwise, sep.pointwise
        _, h, w, _ = dw.out_shape
        # Depthwise accumulators in registers; what lies between the convs (batch norm,
        # activation, the pointwise conv's input copy) is fused into their write-back,
        # which then writes the pointwise conv's input directly.
        wb = accumulate_locally(sch, dw)
        # Both depthwise blocks and that input by pixel row, as the GEMM's rows are (so
        # that computing them per chunk keeps their bindings affine).
        index_by_pixel_row(sch, dw, wb)
        sch.transform_layout(wb, ("write", 0), lambda b, y, x, c: (b * h * w + y * w + x, c))
        PackedConvGEMM._schedule(sch, pw, config, lanes)
        # Each chunk computes its own depthwise rows, right before packing them; each row
        # (pixel) all its channels, a vector at a time, then writes them back.
        sch.compute_at(wb, sch.get_loops(pw.block)[0])
        row, c = sch.get_loops(wb)[1:]
        dw_lanes = channel_vector(dw.out_shape[3], lanes)
        # (One lane: an odd channel count, scalar code; TVM refuses a 1-lane vector.)
        vectorize = sch.vectorize if dw_lanes > 1 else sch.unroll
        vectorize(sch.split(c, [None, dw_lanes])[1])
        sch.compute_at(dw.block, row)
        channels, *window = sch.get_loops(dw.block)[2:]
        co, cv = sch.split(channels, [None, dw_lanes])
        sch.reorder(co, *window, cv)
        for loop in window:
            sch.unroll(loop)
        try:
            vectorize(cv)
        except ScheduleError:
            # TVM refuses to vectorize a reduction update whose bindings it cannot
            # prove affine under the last chunk's bounds predicate; LLVM gets it unrolled.
            sch.unroll(cv)
        init = sch.decompose_reduction(dw.block, window[0])
        vectorize(sch.get_loops(init)[-1])
