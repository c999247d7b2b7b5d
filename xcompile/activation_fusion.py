"""Graph pass: an activation whose result only a depthwise conv reads is computed by that
conv as it reads its input, so the feature map makes one pass through memory less.

Xception opens each separable block with a ReLU of the previous block's sum, which the
residual path also reads unactivated: Relax's ``FuseOps`` fuses an elementwise op into
the kernel *before* it (an epilogue) only when that kernel has no other reader, and
never into a convolution after it, so the ReLU stayed a kernel of its own (at batch 8,
12 of them: 3.9 ms on 2 Emerald Rapids cores, a read and a write of each map).

After operator fusion, a kernel that maps its one input element by element
(``schedules.analysis.elementwise_map_ops``) of at most ``MAX_OPS`` operations, whose
result is used only as a depthwise conv kernel's input, is merged with that kernel
(``kernel_pairs``) and inlined into its padding copy: the merged kernel is a depthwise
conv again, whose rules read the padded input as ``relu(x)``.
"""

from __future__ import annotations

import logging

from xcompile import kernel_pairs

log = logging.getLogger(__name__)

# The most operations per element an activation may cost to be fused: the depthwise conv
# applies it at every tap of its window (9 times per input element for 3x3), so only a
# cheap one (ReLU, a clip, a leaky ReLU) costs less than the memory pass it saves.
MAX_OPS = 4.0


def _is_activation(func) -> bool:
    from xcompile.schedules.analysis import elementwise_map_ops

    ops = elementwise_map_ops(func)
    return ops is not None and ops <= MAX_OPS


def _role(func) -> str | None:
    """An activation produces, a depthwise conv consumes (``kernel_pairs.find_pairs``)."""
    if _is_activation(func):
        return kernel_pairs.PRODUCER
    return kernel_pairs.CONSUMER if _is_depthwise(func) else None


def _is_depthwise(func) -> bool:
    from xcompile.schedules.analysis import DEPTHWISE, classify

    return classify(func) == DEPTHWISE


def _block_count(func) -> int:
    from tvm import s_tir

    from xcompile.schedules.analysis import root_blocks

    return len(root_blocks(s_tir.Schedule(func)))


def _inlined(func, blocks: int):
    """``func`` (an activation's ``blocks`` blocks, then a depthwise conv's) with the
    activation inlined into its reader, or None when that leaves no depthwise conv."""
    from tvm import s_tir

    from xcompile.schedules.analysis import root_blocks

    sch = s_tir.Schedule(func)
    try:
        for _ in range(blocks):
            sch.compute_inline(root_blocks(sch)[0])
    except s_tir.ScheduleError:
        return None
    inlined = sch.mod["main"]
    return inlined if _is_depthwise(inlined) else None


def fuse_input_activations():
    """The pass (see the module docstring); a no-op on a module with no such pairs."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="xcompile.FuseInputActivations")
    def _pass(mod, _ctx):
        pairs = kernel_pairs.find_pairs(mod, _role)
        while pairs:
            fused, kernels = kernel_pairs.fuse_pairs(mod, pairs)
            rejected = set()
            for key, gv in kernels.items():
                inlined = _inlined(fused[gv], _block_count(mod[key[0]]))
                if inlined is None:
                    rejected.add(key)
                else:
                    fused[gv] = inlined
            if not rejected:
                log.debug("activations fused into %d depthwise convs", len(pairs))
                return fused
            pairs = [p for p in pairs if kernel_pairs.kernels_of(p) not in rejected]
        return mod

    return _pass
