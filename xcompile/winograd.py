"""Graph pass: 3x3 stride-1 convolutions by Winograd's minimal filtering, F(4x4, 3x3).

Each 4x4 block of output pixels (a tile) is computed from the 6x6 input pixels under it:
the input tile and the 3x3 kernel are transformed into 6x6 points (``V = B^T d B``,
``U = G g G^T``), multiplied point by point and summed over the input channels, and the
products transformed back (``Y = A^T M A``). The sum over channels is 36 independent
GEMMs, one per point, of (tiles x C_in) by (C_in x C_out): 36 multiplications per tile
and channel pair where the direct convolution does 16 x 9 = 144, 4x fewer. The transforms
are additions and multiplications by small constants, per tile and channel, not per
channel pair. The kernel transform runs once, at build time: it is a layout-rewrite
block, split out and lifted with the weights' packing (``params.bin`` holds ``U``).

The matrices are Cook-Toom's for the points 0, -1, 1, 1/2, -2 and infinity: the points
Barabasz et al. ("Error analysis and improving the accuracy of Winograd convolution for
deep neural networks", 2018) found most accurate in float32 for F(4, 3) (TVM's TOPI uses
the same). Measured on a 2-core Zen 4 against float64: relative error 2e-6 of the
largest output on random data, within the 1e-4 we hold against ONNX Runtime.

Each eligible ``relax.nn.conv2d`` (NHWC data, HWIO weights, 3x3 window, stride and
dilation 1, one group, float32) becomes a ``call_tir`` of the computation below, its
blocks marked with their stage (``schedules.analysis.WINOGRAD_STAGE``), so that the
family's Winograd rule finds them; the function is marked fusable like a convolution,
so the bias, activation and residual after it join its output transform. Which convolutions pay,
and how many tiles a register block of the rule takes (the tile columns are padded to a
multiple of it), is the rule's to say (``schedules.winograd_rule``).
"""

from __future__ import annotations

from fractions import Fraction as F

# F(4x4, 3x3): 4 output pixels a side from 6 input pixels, 3x3 kernel.
OUT_TILE = 4
KERNEL = 3
POINTS = OUT_TILE + KERNEL - 1

# Cook-Toom matrices for the points 0, -1, 1, 1/2, -2, infinity (see the module docstring):
# A (6 x 4) maps the 6x6 products back to a 4x4 output tile, B (6 x 6) an input tile to
# its points, G (6 x 3) the kernel to its points.
A = [[F(1), F(0), F(0), F(0)],
     [F(1), F(-1), F(1), F(-1)],
     [F(1), F(1), F(1), F(1)],
     [F(1), F(1, 2), F(1, 4), F(1, 8)],
     [F(1), F(-2), F(4), F(-8)],
     [F(0), F(0), F(0), F(1)]]
B = [[F(1), F(0), F(0), F(0), F(0), F(0)],
     [F(-3, 2), F(1), F(-1), F(-2), F(1, 2), F(1)],
     [F(-2), F(-5, 2), F(1, 2), F(-1), F(-1), F(-3, 2)],
     [F(3, 2), F(1, 2), F(5, 2), F(2), F(-1, 2), F(-2)],
     [F(1), F(1), F(1), F(1), F(1), F(3, 2)],
     [F(0), F(0), F(0), F(0), F(0), F(1)]]
G = [[F(1), F(0), F(0)],
     [F(-1, 3), F(1, 3), F(-1, 3)],
     [F(1, 3), F(1, 3), F(1, 3)],
     [F(-16, 15), F(-8, 15), F(-4, 15)],
     [F(1, 15), F(-2, 15), F(4, 15)],
     [F(0), F(0), F(1)]]

# relax.transform.FuseOps's pattern kinds (``op_pattern``): a convolution's, whose
# elementwise consumers fuse into it.
OUT_ELEMWISE_FUSABLE = 4


def _entry(matrix, i, j, dtype):
    """``matrix[i][j]`` for index expressions ``i``, ``j``: a chain of selects that TVM
    folds to the constant once the loops over ``i`` and ``j`` are unrolled (and drops the
    products by 0)."""
    from tvm import tirx

    out = tirx.const(0.0, dtype)
    for r, row in enumerate(matrix):
        for c, value in enumerate(row):
            if value:
                out = tirx.Select(tirx.all(i == r, j == c), tirx.const(float(value), dtype), out)
    return out


def compute(data, weight, padding: tuple[int, int, int, int], tile_multiple: int):
    """The convolution of ``data`` (NHWC) with ``weight`` (3x3 HWIO), zero ``padding``
    (top, left, bottom, right), as TE stages: the tiles of each row padded to a multiple
    of ``tile_multiple`` (the rule's register block), their outputs dropped."""
    from tvm import te, tirx

    from xcompile.schedules import LAYOUT_REWRITE
    from xcompile.schedules.analysis import WINOGRAD_STAGE as STAGE

    n, h, w, ci = (int(s) for s in data.shape)
    co = int(weight.shape[3])
    top, left, bottom, right = padding
    oh, ow = h + top + bottom - KERNEL + 1, w + left + right - KERNEL + 1
    rows, cols = -(-oh // OUT_TILE), -(-ow // OUT_TILE)
    cols = -(-cols // tile_multiple) * tile_multiple
    dtype = data.dtype
    kh, kw = te.reduce_axis((0, KERNEL), "kh"), te.reduce_axis((0, KERNEL), "kw")
    u = te.compute(
        (POINTS, POINTS, ci, co),
        lambda e, v, c, f: te.sum(_entry(G, e, kh, dtype) * weight[kh, kw, c, f]
                                  * _entry(G, v, kw, dtype), axis=[kh, kw]),
        name="winograd_weights",
        attrs={STAGE: "weights", LAYOUT_REWRITE: True})

    def pixel(b, y, x, c):
        y, x = y - top, x - left
        inside = tirx.all(y >= 0, y < h, x >= 0, x < w)
        return tirx.if_then_else(inside, data[b, y, x, c], tirx.const(0.0, dtype))

    ra, rb = te.reduce_axis((0, POINTS), "ra"), te.reduce_axis((0, POINTS), "rb")
    rows_t = te.compute(
        (POINTS, POINTS, n, rows, cols, ci),
        lambda e, x, b, ty, tx, c: te.sum(
            _entry(B, ra, e, dtype) * pixel(b, ty * OUT_TILE + ra, tx * OUT_TILE + x, c),
            axis=[ra]),
        name="winograd_input_rows", attrs={STAGE: "input_rows"})
    v = te.compute(
        (POINTS, POINTS, n, rows, cols, ci),
        lambda e, p, b, ty, tx, c: te.sum(
            rows_t[e, rb, b, ty, tx, c] * _entry(B, rb, p, dtype), axis=[rb]),
        name="winograd_input", attrs={STAGE: "input"})
    k = te.reduce_axis((0, ci), "k")
    m = te.compute(
        (POINTS, POINTS, n, rows, cols, co),
        lambda e, p, b, ty, tx, f: te.sum(v[e, p, b, ty, tx, k] * u[e, p, k, f], axis=[k]),
        name="winograd_products", attrs={STAGE: "products"})
    ra2, rb2 = te.reduce_axis((0, POINTS), "ra2"), te.reduce_axis((0, POINTS), "rb2")
    out_rows = te.compute(
        (OUT_TILE, POINTS, n, rows, cols, co),
        lambda y, x, b, ty, tx, f: te.sum(
            _entry(A, ra2, y, dtype) * m[ra2, x, b, ty, tx, f], axis=[ra2]),
        name="winograd_output_rows", attrs={STAGE: "output_rows"})
    # The output's shape in the graph's index type (int64), as the other params'.
    shape = [tirx.IntImm(str(data.shape[0].ty.dtype), d) for d in (n, oh, ow, co)]
    return te.compute(
        shape,
        lambda b, y, x, f: te.sum(
            out_rows[y % OUT_TILE, rb2, b, y // OUT_TILE, x // OUT_TILE, f]
            * _entry(A, rb2, x % OUT_TILE, dtype), axis=[rb2]),
        name="winograd_output", attrs={STAGE: "output"})


def conv_shape(call):
    """``(data shape, weight shape, padding, output shape)`` of a ``relax.nn.conv2d``
    call that Winograd's F(4x4, 3x3) computes (NHWC data, 3x3 HWIO weights, stride and dilation 1,
    one group, float32 throughout, static shapes), else None."""
    attrs = call.attrs
    if (attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO"
            or attrs.out_layout not in ("", "NHWC") or int(attrs.groups) != 1
            or [int(s) for s in attrs.strides] != [1, 1]
            or [int(d) for d in attrs.dilation] != [1, 1]):
        return None
    from xcompile.frontend import static_shape

    data, weight = call.args
    dshape, wshape, oshape = static_shape(data.ty), static_shape(weight.ty), static_shape(call.ty)
    if dshape is None or wshape is None or oshape is None:
        return None
    out_dtype = str(attrs.out_dtype or "")  # unset: the data's
    if (wshape[:2] != [KERNEL, KERNEL] or data.ty.dtype != "float32"
            or weight.ty.dtype != "float32" or out_dtype not in ("", "float32", "void")):
        return None
    padding = tuple(int(p) for p in attrs.padding)
    if len(padding) == 2:
        padding = padding * 2
    return dshape, wshape, padding, oshape


def winograd_convs(choose):
    """The pass: each conv2d that ``conv_shape`` accepts and ``choose(out_shape,
    weight_shape)`` (NHWC, HWIO) gives a tile multiple (the Winograd rule's register
    block; None: leave it direct) becomes a call of ``compute``."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.nn.conv2d")(wildcard(), wildcard())

    @tvm.transform.module_pass(opt_level=0, name="xcompile.WinogradConvs")
    def _pass(mod, _ctx):
        def rewrite(call, _m):
            shape = conv_shape(call)
            multiple = shape and choose(shape[3], shape[1])
            if not multiple:
                return call
            return builder.call_te(compute, *call.args, padding=shape[2],
                                   tile_multiple=multiple,
                                   primfunc_name_hint="winograd_conv2d",
                                   primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})

        builder = relax.BlockBuilder(mod)
        for gv, func in list(builder.get().functions_items()):
            if isinstance(func, relax.Function):
                builder.update_func(gv, rewrite_call(pattern, rewrite, func))
        return builder.get()

    return _pass
