"""Software prefetch of what a GEMM tile's write-back touches, issued as the tile starts.

A register-tiled GEMM (``cpu.conv_gemm``) ends each tile with its write-back: the
accumulators, with the bias, the activation and a residual add fused in, stored to the
output rows. Those rows, and the residual's, are in no cache when the tile gets there
(the output is new memory, and a store to a line not in cache first reads it; the
residual was written layers ago), so each tile ends waiting on MR x NU x 2 lines from L3
or memory. The schedule marks the loop whose body is one tile's work (its reduction, then
its write-back) with ``EPILOGUE``; this pass puts, at the top of that body, a prefetch
into L2 of every line the write-back reads from or writes to a global buffer
(``prefetchw`` for the written ones on x86): the first and the last lane of each of its
vectors, under the write-back's own predicate (the padded rows and channels are not
touched). Reads whose lines do not change with the row (a bias) are left out. The lines
then arrive while the tile's reduction runs.

Measured on a 2-core Zen 4 (1 MiB L2), legacy_xception without a tuning log, interleaved
in one process: batch 1 0.980x and 0.960x as long end to end (the 147x147 GEMMs 0.85-0.95x
per kernel in the model), batch 8 0.978x and 0.982x (the entry flow's GEMMs 0.90-0.95x).
"""

from __future__ import annotations

from .prefetch import LOCALITY_L2
from .tir_walk import loops_to, nodes, stmt_pass, substitute, with_loop_body, without_key

EPILOGUE = "xcompile.prefetch_epilogue"


def insert_epilogue_prefetch():
    """A PrimFunc pass: the prefetches the marks above ask for (a no-op elsewhere)."""
    return stmt_pass("xcompile.EpiloguePrefetch", _marked_loop)


def _marked_loop(node):
    """A marked loop: its body with the prefetches first, and without the mark."""
    from tvm import tirx

    if not (isinstance(node, tirx.For) and EPILOGUE in node.annotations):
        return None
    fetch = _prefetches(node)
    body = tirx.SeqStmt([fetch, node.body]) if fetch is not None else node.body
    return with_loop_body(node, body, without_key(node.annotations, EPILOGUE))


def _prefetches(loop):
    """The loop nest of prefetches for ``loop``'s last block (the write-back), or None
    when it touches no global buffer line by row.

    The contract with the schedule: the write-back is the last block in the loop's body,
    nested in its rows (the outermost of its loops), then its vectors of channels, then
    the vectorized lanes."""
    from tvm import s_tir, tirx
    from tvm.tirx.analysis import undefined_vars

    realizes = [n for n in nodes(loop.body) if isinstance(n, s_tir.SBlockRealize)]
    if not realizes:
        return None
    realize = realizes[-1]
    block = realize.block
    loops = loops_to(loop.body, realize)
    outer = [n for n in loops if n.kind != tirx.ForKind.VECTORIZED]
    lanes = [n for n in loops if n.kind == tirx.ForKind.VECTORIZED]
    if not outer:
        return None
    fresh = [tirx.Var(n.loop_var.name + "_pf", n.loop_var.ty) for n in outer]
    old = [n.loop_var for n in outer + lanes]
    ivars = [iv.var for iv in block.iter_vars]
    calls = []
    for write, regions in ((0, block.reads), (1, block.writes)):
        for region in regions:
            buf = region.source
            if buf.scope() != "global":
                continue
            index = [substitute(r.min, ivars, list(realize.iter_values))
                     for r in region.region]
            row = outer[0].loop_var
            if not any(v.same_as(row) for i in index for v in undefined_vars(i)):
                continue  # the same lines for every row: in cache after the first
            # The vector's first lane and its last: two lines where it straddles them.
            for last in (False, True) if lanes else (False,):
                ends = [n.min + n.extent - 1 if last else n.min for n in lanes]
                at = [substitute(i, old, fresh + ends) for i in index]
                address = tirx.address_of(tirx.BufferLoad(buf, at))
                calls.append(tirx.Evaluate(tirx.call_intrin(
                    "void", "tirx.prefetch", address, write, LOCALITY_L2, 1)))
    if not calls:
        return None
    body = tirx.SeqStmt(calls) if len(calls) > 1 else calls[0]
    predicate = realize.predicate
    if not (isinstance(predicate, tirx.IntImm) and predicate.value):
        # (At the vector's first lane: a vector of padded channels has its real ones
        # first.)
        body = tirx.IfThenElse(substitute(predicate, old, fresh + [n.min for n in lanes]),
                               body, None)
    for n, var in reversed(list(zip(outer, fresh))):
        body = tirx.For(var, n.min, n.extent, tirx.ForKind.SERIAL, body)
    return body
