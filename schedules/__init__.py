"""Hand-written and library TensorIR schedule rules, per target family.

``rules_for(family)`` returns a family's rules (most specific first), ``layout_for(family)``
the graph layout they are written for, ``winograd_rule(family)`` the rule of its
Winograd convolutions (when it has one), ``baseline_rules_for(family)`` TVM's own rules (the
plain path); ``apply_rules`` is the pass that applies them; ``kernel_rules`` reports which
rule scheduled each kernel, ``kernel_work`` its kind and FLOPs (``annotate_work``
records them before scheduling); ``finish_kernels`` is the pass that finishes
scheduled kernels (what their schedules mark), wherever they are compiled, and
``tir_pipeline`` the TIR pipeline they are compiled with. The families
register themselves with the registry when their modules are imported, below: a new
family is a new module and a line here.
"""

from .registry import (UNSCHEDULED, annotate_work, apply_rules, baseline_rules_for,
                       fuses_separable, kernel_rules, kernel_work, layout_for, register,
                       register_baseline, register_layout, register_separable_fusion,
                       register_winograd, rule_name, rules_by_name, rules_for,
                       separable_rule, tag_scheduled, winograd_rule, with_work_of,
                       without_work)
from .intrinsics import register_tensor_intrinsics
from .finish import finish_kernels, tir_pipeline
from .rule import LAYOUT_REWRITE, config_json_key

from . import cpu, cuda  # noqa: E402,F401  (the families: importing one registers its rules)

__all__ = ["LAYOUT_REWRITE", "UNSCHEDULED", "annotate_work", "apply_rules",
           "baseline_rules_for", "config_json_key", "finish_kernels", "fuses_separable", "kernel_rules",
           "kernel_work", "layout_for", "register", "register_baseline", "register_layout",
           "register_separable_fusion", "register_tensor_intrinsics", "register_winograd",
           "rule_name", "rules_by_name", "rules_for", "separable_rule", "tag_scheduled",
           "tir_pipeline", "winograd_rule", "with_work_of", "without_work"]
