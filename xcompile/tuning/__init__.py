"""Auto-tuning with MetaSchedule: tasks, design spaces seeded by our rules, persistent
measurement workers, per-target logs, and applying logs in builds.

``tune`` runs a session (``xcompile tune``); ``load_for_build`` gives the build the
records of a log (``build --tuning-log``, or the shipped log for the target).
"""

from .apply import TUNED_RULE, TunedKernels, load_for_build
from .driver import DEFAULT_LOG_DIR, TuneOptions, resolve_tune_options, tune

__all__ = ["DEFAULT_LOG_DIR", "TUNED_RULE", "TuneOptions", "TunedKernels", "load_for_build",
           "resolve_tune_options", "tune"]
