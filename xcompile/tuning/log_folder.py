"""Tuning logs: one folder per target, MetaSchedule's JSON database plus our manifest.

Folder contents:
- ``database_workload.json`` and ``database_tuning_record.json``: MetaSchedule's
  ``JSONDatabase`` (newline-delimited JSON; a record is appended as one line when it is
  measured, so a killed run loses at most the line being written);
- ``tuning.json``: the manifest (target, versions, models tuned, per task: the baseline
  latency of our default schedule, the best tuned latency and trials; totals);
- ``convergence.csv`` and ``convergence.png``: estimated model latency against trials.

Reading checks every line: a truncated or garbage line is skipped with a warning, a
record made for another target is skipped with a warning, and a log whose manifest
names another target is refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from xcompile.errors import XCompileError
from xcompile.files import atomic_path

log = logging.getLogger(__name__)

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
MANIFEST = "tuning.json"
CURVE_CSV = "convergence.csv"
CURVE_PNG = "convergence.png"
FORMAT = 1


def target_key(target) -> str:
    """A canonical string for a TVM target (what records and manifests are compared by)."""
    import tvm

    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    return json.dumps(json.loads(str(target)), sort_keys=True)


@dataclass
class Record:
    """One measured candidate: the line index of its workload, mean seconds, raw JSON."""

    workload: int
    seconds: float
    raw: list


@dataclass
class LogContents:
    """What a log folder holds after checking (``workloads[i]`` = [hash, module json])."""

    workloads: list = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    dropped_lines: int = 0
    foreign_records: int = 0

    def best(self) -> dict[str, list[Record]]:
        """Workload hash -> its records, fastest first."""
        out: dict[str, list[Record]] = {}
        for r in self.records:
            out.setdefault(self.workloads[r.workload][0], []).append(r)
        for recs in out.values():
            recs.sort(key=lambda r: r.seconds)
        return out


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise XCompileError(f"tuning log {folder}: {MANIFEST} is unreadable ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise XCompileError(f"tuning log {folder}: {MANIFEST} is not an xcompile "
                            f"tuning manifest (format {FORMAT})")
    return data


def check_target(folder: Path, manifest: dict | None, key: str) -> None:
    """Refuse a log whose manifest was written for another target."""
    if manifest is None:
        return
    theirs = manifest.get("target", {}).get("tvm")
    if theirs is None or json.dumps(theirs, sort_keys=True) != key:
        name = manifest.get("target", {}).get("name", "?")
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


def read_log(folder: Path, key: str) -> LogContents:
    """Parse and check ``folder``'s database against the target ``key``."""
    out = LogContents()
    remap: dict[int, int] = {}
    for i, line in enumerate(_lines(folder / WORKLOADS)):
        try:
            item = json.loads(line)
            ok = (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                  and isinstance(item[1], str))
        except ValueError:
            ok = False
        if not ok:
            out.dropped_lines += 1
            continue
        remap[i] = len(out.workloads)
        out.workloads.append(item)
    for line in _lines(folder / RECORDS):
        try:
            index, body = json.loads(line)
            trace, run_secs, target, _args = body
            secs = [float(s) for s in run_secs]
            if index not in remap or not secs or not isinstance(trace, list):
                raise ValueError
        except (ValueError, TypeError):
            out.dropped_lines += 1
            continue
        try:
            same = target_key(target) == key
        except Exception:  # not a target at all
            out.dropped_lines += 1
            continue
        if not same:
            out.foreign_records += 1
            continue
        out.records.append(Record(remap[index], sum(secs) / len(secs), [remap[index], body]))
    if out.dropped_lines:
        log.warning("tuning log %s: skipped %d truncated or malformed line(s)", folder,
                    out.dropped_lines)
    if out.foreign_records:
        log.warning("tuning log %s: skipped %d record(s) tuned for another target", folder,
                    out.foreign_records)
    return out


def rewrite_clean(folder: Path, contents: LogContents) -> None:
    """Rewrite the database without the lines ``read_log`` skipped (before appending to
    it: a truncated last line would otherwise merge with the next record)."""
    if not (contents.dropped_lines or contents.foreign_records):
        return
    with atomic_path(folder / WORKLOADS) as tmp:
        tmp.write_text("".join(json.dumps(w) + "\n" for w in contents.workloads))
    with atomic_path(folder / RECORDS) as tmp:
        tmp.write_text("".join(json.dumps(r.raw) + "\n" for r in contents.records))


def write_manifest(folder: Path, manifest: dict) -> None:
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


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
    manifest = read_manifest(folder)
    if manifest is None:
        raise XCompileError(f"no tuning log in {folder}")
    contents = read_log(folder, json.dumps(manifest["target"]["tvm"], sort_keys=True))
    best = [recs[0] for recs in contents.best().values()]
    with atomic_dir(dst) as tmp:
        keep = sorted({r.workload for r in best})
        index = {old: new for new, old in enumerate(keep)}
        (tmp / WORKLOADS).write_text("".join(json.dumps(contents.workloads[i]) + "\n"
                                             for i in keep))
        (tmp / RECORDS).write_text("".join(json.dumps([index[r.workload], r.raw[1]]) + "\n"
                                           for r in best))
        for name in (MANIFEST, CURVE_CSV, CURVE_PNG):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
    return Path(dst)
