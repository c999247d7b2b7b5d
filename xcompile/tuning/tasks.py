"""Tuning tasks: the distinct kernels of a model as the build pipeline produces them
(after layout conversion, lowering and fusion), each with how many times ``main`` calls
it and what kind of computation it is."""

from __future__ import annotations

import re
from dataclasses import dataclass

from xcompile.errors import XCompileError


@dataclass
class Task:
    """One distinct kernel: ``mod`` is MetaSchedule's workload (``main`` = the kernel)."""

    name: str
    mod: object  # tvm.IRModule
    weight: int  # calls per inference
    kind: str  # schedules.analysis.classify: depthwise, pointwise, dense, separable...
    flops: float  # per call

    def row(self) -> str:
        return f"{self.name} ({self.kind}, x{self.weight}, {self.flops / 1e6:.1f} MFLOP)"


def extract(mod, target) -> list[Task]:
    """The distinct PrimFuncs of ``mod`` (a lowered Relax module), heaviest first."""
    from tvm.s_tir import meta_schedule as ms

    from xcompile.schedules.analysis import classify, work_flops

    tasks = []
    for t in ms.relax_integration.extract_tasks(mod, target):
        work = t.dispatched[0]
        tasks.append(Task(t.task_name, work, int(t.weight), classify(work["main"]),
                          work_flops(work["main"])))
    tasks.sort(key=lambda t: -t.flops * t.weight)
    return tasks


def select(tasks: list[Task], which: str) -> list[Task]:
    """``convs`` (every convolution: depthwise, pointwise, dense KxK and grouped, fused
    separable pairs and Winograd convolutions), ``separable`` (depthwise and pointwise convs, and fused
    pairs of them), ``all``, or the tasks whose name matches the regular expression
    ``which``; never empty."""
    from xcompile.schedules.analysis import (DENSE, DEPTHWISE, GROUPED, POINTWISE, SEPARABLE,
                                             WINOGRAD)

    kinds = {"separable": (DEPTHWISE, POINTWISE, SEPARABLE),
             "convs": (DEPTHWISE, POINTWISE, SEPARABLE, DENSE, GROUPED, WINOGRAD)}
    if which in kinds:
        chosen = [t for t in tasks if t.kind in kinds[which]]
    elif which == "all":
        chosen = list(tasks)
    else:
        try:
            pattern = re.compile(which)
        except re.error as e:
            raise XCompileError(f"--tasks: not a regular expression ({e}): {which}") from e
        chosen = [t for t in tasks if pattern.search(t.name)]
    if not chosen:
        raise XCompileError(f"--tasks {which}: no task of the model matches "
                            f"(it has: {', '.join(t.name for t in tasks[:6])}...)")
    return chosen
