"""Hand-written and library TensorIR schedule rules, per target family.

``rules_for(family)`` returns a family's rules (most specific first), ``layout_for(family)``
the graph layout they are written for, ``baseline_rules_for(family)`` TVM's own rules (the
plain path); ``apply_rules``
is the pass that applies them; ``kernel_rules`` reports which rule scheduled each kernel.
"""

from .registry import (UNSCHEDULED, apply_rules, baseline_rules_for, fuses_separable,
                       kernel_rules, layout_for, register, register_baseline, register_layout,
                       register_separable_fusion, rule_name, rules_for, separable_rule)

__all__ = ["UNSCHEDULED", "apply_rules", "baseline_rules_for", "fuses_separable",
           "kernel_rules", "layout_for", "register", "register_baseline", "register_layout",
           "register_separable_fusion", "rule_name", "rules_for", "separable_rule"]
