"""Our rules' own configurations, each timed: the first phase of a tuning run.

Every configuration a rule lists for a task (register tiles, chunk sizes, vector
widths) is built and timed as the build would run it. This covers what MetaSchedule
cannot measure itself: its runner needs weight packing to be a plain copy, and our
tilings that pad channels to whole register tiles pack with zero fill. Results go to
the log's manifest (``tasks[<workload>].configs``), next to MetaSchedule's records.
"""

from __future__ import annotations

import logging

from xcompile.schedules import config_json_key

from .baseline import build, prepacked, run

log = logging.getLogger(__name__)

# Each batch is timed after two timings of the task's default configuration and before
# a third. The first takes the batch's cold start (the runner's threads asleep while the
# batch was built: it read up to 6x the baseline for a 35 us kernel, every batch), which
# the batch's first configuration used to pay; the other two are what the batch's times
# are logged against (``relative_to_baseline``). Where the last reads more than
# SLOW_STRETCH times the baseline, the machine ran slow for a while and the batch is
# timed again (at most RETRIES times, built once; then the last timings stand). Each
# configuration is timed once: a stretch of a VM's host at half speed, seconds long, had
# mis-ranked whole batches. Measured on a 2-core Zen 4 (AMD EPYC, CPUID family 25 model
# 17): a top-up of legacy_xception's configurations logged the 147x147 128 -> 128 conv's
# 14 x 1 tiles at 7.97-8.19 ms, which the same runner timed at 3.6-3.8 ms when asked again
# (its default 14 x 2: 4.5 logged, 3.9-4.1 again); in the model those tiles ran 0.91x as
# long as the default.
SLOW_STRETCH = 1.25
RETRIES = 2


def relative_to_baseline(times: list, default_ms, baseline_ms) -> list:
    """``times`` of a batch scaled by ``baseline_ms / default_ms``, the default's time
    in the same batch: what they would read at the moment the baseline was timed.

    A log is timed over several runs (a top-up, a new default, a second batch size),
    minutes or days apart, and a VM's host drifts by more than the configurations
    differ: a top-up of the Zen 4 log timed legacy_xception's 19x19x728 GEMM's default
    at 15.25 ms and a new configuration at 14.89 (0.977x), which ranked it 26th of 69
    behind configurations an earlier, quicker run had timed at 14.21-14.44, though in
    the model it ran 0.978x as long as the default and the earlier ones 0.99x. Against
    the default beside it, each batch's times compare across runs; against the mean of
    its timings before and after the batch, one noisy timing moves the batch by half as
    much. Unscaled where the default's time is missing or failed."""
    if not default_ms or not baseline_ms:
        return list(times)
    scale = baseline_ms / default_ms
    return [None if ms is None else ms * scale for ms in times]


def candidates(task, rule, target, skip=(), limit: int | None = None
               ) -> list[tuple[str, object]]:
    """``(config key, module to time)`` for the configurations of ``rule`` on ``task``
    in ``configs`` order (the default first), leaving out the keys in ``skip``, at most
    ``limit`` of them. Only those are scheduled."""
    import tvm

    func = task.mod["main"]
    out = []
    for config in rule.all_configs(func, target):
        if limit is not None and len(out) >= limit:
            break
        key = config_json_key(rule.config_to_json(config))
        if key in skip:
            continue
        sch = rule.apply_config(func, target, config)
        if sch is None:
            continue
        kernel = prepacked(sch.mod["main"].with_attr("global_symbol", "main"))
        out.append((key, tvm.IRModule({"main": kernel})))
    return out


def run_grid(chosen, entries: dict, hashes: dict, rules_by_name: dict, target, device: str,
             builder, runner, budget: int, progress, per_task: int | None = None,
             batch: int = 32, save=lambda: None) -> int:
    """Time untimed configurations of the ``chosen`` tasks, at most ``budget`` of them
    and ``per_task`` per task: an equal share each first, then what is left to the
    heaviest tasks (calls x latency). ``save`` runs after every batch (the manifest
    holds these results: a kill loses at most the batch in flight). Returns how many
    were timed."""
    order = sorted(chosen, key=lambda t: -(entries[hashes[t.name]].get("baseline_ms") or 0)
                   * t.weight)
    per_task = per_task or budget
    spent = 0
    used = {t.name: 0 for t in order}  # timed in this run, per task
    share = max(budget // max(len(order), 1), 1)
    for limit in (share, budget):
        for task in order:
            left = min(limit, budget - spent, per_task - used[task.name])
            if left <= 0:
                continue
            n = _time_task(task, entries[hashes[task.name]], rules_by_name, target,
                           device, builder, runner, left, progress, batch, save)
            used[task.name] += n
            spent += n
    return spent


def _time_task(task, entry, rules_by_name, target, device, builder, runner, limit,
               progress, batch, save) -> int:
    rule = rules_by_name.get(entry.get("rule"))
    if rule is None or not hasattr(rule, "all_configs"):
        return 0
    timed = entry.setdefault("configs", {})
    todo = candidates(task, rule, target, skip=timed, limit=limit)
    reference = entry.get("baseline_ms")
    sentinel = candidates(task, rule, target, limit=1) if reference else []
    for i in range(0, len(todo), batch):
        part = todo[i:i + batch]
        # The default three times: a cold start, then before and after the batch.
        inputs = build(builder, [m for _, m in 2 * sentinel + part + sentinel], target,
                       device)
        defaults: list = []
        for _ in range(RETRIES + 1):
            times = run(runner, inputs)
            if not sentinel:
                break
            last = times[-1]
            defaults = [t for t in (times[1], last) if t is not None]
            times = times[2:-1]
            if last is not None and last <= SLOW_STRETCH * reference:
                break
            log.info("%s: the default read %s ms after a batch against its %.3f ms "
                     "baseline: the machine ran slow; timing the batch again", task.name,
                     "-" if last is None else f"{last:.3f}", reference)
        # Logged at the baseline's scale: each time over the default's in the same batch
        # (the mean of its timings before and after), times the baseline
        # (``relative_to_baseline``).
        times = relative_to_baseline(times, sum(defaults) / len(defaults) if defaults
                                     else None, reference)
        for (key, _), ms in zip(part, times):
            timed[key] = ms
        save()
        progress.update(task.name, times)
    return len(todo)
