"""The design space of a task: our rule's configurations next to MetaSchedule's own
search space.

Our rules' schedules (``ConfigRule.space``: the hand-picked default first, then the
other tilings that fit) are deterministic traces the search replays as they are;
MetaSchedule's post-order-apply space brings its sampled multi-level tilings, which
the evolutionary search mutates. The baseline (our default) is measured before the
search starts, so a tuned kernel is never slower, as measured, than the untuned one.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

log = logging.getLogger(__name__)


def first_rule(rules: list, func, target):
    """The first of ``rules`` that matches ``func`` (the one a plain build applies)."""
    for rule in rules:
        try:
            if rule.apply(func, target, False) is not None:
                return rule
        except Exception:  # a rule's bug: the build falls through too
            continue
    return None


def rule_schedules(rule, sch, target) -> list:
    """``rule``'s schedules of ``sch``'s function: its configurations when it has them
    (our rules), else its single schedule (DLight's)."""
    if hasattr(rule, "space"):
        return rule.space(sch, target)
    scheduled = rule.apply(sch.mod["main"], target, False)
    return [scheduled] if scheduled is not None else []


def design_space(rule, target):
    """A MetaSchedule space generator: ``rule``'s schedules next to MetaSchedule's own
    space (the target's default rules)."""
    from tvm.s_tir import meta_schedule as ms

    def ours(sch):
        return rule_schedules(rule, sch, target) if rule is not None else []

    seeded = ms.space_generator.ScheduleFn(ours, sch_rules=[], postprocs=[], mutator_probs={})
    return ms.space_generator.SpaceGeneratorUnion(
        [seeded, ms.space_generator.PostOrderApply(sch_rules=search_rules(target))])


def search_rules(target):
    """MetaSchedule's default rules for ``target``; on CPUs without its 512-step unroll
    choice, whose candidates took several times longer to compile than the rest and
    never won on these machines' convolutions."""
    from tvm.s_tir import meta_schedule as ms

    if target.kind.name != "llvm":
        return "from-target"
    rules = []
    for rule in ms.schedule_rule.ScheduleRule.create("llvm"):
        if isinstance(rule, ms.schedule_rule.ParallelizeVectorizeUnroll):
            rule = ms.schedule_rule.ParallelizeVectorizeUnroll(
                max_jobs_per_core=16, max_vectorize_extent=64, unroll_max_steps=[0, 16, 64],
                unroll_explicit=True)
        rules.append(rule)
    return rules


def import_tensor_intrinsics(device: str) -> None:
    """Register the tensor intrinsics MetaSchedule's rules may use for ``device``.

    ``TuneContext`` imports the whole ``tvm.s_tir.tensor_intrin`` package: 37 s on these
    machines, 25 s of it CUDA's. CPU tuning needs only the CPU intrinsics, so the package
    is entered without running its ``__init__`` and only those are imported.
    """
    import importlib

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    if device == "cuda":
        importlib.import_module(name)
        return
    import tvm.s_tir

    pkg = types.ModuleType(name)
    pkg.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    pkg.__package__ = name
    sys.modules[name] = pkg
    for sub in ("x86", "arm_cpu"):
        importlib.import_module(f"{name}.{sub}")
