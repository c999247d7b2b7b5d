"""Applying a tuning log in a build: each kernel with a record gets the fastest
record's schedule, when it beat our default schedule's measured latency and the log's
validation (timed inside the whole model) did not reject it; every other kernel is left
to the rules. Shipped logs live in ``xcompile/tuning_logs/<preset>``; a user's log is
applied over the shipped log of its target (``load_for_build``): what the user's log
has no accepted result for takes the shipped log's, as the default build does."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xcompile.schedules import (rule_name, rules_by_name, tag_scheduled, with_work_of,
                                without_work)

from xcompile.errors import XCompileError, last_line

from . import log_folder

log = logging.getLogger(__name__)

TUNED_RULE = "meta_schedule.tuned"
SHIPPED = Path(__file__).resolve().parent.parent / "tuning_logs"


def workload(func):
    """MetaSchedule's workload module for a kernel: the function as ``main``, as the
    tuner saw it (without the build's kind and FLOPs annotations)."""
    import tvm

    return tvm.IRModule({"main": without_work(func).with_attr("global_symbol", "main")})


def workload_hash(func) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(workload(func)))


class TunedKernels:
    """The usable results of one log folder for one target: per workload, our rules'
    timed configurations (manifest) and MetaSchedule's records (database)."""

    def __init__(self, folder: Path, key: str, rules: list, model: tuple | None = None,
                 fallback: TunedKernels | None = None):
        """``model``: (the sha256 of the ONNX file built, its batch), whose validations
        count first (``log_folder.judgement``); ``fallback``: the log whose results
        apply to the kernels this one applies none to (the shipped log, under a
        user's)."""
        self.folder = folder
        self.fallback = fallback
        with log_folder.locked(folder, exclusive=False):  # not while a tune writes it
            manifest = log_folder.read_manifest(folder)
            if manifest is None:
                raise XCompileError(f"tuning log {folder} has no {log_folder.MANIFEST}: not "
                                    "an xcompile tuning log")
            log_folder.check_target(folder, manifest, key)
            contents = log_folder.read_log(folder, key)
            validation = log_folder.read_validation(folder)
        # Workloads whose result did not make the model faster, timed inside it, and
        # workload -> the rank of the candidate the validation chose in the model.
        self.rejected, self.ranks = (log_folder.judgement(validation, *(model or (None, None)))
                                     if validation else (set(), {}))
        self.validated = validation is not None
        self.workloads = contents.workloads
        self.records = contents.best()
        self.tasks = manifest.get("tasks", {})
        self.rules = rules_by_name(rules)
        self.applied: dict[str, str] = {}  # kernel -> what scheduled it
        self.applied_workloads: dict[str, str] = {}  # kernel -> its workload hash
        self.kept: list[str] = []  # kernels whose default schedule was the fastest
        # Kernels whose rule has another default schedule than the one the log timed:
        # what the log knows of them was measured against that one (``stale_default``);
        # kernel -> its workload hash.
        self.stale: dict[str, str] = {}

    @staticmethod
    def _candidates(entry: dict, records: list) -> list[tuple]:
        """``(ms, kind, config)`` fastest first: our timed configurations, and
        MetaSchedule's fastest record (``kind`` "record"; the shipped logs keep only it),
        our configuration first on a tie."""
        cands = [(ms, 0, "config", k) for k, ms in entry.get("configs", {}).items()
                 if ms is not None]
        if records:
            cands.append((records[0].seconds * 1e3, 1, "record", None))
        return [(ms, kind, k) for ms, _, kind, k in sorted(cands)]

    def schedule(self, name: str, func):
        """``(tuned PrimFunc, label)`` for ``func``, or None: no result for it, our
        default schedule was the fastest, or nothing faster applies. The fastest result
        alone is taken, or the one the log's validation chose in the whole model (its
        rank among the candidates, ``log_folder.judgement``)."""
        import tvm_ffi

        mod = workload(func)
        key = str(tvm_ffi.structural_hash(mod))
        entry = self.tasks.get(key, {})
        if key in self.rejected:
            self.kept.append(name)
            return None
        rule = self.rules.get(entry.get("rule"))
        if stale_default(entry, rule, func, tvm_target()):
            self.stale[name] = key
            return None
        baseline = entry.get("baseline_ms")
        records = [r for r in self.records.get(key, [])
                   if baseline is None or r.seconds * 1e3 < baseline]
        cands = self._candidates(entry, records)
        rank = min(self.ranks.get(key, 1), len(cands)) if cands else 0
        config = None
        if cands:
            ms, kind, chosen = cands[rank - 1]
            config = (ms, chosen) if kind == "config" else None
            if kind == "record":
                for rec in records:
                    tuned = self._replay(name, mod, rec)
                    if tuned is not None:
                        self.applied[name] = f"metaschedule {rec.seconds * 1e3:.3f} ms"
                        self.applied_workloads[name] = key
                        return _same_symbol(tuned, func), TUNED_RULE
                # No record replays: our fastest configuration, if any.
                config = next(((ms, k) for ms, kind, k in cands if kind == "config"), None)
        if config is None or rule is None or config[1] == entry.get("default_config"):
            if entry:
                self.kept.append(name)
            return None
        sch = rule.apply_config(func, tvm_target(), rule.config_from_json(json.loads(config[1])))
        if sch is None:
            return None
        self.applied[name] = f"{rule_name(rule)} {config[1]} {config[0]:.3f} ms"
        self.applied_workloads[name] = key
        return with_work_of(sch.mod["main"], func), f"{rule_name(rule)} (tuned)"

    def _replay(self, name: str, mod, rec):
        import tvm_ffi
        from tvm import s_tir
        from tvm.s_tir import meta_schedule as ms

        stored = ms.database.Workload.from_json(self.workloads[rec.workload]).mod
        if not tvm_ffi.structural_equal(stored, mod):  # a hash collision
            return None
        sch = s_tir.Schedule(mod)
        try:
            s_tir.Trace.apply_json_to_schedule(rec.raw[1][0], sch)
        except Exception as e:  # a damaged record: the next best may apply
            log.warning("tuning log %s: a record for %s does not apply (%s); skipped",
                        self.folder, name, last_line(e)[:120])
            return None
        return sch.mod["main"]

    def apply_pass(self):
        """A module pass scheduling every kernel this log has a winning record for."""
        import tvm
        from tvm import tirx

        @tvm.transform.module_pass(opt_level=0, name="xcompile.ApplyTuningLog")
        def _pass(mod, _ctx):
            for gvar, func in list(mod.functions_items()):
                if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled"):
                    continue
                found = self.schedule(gvar.name_hint, func)
                if found is None and self.fallback is not None:
                    found = self.fallback.schedule(gvar.name_hint, func)
                    if found is not None and gvar.name_hint in self.kept:
                        self.kept.remove(gvar.name_hint)
                if found is not None:
                    tuned, label = found
                    mod[gvar] = tag_scheduled(tuned, label)
            log.info("tuning log %s: %d kernels tuned, %d kept our schedule%s", self.folder,
                     len(self.applied), len(self.kept),
                     f"; {len(self.fallback.applied)} more from the shipped log "
                     f"{self.fallback.folder.name}" if self.fallback else "")
            if self.stale:
                log.warning("tuning log %s: our default schedule of %d kernels changed since "
                            "it was tuned (%s); they get the new one; tune again to time "
                            "them", self.folder, len(self.stale),
                            ", ".join(list(self.stale)[:4])
                            + (", ..." if len(self.stale) > 4 else ""))
            return mod

        return _pass

    def summary(self) -> dict:
        """What a build manifest records about the log it applied (and, under
        ``fallback``, about the shipped log beneath it)."""
        out = {"log": str(self.folder), "applied": dict(sorted(self.applied.items())),
               "workloads": dict(sorted(self.applied_workloads.items())),
               "kept_default": sorted(self.kept), "stale_default": sorted(self.stale),
               "stale_workloads": dict(sorted(self.stale.items())),
               "validated": self.validated}
        if self.fallback is not None:
            out["fallback"] = self.fallback.summary()
        return out


def stale_default(entry: dict, rule, func, target) -> bool:
    """Whether a log ``entry`` timed another default configuration of ``rule`` for
    ``func`` than the rule's default now: its baseline, and the results that beat it,
    were measured against a schedule the build no longer uses. (Entries of rules with
    one schedule, or from before defaults were recorded, are taken as they are.)"""
    timed = entry.get("default_config")
    if timed is None or rule is None or not hasattr(rule, "default_config_key"):
        return False
    return rule.default_config_key(func, target) != timed


def _same_symbol(tuned, func):
    """``tuned`` with ``func``'s global symbol (or none, as the pipeline's kernels have)
    and its kind and FLOPs."""
    tuned = with_work_of(tuned, func)
    symbol = func.attrs.get("global_symbol") if func.attrs else None
    if symbol is None:
        return tuned.without_attr("global_symbol")
    return tuned.with_attr("global_symbol", symbol)


def tvm_target():
    """The target the build pass runs under."""
    import tvm

    return tvm.target.Target.current(allow_none=False)


def shipped_log(key: str, cpu: str | None = None) -> Path | None:
    """The shipped log folder for exactly the target ``key``: the one tuned on the CPU
    model ``cpu`` (``targets.host_cpu``; None for a build that runs elsewhere) where
    there is one, else the one that names no CPU model, never one tuned on another
    model: what is fastest on one model is not on another of the same ISA (a Zen 4's
    tune of the 19x19x728 GEMMs at batch 8 chose tiles one channel vector wide, where
    our default, chosen on an Emerald Rapids, is two), and the Zen 4's own log
    validated 0.939x at batch 8."""
    if not SHIPPED.is_dir():
        return None
    found: dict[str | None, Path] = {}
    for folder in sorted(p for p in SHIPPED.iterdir() if p.is_dir()):
        try:
            manifest = log_folder.read_manifest(folder)
        except XCompileError:
            continue
        if manifest and log_folder.target_key(manifest["target"]["tvm"]) == key:
            found.setdefault(manifest.get("cpu"), folder)
    return found.get(cpu) if cpu in found else found.get(None)


def default_log(preset, under: Path | None = None) -> Path | None:
    """The log a build for ``preset`` applies by default: the shipped one for its
    target (``shipped_log``), or None; also None where that is the folder ``under``
    itself (a log is not applied over itself)."""
    from xcompile import targets

    shipped = shipped_log(log_folder.target_key(preset.tvm_target()),
                          targets.host_cpu() if targets.runs_here(preset) else None)
    if shipped is not None and under is not None and shipped.resolve() == under.resolve():
        return None
    return shipped


def load_for_build(spec: str | None, preset, model: tuple | None = None
                   ) -> TunedKernels | None:
    """``spec``: a log folder (its own or holding ``<preset>/``), ``"none"``, or None for
    the shipped log of this target when there is one; ``model``: (the sha256 of the
    ONNX file, the batch built), see ``TunedKernels``. A log folder is applied over the
    shipped log (its ``fallback``): a user's tune judged against the default build
    (``tuning_validation``) replaces the shipped results it beat and keeps the others,
    instead of dropping every kernel it has no result for back to our defaults. (On
    the Zen 4, a 480-trial tune of legacy_xception alone ran 1.013x as long as the
    default build with the shipped log, 60 paired rounds.)"""
    from xcompile import schedules

    key = log_folder.target_key(preset.tvm_target())
    if spec is not None and spec.lower() == "none":
        return None
    rules = schedules.rules_for(preset.family)
    if spec is None:
        shipped = default_log(preset)
        if shipped is None:
            return None
        log.info("using the shipped tuning log %s", shipped.name)
        return TunedKernels(shipped, key, rules, model)
    folder = log_folder.resolve_folder(spec, preset.name)
    shipped = default_log(preset, under=folder)
    fallback = TunedKernels(shipped, key, rules, model) if shipped is not None else None
    return TunedKernels(folder, key, rules, model, fallback)
