"""Graph pass: fuse each depthwise conv kernel with the pointwise conv kernel that
consumes it into one kernel (a separable convolution), so that a schedule can produce
the depthwise output tile in cache and consume it at once, with no round trip through
main memory.

It runs after operator fusion (``FuseOps``/``FuseTIR``), on ``main``'s ``call_tir``
bindings: a depthwise kernel whose output is used only by a 1x1 stride-1 conv kernel
(with its fused epilogue) is merged with it into one PrimFunc (``kernel_pairs``).
Kernels are recognised by structure (``schedules.analysis``), not by name.
"""

from __future__ import annotations

import logging

from xcompile import kernel_pairs

log = logging.getLogger(__name__)


def _kind(func) -> str | None:
    """``DEPTHWISE``, or ``POINTWISE`` for a pointwise kernel a depthwise kernel can fuse
    into (stride 1, its input read once), else None (``schedules.analysis`` classifies)."""
    from tvm import s_tir

    from xcompile.schedules.analysis import DEPTHWISE, POINTWISE, match_conv2d_nhwc, pixel_for_pixel

    sch = s_tir.Schedule(func)
    conv = match_conv2d_nhwc(sch)
    if conv is None or conv.kind not in (DEPTHWISE, POINTWISE) or conv.tail:
        return None
    if conv.kind == DEPTHWISE:
        return DEPTHWISE
    # The input read once, by the conv (or its padding copy): a residual read of the
    # same tensor would need the depthwise output outside the fused pixel chunks.
    data = func.params[0]
    readers = [rv for rv in sch.get_child_blocks(sch.get_sblock("root"))
               if any(r.source.same_as(data) for r in sch.get(rv).reads)]
    return POINTWISE if pixel_for_pixel(sch, conv) and len(readers) == 1 else None


def find_pairs(mod) -> list[tuple]:
    """(depthwise binding, pointwise binding) pairs of ``mod``'s main that can fuse."""
    from xcompile.schedules.analysis import DEPTHWISE, POINTWISE

    roles = {DEPTHWISE: kernel_pairs.PRODUCER, POINTWISE: kernel_pairs.CONSUMER}
    return kernel_pairs.find_pairs(mod, lambda func: roles.get(_kind(func)))


def fuse_separable(accept=None):
    """The pass (see the module docstring); a no-op on a module with no such pairs.

    ``accept(prim_func) -> bool``, when given, vets each fused kernel (the pipeline asks
    the family's separable rule whether it can schedule it); a pair whose kernel it
    rejects stays two kernels."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="xcompile.FuseSeparable")
    def _pass(mod, _ctx):
        pairs = find_pairs(mod)
        while pairs:
            fused, kernels = kernel_pairs.fuse_pairs(mod, pairs)
            rejected = {key for key, gv in kernels.items()
                        if accept is not None and not accept(fused[gv])}
            if not rejected:
                return fused
            log.debug("separable pairs left unfused (no schedule): %s", sorted(
                f"{dw.name_hint}+{pw.name_hint}" for dw, pw in rejected))
            pairs = [p for p in pairs if kernel_pairs.kernels_of(p) not in rejected]
        return mod

    return _pass
