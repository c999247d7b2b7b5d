"""Dense NHWC convolution (pointwise 1x1 and full KxK, any stride and padding) as a GEMM.

The output pixels are the GEMM's rows (M = N*H*W), the output channels its columns
(contiguous in NHWC) and the input channels times the kernel window its depth. The
schedule is a register-blocked micro-kernel in the BLIS manner:

- the pixel domain is padded to whole chunks (``pad_einsum``), so the hot loop carries no
  bounds checks, and each chunk's input rows are packed (im2col for KxK) into a
  ``[tile, K / v, MR, v]`` panel while they are hot in cache (``pack_panel``), except
  where a stride-1 conv without padding has its tiles read the rows in place
  (``GEMMTile.direct``: a 1x1 conv's rows are the input's pixels; a KxK conv's rows at
  window position (ry, rx) are the pixels ry rows and rx columns on, with no im2col copy);
- weights are packed at build time into ``[F/NR, KH, KW, C, NR]`` panels (a layout-rewrite
  block that the pipeline lifts into the weight transform), so each panel is contiguous;
- MR x NR accumulators stay in vector registers across the whole reduction; bias,
  activation and residual epilogues are fused into the write-back;
- within a chunk, each weight panel runs through the chunk's tiles, the next panel
  prefetched meanwhile; or, where all the weights fit in L2, each tile runs through every
  panel (``GEMMTile.tile_major``), its input rows in L1 and its output rows written whole;
- chunks of pixels run in parallel, sized so the thread count divides them; or, where
  the weights outweigh the pixels (the 10x10 exit-flow layers of Xception at batch 1),
  groups of output channels run in parallel, each over every pixel, so that each
  weight is read from memory by one core only (``column_groups``; measured on a 2-core
  Sapphire Rapids with inputs and weights out of cache: 1536 -> 2048 channels on 10x10
  pixels 3.83 -> 2.89 ms, 1024 -> 1536 1.92 -> 1.43 ms; 728 -> 728 on 19x19, where the
  pixels weigh as much, no faster).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from ..epilogue_prefetch import EPILOGUE
from ..padded_rows import READ_LAST_ROW
from ..prefetch import LINE_BYTES, PREFETCH
from ..rule import LAYOUT_REWRITE, ConfigRule
from ..analysis import (DENSE, POINTWISE, accumulate_locally, index_by_pixel_row,
                        inline_padding, match_conv)
from .generic import schedule_tail
from .target_info import channel_vector, cpu_info

# At most this many register tiles per parallel chunk: each chunk streams every weight
# panel once, so bigger chunks read the weights fewer times, but a chunk's input rows
# and output rows should stay in L2 while it runs through the weight panels (28 x 14
# rows of 728 channels in and out: 2.3 MB). Measured on a 2-core Emerald Rapids (Xeon,
# CPUID model 207), legacy_xception at batch 8, interleaved in one process: 16 made it
# 0.967x as long as 32 (its 19x19x728 GEMMs 7.28 -> 7.07 ms, the 147x147 ones 7-10%
# faster); batch 1 unchanged. (Before the weight-panel prefetch, 32 had been the faster.)
MAX_TILES_PER_CHUNK = 16


# The most pixel rows in a register tile: 14 x 2 vectors (28 accumulators) still leaves an
# AVX-512 or NEON register file room for the weights and a broadcast, and lets the 19x19
# maps of Xception's middle flow (361 rows) pad to 364 rows instead of 372-384 with 12.
MAX_ROWS = 14


def most_rows(nu: int, registers: int) -> int:
    """The most pixel rows a tile of ``nu`` channel vectors can have: MR x NU accumulators,
    NU weight vectors and one broadcast in the vector registers, and at most MAX_ROWS."""
    return min(MAX_ROWS, (registers - nu - 1) // nu)


def register_tile(channels: int, lanes: int, registers: int,
                  rows: int = 0) -> tuple[int, int]:
    """(MR, NU): a tile of MR pixel rows x NU vectors of output channels.

    Each step of the reduction loads NU weight vectors and MR broadcasts and issues MR*NU
    FMAs; with two load and two FMA ports the tile runs at MR*NU / max(MR*NU, MR+NU) of
    peak. Channels are padded up to whole tiles and ``rows`` (when given) up to whole
    tiles of MR (the padding is computed and dropped), so the score also charges that
    waste. MR*NU accumulators, NU weight vectors and one broadcast must fit in the vector
    registers, and MR*NU >= 10 accumulators hide the FMA latency.
    """
    scored = []
    for nu in (1, 2, 3, 4):
        top = most_rows(nu, registers)
        for mr in range(top, top - 3, -1):
            if mr < 1 or mr * nu < 10:
                continue
            nr = nu * lanes
            padded = -(-channels // nr) * nr
            score = mr * nu / max(mr * nu, mr + nu) * channels / padded
            if rows:
                score *= rows / (-(-rows // mr) * mr)
            scored.append((score, mr, nu))
    # Among tiles within NEAR_TIE of the best score, the most accumulators, then the
    # most rows: a step loads NU weight vectors for MR x NU FMAs, so more rows read the
    # weights fewer times (see NEAR_TIE).
    best = max(score for score, _, _ in scored)
    near = [(mr, nu) for score, mr, nu in scored if score >= (1 - NEAR_TIE) * best]
    return max(near, key=lambda tile: (tile[0] * tile[1], tile[0]))


# Register tiles scoring within this fraction of the best count as equal, and the one
# with the most accumulators (then rows) is taken. With the score alone, the least
# padding decided among tiles the port model rates alike: on AVX2 (16 registers) most of
# legacy_xception's GEMMs got 5 x 2 vectors (10 FMAs per 7 loads) to save a row or two of
# padding, where 6 x 2 (12 per 8) pads a little more; with 6 x 2 the model ran
# 0.90-0.91x as long (two interleaved runs, AVX2 code on a 2-core Emerald Rapids; its
# pointwise convs 0.89x). On AVX-512 the 147x147 and 74x74 layers go from 5 x 4 and
# 4 x 4 to 14 x 2 (no change measurable end to end there).
NEAR_TIE = 0.01


# The reduction over input channels runs as this many interleaved streams, when they
# divide the channels into runs of at least MIN_STREAM_DEPTH (see ``depth_streams``).
STREAMS = 4
MIN_STREAM_DEPTH = 16


def depth_streams(depth: int) -> int:
    """How many interleaved streams the reduction over ``depth`` input channels runs as:
    each step of the loop advances every stream by one channel, so the weight panel and
    the packed input are read at that many places at once.

    Measured on a 2-core Emerald Rapids (Xeon, CPUID model 207) in legacy_xception at
    batch 1, where each GEMM's weights come from L3 or memory: the 19x19x728 GEMM loses
    about 20% to cold weights (0.95 -> 1.16 ms, timed alone on rotating weight copies),
    the latency of the hardware prefetcher restarting at every 4 KiB page of the panel.
    Several streams keep several misses in flight: with 14-row tiles, the whole model ran
    0.963x (2 streams), 0.919-0.930x (4) and 0.920x (8) of its time with 12-row tiles
    and one stream (14 rows alone: 0.975-0.982x), interleaved in one process. (The
    software prefetch of the next panel, ``prefetch_parts``, came later and adds to it.)
    """
    for streams in (STREAMS, 2):
        if depth % streams == 0 and depth // streams >= MIN_STREAM_DEPTH:
            return streams
    return 1


# Each part of a tile's reduction prefetches its share of the next weight panel
# (``schedules.prefetch``); a part runs at least this many steps of each stream, so that
# reloading the accumulators between parts (LLVM keeps them in registers within a part
# only) stays a small cost.
MIN_PART_DEPTH = 24


def prefetch_parts(steps: int) -> int:
    """Parts of a tile's reduction of ``steps`` steps (per stream), each prefetching a
    share of the next weight panel: the most parts of at least MIN_PART_DEPTH steps that
    divide the steps evenly; 0 (no prefetch) when that is fewer than two.

    Measured on a 2-core Emerald Rapids (Xeon, CPUID model 207), the 19x19x728 GEMM of
    legacy_xception timed alone with its weights rotated through 40 copies (as far back
    in the caches as the model leaves them): 1.270 -> 1.100 ms with 7 parts of 26 steps
    (warm weights: 1.131 -> 1.097); parts of 13 and 7 steps timed alike.
    """
    parts = max((p for p in range(1, steps // MIN_PART_DEPTH + 1) if steps % p == 0),
                default=1)
    return parts if parts > 1 else 0


def chunk_tiles(rows: int, mr: int, threads: int, tile_bytes: int = 0,
                l2_bytes: int = 0) -> int:
    """Micro-tiles per parallel chunk, between MIN_TILES_PER_CHUNK (or what gives every
    thread a chunk, when fewer) and MAX_TILES_PER_CHUNK: little padding waste, chunks a
    multiple of the thread count, and among the choices within CHUNK_NEAR_TIE of the
    least waste the most tiles per chunk (each chunk streams all the weights once) whose
    input rows (``tile_bytes`` a tile) fit L2_SHARE of the ``l2_bytes`` L2, or the fewest
    when none does (see L2_SHARE)."""
    tiles = -(-rows // mr)
    lowest = max(1, min(MIN_TILES_PER_CHUNK, -(-tiles // threads)))
    scored = []
    for mb in range(MAX_TILES_PER_CHUNK, lowest - 1, -1):
        p = mr * mb
        padded = -(-rows // p) * p
        chunks = padded // p
        balance = (-(-chunks // threads) * threads) / chunks
        scored.append((padded / rows * balance, mb))
    best = min(score for score, _ in scored)
    near = [mb for score, mb in scored if score <= best * (1 + CHUNK_NEAR_TIE)]
    if not l2_bytes:
        return max(near)
    fits = [mb for mb in near if mb * tile_bytes <= l2_bytes * L2_SHARE]
    return max(fits) if fits else min(near)


# The fewest tiles per chunk where the rows allow it: the 800 rows of Xception's
# 728 -> 1024 1x1 conv at batch 8 otherwise took 62 chunks of one 13-row tile (the least
# padding) and ran 1.5x as long as in 2 chunks of 31, streaming its 3 MB of weights 62
# times. Chunk sizes scoring within CHUNK_NEAR_TIE of the best count as equal.
MIN_TILES_PER_CHUNK = 8
CHUNK_NEAR_TIE = 0.01

# A chunk's input rows take at most this share of a core's L2: a chunk runs every weight
# panel through its tiles, so each input row is read again after all the chunk's other
# rows, a weight panel and the next one's prefetch; rows that no longer fit come from L3
# at each panel. Measured on a 2-core Zen 4 (1 MiB L2), legacy_xception at batch 8
# without a tuning log, per kernel in the model, interleaved: the 19x19x728 GEMMs (2,888
# rows, 14-row tiles of 40.8 KB) ran 0.94x as long in chunks of 12 or 8 tiles (490 and
# 326 KB) as in chunks of 13 or 16 (530 and 652 KB; 16 was the default), the 728 -> 1024
# and 1024 -> 1536 ones 0.93x-0.96x; the model 0.975x. At batch 1 those GEMMs keep 2
# chunks of 13 tiles, one a core: the fewer tiles pad 361 rows to 448. The x86-avx2
# preset's code there (its 256 KiB L2: 8 tiles of 6 rows at batch 1 for 16 before): its
# 19x19x728 GEMMs 0.90x and 0.97x as long in the model, two runs in either order.
L2_SHARE = 0.5


# Channel groups in parallel when the output channels number at least this many times
# the pixels (see the module docstring).
COLUMN_GROUP_RATIO = 4


def column_groups(rows: int, channels: int, cores: int) -> int:
    """Parallel groups of output channels (1: chunks of pixels run in parallel instead)."""
    return cores if cores > 1 and channels >= COLUMN_GROUP_RATIO * rows else 1


@dataclass(frozen=True)
class GEMMTile:
    """MR pixel rows x NU vectors of channels per register tile; MB tiles per chunk;
    ``groups`` groups of output channels in parallel (1: the chunks in parallel); the
    reduction over input channels as ``streams`` interleaved streams, in ``prefetch``
    parts; each tile through every weight panel (``tile_major``) or each panel through
    every tile. (Logs written before ``streams`` existed read as 1: what they timed.)"""

    mr: int
    nu: int
    mb: int
    groups: int = 1
    streams: int = 1  # interleaved streams of the reduction (``depth_streams``)
    # The reduction of each tile in this many parts, each prefetching a share of the next
    # weight panel (``prefetch_parts``); 0: no prefetch. (Logs written before read as 0.)
    prefetch: int = 0
    # The tiles read the input rows where they lie, not a packed copy (stride-1 convs
    # without padding, ``Conv2DNHWC.rows_in_place``; see ``schedules.padded_rows``).
    # Measured for a KxK window on a 2-core Zen 4, legacy_xception's second stem conv
    # (3x3, 32 -> 64 channels on 147x147, no padding) in the model at batch 1: 4.07-4.32
    # -> 3.93-4.12 ms untuned; with the shipped log (whose packed 4 x 1 tiles it
    # replaces) 3.86-4.06 -> 3.74-3.77, the model 0.990x (80 paired rounds); OpenVINO's
    # 3.66-3.75. Timed alone, in-place tiles of 6 x 4 to 14 x 2 all ran 3.54-3.66 ms.
    direct: bool = False
    # Each tile runs through every weight panel of its group before the next tile starts
    # (its input rows stay in L1, its output rows are written whole), instead of each
    # panel through every tile of the chunk (``tile_major``). No panel prefetch then.
    tile_major: bool = False

    # Written to tuning logs only where set: the configurations logs timed before it
    # existed keep their keys (``ConfigRule.config_to_json``).
    OMITTED_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("tile_major",)


# Tiles read the input rows in place (``GEMMTile.direct``) only where the input is at
# most this large; a larger one comes from memory rather than the caches, and packing
# reads it as one sequential stream per row, where the tiles read MR rows x STREAMS
# places at once, more streams than the L2 prefetcher follows. Measured on a 2-core
# Emerald Rapids (Xeon, CPUID model 207), legacy_xception at batch 8, interleaved in one
# process: 0.983x as long with the 22-88 MB inputs of its 147x147, 74x74 and 37x37x728
# layers packed (each of those 4-6% faster); at batch 1 the largest input is 11 MB.
DIRECT_MAX_BYTES = 16 << 20


def rows_crowd_l1(depth: int, mr: int, streams: int, l1_sets: int, l1_ways: int) -> bool:
    """Whether a tile's MR input rows read in place (``depth`` floats apart, each read
    at ``streams`` places ``depth / streams`` floats apart) put more lines into one set
    of an L1 of ``l1_sets`` sets (64-byte lines) than it has ``l1_ways``: those lines
    then evict each other at every step of the reduction. A packed tile's rows lie side
    by side (``pack_panel``) and spread over the sets.

    1024 channels are 4 KiB a row, one L1 set (64 sets of 64 bytes) for every row: on a
    2-core Zen 4 (AVX-512), each GEMM timed alone, warm, 14-row tiles read in place ran
    at 63% of the FMA peak, packed at 93-95% (1024 -> 1024 on 7x7 at batch 8: 5.53 ->
    3.67 ms; 1024 -> 736 on 19x19 at batch 8: 31.0 ms in place). 9 rows in a set (the
    exit flow's 1024 -> 1536, 9-row tiles) 11.50 -> 11.46 ms; 7 (512 channels, 14 rows)
    10.53 -> 10.18 ms on 19x19 but 3.64 -> 3.71 on 14x14: left in place."""
    if not l1_sets or not l1_ways:
        return False
    sets: dict[int, int] = {}
    for r in range(mr):
        for s in range(streams):
            line = (r * depth + s * (depth // streams)) * 4 // LINE_BYTES % l1_sets
            sets[line] = sets.get(line, 0) + 1
    return max(sets.values()) > l1_ways


# Tiles run through every weight panel (``GEMMTile.tile_major``) by default where all the
# weights (input channels x window x output channels, float32) take at most this many
# bytes: they stay in L2 while a tile's input rows stay in L1, and each output row is
# written whole. Larger weights stream through L2 panel by panel, with the next panel
# prefetched, as before. Measured on a 2-core Emerald Rapids (Xeon, CPUID model 207),
# legacy_xception without a tuning log, interleaved in one process, against no kernel
# tile-major: with this limit (its entry flow's 1x1 and 3x3 convs, up to the 745 KB of
# 256 -> 728) batch 1 0.984x and 0.987x as long, batch 8 0.983x twice; 300 KB (without
# the 256 -> 728 layers) 0.986x and 0.992x; 4 MiB (with the 3 MB 728 -> 1024) 1.041x and
# 1.005x. Timed alone on warm caches: the 147x147 128 -> 128 conv 0.94x, 74x74
# 256 -> 256 0.91x, 37x37 256 -> 728 0.89x (0.82x at batch 8), the 2.1 MB 728 -> 728 ones
# 1.05x. The x86-avx2 preset's code on the same machine: 1.004x and 1.003x (neutral).
TILE_MAJOR_MAX_BYTES = 1 << 20


def tile_major(depth: int, window: int, channels: int) -> bool:
    """Whether a GEMM's tiles run through every weight panel by default (see
    TILE_MAJOR_MAX_BYTES)."""
    return depth * window * channels * 4 <= TILE_MAJOR_MAX_BYTES


def gemm_configs(rows: int, channels: int, lanes: int, registers: int,
                 cores: int, depth: int = 1, window: int = 1,
                 direct: bool = False, l2_bytes: int = 0,
                 l1_sets: int = 0, l1_ways: int = 0) -> list[GEMMTile]:
    """The default tiling (``register_tile``, ``chunk_tiles`` for an ``l2_bytes`` L2,
    ``depth_streams`` of the ``depth`` input channels, the tiles through every panel
    where ``tile_major`` says so and otherwise ``prefetch_parts`` where the ``window``
    is 1x1, the input read in place where ``direct`` allows it and the rows do not
    crowd an L1 of ``l1_sets`` x ``l1_ways``, ``rows_crowd_l1``) first, then the
    neighbourhood the tuner measures: the other loop order, the other parallel split,
    the other stream counts, prefetch or none, a packed input or none (and neither
    in-place rows nor prefetch: on a Zen 4 the 19x19x728 GEMMs' best), and the other
    register tiles that fit (fewer rows, other widths) with a few chunk sizes each."""
    mr, nu = register_tile(channels, lanes, registers, rows)
    streams = depth_streams(depth)
    major = tile_major(depth, window, channels)

    def parts(streams: int, major: bool = major) -> int:
        # A KxK window's reduction loops over the window outside the channels: its
        # parts would prefetch the same lines once per window position. Tiles that run
        # through every panel have no next panel to prefetch.
        return prefetch_parts(depth // streams) if window == 1 and not major else 0

    groups = column_groups(rows, channels, cores)

    def in_place(mr: int) -> bool:
        # In place only where the rows fill a tile (the padded rows read guarded where
        # they share an accumulator with a real row: ``schedules.padded_rows``), where
        # the input is small enough to come from the caches (DIRECT_MAX_BYTES), and
        # where the tile's rows spread over the L1's sets (``rows_crowd_l1``).
        return (direct and rows >= mr and rows * depth * 4 <= DIRECT_MAX_BYTES
                and not rows_crowd_l1(depth, mr, streams, l1_sets, l1_ways))

    def chunk(mr: int, threads: int) -> int:
        # Tiles that run through every panel keep their rows in L1 and the weights in
        # L2: the chunk's rows need not stay there.
        return chunk_tiles(rows, mr, threads, mr * depth * window * 4,
                           0 if major else l2_bytes)

    by_rows = GEMMTile(mr, nu, chunk(mr, cores), 1, streams, parts(streams), in_place(mr),
                       major)
    by_columns = replace(by_rows, mb=chunk(mr, 1), groups=cores)
    out = [by_columns, by_rows] if groups > 1 else [by_rows]
    if cores > 1 and groups == 1:
        out.append(by_columns)  # the alternative, for the tuner
    first = out[0]
    out.append(replace(first, tile_major=not major, prefetch=parts(streams, not major)))
    if first.prefetch:
        out.append(replace(first, prefetch=0))
    if first.direct:
        out.append(replace(first, direct=False))
    if first.direct and first.prefetch:
        out.append(replace(first, direct=False, prefetch=0))
    for other in (1, 2, 4, 8):
        if other != streams and depth % other == 0:
            out.append(replace(first, streams=other, prefetch=parts(other)))
    for nu in (1, 2, 3, 4):
        top = most_rows(nu, registers)
        for mr in sorted({top, top - 2, 4} - {0}, reverse=True):
            if not 1 <= mr <= top:
                continue
            for mb in sorted({chunk(mr, cores), 2, 4, 8, 16}):
                if -(-rows // (mr * mb)) >= cores:  # enough chunks for every core
                    config = GEMMTile(mr, nu, mb, 1, streams, parts(streams),
                                      in_place(mr), major)
                    if config not in out:
                        out.append(config)
    return out


def pack_panel(sch, panel, mr: int, channels: int, lanes: int) -> None:
    """Lay out the packed input ``panel`` (rows ``[row, (window,) k]``) so that a tile's
    MR rows sit side by side: ``[tile, (window,) k // v, row-in-tile, k % v]``, copied a
    vector of v channels at a time, v the widest vector that divides the ``channels``
    (``channel_vector``: 8 of 16 lanes for 728); with an odd channel count
    ``[tile, (window,) k, row-in-tile]``, copied by LLVM as it likes.

    A step of the reduction broadcasts its MR inputs from MR lines that the next v - 1
    steps reuse, and the copy is whole-vector loads and stores. The layout
    with the rows innermost made LLVM copy with scatters (about an element a cycle; 22 M
    elements in legacy_xception at batch 1). Measured there on 2 Emerald Rapids cores,
    interleaved: pointwise convs 48.8 -> 46.4 ms, the 3x3 stem convs 3.3 -> 2.7 ms.
    """
    from tvm.tirx import IndexMap

    ndim = len(sch.get(panel).writes[0].source.shape)
    v = channel_vector(channels, lanes)
    if v > 1:
        sch.transform_layout(panel, ("write", 0), IndexMap.from_func(
            lambda *i: (i[0] // mr, *i[1:-1], i[-1] // v, i[0] % mr, i[-1] % v),
            ndim=ndim))
        sch.vectorize(sch.split(sch.get_loops(panel)[-1], [None, v])[1])
    else:
        sch.transform_layout(panel, ("write", 0), IndexMap.from_func(
            lambda *i: (i[0] // mr, *i[1:], i[0] % mr), ndim=ndim))


class PackedConvGEMM(ConfigRule):
    """Schedule rule: dense (groups=1) NHWC/HWIO convolution -> packed register-tiled GEMM."""

    name = "xcompile.cpu.PackedConvGEMM"
    aliases = ("xcompile.cpu.ConvGEMM",)  # its name in earlier manifests and tuning logs
    config_type = GEMMTile

    def match(self, sch, target):
        return match_conv(sch, target, "llvm", (POINTWISE, DENSE), tail=True)

    def configs(self, conv, target) -> list[GEMMTile]:
        info = cpu_info(target)
        n, h, w, f = conv.out_shape
        return gemm_configs(n * h * w, f, info.lanes, info.registers, info.cores,
                            conv.in_channels, conv.kernel[0] * conv.kernel[1],
                            conv.rows_in_place, info.l2_bytes, info.l1_sets, info.l1_ways)

    def searchable(self, conv, config: GEMMTile, target) -> bool:
        # MetaSchedule times kernels on pre-packed weights and requires the packing block
        # to be a plain copy; zero-padding the channels to whole tiles makes it a select.
        return conv.out_shape[3] % (config.groups * config.nu * cpu_info(target).lanes) == 0

    def schedule(self, sch, conv, config: GEMMTile, target) -> None:
        self._schedule(sch, conv, config, cpu_info(target).lanes)

    @staticmethod
    def _schedule(sch, conv, config: GEMMTile, lanes: int) -> None:
        mr, nu, mb, groups = config.mr, config.nu, config.mb, config.groups
        nr = nu * lanes
        # Channels padded to whole tiles, and to whole groups of them.
        per_group = -(-conv.out_shape[3] // (nr * groups)) * nr
        block = conv.block
        # Accumulators, with the elementwise epilogue fused into their write-back;
        # pixels as one GEMM row index. The zero padding goes into the packing below.
        wb = accumulate_locally(sch, conv, pad_in_place=False)
        index_by_pixel_row(sch, conv, wb)
        # Input rows: reindexed to [row, ry, rx, rc], padded to whole chunks, packed.
        gathered = sch.reindex(block, ("read", 0))
        # Pad rows to whole chunks and channels to whole NR-wide tiles.
        sch.pad_einsum(block, [mr * mb, per_group if groups > 1 else nr, 1, 1, 1])
        reads = [r.source for r in sch.get(block).reads]
        producers = {i: p for p in sch.get_producers(block) for i, buf in enumerate(reads)
                     if sch.get(p).writes[0].source.same_as(buf)}
        panel = producers[0]
        if not sch.get(panel).same_as(sch.get(gathered)):  # rows were padded
            sch.compute_inline(gathered)
        # The panel reads the input under the padding predicate and packs the zeros:
        # no read outside the input, and no predicate in the micro-kernel.
        inline_padding(sch, conv)
        # Weights packed into contiguous NR-wide panels; the pipeline runs this block once,
        # at build time (it is lifted into the weight transform).
        packed = sch.cache_read(block, 1, "global")
        if 1 in producers:  # channel padding of the weights: zeros, packed with them
            sch.compute_inline(producers[1])
        sch.transform_layout(packed, ("write", 0),
                             lambda ry, rx, rc, c: (c // nr, ry, rx, rc, c % nr))
        sch.annotate(packed, LAYOUT_REWRITE, True)
        consumer = sch.get_consumers(block)[0]
        if not sch.get(consumer).same_as(sch.get(wb)):  # padded accumulators -> write-back
            sch.compute_inline(consumer)
        m, c, ry, rx, rc = sch.get_loops(block)
        mo, mt, mi = sch.split(m, [None, mb, mr])
        # Stream s of the reduction covers input channels [s*C/S, (s+1)*C/S); each step
        # advances all of them (``depth_streams``).
        rs = part = None
        if config.streams > 1:
            rs, rc = sch.split(rc, [config.streams, None])
        steps = conv.in_channels // config.streams
        if config.prefetch > 1 and steps % config.prefetch == 0 and not config.tile_major:
            # The prefetch of the next weight panel goes at the top of each part
            # (``schedules.prefetch``), outside the loop that keeps the accumulators in
            # registers.
            part, rc = sch.split(rc, [config.prefetch, None])
        depth = [ry, rx, *([part] if part else []), rc, *([rs] if rs else [])]
        if groups > 1:
            cg, co, cu, cv = sch.split(c, [groups, None, nu, lanes])
        else:  # (the chunk loop outermost: SeparableConv computes its depthwise rows there)
            cg, (co, cu, cv) = None, sch.split(c, [None, nu, lanes])
        tiles = [mt, co] if config.tile_major else [co, mt]
        sch.reorder(*([cg] if cg else []), mo, *tiles, *depth, mi, cu, cv)
        if rs is not None:
            sch.unroll(rs)
        if part is not None:  # (the value: the weight panels a channel group runs through)
            sch.annotate(mt, PREFETCH, per_group // nr)
            sch.annotate(part, PREFETCH, per_group // nr)
        sch.reverse_compute_at(wb, tiles[-1])
        # The write-back's lines prefetched as each tile starts (``epilogue_prefetch``).
        sch.annotate(tiles[-1], EPILOGUE, True)
        if config.direct and conv.rows_in_place:
            # The input rows where they lie: the padded rows' guarded reads become reads of
            # the last row (``schedules.padded_rows``; their results are dropped).
            sch.compute_inline(panel)
            n, h, w, _ = conv.out_shape
            sch.annotate(block, READ_LAST_ROW, n * h * w)
        else:
            sch.compute_at(panel, mo)
            pack_panel(sch, panel, mr, conv.in_channels, lanes)
        sch.unroll(mi)
        sch.unroll(cu)
        sch.vectorize(cv)
        # Each group packs the pixel chunks it runs (the groups share no buffer).
        sch.parallel(cg if groups > 1 else mo)
        init = sch.decompose_reduction(block, ry)
        loops = sch.get_loops(init)
        sch.vectorize(loops[-1])
        sch.unroll(loops[-2])
        sch.unroll(loops[-3])
        wl = sch.get_loops(wb)
        sch.vectorize(sch.split(wl[-1], [None, lanes])[-1])
        schedule_tail(sch, conv, lanes)
