"""Depthwise NHWC convolution (any kernel size, stride, padding, channel multiplier).

Memory-bound: one pass over the input, vectorized over channels (contiguous in NHWC;
whole vectors of the widest width that divides the channels, see ``channel_vector``, or,
where that is under half the target's or few channels would be computed twice, vectors of
its full width, the last overlapping the one before, see ``overlaps_pay``), a register
tile of output pixels along a row (one accumulator vector each) held across the KHxKW
window, the elementwise epilogue (batch norm, activation) fused into its write-back, rows
of output pixels in parallel.

The tile is one pixel, or under a heavy epilogue a row split as evenly as half the vector
registers allow (``row_tile``); the tuner tries the others. Within a row, each channel
vector runs along the whole row (``DepthwiseTile.channels_outer``), its KHxKW weight
vectors loaded once for the row's pixels, where the lines that pass reads stay in L1
(``channels_outside``); the tuner also times the other order (all channels of a pixel,
then the next pixel), the default where they do not. Measured on a 2-core Zen 4
(AVX-512) against that order, each kernel alone, warm: legacy_xception's 19x19x728
depthwise convs 0.091 -> 0.030 ms (0.089 -> 0.047 with the ReLU before them), its ten
depthwise kernels 1.1-3x faster, MobileNetV2's ten 1.0-2.6x, EfficientNet-B0's twelve
(SiLU, row tiles) 0.97-1.16x. Inside the models, interleaved: legacy_xception's ten
5.55 -> 4.70 ms (the 728-channel ones 1.4-1.6x faster, the entry flow's 64 to 256
channels 1.05-1.4x slower: their rows miss L1, and they now keep the other order),
MobileNetV2's 0.76 -> 0.56 ms, EfficientNet-B0's 1.23 -> 1.25 ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..analysis import DEPTHWISE, accumulate_locally, match_conv
from ..overlapped_vectors import mark_overlap
from ..prefetch import LINE_BYTES
from ..rule import ConfigRule
from .generic import schedule_tail
from .target_info import cpu_info, overlaps_fit, overlaps_pay, vector_width


# Operations per element (``Conv2DNHWC.epilogue_ops``) from which the default tile has a
# row of pixels rather than one: their epilogues' long dependent chains (a SiLU's
# polynomial) then run side by side. A light epilogue runs best one pixel a tile: on
# Xception's depthwise convs (bias and ReLU at most; 147x147x64 to 19x19x728) wider tiles
# were 1.5x slower in the model, on EfficientNet-B0's (SiLU) 1.4x faster (0.94 ms for
# its 12, 1.33 ms one pixel a tile; Emerald Rapids, AVX-512).
HEAVY_EPILOGUE = 16.0


def row_tile(width: int, registers: int, vectors: int = 1) -> int:
    """Output pixels of a row per register tile: at most half the vector registers as
    accumulators (the other half: the window's weights and inputs), the row split into
    tiles as even as can be (19 pixels: 10 + 9, not 16 + 3; the last tile of an uneven
    split runs under a bounds check)."""
    most = max(1, registers // 2 // vectors)
    tiles = -(-width // most)
    return -(-width // tiles)


def channels_outside(conv, info) -> bool:
    """The default loop order: each channel vector along the whole row (True), unless the
    lines that pass reads miss L1 while a pixel's channels, taken together, fit it.

    A channel vector's pass along an output row reads the KH input rows' pixels, a line
    each, ``channels x 4`` bytes apart. With that spacing a multiple of the line, the
    lines fall into every ``gcd``-th set only (128 channels: every 8th of 64 sets), and
    8 ways of 8 sets hold 64 lines, where a 147-pixel row's window is 441: each channel
    vector's pass then reloads from L2 what the last one fetched. With the channels
    inside, a pixel needs its KHxKW window's inputs and weights over all the channels
    in L1 instead (9 KB each at 256 channels, 37 KB at 1024).

    Measured on a 2-core Zen 4 (AMD EPYC, CPUID family 25 model 17), each kernel in the
    model, interleaved against the channels outside: legacy_xception's entry flow
    (64-256 channels, 147x147 to 37x37) 0.70-0.84x as long with them inside in one run,
    0.76-0.97x in another (its ten depthwise kernels 3.85 -> 3.66 ms); its 10x10 ones
    with 1024 and 1536 channels ran 1.3x and 1.6x as long inside (before the window's
    size counted: they stay outside now); MobileNetV2's ten 0.544 -> 0.521 ms (its 32-
    and 96-channel 112x112 ones inside), EfficientNet-B0's 0.991 -> 0.989. By channel
    count alone (outside from 512), MobileNetV2's 144-384 channel ones, whose rows fit,
    ran 1.1-1.3x as long inside."""
    _, _, width, channels = conv.in_shape
    pixel_bytes = channels * 4
    sets = info.l1_sets
    if pixel_bytes % LINE_BYTES == 0:
        sets //= math.gcd(pixel_bytes // LINE_BYTES, info.l1_sets)
    rows_fit = conv.kernel[0] * width <= sets * info.l1_ways
    window_bytes = 2 * conv.kernel[0] * conv.kernel[1] * pixel_bytes  # inputs and weights
    return rows_fit or window_bytes > info.l1_sets * info.l1_ways * LINE_BYTES


@dataclass(frozen=True)
class DepthwiseTile:
    """``vectors`` channel vectors x ``pixels`` output pixels of a row per register tile;
    ``channels_outer``: the loop over a row's channel vectors outside the loop over its
    pixels (each channel vector's weights held across the row), else inside it;
    ``overlapped``: vectors of the target's full width, the last overlapping the one
    before it (``schedules.overlapped_vectors``), else whole vectors of the widest width
    that divides the channels (``channel_vector``)."""

    vectors: int = 1
    pixels: int = 1
    # Added after tuning logs were written: at their defaults (what those logs timed)
    # they stay out of a configuration's key (``ConfigRule.config_to_json``).
    channels_outer: bool = False
    overlapped: bool = False
    OMITTED_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("channels_outer", "overlapped")


class VectorDepthwise(ConfigRule):
    """Schedule rule: depthwise NHWC/HWIO convolution -> channel-vectorized direct conv."""

    name = "xcompile.cpu.VectorDepthwise"
    aliases = ("xcompile.cpu.Depthwise",)  # its name in earlier manifests and tuning logs
    config_type = DepthwiseTile

    def match(self, sch, target):
        return match_conv(sch, target, "llvm", (DEPTHWISE,), tail=True)

    def configs(self, conv, target) -> list[DepthwiseTile]:
        """The default first: one vector x one pixel, or x ``row_tile`` pixels under a
        heavy epilogue (``HEAVY_EPILOGUE``), channels outside pixels, overlapped
        vectors where they pay (``overlaps_pay``); then the other tiles of 1, 2 or 4
        vectors that divide the channel vectors by one pixel or the row split evenly
        (``row_tile``), with at most half the vector registers as accumulators, in both
        orders, with either kind of vector where overlapped ones fit (``overlaps_fit``).
        (2, 4 and 8 pixels too doubled the configurations the tuner times; in the
        shipped logs' timings none of them was the fastest for any of Xception's
        depthwise convs: one pixel was, or the row for the 10x10 ones.)"""
        _, _, width, channels = conv.out_shape
        info = cpu_info(target)
        overlap = overlaps_pay(channels, info.lanes)
        kinds = (True, False) if overlaps_fit(channels, info.lanes) else (False,)
        pixels = row_tile(width, info.registers) if conv.epilogue_ops >= HEAVY_EPILOGUE else 1
        default = DepthwiseTile(1, pixels, channels_outside(conv, info), overlap)
        others = []
        for overlapped in kinds:
            lanes = vector_width(channels, info.lanes, overlapped)
            others += [DepthwiseTile(v, p, outer, overlapped)
                       for outer in (True, False) for v in (1, 2, 4)
                       for p in sorted({1, row_tile(width, info.registers, v)})
                       if -(-channels // lanes) % v == 0 and v * lanes <= channels
                       and p <= width and v * p <= info.registers // 2]
        return [default] + [c for c in others if c != default]

    def schedule(self, sch, conv, config: DepthwiseTile, target) -> None:
        lanes = vector_width(conv.out_shape[3], cpu_info(target).lanes, config.overlapped)
        self._schedule(sch, conv, lanes, config)

    @staticmethod
    def _schedule(sch, conv, lanes: int, config: DepthwiseTile = DepthwiseTile()) -> None:
        block = conv.block
        wb = accumulate_locally(sch, conv)
        n, y, x, c, ry, rx, rc = sch.get_loops(block)
        rows = sch.fuse(n, y)
        xo, xi = sch.split(x, [None, config.pixels])
        co, cu, cv = sch.split(c, [None, config.vectors, lanes])
        # Full-width vectors past the last channel: the last tile moved back over the one
        # before (``schedules.overlapped_vectors``; ``overlaps_pay``).
        mark_overlap(sch, co, conv.out_shape[3], lanes)
        outer, inner = (co, xo) if config.channels_outer else (xo, co)
        sch.reorder(rows, outer, inner, ry, rx, rc, xi, cu, cv)
        sch.reverse_compute_at(wb, inner)
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
