"""Graph passes and scheduling: the Relax module from the front end becomes a module
whose every kernel is scheduled for the target, ready for ``tvm.compile``.

Stages, in order:
1. graph passes: inference-only decomposition (batch norm), operator legalization to TIR,
   constant folding, and fusion of each heavy op with the elementwise ops after it (the
   "zero" pipeline of ``relax.pipeline``, spelled out so our own graph passes slot in);
2. scheduling: each kernel gets the first matching rule of the target's family from
   ``schedules``; kernels no rule matches keep TVM's default lowering.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def graph_passes():
    """The target-independent Relax passes, as one Sequential."""
    import tvm
    from tvm import relax

    t = relax.transform
    return tvm.transform.Sequential(
        [
            t.DecomposeOpsForInference(),
            t.CanonicalizeBindings(),
            t.LegalizeOps(),
            t.AnnotateTIROpPattern(),
            t.FoldConstant(),
            t.FuseOps(),
            t.FuseTIR(),
            t.DeadCodeElimination(),
        ],
        name="xcompile.GraphPasses",
    )


def optimize(mod, preset, rules: list | None = None):
    """Run the graph passes and schedule every kernel for ``preset``.

    ``rules`` defaults to the preset family's rules. Returns ``(mod, kernels)`` where
    ``kernels`` maps each kernel's name to the rule that scheduled it.
    """
    import schedules

    target = preset.tvm_target()
    if rules is None:
        rules = schedules.rules_for(preset.family)
    with target:
        mod = graph_passes()(mod)
        mod = schedules.apply_rules(rules)(mod)
    kernels = schedules.kernel_rules(mod)
    log.info("%d kernels; %d scheduled by rules", len(kernels),
             sum(r != schedules.UNSCHEDULED for r in kernels.values()))
    return mod, kernels
