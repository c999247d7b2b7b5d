"""Dense NHWC convolution (pointwise 1x1 and full KxK, any stride and padding) as a tiled
GEMM on CUDA cores.

Rows are output pixels (M = N*H*W), columns output channels (contiguous in NHWC), depth
the window times the input channels (K = KH*KW*C, contiguous along C). Each block computes
a BM x BN tile of the output; its threads each hold a TM x TN register tile of
accumulators. The reduction walks K in BK-deep steps: every step the block's threads
fetch the A (im2col rows, gathered on the fly from the input) and B (weights, HWIO read
as [K, F]) tiles into shared memory together, with 16-byte loads where the channels allow,
then each thread runs BK rank-1 updates from shared memory. M, F and K are padded to
whole tiles, so only the fetches and the write-back carry bounds checks. Bias,
activation and residual epilogues are fused into the write-back.

fp16 operands are left to DLight's tensor-core matmul, next in the rule list.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..analysis import (DENSE, POINTWISE, accumulate_locally, index_by_pixel_row,
                        match_conv)
from .gpu_info import TARGET_BLOCKS, gpu_info
from .rule import GPURule

BK = 16  # reduction depth per shared-memory step
VECTOR = 4  # float32 lanes of a 16-byte load
# (BM, BN, TM, TN), the largest tiles first: the default is the first that fills the GPU.
TILES = ((128, 64, 8, 4), (64, 64, 4, 4), (64, 32, 4, 4), (32, 32, 4, 4))


@dataclass(frozen=True)
class BlockTile:
    """A BM x BN output tile per block, TM x TN per thread, BK-deep shared-memory steps."""

    bm: int
    bn: int
    tm: int
    tn: int
    bk: int = BK

    @property
    def threads(self) -> tuple[int, int]:
        """(threads over rows, threads over columns)."""
        return self.bm // self.tm, self.bn // self.tn


def blocks(rows: int, cols: int, config: BlockTile) -> int:
    return -(-rows // config.bm) * -(-cols // config.bn)


def tile_configs(rows: int, cols: int, max_threads: int, shared_bytes: int,
                 itemsize: int = 4) -> list[BlockTile]:
    """Tiles that fit the block limits; the default first: the largest that still gives
    ``TARGET_BLOCKS`` blocks, else the one giving the most."""
    fits = [BlockTile(*t) for t in TILES
            if (t[0] // t[2]) * (t[1] // t[3]) <= max_threads
            and (t[0] + t[1]) * BK * itemsize <= shared_bytes]
    full = [c for c in fits if blocks(rows, cols, c) >= TARGET_BLOCKS]
    default = full[0] if full else max(fits, key=lambda c: blocks(rows, cols, c))
    return [default] + [c for c in fits if c != default]


class SharedMemoryConvGEMM(GPURule):
    """Schedule rule: dense NHWC/HWIO float32 convolution -> shared-memory tiled GEMM."""

    name = "xcompile.cuda.SharedMemoryConvGEMM"
    aliases = ("xcompile.cuda.ConvGEMM",)  # its name in earlier manifests and tuning logs
    config_type = BlockTile

    def match(self, sch, target):
        conv = match_conv(sch, target, "cuda", (POINTWISE, DENSE))
        if conv is None:
            return None
        block = sch.get(conv.block)
        if any(r.source.dtype != "float32" for r in block.reads):
            return None
        return conv

    def configs(self, conv, target) -> list[BlockTile]:
        info = gpu_info(target)
        n, h, w, f = conv.out_shape
        return tile_configs(n * h * w, f, info.max_threads, info.shared_bytes)

    def schedule(self, sch, conv, config: BlockTile, target) -> None:
        f = conv.out_shape[3]
        c = conv.in_channels
        block = conv.block
        # The padding stays a producer: the shared-memory fetch of A inlines it, so the
        # fetch reads under the padding predicate (``_fetch``).
        wb = accumulate_locally(sch, conv, pad_in_place=False)
        # GEMM form: [pixel, channel] += A[pixel, window x channel] * B[window x channel, channel].
        index_by_pixel_row(sch, conv, wb, fuse_reduction=True)
        sch.reindex(block, ("read", 0))  # A[m, k]: im2col rows (a gather, inlined below)
        b_reindex = sch.reindex(block, ("read", 1))
        sch.transform_layout(b_reindex, ("write", 0), lambda o, k: (k, o))  # B[k, n]
        sch.pad_einsum(block, [config.bm, config.bn, config.bk])
        consumer = sch.get_consumers(block)[0]
        if not sch.get(consumer).same_as(sch.get(wb)):  # padded accumulators -> write-back
            sch.compute_inline(consumer)

        ty_n, tx_n = config.threads
        m, o, k = sch.get_loops(block)
        by, ty, mi = sch.split(m, [None, ty_n, config.tm])
        bx, tx, ni = sch.split(o, [None, tx_n, config.tn])
        ko, ki = sch.split(k, [None, config.bk])
        sch.reorder(by, bx, ty, tx, ko, ki, mi, ni)
        # Column tiles of one row tile run side by side: they share its A tile in L2.
        self.bind(sch, sch.fuse(by, bx), "blockIdx.x")
        self.bind(sch, ty, "threadIdx.y")
        self.bind(sch, tx, "threadIdx.x")
        sch.reverse_compute_at(wb, tx)

        # A's 16-byte loads need whole vectors of input channels; B's, of output channels.
        for index, vector in ((0, VECTOR if c % VECTOR == 0 else 1),
                              (1, VECTOR if f % VECTOR == 0 else 1)):
            shared = self._fetch(sch, block, index, ko, (ty_n, tx_n), vector)
            if index == 0:
                # A's rows are read by the threads of a warp at once (one row per thread
                # row): a row stride of BK + 4 spreads them over the banks.
                sch.storage_align(shared, 0, axis=0, factor=config.bk, offset=VECTOR)
        for loop in (ki, mi, ni):
            sch.unroll(loop)
        sch.decompose_reduction(block, ko)
        wl = sch.get_loops(wb)
        if f % VECTOR == 0 and config.tn % VECTOR == 0:
            sch.vectorize(wl[-1])

    def _fetch(self, sch, block, index: int, ko, threads: tuple[int, int], vector: int):
        """Stage operand ``index`` of ``block`` in shared memory at each ``ko`` step,
        loaded by all the block's threads together."""
        shared = sch.cache_read(block, index, "shared")
        sch.compute_at(shared, ko)
        # The gather (im2col) and padding producers are computed inside the fetch.
        for producer in sch.get_producers(shared):
            _inline_chain(sch, producer)
        loops = sch.get_loops(shared)[-2:]
        # Consecutive threads load consecutive vectors: each warp's loads coalesce.
        _, ty, tx, vec = sch.split(sch.fuse(*loops), [None, threads[0], threads[1], vector])
        self.bind(sch, ty, "threadIdx.y")
        self.bind(sch, tx, "threadIdx.x")
        if vector > 1:
            sch.vectorize(vec)
        return shared


def _inline_chain(sch, block) -> None:
    """Inline ``block`` and, first, the elementwise producers it reads from."""
    for producer in sch.get_producers(block):
        _inline_chain(sch, producer)
    sch.compute_inline(block)
