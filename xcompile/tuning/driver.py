"""``xcompile tune``: MetaSchedule over a model's kernels, logged per target.

Flow: import the model and lower it as a build would -> extract the distinct kernels
(tasks) -> time our default schedule of every kernel (the baseline, and the model
estimate's starting point) -> MetaSchedule's evolutionary search over each chosen task's
space (our rule's configurations plus MetaSchedule's own), trials shared by our task
scheduler by the tasks' share of the model's time -> the JSON database, the
manifest and the convergence plot in the log folder. A rerun resumes: trials already in
the log count against the budget, and the search starts from the logged best.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from xcompile import frontend, pipeline, schedules, signals, targets
from xcompile.errors import XCompileError, last_line
from xcompile.files import sha256_file
from xcompile.models import BuiltinSpec, resolve_model
from xcompile.versions import versions

from . import baseline, grid, log_folder, measure, progress, scheduler, space, tasks
from .apply import stale_default, workload_hash

log = logging.getLogger(__name__)

DEFAULT_LOG_DIR = "tuning-logs"
TRIALS_PER_ITER = 32  # candidates measured per search round of a task


@dataclass(frozen=True)
class TuneOptions:
    """A tuning run, resolved."""

    model: str
    builtin: BuiltinSpec | None
    target: str
    batch: int | None
    trials: int  # total measured trials the log should hold for the chosen tasks
    trials_per_task: int | None
    tasks: str  # convs | separable | all | a regular expression over task names
    log_dir: str
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    search: bool = True  # also MetaSchedule's own space, not only our configurations

    def describe(self) -> str:
        where = f"rpc={self.rpc_tracker}/{self.rpc_key}" if self.rpc_tracker else "local"
        return (f"model={self.model} target={self.target} batch={self.batch or 'from model'} "
                f"trials={self.trials} trials_per_task={self.trials_per_task or '-'} "
                f"tasks={self.tasks} log_dir={self.log_dir} measure={where} "
                f"search={'ours+metaschedule' if self.search else 'ours'}")


def resolve_tune_options(model: str | None = None, target: str = targets.HOST,
                         batch: int | None = None, trials: int = 600,
                         trials_per_task: int | None = None, tasks: str = "convs",
                         log_dir: str = DEFAULT_LOG_DIR, rpc_tracker: str | None = None,
                         rpc_key: str | None = None, search: bool = True) -> TuneOptions:
    """Check everything that can be checked before any work is done."""
    if trials < 1:
        raise XCompileError(f"--trials must be >= 1, got {trials}")
    if trials_per_task is not None and trials_per_task < 1:
        raise XCompileError(f"--trials-per-task must be >= 1, got {trials_per_task}")
    if bool(rpc_tracker) != bool(rpc_key):
        raise XCompileError("--rpc-tracker and --rpc-key go together")
    if rpc_tracker:
        try:
            host, port = measure.parse_tracker(rpc_tracker)
        except ValueError as e:
            raise XCompileError(str(e)) from e
        measure.check_tracker(host, port, rpc_key)
    preset = targets.resolve(target)
    if not rpc_tracker:
        _check_local_device(preset)
    log_folder.check_folder(Path(log_dir) / preset.name)
    model_path, builtin = resolve_model(model, batch)
    return TuneOptions(model_path, builtin, target, batch, trials, trials_per_task, tasks,
                       log_dir, rpc_tracker, rpc_key, search)


def _check_local_device(preset) -> None:
    """Candidates are timed on this machine: it must be able to run them."""
    if not preset.device_kind.is_host:
        from xcompile.runtime import device_available

        if not device_available(preset.device):
            raise XCompileError(f"{preset.name} tuning times candidates on a {preset.device} "
                                "device and this machine has none; tune on such a machine or "
                                "give --rpc-tracker/--rpc-key")
    elif preset.arch != targets.detect_arch():
        raise XCompileError(f"{preset.name} code does not run on this {targets.detect_arch()} "
                            "machine; measure on the device with --rpc-tracker/--rpc-key")
    elif not targets.runs_here(preset):
        raise XCompileError(f"this CPU lacks instructions {preset.name} code uses; tune "
                            "--target host, or measure on such a CPU through --rpc-tracker")


def _new_manifest(preset, key: str, timing: str, cpu: str | None) -> dict:
    return {"format": log_folder.FORMAT, "target": {"name": preset.name, "tvm": json.loads(key)},
            "timing": timing, **({"cpu": cpu} if cpu else {}),
            "versions": versions(), "models": {}, "tasks": {}, "trials": 0,
            "wall_seconds": 0.0, "runs": []}


def _evaluator(preset, imported):
    """How this run times candidates: on CPUs, weights as far back in the caches as in
    the model (see ``measure.Evaluator``)."""
    if preset.device_kind.is_host:
        return measure.Evaluator(repeat=measure.CPU_REPEAT,
                                 rotate_bytes=_weight_bytes(imported))
    return measure.Evaluator()


def tune(opts: TuneOptions) -> dict:
    """Tune ``opts.model`` for ``opts.target``; returns the log's manifest."""
    started = time.perf_counter()
    log.info("tune options: %s", opts.describe())
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # MetaSchedule logs a full task table after every batch; our progress line
        # says what matters. Its per-task logs still go to <log>/logs.
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    preset = targets.resolve(opts.target)
    if opts.rpc_tracker:
        targets.check_toolchain(preset)
    target = preset.tvm_target()
    key = log_folder.target_key(target)
    imported = frontend.import_onnx(frontend.load_onnx(opts.model), batch=opts.batch,
                                    source=opts.model)
    lowered, _ = pipeline.lower(imported.mod, preset)
    all_tasks = tasks.extract(lowered, target)
    chosen = tasks.select(all_tasks, opts.tasks)
    hashes = {t.name: workload_hash(t.mod["main"]) for t in all_tasks}

    folder = log_folder.check_folder(Path(opts.log_dir) / preset.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise XCompileError(f"cannot create the tuning log {folder}: {e.strerror}") from e
    with log_folder.locked(folder, exclusive=True):
        return _tune_locked(opts, preset, target, key, imported, all_tasks, chosen, hashes,
                            folder, started)


def _tune_locked(opts, preset, target, key, imported, all_tasks, chosen, hashes, folder,
                 started) -> dict:
    """``tune``, holding the log folder's exclusive lock."""
    from tvm.s_tir import meta_schedule as ms

    manifest = log_folder.read_manifest(folder)
    log_folder.check_target(folder, manifest, key)
    contents = log_folder.read_log(folder, key)
    log_folder.set_aside_rejected(folder, contents)
    evaluator = _evaluator(preset, imported)
    timing = measure.timing(evaluator, remote=bool(opts.rpc_tracker))
    timed = (manifest or {}).get("timing", log_folder.TIMING_WARM)
    if manifest is not None and timed != timing:
        raise XCompileError(f"tuning log {folder} was timed {timed}, this run times "
                            f"{timing}: their times do not compare; tune into another "
                            "--log-dir")
    # The CPU model the candidates run on: what is fastest on one is not on another of
    # the same ISA, so a log holds one model's times (builds pick the shipped log by it).
    cpu = targets.host_cpu() if preset.device_kind.is_host and not opts.rpc_tracker else None
    if manifest is not None and manifest.get("cpu") != cpu:
        theirs = manifest.get("cpu") or "a CPU it does not name"
        raise XCompileError(f"tuning log {folder} was timed on {theirs}, this run times on "
                            f"{cpu or 'a remote device'}: their times do not compare; tune "
                            "into another --log-dir")
    manifest = manifest or _new_manifest(preset, key, timing, cpu)
    model_hash = sha256_file(opts.model)
    manifest["models"][model_hash] = {
        "path": str(Path(opts.model).resolve()), "batch": opts.batch,
        "builtin": opts.builtin.to_json() if opts.builtin else None}

    schedules.register_tensor_intrinsics(preset.device)
    rules = schedules.rules_for(preset.family)
    cores = int(target.attrs.get("num-cores", targets.host_cores()))
    builder = measure.make_builder(target, cores, preset.cross_cc if opts.rpc_tracker else None)
    runner = (measure.rpc_runner(opts.rpc_tracker, opts.rpc_key, evaluator) if opts.rpc_tracker
              else measure.make_local_runner(cores, preset.device, evaluator))
    interrupted = False
    try:
        entries = manifest["tasks"]
        by_name = schedules.rules_by_name(rules)
        _baselines(entries, all_tasks, hashes, rules, target, preset.device, builder, runner)
        log_folder.write_manifest(folder, manifest)
        records = contents.best()
        done = {t.name: len(records.get(hashes[t.name], []))
                + len(entries[hashes[t.name]].get("configs", {})) for t in chosen}
        best = _best_ms(entries, all_tasks, hashes, records)
        run_progress = progress.Progress(best, {t.name: t.weight for t in all_tasks},
                                 sum(done.values()), opts.trials, folder / log_folder.CURVE_CSV,
                                 float(manifest.get("wall_seconds", 0.0)))
        remaining = opts.trials - sum(done.values())
        if remaining > 0:
            # Our configurations first (half the budget when MetaSchedule's space
            # follows): cheap to build, and the search then starts from their best.
            share = remaining // 2 if opts.search else remaining
            remaining -= grid.run_grid(chosen, entries, hashes, by_name, target,
                                       preset.device, builder, runner, share, run_progress,
                                       per_task=opts.trials_per_task or share,
                                       save=lambda: log_folder.write_manifest(folder, manifest))
        cap = opts.trials_per_task or opts.trials  # per task, in this run
        # (Tasks whose rule has no MetaSchedule space: our configurations cover them.)
        todo = _search_tasks([t for t in chosen if getattr(
            by_name.get(entries[hashes[t.name]].get("rule")), "metaschedule_space", True)],
            run_progress.best_ms, remaining)
        if remaining <= 0 or not opts.search or not todo:
            log.info("%d trials in the log for these tasks; no search to run",
                     run_progress.trials)
        else:
            log.info("MetaSchedule search over %d tasks, %d trials", len(todo), remaining)
            contexts = [_context(t, by_name.get(entries[hashes[t.name]].get("rule")), target)
                        for t in todo]
            try:
                database = ms.database.JSONDatabase(
                    path_workload=str(folder / log_folder.WORKLOADS),
                    path_tuning_record=str(folder / log_folder.RECORDS), allow_missing=True)
            except Exception as e:
                raise XCompileError(f"tuning log {folder} is damaged: "
                                    f"{last_line(e)[:200]}") from e
            callbacks = [ms.measure_callback.AddToDatabase(),
                         ms.measure_callback.RemoveBuildArtifact(),
                         ms.measure_callback.UpdateCostModel(),
                         progress.callback(run_progress, [t.name for t in todo])]
            per_iter = TRIALS_PER_ITER
            if remaining < per_iter * len(todo):  # a small budget: every task gets some
                per_iter = cap = min(cap, -(-remaining // len(todo)))
            # A signal ends the search at the next batch (the scheduler polls it), not
            # at an arbitrary point of a callback inside TVM's C++ loop.
            with signals.deferred():
                ms.tune_tasks(tasks=contexts, task_weights=[float(t.weight) for t in todo],
                              work_dir=str(folder), max_trials_global=remaining,
                              max_trials_per_task=min(cap, remaining),
                              num_trials_per_iter=per_iter, builder=builder,
                              runner=runner, database=database, cost_model="xgb",
                              measure_callbacks=callbacks,
                              task_scheduler=scheduler.joined_scheduler(
                                  [float(t.weight) for t in todo],
                                  lambda i: run_progress.best_ms.get(todo[i].name, 1.0)))
    except KeyboardInterrupt:
        interrupted = True
    except Exception:
        # An interrupt inside a callback from TVM comes back as TVM's own error.
        if signals.received() is None:
            raise
        interrupted = True
    finally:
        log.info("time spent: building %.1f s, measuring %.1f s, in all %.1f s",
                 builder.seconds, getattr(runner, "seconds", float("nan")),
                 time.perf_counter() - started)
        builder.close()
        if hasattr(runner, "close"):
            runner.close()
    contents = log_folder.read_log(folder, key)
    _finish_manifest(manifest, all_tasks, chosen, hashes, contents, started, opts,
                     model_hash)
    log_folder.write_manifest(folder, manifest)
    if (folder / log_folder.CURVE_CSV).is_file():
        progress.plot(folder / log_folder.CURVE_CSV, folder / log_folder.CURVE_PNG,
                  f"{Path(opts.model).name} on {preset.name}: estimated latency vs trials")
    if interrupted or signals.received() is not None:
        raise signals.interrupted(f"interrupted; the log {folder} keeps {manifest['trials']} "
                                  "trials; run the same command again to resume")
    return manifest


def _weight_bytes(imported) -> int:
    """The bytes of the model's weights (what one inference reads between two calls of
    a kernel)."""
    import math

    import numpy as np

    return sum(math.prod(int(d) for d in p.shape) * np.dtype(str(p.dtype)).itemsize
               for p in imported.params)


def _search_tasks(chosen: list, best_ms: dict[str, float], budget: int) -> list:
    """The tasks MetaSchedule's search gets: those with the largest share of the model's
    time (calls x best latency), as many as the budget gives a round of
    ``TRIALS_PER_ITER`` trials each (at least two). Each task searched costs a round of
    evolutionary search and a cost-model update per batch: with all 24 separable tasks of
    Xception and 228 trials, batches of ~10 ran ~100 trials a minute here."""
    ranked = sorted(chosen, key=lambda t: -t.weight * best_ms.get(t.name, 0.0))
    return ranked[:max(2, budget // TRIALS_PER_ITER)]


def _context(task, rule, target):
    from tvm.s_tir import meta_schedule as ms

    return space.tune_context(
        task.mod, target, space.design_space(rule, target),
        ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=32,
                                              genetic_num_iters=2),
        task.name, int(target.attrs.get("num-cores", 1)))


def _baselines(entries, all_tasks, hashes, rules, target, device, builder, runner) -> None:
    """Time our default schedule of every task not timed before (all of the model's
    kernels: the model estimate needs them), and again where the rule's default is no
    longer the one the log timed (``stale_default``: the entry keeps its other results)."""
    first = {t.name: space.first_rule(rules, t.mod["main"], target) for t in all_tasks}
    missing = [t for t in all_tasks
               if entries.get(hashes[t.name], {}).get("baseline_ms") is None
               or stale_default(entries[hashes[t.name]], first[t.name], t.mod["main"], target)]
    if not missing:
        return
    log.info("timing our default schedules of %d kernels", len(missing))
    plans = []  # (rule name, config key or None, module)
    for t in missing:
        rule = first[t.name]
        name = schedules.rule_name(rule) if rule is not None else None
        found = grid.candidates(t, rule, target, limit=1) if hasattr(rule, "all_configs") else []
        if found:
            plans.append((name, *found[0]))
        else:
            plans.append((name, None, baseline.default_module(t, rule, target)))
    times = baseline.measure(builder, runner, [p[2] for p in plans], target, device)
    for t, (rule, key, _), ms_ in zip(missing, plans, times):
        entry = entries.setdefault(hashes[t.name], {})
        entry.update({"name": t.name, "kind": t.kind, "calls": t.weight, "flops": t.flops,
                      "rule": rule, "baseline_ms": ms_})
        if key is not None:
            entry["default_config"] = key
            entry.setdefault("configs", {})[key] = ms_


def _best_ms(entries, all_tasks, hashes, records) -> dict[str, float]:
    """Task name -> the best latency known: our configurations' or the log's records'
    (``records``: workload hash -> records, fastest first)."""
    out = {}
    for t in all_tasks:
        h = hashes[t.name]
        entry = entries.get(h, {})
        cands = [entry.get("baseline_ms"), *entry.get("configs", {}).values()]
        if records.get(h):
            cands.append(records[h][0].seconds * 1e3)
        cands = [c for c in cands if c is not None]
        if cands:
            out[t.name] = min(cands)
    return out


def _finish_manifest(manifest, all_tasks, chosen, hashes, contents, started, opts,
                     model_hash: str) -> None:
    records = contents.best()
    names = {t.name for t in chosen}
    model = [model_hash, opts.batch]  # the model (and batch) each task came from
    for t in all_tasks:
        entry = manifest["tasks"].setdefault(hashes[t.name], {"name": t.name})
        if model not in entry.setdefault("models", []):
            entry["models"].append(model)
        # Calls per inference, per model: a batch-8 model whose slices run the batch-1
        # kernels calls each 8 times as often as the batch-1 model, on one workload.
        entry["calls"] = t.weight
        entry.setdefault("calls_by_model", {})[json.dumps(model)] = t.weight
        recs = records.get(hashes[t.name], [])
        timed = [v for v in entry.get("configs", {}).values() if v is not None]
        entry["trials"] = len(recs) + len(entry.get("configs", {}))
        best = [*timed, *([recs[0].seconds * 1e3] if recs else [])]
        entry["best_ms"] = min(best) if best else None
        entry["tuned"] = entry.get("tuned", False) or t.name in names
    # Tasks an earlier lowering of this model made and this one does not (a compiler
    # change, such as the batch tiling, split or renamed its kernels) no longer count
    # toward its estimate.
    current = {hashes[t.name] for t in all_tasks}
    for h, entry in manifest["tasks"].items():
        if h not in current and model in entry.get("models", []):
            entry["models"].remove(model)
            entry.get("calls_by_model", {}).pop(json.dumps(model), None)
    seconds = time.perf_counter() - started
    manifest["trials"] = (sum(len(r) for r in records.values())
                          + sum(len(e.get("configs", {})) for e in manifest["tasks"].values()))
    manifest["wall_seconds"] = round(float(manifest.get("wall_seconds", 0.0)) + seconds, 1)
    manifest["runs"].append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "seconds": round(seconds, 1), "options": opts.describe()})
    manifest["versions"] = versions()
