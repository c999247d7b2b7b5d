"""Reductions of one tensor (max and average pooling, means over axes) with their
elementwise epilogue.

The spatial loops run in parallel, a vector of the output's contiguous axis (channels in
NHWC) at a time (whole vectors, or full-width ones, the last overlapping the one before,
where ``target_info.overlaps_pay``); its accumulator stays in registers over the window,
and the epilogue (a residual add after a max pool, as in each of Xception's entry-flow
blocks) is computed in the write-back, not in a pass of its own over the pooled map. The
generic rule wrote the pooled map out and read it back for the add: Xception's first
pool and add (147x147x128 -> 74x74x128) at batch 8 took 4.9 ms on 2 Emerald Rapids
cores.
"""

from __future__ import annotations

import math

from ..analysis import fuse_epilogue, iter_kinds, match_reduction
from ..overlapped_vectors import mark_overlap
from ..rule import ConfigRule
from .generic import MIN_PARALLEL
from .target_info import cpu_info, overlaps_pay, vector_width


class VectorReduction(ConfigRule):
    """Schedule rule: pooling / mean -> parallel channel vectors, accumulators in
    registers, the epilogue fused into the write-back."""

    name = "xcompile.cpu.VectorReduction"

    def match(self, sch, target):
        if target.kind.name != "llvm":
            return None
        return match_reduction(sch)

    def configs(self, _found, target) -> list:
        return [None]  # one schedule, sized from the shape and the target

    def schedule(self, sch, found, _config, target) -> None:
        for producer in found.producers:  # the padding: read under its predicate
            sch.compute_inline(producer)
        wb = sch.cache_write(found.block, 0, "local")
        fuse_epilogue(sch, found.epilogues)
        block = sch.get(found.block)
        kinds = iter_kinds(block)
        loops = sch.get_loops(found.block)
        spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
        reduce = [lp for lp, k in zip(loops, kinds) if k == "R"]
        channels = int(sch.get(spatial[-1]).extent)
        lanes = cpu_info(target).lanes
        # Overlapped vectors where pixels run in parallel outside the channel vectors (the
        # loop the pass moves stays a loop of its own).
        pixels = math.prod(int(sch.get(lp).extent) for lp in spatial[:-1])
        lanes = vector_width(channels, lanes,
                             pixels >= MIN_PARALLEL and overlaps_pay(channels, lanes))
        co, cv = sch.split(spatial[-1], [None, lanes])
        mark_overlap(sch, co, channels, lanes)
        outer = sch.fuse(*spatial[:-1]) if len(spatial) > 1 else None
        sch.reorder(*([outer] if outer is not None else []), co, *reduce, cv)
        # In parallel: the pixels, or with too few of them (a mean over the whole map)
        # the channel vectors too. The accumulators' write-back goes under a loop inside
        # the parallel one: TVM allocates a buffer whose accesses meet at the parallel
        # loop itself from the heap, at its full size.
        if outer is None or int(sch.get(outer).extent) < MIN_PARALLEL:
            par = sch.fuse(outer, co) if outer is not None else co
            par, co = sch.split(par, [None, 1])
        else:
            par = outer
        sch.reverse_compute_at(wb, co)
        if int(sch.get(par).extent) >= MIN_PARALLEL:
            sch.parallel(par)
        vectorize = sch.vectorize if lanes > 1 else sch.unroll
        vectorize(cv)
        if reduce:
            init = sch.decompose_reduction(found.block, reduce[0])
            vectorize(sch.get_loops(init)[-1])
        vectorize(sch.get_loops(wb)[-1])
