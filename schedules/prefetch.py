"""Software prefetch of a GEMM's next weight panel, spread over the current panel's work.

A register-tiled GEMM (``cpu.conv_gemm``) streams one packed weight panel (K x NR) through
a chunk's tiles, then the next. The first tile of each panel finds its weights in L3 or
memory, not in L2, and reads them at the rate the FMAs consume them (about 30 GB/s on one
core), faster than one core streams from L3 (~25 GB/s here, less with both cores at it):
that tile runs several times slower than the others. The schedule marks two nested loops
of the panel's work with ``PREFETCH`` (the loop over a chunk's tiles and an outer part of
each tile's reduction, which it splits for this, in either order), the mark's value the
number of panels one group of output channels runs through; this pass then puts a loop
of prefetches into L2 at the top of the inner marked loop's body, ``ceil(panel lines /
(outer x inner extent))`` lines of the next panel each, so that the iterations of the
two loops together fetch the next panel once while they use the current one, and
removes the marks.

The contract with the schedule: the weights are the GEMM update block's last read (the
packed ``[panel, ..., NR]`` buffer, ``cpu.conv_gemm``'s ``cache_read`` of the weights);
the current panel is that read's first index with the loops inside the marked ones at
their start; the next one is the group's next, its last wrapping to its first (what the
core's next chunk starts with). The prefetch sits
outside the innermost reduction loop on purpose: inside it, LLVM no longer keeps the
accumulators in registers across the loop (``llvm.prefetch`` may write memory, as far as
LICM knows); there the kernel ran 1.5x as long.
"""

from __future__ import annotations

from .tir_walk import (map_stmt, nodes, stmt_pass, substitute, with_loop_body,
                        without_key)

PREFETCH = "xcompile.prefetch_next_panel"
LINE_BYTES = 64
# tirx.prefetch's locality: 2 is prefetcht1, into L2 (the panel is re-read from L2 by
# the chunk's other tiles; L1 holds only the part each tile is at).
LOCALITY_L2 = 2


def insert_panel_prefetch():
    """A PrimFunc pass: the prefetches the marks above ask for (a no-op elsewhere)."""
    return stmt_pass("xcompile.PanelPrefetch", _outer_loop)


def _marked(node) -> bool:
    from tvm import tirx

    return isinstance(node, tirx.For) and PREFETCH in node.annotations


def _outer_loop(node):
    """A marked loop with a marked loop inside: that inner loop's body, prefetching."""
    from tvm import tirx

    if not _marked(node):
        return None
    inner = next((n for n in nodes(node.body) if _marked(n)), None)
    if inner is None:
        return None

    def with_prefetch(n):
        # The marks go with the rewrite: a second run of the pass changes nothing.
        if n.same_as(inner):
            return with_loop_body(n, tirx.SeqStmt([_prefetch(node, n), n.body]),
                                  without_key(n.annotations, PREFETCH))
        if _marked(n) and n.loop_var.same_as(node.loop_var):
            return with_loop_body(n, n.body, without_key(n.annotations, PREFETCH))
        return None

    return map_stmt(node, with_prefetch)


def _prefetch(outer, inner):
    """The loop of prefetches at the top of ``inner``'s body."""
    import math

    import tvm
    from tvm import s_tir, tirx

    inside = nodes(inner.body)
    realizes = [n for n in inside if isinstance(n, s_tir.SBlockRealize)]
    if not realizes:
        raise ValueError("a loop marked for panel prefetch holds no block")
    realize = realizes[0]
    weights = realize.block.reads[-1]
    buf = weights.source
    # The panel being read: the weights' first index, in the loops' variables, with the
    # loops inside the marked ones at their start.
    panel = substitute(weights.region[0].min, [iv.var for iv in realize.block.iter_vars],
                        list(realize.iter_values))
    loops = [n for n in inside if isinstance(n, tirx.For)]
    panel = substitute(panel, [n.loop_var for n in loops], [n.min for n in loops])
    shape = [int(s) for s in buf.shape]
    per_panel = math.prod(shape[1:])
    per_line = LINE_BYTES * 8 // tvm.DataType(buf.dtype).bits
    lines = -(-per_panel // per_line)
    count = -(-lines // (int(outer.extent) * int(inner.extent)))
    index_type = str(panel.ty.dtype)

    def const(v):
        return tirx.const(v, index_type)

    line_var = tirx.Var("prefetch_line", index_type)
    line = ((outer.loop_var - outer.min) * inner.extent
            + (inner.loop_var - inner.min)) * const(count) + line_var
    rest = tirx.min(line * const(per_line), const(per_panel - 1))
    indices = []
    for extent in reversed(shape[1:]):
        indices.append(tirx.floormod(rest, const(extent)))
        rest = tirx.floordiv(rest, const(extent))
    # The next panel of the same group of panels (the mark's value: the panels a group
    # of output channels runs through), wrapping to the group's first: what the next
    # chunk of this core starts with.
    group = int(inner.annotations[PREFETCH])
    # (A select: the same arithmetic as nested floormods made TVM 0.27's lowering fold a
    # division by zero.)
    nxt = tirx.Select(tirx.floormod(panel, const(group)) == const(group - 1),
                      panel - const(group - 1), panel + const(1))
    address = tirx.address_of(tirx.BufferLoad(buf, [nxt, *reversed(indices)]))
    call = tirx.call_intrin("void", "tirx.prefetch", address, 0, LOCALITY_L2, 1)
    return tirx.For(line_var, const(0), const(count), tirx.ForKind.SERIAL,
                    tirx.Evaluate(call))
