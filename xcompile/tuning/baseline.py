"""The untuned baseline of each task: our rules' default schedule, timed the way the
build runs it (weights the schedule packs are packed beforehand, not per call)."""

from __future__ import annotations

import logging

from xcompile.schedules import LAYOUT_REWRITE

log = logging.getLogger(__name__)


def _packs_weights(func) -> bool:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    return any(LAYOUT_REWRITE in sch.get(b).annotations
               for b in sch.get_child_blocks(sch.get_sblock("root")))


def prepacked(func):
    """``func`` as the build runs it: when its schedule packs weights, the kernel that
    reads the packed weights (the build splits the packing out and runs it once)."""
    import tvm
    from tvm import relax

    if not _packs_weights(func):
        return func
    bb = relax.BlockBuilder()
    *ins, out = func.params
    args = [relax.Var(f"a{i}", relax.TensorType([int(s) for s in p.shape], p.dtype))
            for i, p in enumerate(ins)]
    with bb.function("main", args):
        gv = bb.add_func(func, "kernel")
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType([int(s) for s in out.shape],
                                                              out.dtype)))
        bb.emit_func_output(y)
    split = relax.transform.SplitLayoutRewritePreproc()(bb.get())
    for gv, f in split.functions_items():
        if gv.name_hint == "kernel_prepacked" and isinstance(f, tvm.tirx.PrimFunc):
            return f.with_attr("global_symbol", "main")
    return func


def default_module(task, rule, target):
    """The workload module to time for ``rule``'s default schedule of ``task`` (the
    task itself, unscheduled, when ``rule`` is None or declines)."""
    import tvm

    sch = rule.apply(task.mod["main"], target, False) if rule is not None else None
    if sch is None:
        return task.mod
    return tvm.IRModule({"main": prepacked(sch.mod["main"].with_attr("global_symbol", "main"))})


def measure(builder, runner, mods: list, target, device: str) -> list[float | None]:
    """Mean milliseconds of each module's ``main`` on ``device`` (None where building or
    running it failed), through the tuner's own builder and runner."""
    return run(runner, build(builder, mods, target, device))


def build(builder, mods: list, target, device: str) -> list:
    """What ``run`` times: each module's runner input (None where it does not build),
    a module listed more than once built once. The built files stay until the builder
    closes, so the inputs can be run again."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    distinct = list({id(m): m for m in mods}.values())
    built = builder.build([BuilderInput(m, target) for m in distinct])
    inputs = {}
    for i, (m, b) in enumerate(zip(distinct, built)):
        if b.error_msg is None:
            inputs[id(m)] = RunnerInput(b.artifact_path, device, ArgInfo.from_prim_func(m["main"]))
        else:
            log.warning("baseline of kernel %d does not build: %s", i, b.error_msg[:200])
    return [inputs.get(id(m)) for m in mods]


def run(runner, inputs: list) -> list[float | None]:
    """Mean milliseconds of each of ``build``'s inputs, in order (None where it was not
    built or failed to run)."""
    order = [i for i, inp in enumerate(inputs) if inp is not None]
    out: list[float | None] = [None] * len(inputs)
    for i, fut in zip(order, runner.run([inputs[i] for i in order])):
        r = fut.result()
        if r.error_msg is None and r.run_secs:
            out[i] = sum(float(s) for s in r.run_secs) / len(r.run_secs) * 1e3
        else:
            log.warning("kernel %d failed to run: %s", i, (r.error_msg or "no time")[-200:])
    return out
