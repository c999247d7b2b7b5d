"""Whole vectors over a channel count the vector width does not divide: the last tile of
vectors moved back to overlap the one before it.

A schedule that splits ``channels`` into vectors of the target's full width (61 on
AVX-512: 4 vectors of 16, the last past the end) gets a predicate from the split,
``vector * 16 + lane < 61``, under which TVM's vectorizer gives up and emits scalar code
for the whole loop. The schedule instead marks the loop over the tiles of vectors with
``OVERLAP_CHANNELS`` = the channel count, and this pass moves each tile's first channel
to ``min(tile * span, channels - span)`` (span: the tile's channels) in every block under
that loop and drops the channel predicate: the last vector covers channels 45-60, three
of them computed a second time, to the same values, by the thread that computed them
first. Every access stays in bounds and the loop vectorizes whole. (TVM 0.27's
buffer-level predication, the alternative, rewrites only accesses whose index is the
predicate's own ramp, which a multi-dimensional feature map's are not.) Where it pays
is ``cpu.target_info.overlaps_pay``: for odd channel counts, 16 lanes instead of scalar
code ran 0.19x as long.

Only what recomputes its outputs from unchanged inputs may be marked: the blocks under
the loop write what they read from nowhere else (a convolution's accumulators and its
fused write-back).
"""

from __future__ import annotations

from .tir_walk import map_stmt, nodes, stmt_pass, substitute, with_loop_body, without_key

OVERLAP_CHANNELS = "xcompile.overlap_channels"


def mark_overlap(sch, loop, channels: int, lanes: int) -> None:
    """Mark ``loop``, the loop over tiles of ``lanes``-wide channel vectors, for this pass
    where ``lanes`` does not divide the ``channels`` (the split left a predicate)."""
    if channels % lanes:
        sch.annotate(loop, OVERLAP_CHANNELS, channels)


def overlap_last_vector():
    """A PrimFunc pass: the marked loops' blocks -> overlapping whole vectors (a no-op
    elsewhere)."""
    return stmt_pass("xcompile.OverlapLastVector", _overlapped)


def _overlapped(node):
    from tvm import tirx

    if not isinstance(node, tirx.For) or OVERLAP_CHANNELS not in node.annotations:
        return None
    channels = int(node.annotations[OVERLAP_CHANNELS])
    loops = {n.loop_var: n for n in nodes(node.body) if isinstance(n, tirx.For)}
    spans, failed = set(), []

    def rewrite(n):
        new = _block(n, node.loop_var, channels, loops)
        if new is False:
            failed.append(n)
            return None
        if new is not None:
            new, span = new
            spans.add(span)
        return new

    body = map_stmt(node.body, rewrite)
    # The mark goes with the rewrite: a second run of the pass changes nothing. Where a
    # block cannot be moved, or the blocks' tiles differ, none is (they share the tile's
    # accumulators): the loop keeps its predicates, correct and scalar.
    return with_loop_body(node, node.body if failed or len(spans) > 1 else body,
                          without_key(node.annotations, OVERLAP_CHANNELS))


def _block(node, tile, channels: int, loops: dict):
    """A block realization under the loop over the tiles of channel vectors (``tile``;
    ``loops``: the loops under it by variable): its channel binding ``tile * span +
    offset``, offset within ``[0, span)``, -> ``min(tile * span, channels - span) +
    offset``, and the conditions on the offset's loops alone out of its predicate, with
    the span; None where it binds nothing to ``tile``, False where it binds more than one
    axis to it, the binding is not of that form or the span exceeds the channels.

    The whole tile moves, not its last vector alone: a tile of two vectors whose second
    moved back onto its first would add the overlap into the same accumulators twice."""
    from tvm import s_tir, tirx

    if not isinstance(node, s_tir.SBlockRealize):
        return None
    values = list(node.iter_values)
    bound = [i for i, v in enumerate(values)
             if any(u.same_as(tile) for u in tirx.analysis.undefined_vars(v))]
    if not bound:
        return None
    if len(bound) > 1:
        return False
    i = bound[0]
    value = values[i]
    inner = [v for v in tirx.analysis.undefined_vars(value) if not v.same_as(tile)]
    inner_loops = [loops[u] for v in inner for u in loops if u.same_as(v)]
    if len(inner_loops) != len(inner):
        return False  # a variable from outside the tile loop
    dtype = str(tile.ty.dtype)
    first = substitute(value, inner, [tirx.const(0, dtype)] * len(inner))
    span = _simplified(substitute(first, [tile], [tirx.const(1, dtype)])
                       - substitute(first, [tile], [tirx.const(0, dtype)]))
    offset = substitute(value, [tile], [tirx.const(0, dtype)])
    if not (isinstance(span, tirx.IntImm) and 0 < span.value <= channels
            and _proves(first - tile * span) and _proves(value - offset - tile * span)
            and _within(offset, span.value, inner_loops)):
        return False  # not ``tile * span + offset``, or a tile wider than the channels
    values[i] = tirx.min(first, tirx.const(channels - span.value, dtype)) + offset
    tile_vars = inner + [tile]
    kept = [c for c in _conjuncts(node.predicate)
            if not all(any(v.same_as(w) for w in tile_vars)
                       for v in tirx.analysis.undefined_vars(c))]
    predicate = kept[0] if kept else tirx.const(True, "bool")
    for c in kept[1:]:
        predicate = tirx.And(predicate, c)
    return s_tir.SBlockRealize(values, predicate, node.block), span.value


def _within(offset, span: int, loops: list) -> bool:
    """Whether ``offset`` lies in ``[0, span)`` over the ``loops``' ranges."""
    from tvm.ir import Range
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()
    for loop in loops:
        analyzer.bind(loop.loop_var, Range.from_min_extent(loop.min, loop.extent))
    bounds = analyzer.const_int_bound(offset)
    return bounds.min_value >= 0 and bounds.max_value < span


def _proves(zero) -> bool:
    from tvm.sym.analyzer import Analyzer

    return Analyzer().can_prove_equal(zero, 0)


def _simplified(expr):
    from tvm.sym.analyzer import Analyzer

    return Analyzer().simplify(expr)


def _conjuncts(expr) -> list:
    from tvm import tirx

    if isinstance(expr, tirx.And):
        return _conjuncts(expr.a) + _conjuncts(expr.b)
    return [expr]
