"""Graph pass: batch norm after a convolution folded into the convolution's weights.

``batch_norm(conv2d(x, W) [+ bias], gamma, beta, mean, var)`` becomes
``conv2d(x, W * s) + (beta + (bias - mean) * s)`` with ``s = gamma / sqrt(var + eps)``
per output channel. The weights are ``main``'s parameters, so everything computed from
them is lifted into the build's weight transform: the kernel keeps a bias add in its
write-back where the decomposed batch norm left a subtract, a divide and a multiply per
element (Relax's ``FoldBatchnormToConv2D`` folds only constant weights).
"""

from __future__ import annotations


def fold_batch_norm():
    """The pass (a no-op on a module with no conv -> batch norm)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, is_tuple_get_item, rewrite_call, wildcard

    data, weight, bias = wildcard(), wildcard(), wildcard()
    gamma, beta, mean, var = wildcard(), wildcard(), wildcard(), wildcard()
    conv = is_op("relax.nn.conv2d")(data, weight)
    biased = is_op("relax.add")(conv, bias)
    norm = is_op("relax.nn.batch_norm")(conv | biased, gamma, beta, mean, var)
    pattern = is_tuple_get_item(norm, 0)

    def rewrite(expr, m):
        conv_call, norm_call = m[conv], m[norm]
        if (conv_call.attrs.data_layout != "NCHW" or conv_call.attrs.kernel_layout != "OIHW"
                or int(norm_call.attrs.axis) != 1):
            return expr  # (ONNX imports NCHW / OIHW; anything else is left alone)
        channels = m[weight].ty.shape.values[0]
        if biased in m:
            bias_ty = m[bias].ty
            if bias_ty.shape is None or [int(v) for v in bias_ty.shape.values] != \
                    [1, int(channels), 1, 1]:
                return expr
        eps = relax.const(float(norm_call.attrs.epsilon), m[var].ty.dtype)
        scale = relax.op.divide(m[gamma], relax.op.sqrt(relax.op.add(m[var], eps)))
        weight4 = relax.op.multiply(m[weight], relax.op.reshape(scale, [channels, 1, 1, 1]))
        offset = relax.op.negative(m[mean])
        if biased in m:
            offset = relax.op.add(relax.op.reshape(m[bias], [channels]), offset)
        shift = relax.op.add(m[beta], relax.op.multiply(offset, scale))
        folded = relax.op.nn.conv2d(m[data], weight4, **_conv_attrs(conv_call.attrs))
        return relax.op.add(folded, relax.op.reshape(shift, [1, channels, 1, 1]))

    @tvm.transform.module_pass(opt_level=0, name="xcompile.FoldBatchNorm")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = rewrite_call(pattern, rewrite, func)
        return mod

    return _pass


def _conv_attrs(attrs) -> dict:
    return {"strides": attrs.strides, "padding": attrs.padding, "dilation": attrs.dilation,
            "groups": int(attrs.groups), "data_layout": attrs.data_layout,
            "kernel_layout": attrs.kernel_layout, "out_layout": attrs.out_layout,
            "out_dtype": attrs.out_dtype}
