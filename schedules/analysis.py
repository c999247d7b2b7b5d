"""Structural queries on PrimFuncs that the rules of every family match on (never on names)."""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass
class Conv2DNHWC:
    """A 2-D convolution block over NHWC data and HWIO weights.

    ``depthwise`` when each output channel reads its own input channel(s) (the input's
    channel index uses the output-channel iter); otherwise a dense (groups=1) conv.
    """

    block: object  # SBlockRV
    pad_block: object | None  # the padding producer, when there is one
    epilogues: list  # the elementwise blocks after the convolution, in order
    out_shape: tuple[int, ...]
    kernel: tuple[int, int]  # (KH, KW)
    in_channels: int  # reduction extent over channels (1 for depthwise)
    depthwise: bool


def match_conv2d_nhwc(sch) -> Conv2DNHWC | None:
    """Find the single convolution block of a fused conv PrimFunc, or None.

    Matches: one reduction block with iters S(n) S(y) S(x) S(f) R(ry) R(rx) R(rc) writing
    ``out[n, y, x, f]``, reading an input whose last index uses rc (dense) or f
    (depthwise), and a 4-D weight indexed ``[ry, rx, rc, f]`` (HWIO). Every other root
    block is elementwise: a padding producer, or an epilogue over the output's shape.
    """
    reductions = []
    for rv in root_blocks(sch):
        block = sch.get(rv)
        kinds = iter_kinds(block)
        if "R" in kinds:
            reductions.append((rv, block, kinds))
        elif "?" in kinds:
            return None
    if len(reductions) != 1:
        return None
    rv, block, kinds = reductions[0]
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
    channel_vars = free_vars(data.region[3].min)
    if f in channel_vars:
        depthwise = True
    elif channel_vars == {rc}:
        depthwise = False
    else:
        return None
    pad = None
    for prv in sch.get_producers(rv):
        if "R" not in iter_kinds(sch.get(prv)):
            pad = prv
    others = [b for b in root_blocks(sch) if not sch.get(b).same_as(block)]
    epilogues = [b for b in others if pad is None or not sch.get(b).same_as(sch.get(pad))]
    out_shape = tuple(int(s) for s in out.source.shape)
    # Only elementwise epilogues over the conv's own output (a squeeze-excite gate that
    # broadcasts over a larger map is another pattern).
    if any(tuple(int(s) for s in sch.get(b).writes[0].source.shape) != out_shape
           for b in epilogues):
        return None
    ext = [int(iv.dom.extent) for iv in block.iter_vars]
    return Conv2DNHWC(rv, pad, epilogues, out_shape, (ext[4], ext[5]), ext[6], depthwise)


def match_conv(sch, target, kind: str, depthwise: bool) -> Conv2DNHWC | None:
    """The convolution of ``sch`` when ``target`` is of TVM target kind ``kind`` ("llvm"
    for CPUs, "cuda") and the function is a convolution of the wanted kind (depthwise or
    dense); otherwise None."""
    if target.kind.name != kind:
        return None
    conv = match_conv2d_nhwc(sch)
    if conv is None or conv.depthwise != depthwise:
        return None
    return conv


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
