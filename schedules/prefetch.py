"""Software prefetch of a GEMM's next weight panel, spread over the current panel's work.

A register-tiled GEMM (``cpu.conv_gemm``) streams one packed weight panel (K x NR) through
a chunk's tiles, then the next. The first tile of each panel finds its weights in L3 or
memory, not in L2, and reads them at the rate the FMAs consume them (about 30 GB/s on one
core), faster than one core streams from L3 (~25 GB/s here, less with both cores at it):
that tile runs several times slower than the others. The schedule marks two loops; this
pass then prefetches the next panel into L2 while the current one is used, a few lines
per step, so that no tile waits for it:

- ``PREFETCH_TILES`` on the loop over a chunk's tiles;
- ``PREFETCH_PANEL`` on an outer part of each tile's reduction loop (the schedule splits
  it so): the prefetches go at the top of each part, ``ceil(panel lines / (tiles x
  parts))`` lines each, so the chunk's tiles together cover the next panel once.

The weights are the GEMM update block's last read (the packed ``[panel, ..., NR]``
buffer); the current panel is that read's first index with the loops inside the part at
zero, and the last panel prefetches itself (a no-op). The prefetch sits outside the
innermost reduction loop on purpose: inside it, LLVM no longer keeps the accumulators
in registers across the loop (``llvm.prefetch`` may write memory, as far as LICM knows);
there the kernel ran 1.5x as long.
"""

from __future__ import annotations

PREFETCH_TILES = "xcompile.prefetch_tiles"
PREFETCH_PANEL = "xcompile.prefetch_panel"
LINE_BYTES = 64
# tirx.prefetch's locality: 2 is prefetcht1, into L2 (the panel is re-read from L2 by
# the chunk's other tiles; L1 holds only the part each tile is at).
LOCALITY_L2 = 2


def insert_panel_prefetch():
    """A PrimFunc pass: the prefetches the marks above ask for (a no-op elsewhere)."""
    import tvm

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="xcompile.PanelPrefetch")
    def _pass(func, _mod, _ctx):
        body = _rewrite(func.body, None)
        return func if body.same_as(func.body) else func.with_body(body)

    return _pass


def _rewrite(stmt, tile_loop):
    """``stmt`` with a prefetch loop at the top of each marked part loop (the nodes a
    scheduled kernel nests loops in are walked; TVM 0.27 has no Python IR mutator)."""
    from tvm import s_tir, tirx

    if isinstance(stmt, tirx.For):
        if PREFETCH_PANEL in stmt.annotations and tile_loop is not None:
            body = tirx.SeqStmt([_prefetch(tile_loop, stmt), stmt.body])
        else:
            body = _rewrite(stmt.body, stmt if PREFETCH_TILES in stmt.annotations
                            else tile_loop)
        if body.same_as(stmt.body):
            return stmt
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body,
                        stmt.thread_binding, stmt.annotations, stmt.step)
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_rewrite(s, tile_loop) for s in stmt.seq]
        if all(a.same_as(b) for a, b in zip(seq, stmt.seq)):
            return stmt
        return tirx.SeqStmt(seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        block = stmt.block
        body = _rewrite(block.body, tile_loop)
        if body.same_as(block.body):
            return stmt
        new = s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, body,
                           block.init, block.alloc_buffers, block.match_buffers,
                           block.annotations)
        return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, new)
    if isinstance(stmt, tirx.IfThenElse):
        then = _rewrite(stmt.then_case, tile_loop)
        other = _rewrite(stmt.else_case, tile_loop) if stmt.else_case is not None else None
        if then.same_as(stmt.then_case) and (other is None
                                              or other.same_as(stmt.else_case)):
            return stmt
        return tirx.IfThenElse(stmt.condition, then, other)
    if isinstance(stmt, tirx.AttrStmt):
        body = _rewrite(stmt.body, tile_loop)
        return stmt if body.same_as(stmt.body) else tirx.AttrStmt(
            stmt.node, stmt.attr_key, stmt.value, body)
    return stmt


def _walk(stmt, found: list) -> list:
    """The loops and block realizations in ``stmt``, outermost first."""
    from tvm import s_tir, tirx

    if isinstance(stmt, tirx.For):
        found.append(stmt)
        _walk(stmt.body, found)
    elif isinstance(stmt, tirx.SeqStmt):
        for s in stmt.seq:
            _walk(s, found)
    elif isinstance(stmt, s_tir.SBlockRealize):
        found.append(stmt)
        _walk(stmt.block.body, found)
    elif isinstance(stmt, tirx.IfThenElse):
        _walk(stmt.then_case, found)
        if stmt.else_case is not None:
            _walk(stmt.else_case, found)
    elif isinstance(stmt, tirx.AttrStmt):
        _walk(stmt.body, found)
    return found


def _substitute(expr, variables: list, values: list):
    """``expr`` with ``variables`` replaced by ``values``, simplified."""
    from tvm import tirx

    if not variables:
        return expr
    return tirx.IndexMap(list(variables), [expr], None).map_indices(list(values))[0]


def _prefetch(tile_loop, part_loop):
    """The loop of prefetches at the top of ``part_loop``'s body."""
    import math

    import tvm
    from tvm import s_tir, tirx

    inside = _walk(part_loop.body, [])
    realizes = [n for n in inside if isinstance(n, s_tir.SBlockRealize)]
    if not realizes:
        raise ValueError("a loop marked for panel prefetch holds no block")
    realize = realizes[0]
    weights = realize.block.reads[-1]
    buf = weights.source
    # The panel the part reads: the weights' first index, in the loops' variables, with
    # the loops inside the part at their start.
    panel = _substitute(weights.region[0].min, [iv.var for iv in realize.block.iter_vars],
                        list(realize.iter_values))
    loops = [n for n in inside if isinstance(n, tirx.For)]
    panel = _substitute(panel, [n.loop_var for n in loops], [n.min for n in loops])
    shape = [int(s) for s in buf.shape]
    per_panel = math.prod(shape[1:])
    per_line = LINE_BYTES * 8 // tvm.DataType(buf.dtype).bits
    lines = -(-per_panel // per_line)
    tiles, parts = int(tile_loop.extent), int(part_loop.extent)
    count = -(-lines // (tiles * parts))
    index_type = str(panel.ty.dtype)

    def const(v):
        return tirx.const(v, index_type)

    line_var = tirx.Var("prefetch_line", index_type)
    line = ((tile_loop.loop_var - tile_loop.min) * const(parts)
            + (part_loop.loop_var - part_loop.min)) * const(count) + line_var
    rest = tirx.min(line * const(per_line), const(per_panel - 1))
    indices = []
    for extent in reversed(shape[1:]):
        indices.append(tirx.floormod(rest, const(extent)))
        rest = tirx.floordiv(rest, const(extent))
    nxt = tirx.min(panel + const(1), const(shape[0] - 1))
    address = tirx.address_of(tirx.BufferLoad(buf, [nxt, *reversed(indices)]))
    call = tirx.call_intrin("void", "tirx.prefetch", address, 0, LOCALITY_L2, 1)
    return tirx.For(line_var, const(0), const(count), tirx.ForKind.SERIAL,
                    tirx.Evaluate(call))
