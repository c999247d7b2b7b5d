"""Walking and rebuilding scheduled TIR from Python (TVM 0.27 has no Python IR mutator).

Only the statements a scheduled kernel nests its loops and blocks in are descended into
(loops, sequences, block realizations, conditions, attributes); anything else is a leaf.
In TVM 0.27 that loses nothing a rule marks: bindings, buffer declarations and
allocations have no body (they sit in a sequence), and a block's ``init`` and ``while``
loops hold no marked loop or block.
"""

from __future__ import annotations

from collections.abc import Callable


def map_stmt(stmt, fn: Callable):
    """``stmt`` rebuilt bottom-up: each node's children first, then ``fn(node)`` with the
    rebuilt node, which returns a replacement or None (keep it). Unchanged subtrees stay
    the same objects."""
    from tvm import s_tir, tirx

    new = stmt
    if isinstance(stmt, tirx.For):
        body = map_stmt(stmt.body, fn)
        if not body.same_as(stmt.body):
            new = with_loop_body(stmt, body)
    elif isinstance(stmt, tirx.SeqStmt):
        seq = [map_stmt(s, fn) for s in stmt.seq]
        if not all(a.same_as(b) for a, b in zip(seq, stmt.seq)):
            new = tirx.SeqStmt(seq)
    elif isinstance(stmt, s_tir.SBlockRealize):
        block = stmt.block
        body = map_stmt(block.body, fn)
        if not body.same_as(block.body):
            new = s_tir.SBlockRealize(stmt.iter_values, stmt.predicate,
                                      with_block_body(block, body))
    elif isinstance(stmt, tirx.IfThenElse):
        then = map_stmt(stmt.then_case, fn)
        other = map_stmt(stmt.else_case, fn) if stmt.else_case is not None else None
        if not then.same_as(stmt.then_case) or (other is not None
                                                and not other.same_as(stmt.else_case)):
            new = tirx.IfThenElse(stmt.condition, then, other)
    elif isinstance(stmt, tirx.AttrStmt):
        body = map_stmt(stmt.body, fn)
        if not body.same_as(stmt.body):
            new = tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)
    out = fn(new)
    return new if out is None else out


def stmt_pass(name: str, fn: Callable):
    """A PrimFunc pass (named ``name``) rebuilding each kernel's body with
    ``map_stmt(body, fn)``; a kernel ``fn`` leaves as it is comes back as the same
    object."""
    import tvm

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name=name)
    def _pass(func, _mod, _ctx):
        body = map_stmt(func.body, fn)
        return func if body.same_as(func.body) else func.with_body(body)

    return _pass


def with_block_body(block, body, annotations=None):
    """``block`` (an SBlock) with another body (and, when given, other annotations)."""
    from tvm import s_tir

    return s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, body,
                        block.init, block.alloc_buffers, block.match_buffers,
                        block.annotations if annotations is None else annotations)


def with_loop_body(loop, body, annotations=None):
    """``loop`` (a For) with another body (and, when given, other annotations)."""
    from tvm import tirx

    return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body,
                    loop.thread_binding,
                    loop.annotations if annotations is None else annotations, loop.step)


def children(stmt) -> list:
    """The statements directly inside ``stmt`` that the walks here descend into."""
    from tvm import s_tir, tirx

    if isinstance(stmt, (tirx.For, tirx.AttrStmt)):
        return [stmt.body]
    if isinstance(stmt, tirx.SeqStmt):
        return list(stmt.seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        return [stmt.block.body]
    if isinstance(stmt, tirx.IfThenElse):
        return [c for c in (stmt.then_case, stmt.else_case) if c is not None]
    return []


def nodes(stmt) -> list:
    """The loops and block realizations in ``stmt`` in program order, each before the
    nodes inside it."""
    from tvm import s_tir, tirx

    found = []

    def visit(node):
        if isinstance(node, (tirx.For, s_tir.SBlockRealize)):
            found.append(node)
        for child in children(node):
            visit(child)

    visit(stmt)
    return found


def without_key(annotations, key: str) -> dict:
    """``annotations`` (a loop's or a block's) without ``key``."""
    return {k: v for k, v in annotations.items() if k != key}


def substitute(expr, variables: list, values: list):
    """``expr`` with ``variables`` replaced by ``values``, simplified (by way of an
    ``IndexMap``, which substitutes and simplifies)."""
    from tvm import tirx

    if not variables:
        return expr
    return tirx.IndexMap(list(variables), [expr], None).map_indices(list(values))[0]


def loops_to(stmt, target) -> list | None:
    """The loops from ``stmt`` down to the block realization ``target``, outermost
    first, or None when ``target`` is not inside ``stmt``."""
    from tvm import tirx

    if stmt.same_as(target):
        return []
    for child in children(stmt):
        path = loops_to(child, target)
        if path is not None:
            return ([stmt] if isinstance(stmt, tirx.For) else []) + path
    return None
