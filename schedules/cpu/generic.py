"""Fallback for every CPU kernel no specific rule takes (pooling, elementwise, layout
transforms, reductions, products other than a 2-D matmul, whatever another CNN brings): elementwise producers
are inlined, the output's contiguous axis is vectorized where it splits into whole
vectors (of the target's width, or half or a quarter of it), and the outer data-parallel
loops run in parallel. Each step is tried on its own, so a kernel whose structure resists
one still gets the others."""

from __future__ import annotations

import logging

from xcompile.errors import first_line

from ..rule import ConfigRule
from ..analysis import iter_kinds, root_blocks
from .target_info import cpu_info

log = logging.getLogger(__name__)
# Below this many outer iterations a parallel launch costs more than it saves.
MIN_PARALLEL = 4


class Fallback(ConfigRule):
    """Schedule rule: parallel + vectorized loops for any PrimFunc (any CPU kernel)."""

    name = "xcompile.cpu.Fallback"
    aliases = ("xcompile.cpu.Generic",)  # its name in earlier manifests and tuning logs

    def match(self, sch, target):
        """The function's blocks under the root (any CPU kernel has some)."""
        if target.kind.name != "llvm":
            return None
        return root_blocks(sch) or None

    def configs(self, _found, target) -> list:
        return [None]  # one schedule: nothing here is worth a search

    def schedule(self, sch, blocks, _config, target) -> None:
        from tvm import s_tir

        info = cpu_info(target)
        for rv in blocks[:-1]:
            if "R" not in iter_kinds(sch.get(rv)):
                try:
                    sch.compute_inline(rv)
                except s_tir.ScheduleError:
                    pass
        for rv in root_blocks(sch):
            try:
                parallel_vectorized(sch, rv, info.lanes)
            except s_tir.ScheduleError as e:
                log.debug("%s: left as is (%s)", sch.get(rv).name_hint,
                          first_line(e))


def parallel_vectorized(sch, rv, lanes: int) -> None:
    """Block ``rv`` (under the root, its loops as lowered) with its outer data-parallel
    loops fused and run in parallel and the innermost one vectorized when it indexes
    the output's last axis; raises ``ScheduleError`` where a step does not apply."""
    from tvm.tirx import Var

    block = sch.get(rv)
    kinds = iter_kinds(block)
    loops = sch.get_loops(rv)
    if len(loops) != len(kinds) or "?" in kinds or not kinds:
        return
    spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
    reduce = [lp for lp, k in zip(loops, kinds) if k == "R"]
    if not spatial:
        return
    # Vectorize the innermost spatial loop when it indexes the output's last axis.
    out_last = block.writes[0].region[-1].min
    inner_var = block.iter_vars[kinds.rindex("S")].var
    vector = None
    extent = int(sch.get(spatial[-1]).extent)
    # The widest vector that divides the axis (narrower ones exist on every ISA).
    width = next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 2 and extent % v == 0),
                 None)
    if isinstance(out_last, Var) and out_last.same_as(inner_var) and width:
        outer, vector = sch.split(spatial[-1], [None, width])
        spatial = spatial[:-1] + [outer]
        sch.reorder(*spatial, *reduce, vector)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    if int(sch.get(fused).extent) >= MIN_PARALLEL:
        sch.parallel(fused)
    if vector is not None:
        sch.vectorize(vector)
    if reduce:
        init = sch.decompose_reduction(rv, reduce[0])
        if vector is not None:
            sch.vectorize(sch.get_loops(init)[-1])


def schedule_tail(sch, conv, lanes: int) -> None:
    """The blocks after a convolution's epilogue over another shape (``conv.tail``: a
    squeeze-excite gate applied to its feature map), each parallel and vectorized."""
    for rv in conv.tail:
        parallel_vectorized(sch, rv, lanes)
