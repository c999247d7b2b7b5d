"""Structural queries on PrimFuncs that the rules of every family match on (never on names)."""

from __future__ import annotations

from dataclasses import dataclass, field


def free_vars(expr) -> set:
    """The variables an index expression uses."""
    from tvm import tirx

    return set(tirx.analysis.undefined_vars(expr))


def is_var(expr, var) -> bool:
    from tvm import tirx

    return isinstance(expr, tirx.Var) and expr.same_as(var)


def root_blocks(sch):
    """The blocks directly under the root block."""
    return sch.get_child_blocks(sch.get_sblock("root"))


def iter_kinds(block) -> str:
    """'S'/'R' per block iter, e.g. 'SSSSRRR' for a 2-D convolution."""
    from tvm.tirx import IterVar

    return "".join("S" if iv.iter_type == IterVar.DataPar else
                   "R" if iv.iter_type == IterVar.CommReduce else "?"
                   for iv in block.iter_vars)


def param_buffers(func) -> list:
    """The function's argument buffers (inputs first, outputs last)."""
    return list(func.params)


# The kinds of convolution the rules, the separable fusion and the tuner tell apart.
DEPTHWISE = "depthwise"  # each output channel reads one input channel (groups = C_in)
GROUPED = "grouped"  # groups of several input channels (1 < groups < C_in)
POINTWISE = "pointwise"  # groups = 1, a 1x1 window (any stride)
DENSE = "dense"  # groups = 1, a larger window (KxK, 1xK, Kx1)
SEPARABLE = "separable"  # a depthwise conv and the pointwise conv after it, fused
WINOGRAD = "winograd"  # a 3x3 conv by Winograd's minimal filtering (xcompile.winograd)
OTHER = "other"  # not a convolution

# The block annotation that names each stage of a Winograd convolution
# (``xcompile.winograd``): "weights", "input_rows", "input", "products", "output_rows",
# "output".
WINOGRAD_STAGE = "xcompile.winograd_stage"
WINOGRAD_STAGES = ("weights", "input_rows", "input", "products", "output_rows", "output")


@dataclass
class Conv2DNHWC:
    """A 2-D convolution block over NHWC data and HWIO weights; ``kind`` is one of
    ``DEPTHWISE``, ``GROUPED``, ``POINTWISE``, ``DENSE``."""

    block: object  # SBlockRV
    pad_block: object | None  # the padding producer, when there is one
    epilogues: list  # the elementwise blocks after the convolution over its shape, in order
    out_shape: tuple[int, ...]
    kernel: tuple[int, int]  # (KH, KW)
    in_channels: int  # reduction extent over channels: C_in / groups (1 for depthwise)
    kind: str
    # Elementwise blocks after the epilogues over another shape (a squeeze-excite gate
    # multiplying a feature map): scheduled on their own, after the convolution.
    tail: list = field(default_factory=list)
    # Operations per output element in ``epilogues`` as written (TVM's count: a bias and
    # ReLU 1-2, a SiLU's polynomial sigmoid ~120, its shared subexpressions counted anew).
    epilogue_ops: float = 0.0
    # A stride-1 conv without padding (``window_in_place``): each window position's GEMM
    # rows are input pixels a fixed offset from the output pixel's, and a GEMM can read
    # them where they lie (a 1x1 conv's rows are the input's pixels, in order).
    rows_in_place: bool = False
    # The input the block reads (its zero-padded copy where there is padding), NHWC.
    in_shape: tuple[int, ...] = ()

    @property
    def depthwise(self) -> bool:
        return self.kind == DEPTHWISE

    @property
    def dense(self) -> bool:
        """groups = 1: a pointwise or a dense conv (what a GEMM computes)."""
        return self.kind in (POINTWISE, DENSE)


def conv_block(sch, rv) -> Conv2DNHWC | None:
    """``rv`` as a convolution, or None: iters S(n) S(y) S(x) S(f) R(ry) R(rx) R(rc)
    writing ``out[n, y, x, f]``, reading an input whose last index uses rc alone
    (groups = 1) or f (grouped; depthwise when rc has extent 1), and a 4-D weight
    indexed ``[ry, rx, rc, f]`` (HWIO). Its padding producer and epilogues are left for
    the caller to find (None, [])."""
    block = sch.get(rv)
    kinds = iter_kinds(block)
    if kinds != "SSSSRRR" or len(block.writes) != 1 or len(block.reads) != 2:
        return None
    n, y, x, f, ry, rx, rc = (iv.var for iv in block.iter_vars)
    out = block.writes[0]
    if len(out.region) != 4 or not all(is_var(r.min, v) for r, v in
                                       zip(out.region, (n, y, x, f))):
        return None
    data, weight = block.reads
    if len(weight.region) != 4 or not all(
            is_var(r.min, v) for r, v in zip(weight.region, (ry, rx, rc, f))):
        return None
    if len(data.region) != 4:
        return None
    ext = [int(iv.dom.extent) for iv in block.iter_vars]
    channel_vars = free_vars(data.region[3].min)
    if f in channel_vars:
        kind = DEPTHWISE if ext[6] == 1 else GROUPED
    elif channel_vars == {rc}:
        kind = POINTWISE if ext[4] == ext[5] == 1 else DENSE
    else:
        return None
    return Conv2DNHWC(rv, None, [], tuple(int(s) for s in out.source.shape),
                      (ext[4], ext[5]), ext[6], kind,
                      in_shape=tuple(int(s) for s in data.source.shape))


def _split_blocks(sch):
    """(reduction blocks, other blocks) under the root, in order, or None when DLight's
    ``normalize_prim_func`` finds the function not in normal form (a block nested in
    another, an iter neither data-parallel nor a reduction)."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    # (On a copy: normalizing drops unit iters from the blocks, and the matchers here
    # read a convolution's seven iters; blocks are found back by their unique names.)
    infos = normalize_prim_func(sch.copy())
    if infos is None or any("O" in info.dom_kind() for info in infos):
        return None
    reductions = [sch.get_sblock(info.name) for info in infos if info.is_reduction()]
    others = [sch.get_sblock(info.name) for info in infos if not info.is_reduction()]
    return reductions, others


def _pad_producer(sch, rv):
    """The elementwise producer of conv block ``rv`` (its zero padding), or None."""
    pad = None
    for prv in sch.get_producers(rv):
        if "R" not in iter_kinds(sch.get(prv)):
            pad = prv
    return pad


def _same_shape(sch, blocks, shape) -> bool:
    return all(tuple(int(s) for s in sch.get(b).writes[0].source.shape) == shape
               for b in blocks)


def match_conv2d_nhwc(sch) -> Conv2DNHWC | None:
    """Find the single convolution block of a fused conv PrimFunc (see ``conv_block``),
    or None. Every other root block is elementwise: a padding producer, or an epilogue
    over the output's shape."""
    from tvm import s_tir

    split = _split_blocks(sch)
    if split is None or len(split[0]) != 1:
        return None
    conv = conv_block(sch, split[0][0])
    if conv is None:
        return None
    conv.pad_block = _pad_producer(sch, conv.block)
    conv.rows_in_place = window_in_place(sch, conv) and not _pads(sch, conv.pad_block)
    is_pad = (lambda b: conv.pad_block is not None
              and sch.get(b).same_as(sch.get(conv.pad_block)))
    after = [b for b in split[1] if not is_pad(b)]
    # Elementwise epilogues over the conv's own output, then possibly a tail over
    # another shape: a squeeze-excite gate broadcast over its feature map.
    same = 0
    while same < len(after) and _same_shape(sch, after[same:same + 1], conv.out_shape):
        same += 1
    conv.epilogues, conv.tail = after[:same], after[same:]
    conv.epilogue_ops = sum(float(s_tir.analysis.estimate_tir_flops(sch.get(b)))
                            for b in conv.epilogues)
    return conv


def _pads(sch, pad_block) -> bool:
    """Whether ``pad_block`` (a padding producer, or None) adds any padding (TOPI's convs
    copy their input through one even when every pad is 0)."""
    if pad_block is None:
        return False
    block = sch.get(pad_block)
    shape = [int(s) for s in block.writes[0].source.shape]
    return any(shape != [int(s) for s in r.source.shape] for r in block.reads)


def window_in_place(sch, conv: Conv2DNHWC) -> bool:
    """Whether ``conv`` reads input pixel (n, y + ry, x + rx) for output pixel (n, y, x) at
    window position (ry, rx): stride 1, dilation 1, any window, no padding in the index
    (a padding producer is the caller's to rule out)."""
    from tvm.sym.analyzer import Analyzer

    block = sch.get(conv.block)
    n, y, x, _, ry, rx, _ = (iv.var for iv in block.iter_vars)
    rn, ryy, rxx = (r.min for r in block.reads[0].region[:3])
    # The index is `y + ry` (stride 2: `y * 2 + ry`, dilation 2: `y + ry * 2`).
    same = Analyzer().can_prove_equal
    return is_var(rn, n) and same(ryy, y + ry) and same(rxx, x + rx)


def pixel_for_pixel(sch, conv: Conv2DNHWC) -> bool:
    """Whether ``conv`` reads input pixel (n, y, x) for output pixel (n, y, x): a 1x1
    stride-1 convolution with no padding."""
    return conv.kernel == (1, 1) and window_in_place(sch, conv)


@dataclass
class Separable:
    """A depthwise conv feeding a pointwise (1x1, stride 1) conv in one PrimFunc.

    ``depthwise.epilogues`` are the elementwise blocks between the two (batch norm,
    activation), ``pointwise.epilogues`` those after the pointwise conv."""

    depthwise: Conv2DNHWC
    pointwise: Conv2DNHWC


def match_separable(sch) -> Separable | None:
    """The fused separable convolution of ``sch``, or None: two convolution blocks, the
    first depthwise, the second dense 1x1 with stride 1 reading the first's output (or
    an elementwise function of it) pixel for pixel; every other block elementwise."""
    split = _split_blocks(sch)
    if split is None or len(split[0]) != 2:
        return None
    dw, pw = (conv_block(sch, rv) for rv in split[0])
    if dw is None or pw is None or not dw.depthwise or pw.kind != POINTWISE:
        return None
    if not pixel_for_pixel(sch, pw):  # 1x1, stride 1
        return None
    if dw.out_shape[:3] != pw.out_shape[:3] or dw.out_shape[3] != pw.in_channels:
        return None
    dw.pad_block = _pad_producer(sch, dw.block)
    order = [sch.get(b) for b in root_blocks(sch)]

    def position(rv) -> int:
        return next(i for i, b in enumerate(order) if b.same_as(sch.get(rv)))

    dw_at, pw_at = position(dw.block), position(pw.block)
    for rv in split[1]:
        at = position(rv)
        if dw.pad_block is not None and sch.get(rv).same_as(sch.get(dw.pad_block)):
            continue
        if dw_at < at < pw_at:
            dw.epilogues.append(rv)
        elif at > pw_at:
            pw.epilogues.append(rv)
        else:
            return None
    if not (_same_shape(sch, dw.epilogues, dw.out_shape)
            and _same_shape(sch, pw.epilogues, pw.out_shape)):
        return None
    # The depthwise side's results are read by the pointwise conv only.
    inner = [sch.get(b).writes[0].source for b in [dw.block, *dw.epilogues]]
    if any(r.source.same_as(buf) for b in pw.epilogues for r in sch.get(b).reads
           for buf in inner):
        return None
    return Separable(dw, pw)


def match_conv(sch, target, target_kind: str, kinds: tuple[str, ...],
               tail: bool = False) -> Conv2DNHWC | None:
    """The convolution of ``sch`` when ``target`` is of TVM target kind ``target_kind``
    ("llvm" for CPUs, "cuda") and the function is a convolution of one of ``kinds``
    (``DEPTHWISE``, ``POINTWISE``...), with a ``tail`` only if the caller schedules
    one; otherwise None."""
    if target.kind.name != target_kind:
        return None
    conv = match_conv2d_nhwc(sch)
    if conv is None or conv.kind not in kinds or (conv.tail and not tail):
        return None
    return conv


@dataclass
class Matmul:
    """A 2-D matrix product ``C[i, j] = sum_k A[i, k] * B[k, j]`` (the FC layer of a CNN,
    its weights transposed at build time so that ``j`` is contiguous in ``B``), with
    the elementwise blocks after it over ``C``'s shape (bias, activation)."""

    block: object  # BlockRV of the product
    rows: int  # M (the batch)
    cols: int  # N
    depth: int  # K
    epilogues: list = field(default_factory=list)


def match_matmul(sch) -> Matmul | None:
    """The single matrix-product block of ``sch``'s function and its elementwise
    epilogues, or None: one reduction block over (i, j, k) that reads ``A[i, k]`` and
    ``B[k, j]`` and writes ``C[i, j]``, every other block over ``C``'s shape."""
    split = _split_blocks(sch)
    if split is None or len(split[0]) != 1:
        return None
    rv = split[0][0]
    block = sch.get(rv)
    if iter_kinds(block) != "SSR" or len(block.reads) != 2 or len(block.writes) != 1:
        return None
    i, j, k = (iv.var for iv in block.iter_vars)
    store = block.body
    try:
        out_index = store.indices
        value = store.value
        a, b = value.b.a, value.b.b  # C[i, j] = C[i, j] + A[i, k] * B[k, j]
        a_index, b_index = a.indices, b.indices
    except AttributeError:
        return None
    if not (len(out_index) == 2 and is_var(out_index[0], i) and is_var(out_index[1], j)
            and len(a_index) == 2 and is_var(a_index[0], i) and is_var(a_index[1], k)
            and len(b_index) == 2 and is_var(b_index[0], k) and is_var(b_index[1], j)):
        return None
    shape = tuple(int(x) for x in store.buffer.shape)
    if not _same_shape(sch, split[1], shape):
        return None
    return Matmul(rv, shape[0], shape[1], int(block.iter_vars[2].dom.extent), split[1])


@dataclass
class Reduction:
    """The one reduction block of a function that reads a single tensor (a pooling
    window, a mean over axes), with the elementwise blocks before it (its padding) and
    after it over its output's shape (a residual add, a division)."""

    block: object  # SBlockRV
    producers: list
    epilogues: list


def match_reduction(sch) -> Reduction | None:
    """``sch``'s function as a ``Reduction``, or None: one reduction block, reading one
    tensor, whose output's last (contiguous) axis is its innermost data-parallel iter;
    every block before it elementwise, every block after it over its output's shape."""
    split = _split_blocks(sch)
    if split is None or len(split[0]) != 1:
        return None
    rv = split[0][0]
    block = sch.get(rv)
    kinds = iter_kinds(block)
    if len(block.reads) != 1 or len(block.writes) != 1 or "S" not in kinds:
        return None
    if not is_var(block.writes[0].region[-1].min, block.iter_vars[kinds.rindex("S")].var):
        return None
    order = list(root_blocks(sch))
    at = next(i for i, b in enumerate(order) if sch.get(b).same_as(block))
    before, after = order[:at], order[at + 1:]
    shape = tuple(int(x) for x in block.writes[0].source.shape)
    if any("R" in iter_kinds(sch.get(b)) for b in before + after) \
            or not _same_shape(sch, after, shape):
        return None
    return Reduction(rv, before, after)


@dataclass
class Winograd:
    """A Winograd convolution (``xcompile.winograd``): its stages' blocks by name, the
    elementwise blocks after its output over the output's shape (``epilogues``), and
    the direct convolution's shape: ``out_shape`` NHWC, ``in_channels``; ``row_tiles``
    the tiles a row of them is computed as (padded to the rule's register block)."""

    stages: dict
    epilogues: list
    out_shape: tuple[int, ...]
    in_channels: int
    row_tiles: int

    @property
    def direct_flops(self) -> float:
        """What the direct 3x3 convolution computes: 2 FLOPs per multiply-accumulate."""
        n, h, w, f = self.out_shape
        return 2.0 * n * h * w * f * self.in_channels * 9


def match_winograd(sch) -> Winograd | None:
    """The Winograd convolution of ``sch``: a root block marked with each stage of
    ``WINOGRAD_STAGES`` once, then, after the output stage, elementwise blocks over the
    output's shape; else None."""
    stages, rest = {}, []
    for rv in root_blocks(sch):
        stage = sch.get(rv).annotations.get(WINOGRAD_STAGE)
        if stage is None:
            if "output" not in stages:
                return None
            rest.append(rv)
        elif str(stage) in stages or str(stage) not in WINOGRAD_STAGES or rest:
            return None
        else:
            stages[str(stage)] = rv
    if len(stages) != len(WINOGRAD_STAGES):
        return None
    out = sch.get(stages["output"])
    shape = tuple(int(s) for s in out.writes[0].source.shape)
    if not _same_shape(sch, rest, shape):
        return None
    inputs = sch.get(stages["input"]).writes[0].source
    return Winograd(stages, rest, shape, int(inputs.shape[-1]), int(inputs.shape[4]))


def classify(func) -> str:
    """What ``func`` (a lowered kernel) computes: ``SEPARABLE`` (a fused depthwise ->
    pointwise pair), ``WINOGRAD`` (a Winograd convolution), the kind of its one
    convolution (``DEPTHWISE``, ``GROUPED``, ``POINTWISE``, ``DENSE``), or ``OTHER``.
    The one classifier the rules, the separable fusion and the tuner share."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    if match_separable(sch) is not None:
        return SEPARABLE
    if match_winograd(sch) is not None:
        return WINOGRAD
    conv = match_conv2d_nhwc(s_tir.Schedule(func))
    return conv.kind if conv is not None else OTHER


def elementwise_map_ops(func) -> float | None:
    """Operations per element (TVM's count) when ``func`` maps its one input to its one
    output element by element, ``out[i, j, ...] = f(in[i, j, ...])``, in blocks that
    each read the input or earlier blocks' results at the same element, and scalars (an
    activation: a ReLU is one or two operations, a clip by scalar arguments two blocks
    of one, a leaky ReLU ``max(x, alpha * x)`` two), else None."""
    from tvm import s_tir

    if len(func.params) < 2:
        return None
    inp, *scalars, out = func.params
    if any(len(p.shape) for p in scalars):
        return None
    shape = [int(s) for s in inp.shape]
    sch = s_tir.Schedule(func)
    sources, last, ops = [inp], None, 0.0
    for rv in root_blocks(sch):
        block = sch.get(rv)
        iters = [iv.var for iv in block.iter_vars]

        def elementwise(region) -> bool:
            return len(region) == len(iters) and all(
                is_var(r.min, v) and int(r.extent) == 1 for r, v in zip(region, iters))

        reads = [r for r in block.reads if not any(r.source.same_as(p) for p in scalars)]
        if ("R" in iter_kinds(block) or not reads or len(block.writes) != 1
                or not all(any(r.source.same_as(s) for s in sources)
                           and elementwise(r.region) for r in reads)
                or not elementwise(block.writes[0].region)
                or [int(s) for s in block.writes[0].source.shape] != shape):
            return None
        last = block.writes[0].source
        sources.append(last)
        ops += float(s_tir.analysis.estimate_tir_flops(block))
    return ops if last is not None and last.same_as(out) else None


def work_flops(func) -> float:
    """The FLOPs of one call of ``func`` as model FLOPs are conventionally counted: 2 per
    multiply-accumulate of its reductions (a convolution's or matmul's MACs), 1 per element
    reduced otherwise (a mean, a max pool); elementwise work fused around them is not
    counted (``estimate_tir_flops`` counts every operation, and a SiLU epilogue's
    polynomial then makes a 1x1 conv look 5x faster than it is). A Winograd convolution
    counts as the direct convolution it replaces (as profilers report such kernels). A
    kernel without a reduction: TVM's operation count."""
    import tvm
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    winograd = match_winograd(sch)
    if winograd is not None:
        return winograd.direct_flops
    total, reductions = 0.0, 0
    for rv in root_blocks(sch):
        block = sch.get(rv)
        if "R" not in iter_kinds(block):
            continue
        reductions += 1
        elements = 1
        for iv in block.iter_vars:
            elements *= int(iv.dom.extent)
        value = block.body.value if isinstance(block.body, tirx.BufferStore) else None
        while isinstance(value, tirx.Cast):
            value = value.value
        mac = isinstance(value, tirx.Add) and any(
            isinstance(v.value if isinstance(v, tirx.Cast) else v, tirx.Mul)
            for v in (value.a, value.b))
        total += elements * (2 if mac else 1)
    if reductions:
        return total
    return float(s_tir.analysis.estimate_tir_flops(tvm.IRModule({"main": func})))


def accumulate_locally(sch, conv: Conv2DNHWC, pad_in_place: bool = True):
    """Keep ``conv``'s accumulators in a local buffer and fuse its epilogue into their
    write-back; returns the write-back block.

    ``pad_in_place``: the zero padding is read in place, a guarded load in the
    reduction (no padded copy). Rules that copy the input into a packed buffer pass
    False and inline the padding into that copy (``inline_padding``) instead: the copy
    then reads under the padding predicate and stores the zeros, and the reduction
    reads only the packed buffer. Inlining the padding into the reduction and packing
    afterwards would pack unguarded reads outside the input."""
    if conv.pad_block is not None and pad_in_place:
        sch.compute_inline(conv.pad_block)
    wb = sch.cache_write(conv.block, 0, "local")
    fuse_epilogue(sch, conv.epilogues)
    return wb


def inline_padding(sch, conv: Conv2DNHWC) -> None:
    """Inline ``conv``'s padding producer (kept by ``accumulate_locally(...,
    pad_in_place=False)``) into its consumer, the rule's packing copy."""
    if conv.pad_block is not None:
        sch.compute_inline(conv.pad_block)


def index_by_pixel_row(sch, conv: Conv2DNHWC, writeback, fuse_reduction: bool = False):
    """Index ``conv``'s block, its accumulators and ``writeback`` by pixel row
    ``n*H*W + y*W + x`` instead of (n, y, x): the rows of a GEMM. With
    ``fuse_reduction`` the window and input channels become one depth index
    ``(ry*KW + rx)*C + rc``; otherwise they stay (ry, rx, rc)."""
    _, h, w, _ = conv.out_shape
    kw, c = conv.kernel[1], conv.in_channels

    def row(b, y, x):
        return b * h * w + y * w + x

    sch.transform_layout(conv.block, ("write", 0), lambda b, y, x, f: (row(b, y, x), f))
    if fuse_reduction:
        sch.transform_block_layout(conv.block, lambda b, y, x, f, ry, rx, rc: (
            row(b, y, x), f, (ry * kw + rx) * c + rc))
    else:
        sch.transform_block_layout(conv.block, lambda b, y, x, f, ry, rx, rc: (
            row(b, y, x), f, ry, rx, rc))
    sch.transform_block_layout(writeback, lambda b, y, x, f: (row(b, y, x), f))


def fuse_epilogue(sch, epilogues: list) -> None:
    """Fold the elementwise blocks after a reduction into the block that writes its
    result (the write-back of a cached accumulator).

    Intermediate blocks are first inlined forward into their consumers, leaving one
    block that reads the reduction's output (possibly more than once, as SiLU's
    ``x * sigmoid(x)`` does); that block is then inlined into the write-back. (Inlining a
    chain backwards, block by block, leaves dangling buffers in TVM 0.27 when an
    intermediate has two consumers.)
    """
    for block in epilogues[:-1]:
        sch.compute_inline(block)
    if epilogues:
        sch.reverse_compute_inline(epilogues[-1])
