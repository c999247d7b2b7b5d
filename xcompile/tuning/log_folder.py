"""Tuning logs: one folder per target, MetaSchedule's JSON database plus our manifest.

Folder contents:
- ``database_workload.json`` and ``database_tuning_record.json``: MetaSchedule's
  ``JSONDatabase`` (newline-delimited JSON; a record is appended as one line when it is
  measured, so a killed run loses at most the line being written);
- ``tuning.json``: the manifest (target, versions, models tuned, per task: the baseline
  latency of our default schedule, the best tuned latency and trials; totals);
- ``convergence.csv`` and ``convergence.png``: estimated model latency against trials;
- ``validation.json``: which kernels' results made the model faster when timed inside
  it (``xcompile tune`` writes it last; builds apply only those while the log is
  unchanged since);
- ``rejected_records.json``: lines taken out of the database because they could not be
  read (torn by a kill, garbage), each with the reason: kept, never deleted;
- ``.lock``: the lock file (``tune`` holds it exclusively, builds share it).

Reading checks every line: a line that does not parse, a workload that is not a
module, a record with a time that is not a positive number is skipped with a warning; a
record made for another target is skipped with a warning (and kept in the file); a log
whose manifest names another target is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xcompile.errors import XCompileError
from xcompile.files import OutputKind, atomic_path, check_output_folder, ours

log = logging.getLogger(__name__)

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
MANIFEST = "tuning.json"
CURVE_CSV = "convergence.csv"
CURVE_PNG = "convergence.png"
REJECTED = "rejected_records.json"
VALIDATION = "validation.json"
LOCK = ".lock"
FORMAT = 1
# How candidates were timed (measure.Evaluator): logs of one timing are not comparable
# with another's. Manifests written before this field timed warm; "rotated-weights"
# (earlier logs, the shipped ones among them) rotated the outputs with the weights.
TIMING_CPU = "rotated-weights-warm-output"
TIMING_FLUSHED = "flushed"  # over RPC: TVM's CPU cache flush before each repeat
TIMING_WARM = "warm"


def _is_log(folder: Path) -> bool:
    """A folder holding a log's files (a damaged manifest is reported when read)."""
    return (folder / MANIFEST).is_file() or (folder / RECORDS).is_file()


LOG = OutputKind("tuning log", _is_log,
                 frozenset({WORKLOADS, RECORDS, MANIFEST, CURVE_CSV, CURVE_PNG, REJECTED,
                            VALIDATION, LOCK, "logs"}))


def check_folder(folder: Path) -> Path:
    """A folder ``tune`` may write a log into: absent, empty, or a tuning log."""
    if folder.is_dir() and not any(folder.iterdir()):
        return folder
    return check_output_folder(folder, LOG)


def target_key(target) -> str:
    """A canonical string for a TVM target (what records and manifests are compared by)."""
    import tvm

    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    return json.dumps(json.loads(str(target)), sort_keys=True)


@contextlib.contextmanager
def locked(folder: Path, exclusive: bool) -> Iterator[None]:
    """Hold the log folder's lock: ``exclusive`` for a writer (``tune``: one at a time),
    shared for readers (builds). Taken or refused at once, naming the holder's pid. A
    folder this process cannot write (a shipped log in site-packages) cannot change
    under it and is read without a lock."""
    import fcntl

    if not os.access(folder, os.W_OK):
        yield
        return
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise XCompileError(f"cannot lock the tuning log {folder}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise XCompileError(f"tuning log {folder} is in use by another xcompile "
                                f"{'process' if exclusive else 'tune'} (pid {holder}); "
                                "wait for it to end") from None
        if exclusive:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class Record:
    """One measured candidate: the line index of its workload, mean seconds, raw JSON."""

    workload: int
    seconds: float
    raw: list


@dataclass
class LogContents:
    """What a log folder holds after checking (``workloads[i]`` = [hash, module json]).

    ``rejected`` are the lines that cannot be read, with the file and the reason;
    ``foreign`` the readable records made for another target (kept in the database)."""

    workloads: list = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    foreign: list[list] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def best(self) -> dict[str, list[Record]]:
        """Workload hash -> its records, fastest first."""
        out: dict[str, list[Record]] = {}
        for r in self.records:
            out.setdefault(self.workloads[r.workload][0], []).append(r)
        for recs in out.values():
            recs.sort(key=lambda r: r.seconds)
        return out


def read_manifest(folder: Path) -> dict | None:
    """The log's manifest, checked (None when there is none)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise XCompileError(f"tuning log {folder}: {MANIFEST} is unreadable ({e})") from e
    problem = _manifest_problem(data)
    if problem:
        raise XCompileError(f"tuning log {folder}: {MANIFEST} is not an xcompile tuning "
                            f"manifest ({problem})")
    return data


def _manifest_problem(data) -> str | None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return f"format {FORMAT} expected"
    target = data.get("target")
    if not isinstance(target, dict) or not isinstance(target.get("name"), str) \
            or not isinstance(target.get("tvm"), dict):
        return "no target"
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str)
            and isinstance(t.get("configs", {}), dict) for t in tasks.values()):
        return "tasks are not task entries"
    for key, kind in (("models", dict), ("runs", list), ("trials", int)):
        if not isinstance(data.get(key), kind):
            return f"no {key}"
    return None


def check_target(folder: Path, manifest: dict | None, key: str) -> None:
    """Refuse a log whose manifest was written for another target."""
    if manifest is None:
        return
    theirs = manifest["target"]["tvm"]
    if json.dumps(theirs, sort_keys=True) != key:
        name = manifest["target"]["name"]
        raise XCompileError(f"tuning log {folder} was tuned for target {name} "
                            f"({json.dumps(theirs, sort_keys=True)}), not {key}; "
                            "refusing to apply it")


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise XCompileError(f"cannot read {path}: {e.strerror}") from e


def _workload_problem(item) -> str | None:
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], str)):
        return "not a [hash, module] pair"
    import tvm
    from tvm.s_tir.meta_schedule.database import Workload

    try:
        mod = Workload.from_json(item).mod  # (MetaSchedule's own encoding of the module)
    except Exception:
        return "its module does not parse"
    if not isinstance(mod, tvm.IRModule):
        return "not a module"
    return None


def _record_problem(record, indices) -> tuple[str | None, float]:
    try:
        index, body = record
        trace, run_secs, _target, _args = body
        secs = [float(s) for s in run_secs]
    except (ValueError, TypeError):
        return "not a record", 0.0
    if index not in indices:
        return "its workload is not in the log", 0.0
    if not isinstance(trace, list):
        return "its trace is not a list", 0.0
    if not secs or not all(math.isfinite(s) and s > 0 for s in secs):
        return "its times are not positive numbers", 0.0
    return None, sum(secs) / len(secs)


def read_log(folder: Path, key: str) -> LogContents:
    """Parse and check ``folder``'s database against the target ``key``."""
    out = LogContents()
    remap: dict[int, int] = {}
    for i, line in enumerate(_lines(folder / WORKLOADS)):
        try:
            item = json.loads(line)
            problem = _workload_problem(item)
        except ValueError:
            problem = "not JSON (a line torn by a kill?)"
        if problem:
            out.rejected.append({"file": WORKLOADS, "line": line, "reason": problem})
            continue
        remap[i] = len(out.workloads)
        out.workloads.append(item)
    for line in _lines(folder / RECORDS):
        try:
            record = json.loads(line)
            problem, seconds = _record_problem(record, remap)
        except ValueError:
            problem, seconds = "not JSON (a line torn by a kill?)", 0.0
        if problem is None:
            try:
                same = target_key(record[1][2]) == key
            except Exception:  # not a target at all
                problem = "its target is not a target"
        if problem:
            out.rejected.append({"file": RECORDS, "line": line, "reason": problem})
            continue
        record = [remap[record[0]], record[1]]
        if same:
            out.records.append(Record(record[0], seconds, record))
        else:
            out.foreign.append(record)
    if out.rejected:
        log.warning("tuning log %s: skipped %d line(s) that cannot be read (%s)", folder,
                    len(out.rejected), out.rejected[0]["reason"])
    if out.foreign:
        log.warning("tuning log %s: skipped %d record(s) tuned for another target", folder,
                    len(out.foreign))
    return out


def set_aside_rejected(folder: Path, contents: LogContents) -> None:
    """Before appending (under the exclusive lock): move the lines ``read_log`` could not
    read to ``rejected_records.json`` (appended, with their reasons) and rewrite the
    database without them (records made for another target stay), so MetaSchedule
    reads it and the next record cannot merge with a torn last line."""
    if not contents.rejected:
        return
    with open(folder / REJECTED, "a", encoding="utf-8") as f:
        for item in contents.rejected:
            f.write(json.dumps(item) + "\n")
    with atomic_path(folder / WORKLOADS, ours) as tmp:
        tmp.write_text("".join(json.dumps(w) + "\n" for w in contents.workloads))
    records = [r.raw for r in contents.records] + contents.foreign
    records.sort(key=lambda r: r[0])
    with atomic_path(folder / RECORDS, ours) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    log.warning("tuning log %s: %d unreadable line(s) moved to %s", folder,
                len(contents.rejected), REJECTED)
    contents.rejected = []


def write_manifest(folder: Path, manifest: dict) -> None:
    with atomic_path(folder / MANIFEST, ours) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def log_stamp(folder: Path) -> str:
    """A digest of what a build applies from the log (its records and manifest): a
    validation holds only for the log it was made from."""
    import hashlib

    h = hashlib.sha256()
    for name in (MANIFEST, RECORDS):
        path = folder / name
        h.update(name.encode() + b"\0")
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def write_validation(folder: Path, validation: dict, stamp: str | None = None) -> None:
    """Write ``validation``, stamped with ``stamp`` (the log it judged, taken before
    judging it) or else with the log as it is now."""
    data = dict(validation, log_stamp=stamp or log_stamp(folder))
    with atomic_path(folder / VALIDATION, ours) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_validation(folder: Path) -> dict | None:
    """The log's validation when it was made from the log as it is now; None when there
    is none or the log changed since (a warning says so: then every record applies)."""
    path = folder / VALIDATION
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        rejected = data["rejected"]
        ok = isinstance(rejected, list) and all(isinstance(h, str) for h in rejected)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        log.warning("tuning log %s: %s is unreadable; applying every record", folder,
                    VALIDATION)
        return None
    if data.get("log_stamp") != log_stamp(folder):
        log.warning("tuning log %s changed since it was validated; applying every record "
                    "(run xcompile tune on it again to validate)", folder)
        return None
    return data


def verdicts(validation: dict) -> list[dict]:
    """The verdicts a validation holds, its own first, then those it carried forward
    (``earlier``, newest first): each ``{"model", "batch", "judged", "rejected",
    "choice"}``."""
    own = {"model": validation.get("model_hash"), "batch": validation.get("batch"),
           "judged": [w.get("workload") for w in validation.get("workloads", [])
                      if isinstance(w, dict)],
           "rejected": validation.get("rejected", []), "choice": validation.get("choice", {})}
    return [own, *(v for v in validation.get("earlier", []) if isinstance(v, dict))]


def _same_batch(a, b) -> bool:
    # A verdict written before verdicts named the batch they ran at says None: the
    # model's own, batch 1 for every model those were made with.
    return (a or 1) == (b or 1)


def judgement(validation: dict, model: str | None = None,
              batch: int | None = None) -> tuple[set[str], dict[str, int]]:
    """(the rejected workloads, workload -> the rank of the result chosen in the model)
    for a build of ``model`` (its sha256) at ``batch``. Each workload takes the verdicts
    of this model at this batch where one judged it, else those at this batch on other
    models, else any: within those it is rejected where one rejected it, and takes the
    newest choice. A batch-8 model whose slices run its batch-1 kernels shares their
    workloads with the batch-1 model, and the two validations may differ (the Zen 4's
    x86-avx2 log: 0.945x as long with it at batch 1, not faster at batch 8): neither
    erases the other. A workload no verdict judged is not rejected, rank 1."""
    tiers = [lambda v: model is not None and v.get("model") == model
             and _same_batch(v.get("batch"), batch),
             lambda v: _same_batch(v.get("batch"), batch),
             lambda v: True]
    every = verdicts(validation)
    rejected: set[str] = set()
    ranks: dict[str, int] = {}
    settled: set[str] = set()
    for tier in tiers:
        here = [v for v in every if tier(v)]
        # (What a verdict rejected or chose a rank for, it judged.)
        judged = {w for v in here for w in (*v.get("judged", []), *v.get("rejected", []),
                                            *_choice(v))}
        judged -= settled
        for v in here:
            rejected.update(w for w in v.get("rejected", []) if w in judged)
            for w, r in _choice(v).items():
                if w in judged:
                    ranks.setdefault(str(w), int(r))
        settled |= judged
    return rejected, ranks


def _choice(verdict: dict) -> dict:
    choice = verdict.get("choice", {})
    return choice if isinstance(choice, dict) else {}


def previous_validation(folder: Path) -> dict | None:
    """The validation in ``folder`` as written, whatever log it judged (None if none)."""
    try:
        old = json.loads((folder / VALIDATION).read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def earlier_verdicts(old: dict | None, model: str, batch) -> list[dict]:
    """What a new validation of ``model`` at ``batch`` carries forward from the previous
    one (``old``, ``previous_validation``): every verdict on another model or batch,
    whole, so that tuning a second model or batch into a log keeps the first one's
    (a build weighs them: ``judgement``)."""
    if old is None:
        return []
    out = []
    for v in verdicts(old):
        if v.get("model") is None or (v.get("model") == model
                                      and _same_batch(v.get("batch"), batch)):
            continue
        out.append({"model": v["model"], "batch": v.get("batch"),
                    "judged": list(v.get("judged", [])),
                    "rejected": list(v.get("rejected", [])), "choice": dict(_choice(v))})
    return [v for v in out if v["judged"]]


def resolve_folder(path: str | os.PathLike, preset_name: str) -> Path:
    """The log folder for a preset: ``path`` itself when it holds a log, else
    ``path/<preset>``."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / RECORDS).is_file():
        return path
    sub = path / preset_name
    if (sub / MANIFEST).is_file() or (sub / RECORDS).is_file():
        return sub
    raise XCompileError(f"no tuning log in {path} (nor in {sub})")


def export_best(folder: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy the log in ``folder`` to ``dst`` keeping only the fastest record of each
    workload (what a build applies), with the manifest and the convergence files: how
    the logs shipped in ``xcompile/tuning_logs`` are made."""
    import shutil

    from xcompile.files import atomic_dir

    folder = Path(folder)
    with locked(folder, exclusive=False):
        manifest = read_manifest(folder)
        if manifest is None:
            raise XCompileError(f"no tuning log in {folder}")
        contents = read_log(folder, json.dumps(manifest["target"]["tvm"], sort_keys=True))
        best = [recs[0] for recs in contents.best().values()]
        with atomic_dir(dst, LOG, inputs=[folder]) as tmp:
            keep = sorted({r.workload for r in best})
            index = {old: new for new, old in enumerate(keep)}
            (tmp / WORKLOADS).write_text("".join(json.dumps(contents.workloads[i]) + "\n"
                                                 for i in keep))
            (tmp / RECORDS).write_text("".join(json.dumps([index[r.workload], r.raw[1]])
                                               + "\n" for r in best))
            for name in (MANIFEST, CURVE_CSV, CURVE_PNG):
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, tmp / name)
            validation = read_validation(folder)
            if validation is not None:  # stamped again: the records file is new
                write_validation(tmp, validation)
    return Path(dst)
