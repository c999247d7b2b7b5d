"""Validating a tuning log inside the whole model: a result applies only when the model
gets faster with it.

A kernel timed alone, even with its weights evicted before every call, is not the kernel
in the model: the kernels around it leave the caches, the memory bus and the cores'
clocks in another state. ``validate`` builds the model without the log (the default
build: the shipped log of the target where there is one, ``apply.default_log``, under
which builds apply a user's log), with all of it,
and with every workload's second-fastest result instead of its fastest, times every
kernel inside the three models (interleaved rounds, medians), keeps for each workload
whichever of its two results ran faster there (``choice``: the rank) and rejects the
workload when neither made its kernels faster, then builds with what is left and keeps
it only when the whole model is faster than without the log, timed end to end (the
median of paired rounds' ratios, ``paired_ratio``).
The verdict goes into the log folder (``validation.json``), stamped with the log it
judged; builds apply only the accepted results while the log is unchanged.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from xcompile import bench, build, peers, reference, runtime, targets
from xcompile.files import sha256_file
from xcompile.tuning import TuneOptions, log_folder
from xcompile.tuning.workers import WorkerPool

log = logging.getLogger(__name__)

# A kernel's result is kept when the kernel is at least this much faster in the model
# (its in-model medians move by ~1% between identical builds here).
KERNEL_GAIN = 0.98
# The validated build is kept when the whole model is at least this much faster.
MODEL_GAIN = 0.995
ROUNDS = 7
# The end-to-end check runs the two builds in as many interleaved rounds as take about
# MODEL_CHECK_S seconds, at least 2 x ``rounds``, at most MODEL_MAX_ROUNDS, and compares
# the median of each round's ratio (see ``paired_ratio``).
MODEL_CHECK_S = 15.0
MODEL_MAX_ROUNDS = 100


def _kernel(name: str) -> str:
    """The name a kernel had when the log was applied: the build renames kernels whose
    packed weights it splits out (Relax's SplitLayoutRewritePreproc adds
    ``_prepacked``)."""
    return name.removesuffix("_prepacked")


def decide(untuned: dict[str, float], tuned: dict[str, float],
           workloads: dict[str, str]) -> tuple[list[str], list[dict]]:
    """Which workloads to reject: those whose kernels, summed over the model, did not get
    at least ``KERNEL_GAIN`` faster. ``untuned``/``tuned``: kernel -> in-model ms per run;
    ``workloads``: tuned kernel -> its workload hash. Returns (rejected hashes, one row
    per workload). (``choose`` with the fastest results alone.)"""
    rejected, _, rows = choose(untuned, [(tuned, workloads)])
    return rejected, rows


def choose(untuned: dict[str, float], variants: list[tuple[dict, dict]]
           ) -> tuple[list[str], dict[str, int], list[dict]]:
    """Per workload, the result to apply: ``variants[r - 1]`` is the build applying every
    workload's rank-``r`` result (1: the fastest alone), as (kernel -> in-model ms per
    run, tuned kernel -> workload hash). The rank whose kernels, summed over the model,
    ran fastest is chosen when it is at least ``KERNEL_GAIN`` faster than the untuned
    kernels; otherwise the workload is rejected. Returns (rejected hashes, workload ->
    chosen rank other than 1, one row per workload)."""
    untuned = {_kernel(k): v for k, v in untuned.items()}
    per: dict[str, dict] = {}
    for rank, (ms, workloads) in enumerate(variants, 1):
        ms = {_kernel(k): v for k, v in ms.items()}
        sums: dict[str, list] = {}
        for kernel, h in workloads.items():
            if kernel not in untuned or kernel not in ms:
                continue  # not called (or renamed): no evidence either way
            acc = sums.setdefault(h, [[], 0.0, 0.0])
            acc[0].append(kernel)
            acc[1] += untuned[kernel]
            acc[2] += ms[kernel]
        for h, (kernels, base, tuned) in sums.items():
            row = per.setdefault(h, {"workload": h, "kernels": kernels, "untuned_ms": base,
                                     "tuned_ms": tuned, "rank": rank})
            if rank > 1 and kernels == row["kernels"] and tuned < row["tuned_ms"]:
                row["tuned_ms"], row["rank"] = tuned, rank
    rows = []
    for row in per.values():
        row["kept"] = row["tuned_ms"] <= KERNEL_GAIN * row["untuned_ms"]
        rows.append(row)
    rows.sort(key=lambda r: r["tuned_ms"] - r["untuned_ms"])
    rejected = sorted(r["workload"] for r in rows if not r["kept"])
    choice = {r["workload"]: r["rank"] for r in rows if r["kept"] and r["rank"] > 1}
    return rejected, choice, rows


def _median_kernel_ms(predictors: dict, x, rounds: int) -> dict[str, dict[str, float]]:
    """Per build, kernel -> median in-model ms per run over interleaved rounds."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in predictors}
    inputs = {name: p.to_device(x) for name, p in predictors.items()}
    for i in range(rounds):
        for name in bench.rotated(list(predictors), i):
            for kernel, (_calls, seconds) in bench.kernel_times(
                    predictors[name], inputs[name], repeat=2).items():
                samples[name].setdefault(kernel, []).append(seconds * 1e3)
    return {name: {k: statistics.median(v) for k, v in s.items()}
            for name, s in samples.items()}


def paired_ratio(base: list[float], other: list[float]) -> float:
    """The median over rounds of ``other``'s time over ``base``'s in the same round. A
    shared host drifts by more than a tuned log gains (the same build ran 79-90 ms in
    medians minutes apart on the Zen 4), and a drift moves both runs of a round alike:
    the ratio of the two medians let a log that ran level with the default build, 1.003x
    by this measure over 100 rounds, pass as 0.982x in 14."""
    return statistics.median(o / b for b, o in zip(base, other))


def _model_ms(predictors: dict, x, rounds: int) -> tuple[dict[str, list[float]], int]:
    """Per build, its end-to-end ms in each of the interleaved rounds (order rotating), and
    the rounds: as many as take about MODEL_CHECK_S (from a first run of each), between
    2 x ``rounds`` and MODEL_MAX_ROUNDS. Run back to back as a server runs them: a 50 ms
    pause between runs, as ``bench`` makes for its peers, added 9% to every run here (not
    TVM's thread pool going to sleep: ``TVM_THREAD_POOL_SPIN_COUNT`` did not change it),
    and both builds share this process, so no spinning peer needs the pause."""
    backends = [peers.ours(p, x, name) for name, p in predictors.items()]
    first = sum(b.run() for b in backends) / 1e3  # (also the warm-up)
    n = int(min(MODEL_MAX_ROUNDS, max(2 * rounds, MODEL_CHECK_S / max(first, 1e-6))))
    timings = bench.interleaved(backends, n, warmup=0, settle_s=0.0)
    return {name: t.samples_ms for name, t in timings.items()}, n


def _build(opts: TuneOptions, out: Path, tuning_log: str) -> dict:
    build_opts = build.resolve_options(model=opts.model, target=opts.target, batch=opts.batch,
                                       output=str(out), tuning_log=tuning_log)
    return build.build(build_opts)


def _build_in_worker(opts: TuneOptions, out: Path, tuning_log: str) -> dict:
    """``_build`` in a worker process, whose log lines (TVM's worker sets up its own
    logging format) would interleave with this process's: warnings only."""
    logging.getLogger("xcompile").setLevel(logging.WARNING)
    return _build(opts, out, tuning_log)


def _baseline_log(opts: TuneOptions, folder: Path) -> Path | None:
    """The log the build without ``folder`` applies, the default build's
    (``apply.default_log``): None where there is none, or where it is ``folder``
    itself."""
    from xcompile.tuning.apply import default_log

    return default_log(targets.resolve(opts.target), under=folder)


def _build_both(opts: TuneOptions, tmp: Path, folder: Path) -> dict:
    """Build the model without the log (``tmp/untuned``, ``_baseline_log``) and with
    it (``tmp/tuned``); returns the tuned build's manifest. With more than one core the untuned build runs
    in a worker process beside this one: a build is mostly single-threaded LLVM code
    generation and weight packing (an Xception build: 15.2 s of CPU in 16.5 s), so side
    by side the pair took 13 s instead of 28 on a 2-core Emerald Rapids. Should the
    worker fail, the build is repeated here, where its error is the build's own."""
    shipped = _baseline_log(opts, folder)
    baseline = str(shipped) if shipped is not None else "none"
    if targets.host_cores() < 2:
        _build(opts, tmp / "untuned", baseline)
        return _build(opts, tmp / "tuned", str(folder))
    pool = WorkerPool(1)
    try:
        untuned = pool.submit(_build_in_worker, opts, tmp / "untuned", baseline)
        manifest = _build(opts, tmp / "tuned", str(folder))
        ok, why = pool.outcome(untuned)
    finally:
        pool.close()
    if not ok:
        log.debug("the untuned build failed in its worker (%s); building it here", why)
        _build(opts, tmp / "untuned", baseline)
    return manifest


def validate(opts: TuneOptions, rounds: int = ROUNDS) -> dict | None:
    """Judge the log ``tune`` wrote for ``opts`` inside the whole model and record the
    verdict in the log folder; returns it (None when the log's device is not this
    machine's: candidates measured over RPC are judged on their device by a build
    there)."""
    preset = targets.resolve(opts.target)
    if opts.rpc_tracker:
        log.info("the log was measured over RPC: not validated on this machine")
        return None
    folder = Path(opts.log_dir) / preset.name
    started = time.perf_counter()
    model_hash = sha256_file(opts.model)
    previous = log_folder.previous_validation(folder)
    # Any earlier verdict judged an older log: builds now apply every record until
    # this one is written.
    (folder / log_folder.VALIDATION).unlink(missing_ok=True)
    # The log judged is the log as it is now: a record appended while we judge (by
    # another tune) must not pass as validated.
    stamp = log_folder.log_stamp(folder)
    baseline = _baseline_log(opts, folder)
    with tempfile.TemporaryDirectory(prefix="xcompile-validate-") as tmp:
        log.info("validating the log in the whole model: building without it and with it")
        manifest = _build_both(opts, Path(tmp), folder)
        workloads = (manifest.get("tuning") or {}).get("workloads", {})
        # The batch built (the model's own where the options name none).
        batch = int(manifest["inputs"][0]["shape"][0])
        verdict = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": bench.machine()["cpu"],
                   "model_hash": model_hash, "batch": batch,
                   "rounds": rounds, "rejected": [], "workloads": [],
                   # The log the build without this one applies (None: no log).
                   "baseline_log": baseline.name if baseline is not None else None,
                   "estimate_ms": model_estimate_ms(folder, workloads, [model_hash, opts.batch]),
                   "earlier": log_folder.earlier_verdicts(previous, model_hash, batch)}
        if not workloads:
            log.info("no kernel of the model takes a result from the log")
            verdict["model"] = {"outcome": "nothing to apply"}
        else:
            alt = _build_second_best(opts, Path(tmp), folder, manifest, stamp)
            predictors = {"untuned": runtime.load(Path(tmp) / "untuned"),
                          "tuned": runtime.load(Path(tmp) / "tuned")}
            if alt:
                predictors["second"] = runtime.load(Path(tmp) / "second")
            x = reference.make_input(predictors["untuned"].input, None)
            kernel_ms = _median_kernel_ms(predictors, x, rounds)
            variants = [(kernel_ms["tuned"], workloads)]
            if alt:
                variants.append((kernel_ms["second"], alt))
            rejected, choice, rows = choose(kernel_ms["untuned"], variants)
            verdict["rejected"], verdict["workloads"] = rejected, rows
            verdict["choice"] = choice
            # The estimate's counterpart: our kernels only (not the VM's builtins).
            ours = {k["name"] for k in manifest["kernels"]}
            verdict["kernels_in_model_ms"] = {
                name: round(sum(v for k, v in ms.items() if k in ours), 3)
                for name, ms in kernel_ms.items()}
            del predictors
            verdict["model"] = _check_model(opts, folder, Path(tmp), verdict, x, rounds,
                                            stamp)
    verdict["seconds"] = round(time.perf_counter() - started, 1)
    log_folder.write_validation(folder, verdict, stamp)
    return verdict


def _build_second_best(opts: TuneOptions, tmp: Path, folder: Path, tuned: dict,
                       stamp: str) -> dict:
    """Build the model with every tuned workload's second-fastest result alone
    (``tmp/second``), so that the validation can choose between the two inside the
    model; ``tuned``: the manifest of the build with the fastest results. Returns the
    second build's tuned kernel -> workload map, empty when no workload has a second
    result. (A verdict choosing rank 2 for all is written for the build's sake and
    removed after it.)"""
    first = tuned.get("tuning") or {}
    path = folder / log_folder.VALIDATION
    log_folder.write_validation(folder, {"rejected": [], "choice": {
        h: 2 for h in set(first.get("workloads", {}).values())}}, stamp)
    try:
        second = _build(opts, tmp / "second", str(folder)).get("tuning") or {}
    finally:
        path.unlink(missing_ok=True)
    # Nothing to choose between where the second build applied what the first did.
    if second.get("applied", {}) == first.get("applied", {}):
        return {}
    return second.get("workloads", {})


def _check_model(opts, folder: Path, tmp: Path, verdict: dict, x, rounds: int,
                 stamp: str) -> dict:
    """Build with the accepted results and time it against the untuned build end to end;
    when it is not faster, reject every result."""
    all_rejected = sorted({r["workload"] for r in verdict["workloads"]})
    if verdict["rejected"] == all_rejected:
        return {"outcome": "no result made its kernels faster in the model"}
    validated = tmp / "tuned"  # every result accepted: the build with the whole log
    if verdict["rejected"] or verdict.get("choice"):
        log_folder.write_validation(folder, verdict, stamp)  # the build applies only these
        validated = tmp / "validated"
        _build(opts, validated, str(folder))
    predictors = {"untuned": runtime.load(tmp / "untuned"),
                  "validated": runtime.load(validated)}
    samples, n = _model_ms(predictors, x, rounds)
    ratio = paired_ratio(samples["untuned"], samples["validated"])
    faster = ratio <= MODEL_GAIN
    out = {"untuned_ms": round(statistics.median(samples["untuned"]), 3),
           "validated_ms": round(statistics.median(samples["validated"]), 3),
           "ratio": round(ratio, 4), "rounds": n,
           "outcome": "faster: applied" if faster else "not faster: nothing applied"}
    if not faster:
        verdict["rejected"] = all_rejected
    log.info("model end to end: %.2f ms without the log, %.2f ms with its accepted results, "
             "%.4fx in %d paired rounds (%s)", out["untuned_ms"], out["validated_ms"], ratio,
             n, out["outcome"])
    return out


def model_estimate_ms(folder: Path, workloads: dict[str, str], model: list) -> dict:
    """The tuner's model estimates (sum over the model's kernels of calls x the time
    measured alone): with our default schedules, and with what the build applied.
    ``model``: [model hash, batch]; a log that also holds other models' tasks counts
    only this one's (a log written before tasks named their model counts them all)."""
    manifest = log_folder.read_manifest(folder) or {"tasks": {}}
    applied = set(workloads.values())
    untuned = tuned = 0.0
    for h, t in manifest["tasks"].items():
        if "models" in t and model not in t["models"]:
            continue
        base = t.get("baseline_ms")
        if base is None:
            continue
        # (Logs written before calls were kept per model have the last run's.)
        calls = t.get("calls_by_model", {}).get(json.dumps(model), t.get("calls", 1))
        untuned += calls * base
        best = t.get("best_ms") if h in applied and t.get("best_ms") else base
        tuned += calls * min(base, best)
    return {"untuned": round(untuned, 3), "tuned": round(tuned, 3)}
