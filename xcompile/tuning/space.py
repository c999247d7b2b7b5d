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


def tune_context(mod, target, space_generator, search_strategy, task_name: str,
                 num_threads: int):
    """MetaSchedule's ``TuneContext``, made as its ``__init__`` makes it except for that
    method's first statement, ``import tvm.s_tir.tensor_intrin`` (the whole package, 30
    s: see ``schedules.register_tensor_intrinsics``, which the driver calls instead)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule import _ffi_api
    from tvm.s_tir.meta_schedule.logging import get_logger, get_logging_func

    context = ms.TuneContext.__new__(ms.TuneContext)
    context.__init_handle_by_constructor__(
        _ffi_api.TuneContext, mod, target, space_generator, search_strategy, task_name,
        num_threads, -1, get_logging_func(get_logger("tvm.s_tir.meta_schedule")))
    _ffi_api.TuneContextInitialize(context)
    return context
