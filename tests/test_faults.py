"""The fault suite: what a careful user or an attacker tried, and what xcompile does now.
Every case was a defect once (data loss, code run from outside a build, lost tuning
records, orphaned processes, crashes); each test would have caught it.

1. Never destroy what xcompile did not write.
2. Never load or write outside the build folder.
3. Tuning logs: one writer, every record kept, only sane records.
4. End cleanly on signals, workers included.
5. Every bad input is exit 2 with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, run_cli


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    """Temporaries xcompile left beside its outputs."""
    return sorted(p.name for p in folder.iterdir() if ".xc" in p.name)


@pytest.fixture(scope="module")
def built(mobile_onnx, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "build"
    proc = run_cli("build", "--model", str(mobile_onnx), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def _copy(build: Path, dst: Path, manifest_edit=None) -> Path:
    shutil.copytree(build, dst)
    if manifest_edit is not None:
        m = json.loads((dst / "manifest.json").read_text())
        manifest_edit(m)
        (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _rehash(folder: Path, name: str) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m["sha256"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))


# ---------------------------------------------------------------- 1. data loss


def test_build_never_replaces_a_folder_of_the_users(mobile_onnx, tmp_path):
    user = tmp_path / "thesis"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.txt").write_text("years of work")
    (user / "sub" / "notes.txt").write_text("more")
    before = _files(user)
    for cmd in (["build", "--model", str(mobile_onnx), "-o", str(user)],):
        assert_one_line_error(run_cli(*cmd), "not an xcompile build")
    assert _files(user) == before
    # An earlier build with a file of the user's put in it is not replaced either.
    out = tmp_path / "b"
    assert run_cli("build", "--model", str(mobile_onnx), "-o", str(out)).returncode == 0
    (out / "mine.txt").write_text("x")
    assert_one_line_error(run_cli("build", "--model", str(mobile_onnx), "-o", str(out)),
                          "files xcompile did not write", "mine.txt")
    assert (out / "mine.txt").read_text() == "x"


def test_outputs_never_hold_inputs(mobile_onnx, built, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    model = shutil.copy(mobile_onnx, proj / "model.onnx")
    assert_one_line_error(run_cli("build", "--model", str(model), "-o", str(proj)),
                          "input of this command")
    assert Path(model).is_file()
    # A tuning log given as both the log and the output.
    logs = tmp_path / "log"
    (logs / "host").mkdir(parents=True)
    shutil.copy(REPO / "xcompile" / "tuning_logs" / "x86-avx2" / "tuning.json",
                logs / "host" / "tuning.json")
    assert_one_line_error(run_cli("build", "--model", str(mobile_onnx), "--tuning-log",
                                  str(logs), "-o", str(logs)), "input of this command")
    assert (logs / "host" / "tuning.json").is_file()
    # package pk/b -o pk
    pk = tmp_path / "pk"
    _copy(built, pk / "b")
    assert_one_line_error(run_cli("package", str(pk / "b"), "-o", str(pk)), "input")
    assert (pk / "b" / "module.so").is_file()


def test_current_folder_root_empty_and_symlinks_are_refused_before_work(mobile_onnx,
                                                                       tmp_path):
    cwd = tmp_path / "src"
    cwd.mkdir()
    (cwd / "main.c").write_text("int main(){}")
    started = time.perf_counter()
    for out in (".", str(cwd), ""):
        proc = subprocess.run([sys.executable, "-m", "xcompile", "build", "--model",
                               str(mobile_onnx), "-o", out], cwd=cwd, capture_output=True,
                              text=True, timeout=120)
        assert_one_line_error(proc)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for link in ("link", "dangling"):
        assert_one_line_error(run_cli("build", "--model", str(mobile_onnx), "-o",
                                      str(tmp_path / link)), "symbolic link")
    assert_one_line_error(run_cli("build", "--model", str(mobile_onnx), "-o",
                                  str(tmp_path / ("x" * 250))), "too long")
    # All refused before compiling (a build takes several seconds; a refusal, TVM's
    # import at most).
    assert time.perf_counter() - started < 60
    assert (cwd / "main.c").read_text() == "int main(){}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "elsewhere", "link", "src"]


def test_replacing_a_build_is_one_swap_and_stale_temporaries_go(mobile_onnx, tmp_path):
    out = tmp_path / "b"
    assert run_cli("build", "--model", str(mobile_onnx), "-o", str(out)).returncode == 0
    first = out.stat().st_ino
    # What a kill in the middle of an earlier run left: its pid is no process now.
    stale = tmp_path / ".b.xc999999999-0123456789ab.tmp"
    stale.mkdir()
    (stale / "module.so").write_text("half")
    assert run_cli("build", "--model", str(mobile_onnx), "-o", str(out)).returncode == 0
    assert out.stat().st_ino != first  # the new folder took the old one's place
    assert run_cli("verify", str(out)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_failed_build_leaves_no_folders_it_made(mobile_onnx, tmp_path, monkeypatch):
    from xcompile import build as build_module
    from xcompile.errors import XCompileError

    def fail(*_args, **_kw):
        raise XCompileError("linking failed")

    monkeypatch.setattr(build_module, "_export", fail)
    out = tmp_path / "a" / "b" / "c" / "out"
    with pytest.raises(XCompileError, match="linking failed"):
        build_module.build(build_module.resolve_options(model=str(mobile_onnx), output=str(out)))
    assert list(tmp_path.iterdir()) == []


def test_file_outputs_replace_only_files_of_their_kind(built, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert_one_line_error(run_cli("run", str(built), "--output", str(precious)),
                          "not a file this command writes")
    assert_one_line_error(run_cli("bench", str(built), "--repeat", "1", "--json",
                                  str(precious)), "not a file this command writes")
    assert_one_line_error(run_cli("export-model", "-o", str(precious)),
                          "not a file this command writes")
    assert precious.read_text() == "keep me"
    # Its own kind it replaces: run twice onto the same .npy.
    for _ in range(2):
        assert run_cli("run", str(built), "--output", str(tmp_path / "y.npy")).returncode == 0


def test_export_best_never_replaces_a_users_folder(tmp_path):
    from xcompile.errors import XCompileError
    from xcompile.tuning.log_folder import export_best

    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("x")
    with pytest.raises(XCompileError, match="not an xcompile tuning log"):
        export_best(REPO / "xcompile" / "tuning_logs" / "x86-avx2", dst)
    assert (dst / "notes.txt").read_text() == "x"


# ---------------------------------------------------------------- 2. outside the build


@pytest.fixture(scope="module")
def foreign_so(tmp_path_factory) -> tuple[Path, Path]:
    """A shared object whose constructor leaves a mark: (library, mark)."""
    root = tmp_path_factory.mktemp("foreign")
    mark = root / "constructor-ran"
    src = root / "evil.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                   f'{{ FILE* f = fopen("{mark}", "w"); if (f) fclose(f); }}\n')
    lib = root / "evil.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib, mark


@pytest.mark.parametrize("name", ["../evil.so", "ABSOLUTE", "sub/module.so", ""])
def test_manifest_file_names_stay_inside_the_build(built, foreign_so, tmp_path, name):
    lib, mark = foreign_so
    target = tmp_path / "b"
    shutil.copy(lib, tmp_path / "evil.so")
    sha = hashlib.sha256(lib.read_bytes()).hexdigest()
    module = str(tmp_path / "evil.so") if name == "ABSOLUTE" else name

    def edit(m):
        m["module"] = module
        m["sha256"][module] = sha

    _copy(built, target, edit)
    for cmd in (["run", str(target)], ["verify", str(target)],
                ["package", str(target), "-o", str(tmp_path / "bundle")]):
        assert_one_line_error(run_cli(*cmd), "damaged")
    from xcompile import runner

    np.save(tmp_path / "x.npy", np.zeros((2, 3, 64, 64), np.float32))
    proc = subprocess.run([str(runner.build_runner("x86_64")), str(target), "--input",
                           str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert proc.returncode == 2 and "damaged" in proc.stderr, proc.stderr
    assert not mark.exists(), "a .so from outside the build was loaded"
    assert not (tmp_path / "bundle").exists()


def test_checksums_are_checked_before_any_use(built, tmp_path):
    from xcompile import runner

    np.save(tmp_path / "x.npy", np.zeros((2, 3, 64, 64), np.float32))
    flipped = _copy(built, tmp_path / "flipped")
    data = bytearray((flipped / "module.so").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "module.so").write_bytes(bytes(data))
    proc = runner.run(flipped, str(tmp_path / "x.npy"))
    assert proc.returncode == 2 and "SHA-256 differs" in proc.stderr, proc.stderr
    assert_one_line_error(run_cli("package", str(flipped), "-o", str(tmp_path / "bundle")),
                          "SHA-256 differs")
    assert not (tmp_path / "bundle").exists()
    # Truncated, with its checksum updated to match: refused, not a SIGBUS in dlopen.
    truncated = _copy(built, tmp_path / "truncated")
    whole = (truncated / "module.so").read_bytes()
    (truncated / "module.so").write_bytes(whole[: len(whole) // 2])
    _rehash(truncated, "module.so")
    assert_one_line_error(run_cli("run", str(truncated)), "truncated or damaged")


# ---------------------------------------------------------------- 3. tuning logs


def _mobile_depthwise(mobile_onnx) -> str:
    from xcompile import frontend, pipeline, targets
    from xcompile.tuning import tasks

    host = targets.resolve("host")
    lowered, _ = pipeline.lower(frontend.import_onnx(frontend.load_onnx(mobile_onnx)).mod, host)
    return next(t.name for t in tasks.extract(lowered, host.tvm_target())
                if t.kind == "depthwise")


@pytest.fixture(scope="module")
def tuned_log(mobile_onnx, tmp_path_factory) -> tuple[Path, str]:
    task = _mobile_depthwise(mobile_onnx)
    logs = tmp_path_factory.mktemp("faultlog") / "logs"
    proc = run_cli("tune", "--no-validate",
                   "--model", str(mobile_onnx), "--trials", "10", "--tasks",
                   f"^{task}$", "--log-dir", str(logs))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return logs, task


def _tune_in_background(mobile_onnx, task, logs, trials=400, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "xcompile", "tune", "--no-validate",
         "--model", str(mobile_onnx), "--tasks",
         f"^{task}$", "--log-dir", str(logs), "--trials", str(trials)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})})


def _wait_for_records(logs: Path, proc, count=2, timeout=180) -> None:
    records = logs / "host" / "database_tuning_record.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if records.is_file() and records.read_text().count("\n") >= count:
            return
        time.sleep(0.2)
    raise AssertionError("the tune made no records in time")


def test_one_tune_at_a_time_per_log_and_ctrl_c_ends_it(mobile_onnx, tuned_log, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(tuned_log[0], logs)
    before = json.loads((logs / "host" / "tuning.json").read_text())
    first = _tune_in_background(mobile_onnx, tuned_log[1], logs)
    try:
        _wait_for_records(logs, first, count=1 + len(
            (tuned_log[0] / "host" / "database_tuning_record.json").read_text().splitlines()))
        second = run_cli("tune", "--no-validate",
                         "--model", str(mobile_onnx), "--tasks", f"^{tuned_log[1]}$",
                         "--log-dir", str(logs), "--trials", "500")
        assert_one_line_error(second, "in use", f"pid {first.pid}")
        build = run_cli("build", "--model", str(mobile_onnx), "--tuning-log", str(logs),
                        "-o", str(tmp_path / "b"))
        assert_one_line_error(build, "in use")
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr[-1500:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "interrupted" in errors[0], stderr[-1500:]
    after = json.loads((logs / "host" / "tuning.json").read_text())
    assert len(after["runs"]) == len(before["runs"]) + 1  # finalised
    assert after["trials"] > before["trials"]


def test_unreadable_and_foreign_lines_are_kept_aside_not_deleted(mobile_onnx, tuned_log,
                                                                 tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(tuned_log[0], logs)
    folder = logs / "host"
    records = folder / "database_tuning_record.json"
    lines = records.read_text().splitlines()
    foreign = json.loads(lines[0])
    foreign[1][2] = {**foreign[1][2], "num-cores": 64}
    bad_times = [json.loads(lines[0]) for _ in range(3)]
    for rec, secs in zip(bad_times, ([-1.0], [0.0], ["NaN"])):
        rec[1][1] = secs
    with open(records, "a") as f:
        f.write(json.dumps(foreign) + "\n")
        for rec in bad_times:
            f.write(json.dumps(rec) + "\n")
        f.write("garbage\n")
        f.write(lines[-1][: len(lines[-1]) // 2])  # torn by a kill: no newline
    with open(folder / "database_workload.json", "a") as f:
        f.write('["123", "not a module"]\n')
    proc = run_cli("tune", "--no-validate",
                   "--model", str(mobile_onnx), "--tasks", f"^{tuned_log[1]}$",
                   "--log-dir", str(logs), "--trials", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = [json.loads(line) for line in records.read_text().splitlines()]  # all parse
    assert foreign[1] in [r[1] for r in kept]  # kept in the database
    rejected = [json.loads(x) for x in (folder / "rejected_records.json").read_text().splitlines()]
    reasons = [r["reason"] for r in rejected]
    assert sum("positive" in r for r in reasons) == 3
    assert any("torn" in r for r in reasons) and any("module" in r for r in reasons)
    assert any(r["line"] == "garbage" for r in rejected)
    # The build never applies a record whose time is not a positive number.
    m = json.loads((folder / "tuning.json").read_text())
    assert all(t["best_ms"] is None or t["best_ms"] > 0 for t in m["tasks"].values())


def test_a_damaged_tuning_manifest_is_bad_input(mobile_onnx, tuned_log, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(tuned_log[0], logs)
    (logs / "host" / "tuning.json").write_text(json.dumps({"format": 1, "tasks": [1, 2]}))
    for cmd in (["build", "--model", str(mobile_onnx), "--tuning-log", str(logs), "-o",
                 str(tmp_path / "b")],
                ["tune", "--model", str(mobile_onnx), "--log-dir", str(logs), "--trials", "4"]):
        proc = run_cli(*cmd)
        assert proc.returncode == 2
        assert_one_line_error(proc, "not an xcompile tuning manifest")


# ---------------------------------------------------------------- 4. signals


def test_tune_ends_cleanly_on_sigterm(mobile_onnx, tuned_log, tmp_path):
    sig, code = signal.SIGTERM, 143
    logs = tmp_path / "logs"
    shutil.copytree(tuned_log[0], logs)
    before = json.loads((logs / "host" / "tuning.json").read_text())
    proc = _tune_in_background(mobile_onnx, tuned_log[1], logs)
    _wait_for_records(logs, proc, count=1 + len(
        (tuned_log[0] / "host" / "database_tuning_record.json").read_text().splitlines()))
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-1500:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "interrupted" in errors[0], stderr[-1500:]
    after = json.loads((logs / "host" / "tuning.json").read_text())
    assert len(after["runs"]) == len(before["runs"]) + 1  # finalised
    assert after["trials"] > before["trials"]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["sigint", "sigterm"])
def test_build_ends_cleanly_on_a_signal(xception71_onnx, tmp_path, sig, code):
    proc = subprocess.Popen([sys.executable, "-m", "xcompile", "build", "--model",
                             str(xception71_onnx), "-o", str(tmp_path / "out" / "b")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the signal comes while TVM compiles
        seen.append(line)
        if "xcompile.build: compiling" in line:
            break
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    stderr = "".join(seen) + rest
    assert proc.returncode == code, stderr[-1500:]
    assert_one_line_error(subprocess.CompletedProcess([], code, "", stderr), "interrupted")
    assert not (tmp_path / "out").exists()  # no output, no temporary, no parent made


def _processes_with(tag: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_kill_9_of_tune_leaves_no_workers_and_loses_no_records(mobile_onnx, tuned_log,
                                                                 tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(tuned_log[0], logs)
    records = logs / "host" / "database_tuning_record.json"
    tag = f"XCOMPILE_FAULT_TEST_{os.getpid()}_{time.time_ns()}"
    proc = _tune_in_background(mobile_onnx, tuned_log[1], logs, env={tag: "1"})
    _wait_for_records(logs, proc, count=1 + len(
        (tuned_log[0] / "host" / "database_tuning_record.json").read_text().splitlines()))
    workers = [pid for pid in _processes_with(tag) if pid != proc.pid]
    assert workers, "the tune runs no worker processes"
    proc.kill()
    proc.communicate()
    kept = records.read_text().count("\n")
    deadline = time.time() + 20
    while time.time() < deadline and _processes_with(tag):
        time.sleep(0.2)
    assert _processes_with(tag) == [], "workers outlived the tuner"
    # The next run resumes: every line kept (a torn last one set aside, not lost).
    done = run_cli("tune", "--no-validate",
                   "--model", str(mobile_onnx), "--tasks", f"^{tuned_log[1]}$",
                   "--log-dir", str(logs), "--trials", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in records.read_text().splitlines()]  # all parse
    torn = logs / "host" / "rejected_records.json"
    assert len(lines) + (len(torn.read_text().splitlines()) if torn.exists() else 0) >= kept
    assert json.loads((logs / "host" / "tuning.json").read_text())["trials"] >= len(lines)


# ---------------------------------------------------------------- 5. bad input


def test_bad_inputs_are_one_line_exit_2(built, tmp_path):
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    assert_one_line_error(run_cli("run", str(built), "--input", str(empty)), "not a .npy")
    for rtol in ("-1", "nan", "0"):
        proc = run_cli("verify", str(built), "--rtol", rtol)
        assert proc.returncode == 2
        assert_one_line_error(proc, "positive number")
    for repeat in ("abc", "-5", "99999999999999"):
        assert run_cli("run", str(built), "--repeat", repeat).returncode == 2
    (tmp_path / "dir").mkdir()
    started = time.perf_counter()
    assert_one_line_error(run_cli("run", str(built), "--output", str(tmp_path / "dir")),
                          "is a folder")
    assert_one_line_error(run_cli("bench", str(built), "--json", str(tmp_path / "dir")),
                          "is a folder")
    assert time.perf_counter() - started < 60  # refused before running


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.clear() or m.update({"format": 1}), "damaged"),
    (lambda m: m.update({"inputs": []}), "one input"),
    (lambda m: m["inputs"][0].update({"shape": [2, "3", 64.5, 64]}), "non-integer"),
    (lambda m: m["params"].update({"names": "w0"}), "params"),
], ids=["bare", "no-inputs", "shapes", "names"])
def test_damaged_manifests(built, tmp_path, edit, needle):
    damaged = _copy(built, tmp_path / "b", edit)
    for cmd in (["run", str(damaged)], ["verify", str(damaged)],
                ["package", str(damaged), "-o", str(tmp_path / "bundle")]):
        proc = run_cli(*cmd)
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert_one_line_error(proc, needle)


def test_an_unusable_cache_is_one_line(built, tmp_path):
    blocker = tmp_path / "cache-file"
    blocker.write_text("x")
    proc = run_cli("package", str(built), "-o", str(tmp_path / "bundle"),
                   env={"XCOMPILE_CACHE": str(blocker)})
    assert proc.returncode == 2
    assert_one_line_error(proc, "XCOMPILE_CACHE")


def test_runner_bad_arguments(built, tmp_path):
    from xcompile import runner

    exe = runner.build_runner("x86_64")
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 64, 64), np.float32))
    (tmp_path / "out").mkdir()
    cases = [(["--repeat", "abc"], "--repeat"), (["--repeat", "-5"], "--repeat"),
             (["--repeat", "99999999999999"], "--repeat"),
             (["--output", str(tmp_path / "out")], "not a regular file")]
    for args, needle in cases:
        proc = subprocess.run([str(exe), str(built), "--input", str(tmp_path / "x.npy"), *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    fifo_build = _copy(built, tmp_path / "fifo")
    (fifo_build / "params.bin").unlink()
    os.mkfifo(fifo_build / "params.bin")
    proc = subprocess.run([str(exe), str(fifo_build), "--input", str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr, proc.stderr
    assert_one_line_error(run_cli("run", str(fifo_build), "--input", str(tmp_path / "x.npy")),
                          "not a regular file")


def test_a_batch_that_cannot_fit_is_refused_before_it_grows(xception71_onnx, tmp_path):
    import resource

    proc = run_cli("build", "--model", str(xception71_onnx), "--batch", "100000",
                   "-o", str(tmp_path / "b"))
    assert_one_line_error(proc, "activations need", "--batch")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib < 3 * 2**20, f"the child grew to {peak_kib / 2**20:.1f} GiB"


def test_empty_messages_make_one_line():
    from xcompile.errors import first_line, last_line

    assert first_line(RuntimeError()) == "RuntimeError" == last_line(RuntimeError(""))
    assert first_line(ValueError("a\nb")) == "a" and last_line(ValueError("a\nb")) == "b"


def test_an_int64_input_model_runs_in_the_cpp_runner(tmp_path):
    """The runner takes the input's dtype from the manifest (it once read float32 only)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from xcompile import runner

    w = numpy_helper.from_array(np.arange(24, dtype=np.float32).reshape(8, 3, 1, 1), "w")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Conv", ["f", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])], [w])
    path = tmp_path / "ids.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert run_cli("build", "--model", str(path), "-o", str(tmp_path / "b")).returncode == 0
    x = np.arange(48, dtype=np.int64).reshape(1, 3, 4, 4)
    outputs, _ = runner.predict(tmp_path / "b", x)
    ref = np.einsum("oc,nchw->nohw", np.arange(24, dtype=np.float32).reshape(8, 3), x)
    np.testing.assert_allclose(outputs[0], ref, rtol=1e-6)


def test_nan_inputs_give_nan_as_onnxruntime_does(xception71_onnx, tmp_path):
    """ReLU was max(x, 0), which LLVM makes a maxnum: NaN came out as 0."""
    from conftest import ort_run
    from xcompile import runtime
    from xcompile.build import build, resolve_options

    build(resolve_options(model=str(xception71_onnx), output=str(tmp_path / "b")))
    x = np.full((1, 3, 71, 71), np.nan, np.float32)
    ours = runtime.load(tmp_path / "b")(x)
    ref = ort_run(xception71_onnx, x)
    assert np.isnan(ref).all() and np.isnan(ours).all()
