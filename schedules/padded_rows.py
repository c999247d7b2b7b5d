"""Unguarded reads for GEMM rows whose results are dropped.

A GEMM that reads a stride-1 convolution's input rows where they lie, without a packed
copy (``cpu.conv_gemm``'s ``direct`` tiles), still pads its pixel rows to whole
tiles. The padding makes TVM guard each read, ``if_then_else(row < M, x[row], 0)``: a
branch per broadcast in the micro-kernel. The results of the padded rows are dropped at
the write-back, so what they read does not matter: the schedule marks such a block with
``READ_LAST_ROW`` = M, and this pass replaces its guarded reads with reads of row
``min(row, M - 1)``, in bounds and branch-free. Measured on a 2-core Emerald Rapids
(Xeon, CPUID model 207), legacy_xception's 19x19x728 GEMM timed alone: 1.071 -> 1.026 ms
against the packed panel (weights rotated out of cache), 1.040 -> 1.001 warm.
"""

from __future__ import annotations

from .tir_walk import stmt_pass, substitute, with_block_body, without_key

READ_LAST_ROW = "xcompile.padded_rows_read_last"


def clamp_padded_rows():
    """A PrimFunc pass: the marked blocks' guarded row reads -> clamped reads (a no-op
    elsewhere)."""
    return stmt_pass("xcompile.ClampPaddedRows", _clamped)


def _clamped(node):
    from tvm import s_tir, tirx

    if not isinstance(node, s_tir.SBlockRealize) or READ_LAST_ROW not in node.block.annotations:
        return None
    store = node.block.body
    if not isinstance(store, tirx.BufferStore):
        return None
    rows = int(node.block.annotations[READ_LAST_ROW])
    value = _unguarded(store.value, rows, store.indices)
    if value.same_as(store.value):
        return None
    body = tirx.BufferStore(store.buffer, value, store.indices)
    # The mark goes with the rewrite: a second run of the pass changes nothing.
    block = with_block_body(node.block, body, without_key(node.block.annotations, READ_LAST_ROW))
    return s_tir.SBlockRealize(node.iter_values, node.predicate, block)


_BINARY = ("Add", "Sub", "Mul", "Div", "Min", "Max")
_IF_THEN_ELSE = "prim.if_then_else"


def _unguarded(expr, rows: int, written: list):
    """``expr`` with every ``if_then_else(r < rows, x[..r..], 0)`` -> ``x[..min(r, rows -
    1)..]``, where the block writes row r's own element (``written``, its store's
    indices, use r): a padded row whose accumulator is a real row's (TVM drops an
    index of extent 1: a GEMM of one pixel row) keeps the guard, else it would add its
    copy of the last row to that row."""
    import tvm
    from tvm import tirx

    if isinstance(expr, tvm.ir.Call) and expr.op.same_as(tvm.ir.Op.get(_IF_THEN_ELSE)):
        cond, then, _ = expr.args
        if (isinstance(cond, tirx.LT) and isinstance(cond.a, tirx.Var)
                and isinstance(cond.b, tirx.IntImm) and int(cond.b.value) == rows
                and isinstance(then, tvm.ir.expr.TensorLoad)
                and any(cond.a.same_as(v) for i in written
                        for v in tirx.analysis.undefined_vars(i))):
            last = tirx.min(cond.a, tirx.const(rows - 1, str(cond.a.ty.dtype)))
            return tirx.BufferLoad(then.source,
                                   [substitute(i, [cond.a], [last]) for i in then.indices])
        return expr
    if isinstance(expr, tirx.Cast):  # (a narrower input read into wider accumulators)
        value = _unguarded(expr.value, rows, written)
        return expr if value.same_as(expr.value) else tirx.Cast(str(expr.ty.dtype), value)
    for name in _BINARY:
        cls = getattr(tirx, name)
        if isinstance(expr, cls):
            a, b = _unguarded(expr.a, rows, written), _unguarded(expr.b, rows, written)
            return expr if a.same_as(expr.a) and b.same_as(expr.b) else cls(a, b)
    return expr
