"""Tuning tasks: the distinct kernels of a model as the build pipeline produces them
(after layout conversion, lowering and fusion), each with how many times ``main`` calls
it and what kind of computation it is."""

from __future__ import annotations

import re
from dataclasses import dataclass

from xcompile.errors import XCompileError

SEPARABLE = ("depthwise", "pointwise")


@dataclass
class Task:
    """One distinct kernel: ``mod`` is MetaSchedule's workload (``main`` = the kernel)."""

    name: str
    mod: object  # tvm.IRModule
    weight: int  # calls per inference
    kind: str  # depthwise | pointwise | conv | other
    flops: float  # per call

    def row(self) -> str:
        return f"{self.name} ({self.kind}, x{self.weight}, {self.flops / 1e6:.1f} MFLOP)"


def conv_kind(func) -> str:
    """Classify a kernel by its one reduction block over a 2-D window (any layout).

    A 2-D convolution reduces over (channels, KH, KW): pointwise when the window is 1x1,
    depthwise when each output channel reads a single input channel (that extent is 1)
    with a larger window, a dense conv otherwise. Kernels with another structure are
    ``other``."""
    from tvm import s_tir
    from tvm.tirx import IterVar

    sch = s_tir.Schedule(func)
    reductions = []
    for rv in sch.get_child_blocks(sch.get_sblock("root")):
        block = sch.get(rv)
        red = [int(iv.dom.extent) for iv in block.iter_vars if iv.iter_type == IterVar.CommReduce]
        if red:
            reductions.append((block, red))
    if len(reductions) != 1:
        return "other"
    block, red = reductions[0]
    spatial = sum(iv.iter_type == IterVar.DataPar for iv in block.iter_vars)
    if len(red) != 3 or spatial != 4 or len(block.reads) != 2:
        return "other"
    ones = red.count(1)
    if ones >= 2:
        return "pointwise"
    if ones == 1:
        return "depthwise"
    return "conv"


def extract(mod, target) -> list[Task]:
    """The distinct PrimFuncs of ``mod`` (a lowered Relax module), heaviest first."""
    from tvm.s_tir import analysis
    from tvm.s_tir import meta_schedule as ms

    tasks = []
    for t in ms.relax_integration.extract_tasks(mod, target):
        work = t.dispatched[0]
        tasks.append(Task(t.task_name, work, int(t.weight), conv_kind(work["main"]),
                          float(analysis.estimate_tir_flops(work))))
    tasks.sort(key=lambda t: -t.flops * t.weight)
    return tasks


def select(tasks: list[Task], which: str) -> list[Task]:
    """``separable`` (depthwise and pointwise convs), ``all``, or the tasks whose name
    matches the regular expression ``which``; never empty."""
    if which == "separable":
        chosen = [t for t in tasks if t.kind in SEPARABLE]
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
