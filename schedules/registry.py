"""Schedule rules per target family, and the pass that applies them.

A rule is a ``tvm.s_tir.dlight.ScheduleRule``: given a PrimFunc it inspects the function's
structure and returns a schedule, or ``None`` when the pattern does not match. Each family
lists its rules from the most specific to a generic fallback; the first that matches wins.
The pass records the winning rule's name on the function (``xcompile.rule``) so that the
build manifest can say which rule produced each kernel.
"""

from __future__ import annotations

import logging

from xcompile.errors import first_line
from collections.abc import Callable

log = logging.getLogger(__name__)

RULE_ATTR = "xcompile.rule"
UNSCHEDULED = "unscheduled"
# What a kernel computes, recorded before it is scheduled (a schedule pads and packs):
# its kind (analysis.classify) and its floating-point operations per call.
KIND_ATTR = "xcompile.kind"
FLOPS_ATTR = "xcompile.flops"

# family -> list of factories, in priority order; filled by the family modules.
_FACTORIES: dict[str, list[Callable[[], object]]] = {}
# family -> factories of TVM's own rules, the plain path (`--no-custom-schedules`).
_BASELINE: dict[str, list[Callable[[], object]]] = {}
# family -> factory of its rule for fused depthwise -> pointwise kernels.
_SEPARABLE_FUSION: dict[str, Callable[[], object]] = {}
# family -> factory of its rule for Winograd convolutions (``xcompile.winograd``).
_WINOGRAD: dict[str, Callable[[], object]] = {}
# family -> desired layouts for relax.transform.ConvertLayout (absent: keep the model's).
_LAYOUTS: dict[str, dict[str, list[str]]] = {}


def register(family: str, factory: Callable[[], object]) -> None:
    """Append a rule factory to ``family``'s list (call order is priority order)."""
    _FACTORIES.setdefault(family, []).append(factory)


def register_baseline(family: str, factory: Callable[[], object]) -> None:
    """Append a rule factory to ``family``'s plain path: TVM's own rules, used when our
    rules are turned off (a family whose kernels must be scheduled to compile needs one)."""
    _BASELINE.setdefault(family, []).append(factory)


def register_layout(family: str, layouts: dict[str, list[str]]) -> None:
    """Set the graph layout ``family``'s rules are written for (ConvertLayout's format)."""
    _LAYOUTS[family] = layouts


def register_separable_fusion(family: str, factory: Callable[[], object]) -> None:
    """Declare ``family``'s rule for fused separable convolutions (also one of its
    rules), so the pipeline may fuse the depthwise -> pointwise pairs it schedules."""
    _SEPARABLE_FUSION[family] = factory


def fuses_separable(family: str) -> bool:
    """Whether ``family`` schedules fused separable convolutions."""
    return family in _SEPARABLE_FUSION


def separable_rule(family: str):
    """A fresh instance of ``family``'s fused-separable rule (see ``fuses_separable``)."""
    return _SEPARABLE_FUSION[family]()


def register_winograd(family: str, factory: Callable[[], object]) -> None:
    """Declare ``family``'s rule for Winograd convolutions (also one of its rules), so
    the pipeline computes the 3x3 convs it takes that way."""
    _WINOGRAD[family] = factory


def winograd_rule(family: str):
    """A fresh instance of ``family``'s Winograd rule, or None (the family has none)."""
    make = _WINOGRAD.get(family)
    return make() if make else None


def layout_for(family: str) -> dict[str, list[str]] | None:
    """The graph layout ``family``'s rules expect, or None to keep the model's layout."""
    return _LAYOUTS.get(family)


def rules_for(family: str) -> list:
    """Fresh instances of ``family``'s rules, most specific first (may be empty)."""
    return [make() for make in _FACTORIES.get(family, [])]


def baseline_rules_for(family: str) -> list:
    """Fresh instances of ``family``'s plain-path rules (empty: TVM's naive lowering)."""
    return [make() for make in _BASELINE.get(family, [])]


def rule_name(rule) -> str:
    """The name a manifest shows for ``rule``."""
    return getattr(rule, "name", None) or type(rule).__name__


def rules_by_name(rules: list) -> dict:
    """Name -> rule for ``rules``, under their current names and their earlier ones (a
    tuning log records the rule that produced each result by name)."""
    out = {}
    for rule in rules:
        for name in (*getattr(rule, "aliases", ()), rule_name(rule)):
            out[name] = rule
    return out


def apply_rules(rules: list):
    """A module pass that schedules every unscheduled PrimFunc with the first matching rule
    and tags it with the rule's name; functions no rule matches are left as they are."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="xcompile.ApplyScheduleRules")
    def _pass(mod, _ctx):
        target = tvm.target.Target.current(allow_none=False)
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled"):
                continue
            for rule in rules:
                try:
                    sch = rule.apply(func, target, False)
                except Exception as e:  # a rule's bug must not break the build
                    log.warning("%s failed on %s (%s: %s); trying the next rule",
                                rule_name(rule), gvar.name_hint, type(e).__name__,
                                first_line(e))
                    continue
                if sch is None:
                    continue
                if isinstance(sch, list):  # tunable rules may return a space; take the first
                    sch = sch[0]
                updates[gvar] = tag_scheduled(sch.mod["main"], rule_name(rule))
                log.debug("%s: %s", gvar.name_hint, rule_name(rule))
                break
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return _pass


def annotate_work():
    """A module pass recording on every PrimFunc its kind and FLOPs per call (what
    ``kernel_work`` reports; a profile divides the FLOPs by the kernel's time)."""
    import tvm
    from tvm import tirx

    from .analysis import classify, work_flops

    @tvm.transform.module_pass(opt_level=0, name="xcompile.AnnotateWork")
    def _pass(mod, _ctx):
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and FLOPS_ATTR not in (func.attrs or {}):
                flops = work_flops(func)
                mod[gvar] = func.with_attr(KIND_ATTR, classify(func)).with_attr(
                    FLOPS_ATTR, tirx.FloatImm("float64", flops))
        return mod

    return _pass


def without_work(func):
    """``func`` without ``annotate_work``'s attributes: the function as the tuner saw it
    (a tuning record's workload hash is of the bare function)."""
    for attr in (KIND_ATTR, FLOPS_ATTR):
        if func.attrs is not None and attr in func.attrs:
            func = func.without_attr(attr)
    return func


def with_work_of(func, annotated):
    """``func`` carrying ``annotated``'s kind and FLOPs (a tuned schedule of it)."""
    for attr in (KIND_ATTR, FLOPS_ATTR):
        if annotated.attrs is not None and attr in annotated.attrs:
            func = func.with_attr(attr, annotated.attrs[attr])
    return func


def kernel_work(mod) -> dict[str, tuple[str, float]]:
    """Kernel name -> (kind, FLOPs per call) as ``annotate_work`` recorded them."""
    from tvm import tirx

    out = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and FLOPS_ATTR in (func.attrs or {}):
            out[gvar.name_hint] = (str(func.attrs[KIND_ATTR]), float(func.attrs[FLOPS_ATTR]))
    return out


def tag_scheduled(func, rule: str):
    """``func`` marked as scheduled (later passes leave it alone), by the rule ``rule``
    (what ``kernel_rules`` reports)."""
    return func.with_attr("tirx.is_scheduled", True).with_attr(RULE_ATTR, rule)


def kernel_rules(mod) -> dict[str, str]:
    """Kernel name -> the rule that scheduled it (``unscheduled`` when none did)."""
    from tvm import tirx

    return {gvar.name_hint: str(func.attrs.get(RULE_ATTR, UNSCHEDULED))
            for gvar, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)}
