"""Winograd convolutions (``xcompile.winograd``: F(4x4, 3x3)) on CPUs, a row of tiles at
a time.

Each parallel step takes one row of output tiles (4 output rows) of one image and runs
the whole algorithm on it while its data stay in L2:

- the input transform, per tile and vector of input channels: the 6 x 6 input pixels
  to 6 x 6 points, rows then columns (``V = B^T d B`` as two passes of 6-term sums, the
  constants folded, the zeros dropped), in registers, stored as the row's ``V``;
- the 36 GEMMs (tiles x input channels by input channels x output channels, one per
  point), register-tiled as ``cpu.conv_gemm``'s: MR consecutive tiles x NU vectors of
  output channels in registers across the whole reduction (the row's tiles are padded
  to a multiple of MR by the graph pass, so the micro-kernel has no bounds checks);
- the output transform, per output tile and vector of output channels: the 6 x 6
  products to 4 x 4 pixels (``Y = A^T M A``), in registers, with the bias, activation
  and residual after the convolution applied on the way out.

Measured on a 2-core Zen 4 (AVX-512), legacy_xception's second stem conv (3x3, 32 -> 64
channels on 149x149, no padding) with its bias and ReLU, timed alone: 1.48-1.51 ms with
register blocks of 13 x 2 (the default) and 3 x 4 (the direct ``PackedConvGEMM``: 3.54-3.66
ms); in the model at batch 1, 3.61 -> 1.80 ms. Not measured: maps of a few tiles a row,
where the row's padding to the register block is a large share (7x7 maps: 2 tiles padded
to 3 or more).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..analysis import match_winograd
from ..rule import ConfigRule
from .conv_gemm import most_rows, register_tile
from .target_info import cpu_info


@dataclass(frozen=True)
class WinogradTile:
    """MR consecutive tiles of a row x NU vectors of output channels per register block."""

    mr: int
    nu: int


def default_tile(out_shape, info) -> WinogradTile:
    """The register block for a conv of NHWC ``out_shape`` on a CPU of ``info``
    (``conv_gemm.register_tile``: a row's 4-pixel tiles are its rows, the output channels
    its columns)."""
    tiles = -(-int(out_shape[2]) // 4)
    mr, nu = register_tile(int(out_shape[3]), info.lanes, info.registers, tiles)
    return WinogradTile(mr, nu)


def vectors_divide(in_channels: int, out_channels: int, lanes: int) -> bool:
    """Whether the rule takes a conv of these channels: whole vectors of both."""
    return in_channels % lanes == 0 and out_channels % lanes == 0


class WinogradConv(ConfigRule):
    """Schedule rule: a Winograd convolution (see the module docstring)."""

    name = "xcompile.cpu.WinogradConv"
    config_type = WinogradTile
    # MetaSchedule's own space stops the tuner on these kernels (TVM 0.27: an
    # InternalError, "Check failed: (load)", while it generates or replays candidates).
    metaschedule_space = False

    @staticmethod
    def tile_multiple(out_shape, weight_shape, target) -> int | None:
        """What the graph pass pads each row of tiles to a multiple of (the default
        register block's MR) for a conv of NHWC ``out_shape`` and HWIO
        ``weight_shape``, or None where this rule would not schedule it (channels the
        vectors do not divide) and the conv stays direct."""
        info = cpu_info(target)
        if not vectors_divide(int(weight_shape[2]), int(weight_shape[3]), info.lanes):
            return None
        return default_tile(out_shape, info).mr

    def match(self, sch, target):
        if target.kind.name != "llvm":
            return None
        found = match_winograd(sch)
        if found is None or not vectors_divide(found.in_channels, found.out_shape[3],
                                               cpu_info(target).lanes):
            return None
        return found

    def configs(self, found, target) -> list[WinogradTile]:
        info = cpu_info(target)
        channels = found.out_shape[3]
        tiles = found.row_tiles
        # The graph pass padded the row to this default's MR (``tile_multiple``).
        first = default_tile(found.out_shape, info)
        out = [first] if tiles % first.mr == 0 else []
        for nu in (4, 2, 1):
            if channels % (nu * info.lanes):
                continue
            for mr in range(most_rows(nu, info.registers), 1, -1):
                config = WinogradTile(mr, nu)
                if tiles % mr == 0 and mr * nu >= 8 and config not in out:
                    out.append(config)
        return out

    def schedule(self, sch, found, config: WinogradTile, target) -> None:
        lanes = cpu_info(target).lanes
        st = found.stages
        mr, nu = config.mr, config.nu
        # The epilogue folded into one block writing the output (or, with none, a
        # copy of the output from a local accumulator).
        for block in found.epilogues[:-1]:
            sch.compute_inline(block)
        if found.epilogues:
            out = found.epilogues[-1]
        else:
            out = sch.cache_write(st["output"], 0, "global")
        # The GEMMs of a row of tiles: the row loop outermost, in parallel.
        gemm = st["products"]
        e, v, b, ty, tx, co, k = sch.get_loops(gemm)
        txo, txi = sch.split(tx, [None, mr])
        coo, cu, cv = sch.split(co, [None, nu, lanes])
        sch.reorder(b, ty, e, v, coo, txo, k, txi, cu, cv)
        row = sch.fuse(b, ty)
        sch.parallel(row)
        sch.unroll(txi)
        sch.unroll(cu)
        sch.vectorize(cv)
        acc = sch.cache_write(gemm, 0, "local")
        sch.reverse_compute_at(acc, txo)
        # The write-back unrolled too: the accumulators stay registers (a loop over them
        # kept them in memory, zeroed by a memset and stored twice).
        tiles, chans = sch.get_loops(acc)[-2:]
        vectors, lane = sch.split(chans, [None, lanes])
        sch.unroll(tiles)
        sch.unroll(vectors)
        sch.vectorize(lane)
        init = sch.get_loops(sch.decompose_reduction(gemm, k))
        sch.unroll(init[-3])
        sch.unroll(init[-2])
        sch.vectorize(init[-1])
        # The output transform and the epilogue, per output tile and channel vector.
        sch.reverse_compute_at(st["output_rows"], row)
        sch.reverse_compute_at(st["output"], row)
        sch.set_scope(st["output"], 0, "local")
        sch.reverse_compute_at(out, row)
        oh, ow, oc = sch.get_loops(out)[-3:]
        owo, owi = sch.split(ow, [None, 4])
        oco, oci = sch.split(oc, [None, lanes])
        sch.reorder(owo, oco, oh, owi, oci)
        sch.unroll(oh)
        sch.unroll(owi)
        sch.vectorize(oci)
        self._transform(sch, st["output"], oco)
        sch.set_scope(st["output_rows"], 0, "local")
        self._transform(sch, st["output_rows"], oco)
        # The input transform, per tile and input channel vector, ahead of the GEMMs.
        data = st["input"]
        sch.compute_at(data, row)
        _, e, v, vtx, vc, vr = sch.get_loops(data)
        vco, vci = sch.split(vc, [None, lanes])
        sch.reorder(vtx, vco, e, v, vr, vci)
        local = sch.cache_write(data, 0, "local")
        sch.reverse_compute_at(local, vco)
        loops = sch.get_loops(local)
        sch.unroll(loops[-3])
        sch.unroll(loops[-2])
        sch.vectorize(loops[-1])
        for loop in (e, v, vr):
            sch.unroll(loop)
        sch.vectorize(vci)
        sch.decompose_reduction(data, vr)
        sch.set_scope(st["input_rows"], 0, "local")
        self._transform(sch, st["input_rows"], vco)

    @staticmethod
    def _transform(sch, block, loop) -> None:
        """``block`` (a 6-term sum per element of a 2-D block of a tile) computed under
        ``loop``, for its one tile and channel vector: the two loops over the block and
        the sum unrolled, the channels vectorized, so the sums run in registers with the
        constants folded (the loops of extent 1 are gone after ``compute_at``)."""
        sch.compute_at(block, loop)
        first, second, chan, red = sch.get_loops(block)[-4:]
        sch.reorder(first, second, red, chan)
        for l in (first, second, red):
            sch.unroll(l)
        sch.vectorize(chan)
        sch.decompose_reduction(block, red)
