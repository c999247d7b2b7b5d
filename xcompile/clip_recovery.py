"""Graph pass: ONNX ``Clip`` (ReLU6 in MobileNets) back to Relax's ``maximum``/``minimum``.

TVM's ONNX importer emits ``Clip`` as TE-built ``call_tir`` kernels (``maximum`` then
``minimum`` of the tensor and a 0-d bound), which are opaque to ``ConvertLayout``: in an
NHWC build each one was wrapped in transposes and stayed a kernel of its own instead of
joining the convolution's write-back. timm's MobileNetV2-1.0 has 35 of them; they cost
0.7 of its 4.1 ms of kernel time on a 2-core Emerald Rapids. Each such ``call_tir`` is
recognised by what its PrimFunc computes (``out[i] = max(a[i], b[()])`` or ``min``), not
by its name, and replaced by the Relax operator, which ``ConvertLayout`` and operator
fusion know. The operator legalizes to the same TOPI function, so the numerics do not
change.
"""

from __future__ import annotations


def elementwise_bound(func) -> str | None:
    """``"maximum"`` or ``"minimum"`` when ``func`` (a PrimFunc) computes
    ``out[i] = max(a[i], b[()])`` (or ``min``) over the whole of ``a``; else None."""
    import tvm_ffi
    from tvm import tirx
    from tvm.ir.expr import TensorLoad
    from tvm.s_tir.stmt import SBlockRealize

    if len(func.params) != 3:
        return None
    a, b, out = func.params
    if len(b.shape) != 0 or not tvm_ffi.structural_equal(a.shape, out.shape):
        return None
    stmt = func.body
    while True:
        if isinstance(stmt, SBlockRealize):
            stmt = stmt.block.body
        elif isinstance(stmt, tirx.For):
            stmt = stmt.body
        else:
            break
    if not isinstance(stmt, tirx.BufferStore) or not stmt.buffer.same_as(out):
        return None
    value = stmt.value
    kind = {tirx.Max: "maximum", tirx.Min: "minimum"}.get(type(value))
    if kind is None:
        return None
    lhs, rhs = value.a, value.b
    if not (isinstance(lhs, TensorLoad) and isinstance(rhs, TensorLoad)):
        return None
    if lhs.source.same_as(b):
        lhs, rhs = rhs, lhs
    # Same index for a and out (an elementwise map, no transpose); nothing indexes b.
    if (not lhs.source.same_as(a) or not rhs.source.same_as(b) or len(rhs.indices) != 0
            or not tvm_ffi.structural_equal(lhs.indices, stmt.indices)):
        return None
    return kind


def recover_clip():
    """The pass (a no-op on a module without such kernels)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.call_tir")(wildcard(), wildcard())
    ops = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}

    @tvm.transform.module_pass(opt_level=0, name="xcompile.RecoverClip")
    def _pass(mod, _ctx):
        def rewrite(expr, _m):
            callee, args = expr.args[0], expr.args[1]
            func = mod[callee] if isinstance(callee, tvm.ir.GlobalVar) else None
            if (not isinstance(func, tvm.tirx.PrimFunc) or len(expr.args) != 2
                    or not isinstance(args, relax.Tuple) or len(args.fields) != 2):
                return expr
            kind = elementwise_bound(func)
            return ops[kind](*args.fields) if kind else expr

        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = rewrite_call(pattern, rewrite, func)
        return relax.transform.DeadCodeElimination()(mod)

    return _pass
