"""CUDA family: DLight's generic GPU rules (matmul, GEMV, reductions, a thread-binding
fallback), in DLight's own priority order. Every CUDA kernel leaves here bound to threads."""

from __future__ import annotations

from .registry import register


def _dlight(rule_cls_name: str):
    def make():
        from tvm.s_tir import dlight

        rule = getattr(dlight.gpu, rule_cls_name)()
        rule.name = f"dlight.gpu.{rule_cls_name}"
        return rule

    return make


for _name in ("Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback"):
    register("cuda", _dlight(_name))
