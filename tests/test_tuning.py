"""Tuning: a tiny MetaSchedule session on one depthwise and one pointwise task of a small
separable CNN, resumed, applied in builds that must still match ONNX Runtime, and the
log's failure modes (truncated, garbage, other target, damaged trace, kill -9, RPC)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli

TRIALS = 14  # 2 baselines + 6 of our configurations + ~8 from MetaSchedule's search


def _task_names(onnx_path) -> dict[str, str]:
    from xcompile import targets
    from xcompile import frontend, pipeline
    from xcompile.tuning import tasks

    preset = targets.resolve("host")
    imported = frontend.import_onnx(frontend.load_onnx(onnx_path))
    lowered, _ = pipeline.lower(imported.mod, preset)
    out = {}
    for t in tasks.extract(lowered, preset.tvm_target()):
        out.setdefault(t.kind, t.name)
    return out


@pytest.fixture(scope="module")
def names(mobile_onnx):
    return _task_names(mobile_onnx)


@pytest.fixture(scope="module")
def regex(names):
    return f"^({names['depthwise']}|{names['pointwise']})$"


@pytest.fixture(scope="module")
def tuned(mobile_onnx, regex, tmp_path_factory):
    """(log dir, first run's process): a 14-trial session."""
    logs = tmp_path_factory.mktemp("tune") / "logs"
    proc = run_cli("tune", "--model", str(mobile_onnx), "--trials", str(TRIALS), "--tasks",
                   regex, "--log-dir", str(logs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return logs, proc


def _copy(logs: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "logs"
    shutil.copytree(logs, dst)
    return dst


def _lines(path: Path) -> list:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _host_key() -> str:
    from xcompile import targets
    from xcompile.tuning.log_folder import target_key

    return target_key(targets.resolve("host").tvm_target())


def _task_trials(manifest: dict, names) -> dict[str, int]:
    return {t["name"]: t["trials"] for t in manifest["tasks"].values() if t["name"] in names}


def test_classifies_the_separable_kernels(names):
    assert {"depthwise", "pointwise", "dense", "other"} <= set(names)


def test_task_selections_pick_kinds():
    """``convs`` (the default) adds the KxK and grouped convs to ``separable``; ``all``
    takes every kernel; a regular expression picks by name; nothing chosen is an error."""
    from xcompile.errors import XCompileError
    from xcompile.tuning import tasks

    kinds = ["depthwise", "pointwise", "separable", "dense", "grouped", "other"]
    made = [tasks.Task(f"k_{kind}", None, 1, kind, 1.0) for kind in kinds]

    def picked(which):
        return [t.kind for t in tasks.select(made, which)]

    assert picked("separable") == ["depthwise", "pointwise", "separable"]
    assert picked("convs") == ["depthwise", "pointwise", "separable", "dense", "grouped"]
    assert picked("all") == kinds
    assert picked("^k_(dense|other)$") == ["dense", "other"]
    with pytest.raises(XCompileError, match="no task"):
        tasks.select(made, "^nothing$")


def test_rotated_timing_reports_the_middle_half():
    """A rotated measurement hands MetaSchedule the middle half of its single calls:
    an interrupt's outlier and the luckiest call both drop out of the mean."""
    from xcompile.tuning.measure import middle_half

    times = [1.0, 1.1, 0.2, 1.2, 9.0, 1.0, 1.3, 1.1]
    assert middle_half(times) == [1.0, 1.1, 1.1, 1.2]
    assert sorted(middle_half(list(range(10)))) == [2, 3, 4, 5, 6, 7]
    assert middle_half([3.0, 1.0]) == [3.0, 1.0]


def test_grid_times_a_batch_again_when_the_machine_ran_slow(monkeypatch):
    """Each batch of configurations is timed after two timings of the task's default
    and before a third (the first takes the batch's cold start); where the last reads
    over SLOW_STRETCH times the default's baseline (a host at half speed for a while),
    the batch is timed again (not built again), at most RETRIES times. Each time is
    logged over the mean of the default's two other timings in its batch, times the
    baseline (``relative_to_baseline``): a batch timed at half speed throughout logs
    what a quick one does."""
    from types import SimpleNamespace

    from xcompile.tuning import grid

    configs = [f"c{i}" for i in range(5)]
    speed = {"c0": 1.0, "c1": 0.8, "c2": 1.2, "c3": 0.8, "c4": 1.2}
    monkeypatch.setattr(grid, "candidates", lambda task, rule, target, skip=(), limit=None: [
        (k, k) for k in configs if k not in skip][:limit])
    for slow_rounds in (0, 1, grid.RETRIES + 1):
        calls, builds = [], []

        def fake_build(builder, mods, target, device):
            builds.append(mods)
            return mods

        def fake_run(runner, inputs):
            slow = len(calls) < slow_rounds  # the first rounds run at half speed
            calls.append(inputs)
            # The first timing of every batch is a cold start, slow or not; the
            # configurations take 0.8x and 1.2x the default's time; the default reads
            # 0.9x before the batch and 1.1x after it.
            drift = [0.9] + [1.0] * (len(inputs) - 3) + [1.1]
            return [5.0] + [(2.0 if slow else 1.0) * speed[m] * d
                            for m, d in zip(inputs[1:], drift)]

        monkeypatch.setattr(grid, "build", fake_build)
        monkeypatch.setattr(grid, "run", fake_run)
        # The baseline, timed in an earlier run: 1.5x what this run times.
        entry = {"rule": "r", "baseline_ms": 1.5, "configs": {"c0": 1.5}}
        rule = SimpleNamespace(all_configs=None)
        progress = SimpleNamespace(update=lambda name, times: None)
        n = grid._time_task(SimpleNamespace(name="t"), entry, {"r": rule}, None, "cpu", None,
                            None, 10, progress, 2, lambda: None)
        assert n == 4
        # Two batches of two, each after two timings of the default (c0) and before one.
        assert all(m[0] == m[1] == m[-1] == "c0" and len(m) == 5 for m in calls), calls
        assert len(calls) == 2 + min(slow_rounds, grid.RETRIES), (slow_rounds, calls)
        assert len(builds) == 2, builds  # a batch timed again is not built again
        assert {k: round(v, 9) for k, v in entry["configs"].items() if k != "c0"} == {
            k: round(speed[k] * 1.5, 9) for k in configs[1:]}, slow_rounds
    # Where the default failed in its batch, or there is no baseline: as timed.
    assert grid.relative_to_baseline([2.0, None], None, 1.5) == [2.0, None]
    assert grid.relative_to_baseline([2.0, None], 4.0, 1.0) == [0.5, None]
    assert grid.relative_to_baseline([2.0], 4.0, None) == [2.0]


def test_rotation_keeps_the_input_and_output_warm():
    """Rotated timing gives every call its own weights and the same input and output
    (the model's kernels find theirs warm): as many sets as the weights span the bytes
    asked, capped; without rotation, or without weights, one set."""
    import numpy as np
    import tvm

    from xcompile.tuning.measure import MAX_ROTATION, argument_sets

    dev = tvm.cpu()
    info = [["TENSOR", "float32", [1, 8, 4, 4]], ["TENSOR", "float32", [16, 8, 1, 1]],
            ["TENSOR", "float32", [16]], ["TENSOR", "float32", [1, 16, 4, 4]]]
    weight_bytes = (16 * 8 + 16) * 4
    sets = argument_sets(info, 10 * weight_bytes + 1, dev)
    assert len(sets) == 11
    for s in sets:
        assert len(s) == 4
        assert s[0].same_as(sets[0][0]) and s[-1].same_as(sets[0][-1])
    weights = [a for s in sets for a in s[1:-1]]
    assert len({id(a) for a in weights}) == len(weights) == 22
    assert not np.array_equal(sets[0][1].numpy(), sets[1][1].numpy())
    assert len(argument_sets(info, 10 ** 12, dev)) == MAX_ROTATION
    assert len(argument_sets(info, 0, dev)) == 1
    assert len(argument_sets(info[:1] + info[-1:], 10 ** 9, dev)) == 1


def test_tune_writes_a_valid_log(tuned, names):
    logs, proc = tuned
    folder = logs / "host"
    manifest = json.loads((folder / "tuning.json").read_text())
    assert json.dumps(manifest["target"]["tvm"], sort_keys=True) == _host_key()
    assert manifest["versions"]["tvm"].startswith("0.27")
    from xcompile import targets

    assert manifest["cpu"] == targets.host_cpu()  # the CPU model the candidates ran on
    trials = _task_trials(manifest, {names["depthwise"], names["pointwise"]})
    # Both tasks got trials, and the budget held (MetaSchedule rounds up per task).
    assert all(n >= 2 for n in trials.values()), trials
    assert sum(trials.values()) <= TRIALS + 2, trials
    workloads = _lines(folder / "database_workload.json")
    records = _lines(folder / "database_tuning_record.json")
    assert records and all(0 <= r[0] < len(workloads) for r in records)
    from xcompile.tuning.log_folder import target_key

    record_ms: dict[str, list[float]] = {}
    for index, (trace, run_secs, target, _args) in records:
        assert trace and run_secs and all(float(s) > 0 for s in run_secs)
        assert target_key(target) == _host_key()  # records made for this machine's target
        record_ms.setdefault(workloads[index][0], []).append(
            sum(map(float, run_secs)) / len(run_secs) * 1e3)
    # Every task of the model has its default schedule timed; a tuned task's best is the
    # fastest of its timed configurations and of its records, read back from the files.
    for key, t in manifest["tasks"].items():
        assert t["baseline_ms"] > 0, t
        if t["name"] in trials:
            timed = [*t["configs"].values(), *record_ms.get(key, [])]
            assert t["best_ms"] == pytest.approx(min(timed), rel=1e-6), t
    assert (folder / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (folder / "convergence.csv").read_text().splitlines()
    assert rows[0] == "trials,elapsed_s,estimated_ms" and len(rows) >= 3
    # The curve ends at the model estimate: calls x best latency over all kernels.
    final = float(rows[-1].split(",")[2])
    estimate = sum(t["calls"] * (t["best_ms"] or t["baseline_ms"])
                   for t in manifest["tasks"].values())
    assert final == pytest.approx(estimate, rel=1e-3)
    assert "trials/min" in proc.stderr  # the progress line


def test_rerun_resumes_without_redoing_work(tuned, mobile_onnx, regex, names, tmp_path):
    logs = _copy(tuned[0], tmp_path)
    manifest_path = logs / "host" / "tuning.json"
    before = json.loads(manifest_path.read_text())
    # A task an earlier lowering of the model made (a compiler change split or renamed
    # that kernel since): the rerun no longer counts it as the model's.
    model = next(iter(before["tasks"].values()))["models"][0]
    stale = dict(before, tasks={**before["tasks"], "1": {
        "name": "gone", "kind": "pointwise", "calls": 1, "flops": 1.0, "rule": None,
        "baseline_ms": 5.0, "best_ms": 5.0, "trials": 0, "tuned": False,
        "models": [model]}})
    manifest_path.write_text(json.dumps(stale))
    records = len(_lines(logs / "host" / "database_tuning_record.json"))
    proc = run_cli("tune", "--no-validate",
                   "--model", str(mobile_onnx), "--trials", str(TRIALS), "--tasks",
                   regex, "--log-dir", str(logs))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no search to run" in proc.stderr
    assert len(_lines(logs / "host" / "database_tuning_record.json")) == records
    rerun = json.loads(manifest_path.read_text())["tasks"]
    assert rerun["1"]["models"] == []
    assert all(model in t["models"] for h, t in rerun.items() if h != "1")
    # A larger budget continues from there.
    proc = run_cli("tune", "--no-validate",
                   "--model", str(mobile_onnx), "--trials", str(TRIALS + 8),
                   "--tasks", regex, "--log-dir", str(logs))
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads((logs / "host" / "tuning.json").read_text())
    task_names = {names["depthwise"], names["pointwise"]}
    grown = sum(_task_trials(after, task_names).values()) - sum(
        _task_trials(before, task_names).values())
    assert 4 <= grown <= 10, (before, after)
    assert len(after["runs"]) == len(before["runs"]) + 2


def _build_verify(mobile_onnx, logs, out: Path) -> dict:
    build = run_cli("build", "--model", str(mobile_onnx), "--tuning-log", str(logs), "-o",
                    str(out))
    assert build.returncode == 0, build.stderr[-2000:]
    proc = run_cli("verify", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    m["_stderr"] = build.stderr
    return m


def test_tuned_build_verifies(tuned, mobile_onnx, tmp_path):
    m = _build_verify(mobile_onnx, tuned[0], tmp_path / "b")
    assert m["tuning"]["log"].endswith("host")
    assert m["options"]["tuning_log"] == str(tuned[0])


def _edit_manifest(logs: Path, fn) -> None:
    path = logs / "host" / "tuning.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def _make_another_config_win(entry: dict) -> None:
    """Rig a log entry: a configuration other than the default timed fastest by far."""
    configs = entry["configs"]
    other = next(k for k in configs if k != entry["default_config"])
    for k in configs:
        configs[k] = 1.0
    configs[other] = 1e-6


def test_tuned_config_and_record_apply_and_verify(tuned, mobile_onnx, names, tmp_path):
    """Force each kind of result to win: a non-default configuration of our rule on the
    pointwise task, a MetaSchedule record on the depthwise one. Both builds must match
    ONNX Runtime."""
    logs = _copy(tuned[0], tmp_path)

    def rig(m):
        for t in m["tasks"].values():
            if t["name"] == names["pointwise"]:
                _make_another_config_win(t)
            if t["name"] == names["depthwise"]:
                t["baseline_ms"] = 1e3
                t["configs"] = {k: 1e3 for k in t["configs"]}

    _edit_manifest(logs, rig)
    m = _build_verify(mobile_onnx, logs, tmp_path / "b")
    rules = {k["name"]: k["rule"] for k in m["kernels"]}
    assert any(r == "xcompile.cpu.PackedConvGEMM (tuned)" for r in rules.values()), rules
    assert any(r == "meta_schedule.tuned" for r in rules.values()), rules
    assert len(m["tuning"]["applied"]) == 2


def test_tune_validates_its_log_in_the_whole_model(tuned, mobile_onnx, names, regex,
                                                   tmp_path):
    """The tune ends by timing the model with and without the log; here, on a log where a
    configuration and a record are rigged to win alone, each is kept exactly when its
    kernel got faster inside the model, the verdict is stamped with the log it judged,
    and a build applies what was kept."""
    from xcompile.tuning import log_folder, resolve_tune_options
    from xcompile.tuning_validation import KERNEL_GAIN, MODEL_GAIN, validate

    logs, proc = tuned
    assert "validated in the whole model" in proc.stdout
    assert (logs / "host" / "validation.json").is_file()
    logs = _copy(logs, tmp_path)
    _edit_manifest(logs, _rig_both(names))
    v = validate(resolve_tune_options(model=str(mobile_onnx), tasks=regex,
                                      log_dir=str(logs)), rounds=3)
    folder = logs / "host"
    assert json.loads((folder / "validation.json").read_text())["log_stamp"] == \
        log_folder.log_stamp(folder)
    assert len(v["workloads"]) == 2, v
    for row in v["workloads"]:
        assert row["untuned_ms"] > 0 and row["tuned_ms"] > 0
        assert row["kept"] == (row["tuned_ms"] <= KERNEL_GAIN * row["untuned_ms"])
        if not row["kept"]:
            assert row["workload"] in v["rejected"]
    assert v["estimate_ms"]["untuned"] > 0 and v["kernels_in_model_ms"]["untuned"] > 0
    if "ratio" in v["model"]:  # (some result was kept: the end-to-end check ran)
        assert v["model"]["rounds"] >= 2 * 3
        assert (v["model"]["ratio"] <= MODEL_GAIN) == v["model"]["outcome"].startswith("faster")
    m = _build_verify(mobile_onnx, logs, tmp_path / "b")
    kept = {k for row in v["workloads"] if row["workload"] not in v["rejected"]
            for k in row["kernels"]}
    assert set(m["tuning"]["applied"]) == kept and m["tuning"]["validated"]


def _rig_both(names):
    """A manifest edit: our other configuration wins alone on the pointwise task, a
    MetaSchedule record on the depthwise one."""
    def rig(m):
        for t in m["tasks"].values():
            if t["name"] == names["pointwise"]:
                t["configs"] = {k: (1e-6 if k != t["default_config"] else 1.0)
                                for k in t["configs"]}
            if t["name"] == names["depthwise"]:
                t["baseline_ms"] = 1e3
                t["configs"] = {k: 1e3 for k in t["configs"]}

    return rig


def test_the_model_check_compares_paired_rounds():
    """The end-to-end check takes the median of each round's ratio: a host that slows
    down for some rounds moves both runs of those rounds, not the verdict. Here the
    validated build runs 1% faster in four rounds of five and meets a spike in the first;
    the host is slow in rounds 2-3: the medians alone (80 against 99 ms) read it 24%
    slower."""
    import statistics

    from xcompile.tuning_validation import MODEL_GAIN, paired_ratio

    untuned = [80.0, 100.0, 100.0, 80.0, 80.0]
    validated = [100.0, 99.0, 99.0, 79.2, 79.2]
    assert paired_ratio(untuned, validated) == pytest.approx(0.99)
    assert paired_ratio(untuned, validated) <= MODEL_GAIN
    assert statistics.median(validated) / statistics.median(untuned) > 1.2


def test_validation_decides_per_workload():
    from xcompile.tuning_validation import decide

    untuned = {"a": 1.0, "a2": 1.0, "b": 1.0, "c": 1.0}
    tuned = {"a": 0.5, "a2": 1.6, "b": 0.9, "c": 0.995}
    # a and a2 share a workload: its sum got slower (2.1 vs 2.0), so it is rejected.
    rejected, rows = decide(untuned, tuned, {"a": "h1", "a2": "h1", "b": "h2", "c": "h3",
                                             "gone": "h4"})
    assert rejected == ["h1", "h3"]
    assert {r["workload"]: r["kept"] for r in rows} == {"h1": False, "h2": True, "h3": False}


def test_validation_keeps_other_models_verdicts():
    """Tuning a second model or batch into a log keeps the first one's verdict whole; a
    build takes, per workload, its own model's verdict at its batch, then its batch's,
    then any: a workload the batch-1 and batch-8 models share (the batch-8 model's
    slices run the batch-1 kernels) keeps each batch's verdict."""
    from xcompile.tuning import log_folder

    first = {"model_hash": "m1", "batch": 1, "rejected": ["h1", "h2"], "choice": {"h3": 2},
             "workloads": [{"workload": h} for h in ("h1", "h2", "h3")]}
    carried = log_folder.earlier_verdicts(first, "m1", 8)
    assert carried == [{"model": "m1", "batch": 1, "judged": ["h1", "h2", "h3"],
                        "rejected": ["h1", "h2"], "choice": {"h3": 2}}]
    second = {"model_hash": "m1", "batch": 8, "rejected": ["h9"], "earlier": carried,
              "choice": {"h2": 2}, "workloads": [{"workload": "h2"}, {"workload": "h9"}]}
    # Batch 8: h2 accepted there (its second result), h1 and h3 as batch 1 judged them.
    assert log_folder.judgement(second, "m1", 8) == ({"h1", "h9"}, {"h2": 2, "h3": 2})
    # Batch 1: h2 stays rejected; h9, judged at batch 8 alone, rejected there.
    assert log_folder.judgement(second, "m1", 1) == ({"h1", "h2", "h9"}, {"h3": 2})
    # Another model at batch 8 takes the batch-8 verdict first.
    assert log_folder.judgement(second, "m2", 8) == ({"h1", "h9"}, {"h2": 2, "h3": 2})
    # A build that names no model: batch 1's verdict first (verdicts that name no
    # batch are batch 1's too).
    assert log_folder.judgement(second) == ({"h1", "h2", "h9"}, {"h3": 2})
    # Validating the first again replaces its own verdict (written with no batch before
    # verdicts named it: batch 1) and carries the second's.
    again = log_folder.earlier_verdicts(second, "m1", 1)
    assert again == [{"model": "m1", "batch": 8, "judged": ["h2", "h9"], "rejected": ["h9"],
                      "choice": {"h2": 2}}]
    assert log_folder.earlier_verdicts(dict(first, batch=None), "m1", 1) == []
    assert log_folder.earlier_verdicts(None, "m1", 1) == []


def test_model_estimate_counts_each_models_calls(tmp_path):
    """A workload two models share (the batch-8 model's slices run the batch-1 kernels)
    counts the calls of the model validated: 17 at batch 1, 136 at batch 8; a log from
    before calls were kept per model counts its one figure."""
    from xcompile.tuning import log_folder
    from xcompile.tuning_validation import model_estimate_ms

    one, eight = ["m", None], ["m", 8]
    task = {"name": "gemm", "configs": {}, "baseline_ms": 2.0, "best_ms": 1.5,
            "calls": 136, "models": [one, eight],
            "calls_by_model": {json.dumps(one): 17, json.dumps(eight): 136}}
    old = {"name": "old", "configs": {}, "baseline_ms": 1.0, "calls": 3, "models": [one]}
    manifest = {"format": log_folder.FORMAT, "target": {"name": "host", "tvm": {}},
                "models": {}, "runs": [], "trials": 0, "tasks": {"h1": task, "h2": old}}
    log_folder.write_manifest(tmp_path, manifest)
    assert model_estimate_ms(tmp_path, {"gemm": "h1"}, one) == {"untuned": 37.0,
                                                                 "tuned": 28.5}
    assert model_estimate_ms(tmp_path, {}, eight) == {"untuned": 272.0, "tuned": 272.0}


def test_builds_apply_only_validated_results(tuned, mobile_onnx, names, tmp_path):
    """With both kinds of result rigged to win alone, a validation rejecting the
    pointwise one (for another model of the log) leaves it to our rule; once the log
    changes, the validation is stale and every result applies again."""
    from xcompile.tuning import log_folder

    logs = _copy(tuned[0], tmp_path)

    _edit_manifest(logs, _rig_both(names))
    manifest = json.loads((logs / "host" / "tuning.json").read_text())
    pointwise = next(h for h, t in manifest["tasks"].items() if t["name"] == names["pointwise"])
    # (Rejected by the verdict on another model, carried forward in this one.)
    log_folder.write_validation(logs / "host", {"rejected": [], "earlier": [
        {"model": "other", "batch": 8, "judged": [pointwise], "rejected": [pointwise]}]})
    m = _build_verify(mobile_onnx, logs, tmp_path / "b1")
    assert set(m["tuning"]["applied"]) == {names["depthwise"]}, m["tuning"]
    assert m["tuning"]["validated"] and names["pointwise"] in m["tuning"]["kept_default"]
    _edit_manifest(logs, lambda m: m["runs"].append({"edited": True}))
    m = _build_verify(mobile_onnx, logs, tmp_path / "b2")
    assert set(m["tuning"]["applied"]) == {names["depthwise"], names["pointwise"]}
    assert not m["tuning"]["validated"]
    assert "changed since it was validated" in m["_stderr"]


def test_a_users_log_applies_over_the_shipped_log(tuned, mobile_onnx, names, monkeypatch,
                                                 tmp_path):
    """A user's log replaces the shipped log's results where it has accepted ones, and the
    shipped log's results apply to the rest, as in the default build: here both logs
    time a result fastest on both kernels, and the user's validation rejected its
    depthwise one. The shipped log named as the user's applies once, not over itself;
    and a log is validated against the default build unless it is the default build's."""
    from types import SimpleNamespace

    from xcompile import build
    from xcompile.tuning import apply, log_folder
    from xcompile.tuning_validation import _baseline_log

    logs = _copy(tuned[0], tmp_path)
    _edit_manifest(logs, _rig_both(names))
    shipped = log_folder.export_best(logs / "host", tmp_path / "shipped" / "x86-test")
    monkeypatch.setattr(apply, "SHIPPED", shipped.parent)
    manifest = json.loads((logs / "host" / "tuning.json").read_text())
    depthwise = next(h for h, t in manifest["tasks"].items() if t["name"] == names["depthwise"])
    log_folder.write_validation(logs / "host", {"rejected": [depthwise]})

    def tuning(log, out):
        opts = build.resolve_options(model=str(mobile_onnx), output=str(tmp_path / out),
                                     tuning_log=log)
        return build.build(opts)["tuning"]

    default = tuning(None, "b-default")
    assert set(default["applied"]) == {names["depthwise"], names["pointwise"]}, default
    user = tuning(str(logs), "b-user")
    assert set(user["applied"]) == {names["pointwise"]}, user
    assert user["fallback"]["applied"] == {names["depthwise"]: default["applied"][names["depthwise"]]}
    assert names["depthwise"] not in user["kept_default"]
    assert "fallback" not in tuning(str(shipped), "b-shipped")
    assert _baseline_log(SimpleNamespace(target="host"), logs / "host") == shipped
    assert _baseline_log(SimpleNamespace(target="host"), shipped) is None


def test_validation_chooses_per_workload_among_ranks():
    """Per workload, the rank whose kernels ran fastest in the model, if it beats the
    untuned kernels by KERNEL_GAIN; a workload the second build did not change keeps its
    fastest result's verdict."""
    from xcompile.tuning_validation import choose

    untuned = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    first = ({"a": 0.9, "b": 1.2, "c": 1.0, "d": 0.9}, {"a": "h1", "b": "h2", "c": "h3",
                                                       "d": "h4"})
    second = ({"a": 0.95, "b": 0.8, "c": 0.99, "d": 0.7}, {"a": "h1", "b": "h2", "c": "h3"})
    rejected, choice, rows = choose(untuned, [first, second])
    assert rejected == ["h3"]  # 0.99: not 2% faster
    assert choice == {"h2": 2}  # h1 keeps its fastest alone; h4 had no second result
    assert {r["workload"]: r["tuned_ms"] for r in rows}["h2"] == 0.8


def test_builds_apply_the_validations_choice(tuned, mobile_onnx, names, tmp_path):
    """A validation that chose a workload's second-fastest result makes builds apply
    that one."""
    from xcompile.tuning import log_folder

    logs = _copy(tuned[0], tmp_path)

    def rig(m):
        for t in m["tasks"].values():
            if t["name"] == names["pointwise"]:
                others = sorted(k for k in t["configs"] if k != t["default_config"])
                t["configs"] = {k: (1e-6 * (1 + others.index(k)) if k in others else 1.0)
                                for k in t["configs"]}
                rig.second = others[1]

    _edit_manifest(logs, rig)
    manifest = json.loads((logs / "host" / "tuning.json").read_text())
    pointwise = next(h for h, t in manifest["tasks"].items() if t["name"] == names["pointwise"])
    log_folder.write_validation(logs / "host", {"rejected": [], "choice": {pointwise: 2}})
    m = _build_verify(mobile_onnx, logs, tmp_path / "b")
    assert rig.second in m["tuning"]["applied"][names["pointwise"]], m["tuning"]


def test_slower_results_never_replace_our_schedule(tuned, mobile_onnx, names, tmp_path):
    logs = _copy(tuned[0], tmp_path)

    def rig(m):
        for t in m["tasks"].values():
            t["baseline_ms"] = 1e-9  # nothing beats our default schedules
            t["configs"] = {k: (1e-9 if k == t.get("default_config") else 1.0)
                            for k in t.get("configs", {})}

    _edit_manifest(logs, rig)
    m = _build_verify(mobile_onnx, logs, tmp_path / "b")
    assert m["tuning"]["applied"] == {}
    assert not any("tuned" in k["rule"] for k in m["kernels"])


def test_results_timed_against_another_default_wait_for_a_retune(tuned, mobile_onnx, names,
                                                                  regex, tmp_path):
    """A log whose entry timed another default configuration than our rule's default
    now (the rule changed since): a build gives that kernel the new default and says so,
    though a result beat the old one; a rerun of the tune times the new default (the
    entry's other results stay) and the build applies the log again."""
    logs = _copy(tuned[0], tmp_path)
    old_default = '{"a default": "the rule no longer has"}'

    def rig(m):
        for t in m["tasks"].values():
            if t["name"] == names["pointwise"]:
                _make_another_config_win(t)
                t["default_config"] = old_default
                t["configs"][old_default] = t["baseline_ms"] = 2.0

    _edit_manifest(logs, rig)
    m = _build_verify(mobile_onnx, logs, tmp_path / "b1")
    assert m["tuning"]["stale_default"] == [names["pointwise"]]
    assert names["pointwise"] not in m["tuning"]["applied"]
    assert "our default schedule of 1 kernels changed" in m["_stderr"]
    proc = run_cli("tune", "--no-validate", "--model", str(mobile_onnx), "--trials",
                   str(TRIALS), "--tasks", regex, "--log-dir", str(logs))
    assert proc.returncode == 0, proc.stderr[-2000:]
    entry = next(t for t in json.loads((logs / "host" / "tuning.json").read_text())[
        "tasks"].values() if t["name"] == names["pointwise"])
    assert entry["default_config"] != old_default
    assert entry["baseline_ms"] == entry["configs"][entry["default_config"]] != 2.0
    assert entry["configs"][old_default] == 2.0 and min(entry["configs"].values()) == 1e-6
    m = _build_verify(mobile_onnx, logs, tmp_path / "b2")
    assert m["tuning"]["stale_default"] == []
    assert names["pointwise"] in m["tuning"]["applied"]


def test_damaged_lines_are_skipped_with_a_warning(tuned, mobile_onnx, tmp_path):
    logs = _copy(tuned[0], tmp_path)
    rec_path = logs / "host" / "database_tuning_record.json"
    records = rec_path.read_text().splitlines()
    foreign = json.loads(records[0])
    foreign[1][2] = {**foreign[1][2], "num-cores": 64}  # tuned for another machine
    foreign[1][1] = [1e-9]  # and "fastest": it must still not be used
    broken = json.loads(records[0])
    broken[1][0] = [[["NotAnInstruction", [], [], []]], []]  # valid JSON, bad trace
    broken[1][1] = [2e-9]
    with open(rec_path, "a") as f:
        f.write(json.dumps(foreign) + "\n")
        f.write(json.dumps(broken) + "\n")
        f.write("garbage\n")
        f.write(records[-1][: len(records[-1]) // 2])  # a torn last line, as kill -9 leaves
    with open(logs / "host" / "database_workload.json", "a") as f:
        f.write('["123", \n')
    m = _build_verify(mobile_onnx, logs, tmp_path / "b")
    proc_err = m["_stderr"]
    assert "cannot be read" in proc_err
    assert "another target" in proc_err
    assert "does not apply" in proc_err
    assert m["tuning"] is not None


def test_log_for_another_target_is_refused(tuned, mobile_onnx, regex, tmp_path):
    from xcompile import targets

    # Another x86 preset's CPU than the one this machine's host preset names.
    host_cpu = targets.resolve("host").target.get("mcpu")
    other = next(p.target["mcpu"] for p in targets.PRESETS.values()
                 if p.family == "x86" and p.target["mcpu"] != host_cpu)
    logs = _copy(tuned[0], tmp_path)
    _edit_manifest(logs, lambda m: m["target"]["tvm"].update({"mcpu": other}))
    proc = run_cli("build", "--model", str(mobile_onnx), "--tuning-log", str(logs), "-o",
                   str(tmp_path / "b"))
    assert_one_line_error(proc, "tuned for target", "refusing")
    assert not (tmp_path / "b").exists()
    proc = run_cli("tune", "--no-validate",
                   "--model", str(mobile_onnx), "--trials", "4", "--tasks", regex,
                   "--log-dir", str(logs))
    assert_one_line_error(proc, "tuned for target")


def test_log_timed_on_another_cpu_model_is_refused(tuned, mobile_onnx, regex, tmp_path):
    """A tune adds only to a log timed on this CPU model: another model's times do not
    compare (one error line, the log untouched); a build still applies it."""
    logs = _copy(tuned[0], tmp_path)
    _edit_manifest(logs, lambda m: m.update({"cpu": "othercpu"}))

    def files():  # (the lock file holds the pid of the last tune)
        return {p.name: p.read_bytes() for p in (logs / "host").iterdir()
                if p.is_file() and p.name != ".lock"}

    before = files()
    proc = run_cli("tune", "--no-validate", "--model", str(mobile_onnx), "--trials", "20",
                   "--tasks", regex, "--log-dir", str(logs))
    assert_one_line_error(proc, "timed on othercpu", "another --log-dir")
    assert files() == before
    proc = run_cli("build", "--model", str(mobile_onnx), "--tuning-log", str(logs), "-o",
                   str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_shipped_log_follows_the_cpu_model(tuned, monkeypatch, tmp_path):
    """Of the shipped logs for one target, a build that runs here takes the one tuned on
    this CPU model, else the one that names no model, never one tuned on another; a
    build for another machine takes the one that names none."""
    from xcompile import targets
    from xcompile.tuning import apply, log_folder

    shipped = tmp_path / "shipped"
    for name, cpu in [("x86-any", None), ("x86-other", "othercpu"), ("x86-this", "thiscpu")]:
        log_folder.export_best(tuned[0] / "host", shipped / name)
        manifest = log_folder.read_manifest(shipped / name)
        manifest.pop("cpu", None)
        log_folder.write_manifest(shipped / name, {**manifest, **({"cpu": cpu} if cpu else {})})
    monkeypatch.setattr(apply, "SHIPPED", shipped)
    host = targets.resolve("host")

    def picked():
        found = apply.load_for_build(None, host)
        return found and found.folder.name

    monkeypatch.setattr(targets, "host_cpu", lambda: "thiscpu")
    assert picked() == "x86-this"
    monkeypatch.setattr(targets, "host_cpu", lambda: "thirdcpu")
    assert picked() == "x86-any"
    monkeypatch.setattr(targets, "runs_here", lambda preset: False)
    assert picked() == "x86-any"
    shutil.rmtree(shipped / "x86-any")
    assert picked() is None
    monkeypatch.setattr(targets, "runs_here", lambda preset: True)
    assert picked() is None  # not the other model's, though it is the only one left


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rpc_loopback(mobile_onnx, names, tmp_path):
    """Candidates built here, timed by a TVM RPC server found through a tracker."""
    port = _free_port()
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host",
                                "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    server = None
    try:
        server_port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--tracker",
                                   f"127.0.0.1:{port}", "--key", "xc-test", "--host",
                                   "127.0.0.1", "--port", str(server_port), "--port-end",
                                   str(server_port + 20)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        from xcompile.tuning.measure import tracker_keys

        from xcompile.errors import XCompileError

        deadline = time.time() + 90
        while True:  # both import TVM first: wait for the tracker, then the server
            try:
                if "xc-test" in tracker_keys("127.0.0.1", port):
                    break
            except XCompileError:
                pass
            assert time.time() < deadline, "the RPC server did not register"
            assert server.poll() is None and tracker.poll() is None, "RPC process exited"
            time.sleep(0.5)
        logs = tmp_path / "logs"
        proc = run_cli("tune", "--no-validate",
                       "--model", str(mobile_onnx), "--trials", "8", "--tasks",
                       f"^{names['depthwise']}$", "--log-dir", str(logs), "--rpc-tracker",
                       f"127.0.0.1:{port}", "--rpc-key", "xc-test")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "measure=rpc=" in proc.stderr
        m = json.loads((logs / "host" / "tuning.json").read_text())
        task = next(t for t in m["tasks"].values() if t["name"] == names["depthwise"])
        assert task["trials"] >= 4 and task["best_ms"] > 0
        assert _lines(logs / "host" / "database_tuning_record.json")
    finally:
        for p in (server, tracker):
            if p is not None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.mark.parametrize("args,needles", [
    (["--rpc-tracker", "127.0.0.1:9190"], ["--rpc-key"]),
    (["--rpc-tracker", f"127.0.0.1:{_free_port()}", "--rpc-key", "k"], ["cannot reach"]),
    (["--rpc-tracker", "nohost", "--rpc-key", "k"], ["HOST:PORT"]),
    (["--tasks", "("], ["regular expression"]),
    (["--tasks", "no_such_kernel_xyz"], ["no task"]),
    (["--target", "arm64-neon"], ["--rpc-tracker"]),
    (["--target", "nope"], ["nope"]),
])
def test_tune_rejects_bad_options(mobile_onnx, tmp_path, args, needles):
    proc = run_cli("tune", "--no-validate",
                   "--model", str(mobile_onnx), "--trials", "4", "--log-dir",
                   str(tmp_path / "logs"), *args)
    assert_one_line_error(proc, *needles)


def test_build_with_a_missing_log_is_refused(mobile_onnx, tmp_path):
    proc = run_cli("build", "--model", str(mobile_onnx), "--tuning-log",
                   str(tmp_path / "nothing"), "-o", str(tmp_path / "b"))
    assert_one_line_error(proc, "no tuning log")


def test_shipped_log_is_used_only_for_its_target(tuned, monkeypatch, tmp_path):
    from xcompile import targets
    from xcompile.tuning import apply
    from xcompile.tuning.log_folder import export_best

    shipped = tmp_path / "shipped"
    export_best(tuned[0] / "host", shipped / "x86-test")
    # The exported log keeps one record per workload: the fastest.
    records = _lines(shipped / "x86-test" / "database_tuning_record.json")
    assert len(records) == len({r[0] for r in records}) >= 1
    monkeypatch.setattr(apply, "SHIPPED", shipped)
    host = targets.resolve("host")
    assert apply.load_for_build(None, host) is not None
    assert apply.load_for_build("none", host) is None
    assert apply.load_for_build(None, targets.resolve("arm64-neon")) is None


def test_only_ours_times_our_configurations_without_a_search(mobile_onnx, names, tmp_path):
    logs = tmp_path / "logs"
    proc = run_cli("tune", "--no-validate",
                   "--model", str(mobile_onnx), "--trials", "10", "--tasks",
                   f"^{names['pointwise']}$", "--log-dir", str(logs), "--only-ours")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no search to run" in proc.stderr
    records = logs / "host" / "database_tuning_record.json"
    assert not records.exists() or not records.read_text().strip()
    m = json.loads((logs / "host" / "tuning.json").read_text())
    task = next(t for t in m["tasks"].values() if t["name"] == names["pointwise"])
    assert len(task["configs"]) >= 4
    assert task["best_ms"] == pytest.approx(min(task["configs"].values()), rel=1e-6)


def test_trials_per_task_caps_each_task(mobile_onnx, names, tmp_path):
    logs = tmp_path / "logs"
    proc = run_cli("tune", "--no-validate",
                   "--model", str(mobile_onnx), "--trials", "40", "--tasks",
                   f"^{names['pointwise']}$", "--log-dir", str(logs), "--only-ours",
                   "--trials-per-task", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((logs / "host" / "tuning.json").read_text())
    task = next(t for t in m["tasks"].values() if t["name"] == names["pointwise"])
    assert len(task["configs"]) == 1 + 3  # the baseline, then three configurations


SHIPPED_LOGS = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "xcompile"
                                       / "tuning_logs").iterdir() if p.is_dir())


def model_workloads(path: Path, preset) -> set[str]:
    """The workload hashes of the kernels a build of the ONNX file at ``path`` for
    ``preset`` has (at batch 1, before any schedule)."""
    import tvm

    from xcompile import frontend, pipeline
    from xcompile.tuning.apply import workload_hash

    mod, _ = pipeline.lower(frontend.import_onnx(frontend.load_onnx(path)).mod, preset)
    return {workload_hash(f) for f in mod.functions.values()
            if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("shipped", SHIPPED_LOGS)
def test_shipped_log_applies_to_the_model_it_was_tuned_for(shipped, tmp_path):
    """Each shipped log, built for the target its manifest names (``x86-avx512-znver4``
    for ``x86-avx512``): its validated results, and only those, schedule kernels of the
    built-in Xception, and where this CPU can run the build it matches ONNX Runtime."""
    from xcompile import schedules, targets
    from xcompile.tuning import log_folder

    folder = Path(__file__).resolve().parent.parent / "xcompile" / "tuning_logs" / shipped
    manifest = log_folder.read_manifest(folder)
    preset = manifest["target"]["name"]
    cores = int(manifest["target"]["tvm"].get("num-cores", 0))
    if cores != targets.host_cores():
        pytest.skip(f"{shipped}'s log was tuned for {cores} cores and builds here target "
                    f"{targets.host_cores()}: it would not apply")
    out = tmp_path / "b"
    proc = run_cli("build", "--target", preset, "--tuning-log", str(folder), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    stale = m["tuning"]["stale_default"]
    if manifest.get("cpu") == targets.host_cpu():
        # In step with our rules: no default schedule changed since the log timed it.
        assert stale == [], f"re-tune the shipped {shipped} log"
    else:
        # Tuned on another CPU model (or before logs named one): this machine cannot
        # re-time it, so kernels whose default changed since wait for a tune there
        # and get our new default meanwhile, none of the log's results.
        assert not set(stale) & set(m["tuning"]["applied"]), m["tuning"]
        # (The log names kernels as tuned: the build adds ``_prepacked`` to those whose
        # packed weights it splits out.)
        rules = {k["name"].removesuffix("_prepacked"): k["rule"] for k in m["kernels"]}
        ours = schedules.rules_by_name(schedules.rules_for(targets.resolve(preset).family))
        assert all(rules[k] in ours for k in stale), {k: rules[k] for k in stale}
    validation = log_folder.read_validation(folder)
    if validation is None:
        assert m["tuning"]["applied"], m["tuning"]
    else:
        # Exactly the results the validation of this model at batch 1 did not reject
        # schedule kernels (none, where the model was no faster with them: this
        # round's x86-avx2 log). That verdict is the validation's own or, where another
        # batch was validated last, one it carried forward (``earlier``).
        assert m["tuning"]["validated"]
        verdicts = [{"model": validation["model_hash"], "batch": validation["batch"],
                     "judged": [w["workload"] for w in validation["workloads"]],
                     "rejected": validation["rejected"]},
                    *validation.get("earlier", [])]
        own = [v for v in verdicts if v["model"] == m["model"]["sha256"]
               and v["batch"] in (None, 1)]
        judged = {w for v in own for w in v["judged"]}
        # (Less those of kernels whose default changed since: they wait for a re-tune;
        # and those this build no longer has: a conv computed another way since the log
        # judged it, as Winograd's algorithm took the stem's 3x3 conv.)
        kept = ((judged - {w for v in own for w in v["rejected"]}
                 - set(m["tuning"]["stale_workloads"].values()))
                & model_workloads(Path(m["model"]["path"]), targets.resolve(preset)))
        assert set(m["tuning"]["workloads"].values()) == kept, m["tuning"]
        assert bool(m["tuning"]["applied"]) == bool(kept)
    if not targets.runs_here(targets.resolve(preset)):
        pytest.skip(f"built; this CPU cannot run {preset} code to compare it")
    proc = run_cli("verify", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
