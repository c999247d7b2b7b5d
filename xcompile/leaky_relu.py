"""Graph pass: ONNX ``LeakyRelu`` (Keras and YOLO-style CNNs) as ``maximum(x, alpha * x)``.

Relax's ``nn.leakyrelu`` has no layout inference in TVM 0.27: in an NHWC build
``ConvertLayout`` left each one in NCHW between two transposes, three kernels and three
passes over the feature map where the convolution before it could have applied it in its
write-back. The same function from two operators it knows: for ``alpha <= 1``,
``max(x, alpha * x)`` is ``x`` where ``x >= 0`` and ``alpha * x`` below (with ``alpha > 1``
the ``min``); the product is the one ONNX Runtime computes, so the result is the same to
the bit. Both then fuse into the convolution's epilogue like a ReLU.
"""

from __future__ import annotations


def rewrite_leaky_relu():
    """The pass (a no-op on a module without ``nn.leakyrelu``)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.nn.leakyrelu")(wildcard())

    @tvm.transform.module_pass(opt_level=0, name="xcompile.RewriteLeakyRelu")
    def _pass(mod, _ctx):
        def rewrite(expr, _m):
            x = expr.args[0]
            alpha = float(expr.attrs.alpha)
            scaled = relax.op.multiply(x, relax.const(alpha, x.ty.dtype))
            pick = relax.op.maximum if alpha <= 1 else relax.op.minimum
            return pick(x, scaled)

        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = rewrite_call(pattern, rewrite, func)
        return mod

    return _pass
