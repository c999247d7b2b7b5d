"""Progress of a tuning run: a line per measured batch (task, trials, best latency,
estimated model latency, time left), the convergence history appended to a CSV as it
grows, and the convergence plot drawn from it at the end."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from xcompile.errors import XCompileError
from xcompile.files import atomic_path, ours

log = logging.getLogger("xcompile.tune")


class Progress:
    """Best latency per task and the model estimate, updated as results come in.

    ``estimate_ms`` is the sum over all of the model's kernels of calls x best latency
    (our default schedule's latency for kernels not tuned): the model's time without
    the VM's own overhead.
    """

    def __init__(self, best_ms: dict[str, float], weights: dict[str, int],
                 trials_done: int, budget: int, csv_path: Path, elapsed_before: float):
        self.best_ms = dict(best_ms)  # task name -> ms
        self.weights = weights
        self.trials = trials_done
        self.start_trials = trials_done
        self.budget = budget
        self.csv = csv_path
        self.elapsed_before = elapsed_before
        self.started = time.perf_counter()
        self.per_task: dict[str, int] = {}
        if not self.csv.exists():
            self._append("trials,elapsed_s,estimated_ms\n")
            self._point()

    def estimate_ms(self) -> float:
        return sum(self.weights[n] * ms for n, ms in self.best_ms.items())

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _append(self, text: str) -> None:
        with open(self.csv, "a") as f:
            f.write(text)

    def _point(self) -> None:
        self._append(f"{self.trials},{self.elapsed():.1f},{self.estimate_ms():.4f}\n")

    def update(self, task: str, results_ms: list[float | None]) -> None:
        """Fold in one measured batch of ``task`` (None: a candidate that failed)."""
        self.trials += len(results_ms)
        self.per_task[task] = self.per_task.get(task, 0) + len(results_ms)
        good = [r for r in results_ms if r is not None]
        if good and min(good) < self.best_ms.get(task, float("inf")):
            self.best_ms[task] = min(good)
        self._point()
        run_trials = self.trials - self.start_trials
        rate = run_trials / max(time.perf_counter() - self.started, 1e-9)
        left = max(self.budget - self.trials, 0) / rate if rate else float("nan")
        log.info("[%5d/%d] %-32s %3d trials  best %8.3f ms  failed %2d | model est. "
                 "%8.2f ms | %5.0f trials/min | %s left", self.trials, self.budget, task,
                 self.per_task[task], self.best_ms.get(task, float("nan")),
                 len(results_ms) - len(good), self.estimate_ms(), rate * 60, _hms(left))


def _hms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def callback(progress: Progress, task_names: list[str]):
    """A MetaSchedule measure callback feeding ``progress``."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            results = []
            for b, r in zip(builder_results, runner_results):
                ok = b.error_msg is None and r.error_msg is None and r.run_secs
                results.append(sum(float(s) for s in r.run_secs) / len(r.run_secs) * 1e3
                               if ok else None)
            progress.update(task_names[task_id], results)

    return ProgressCallback()


def plot(csv_path: Path, png_path: Path, title: str) -> None:
    """Draw estimated model latency against trials from ``csv_path`` into ``png_path``."""
    try:
        import matplotlib
    except ImportError as e:
        raise XCompileError("the convergence plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [line.split(",") for line in csv_path.read_text().splitlines()[1:] if line.strip()]
    trials = [int(r[0]) for r in rows]
    est = [float(r[2]) for r in rows]
    best = [min(est[: i + 1]) for i in range(len(est))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(trials, best, drawstyle="steps-post", color="tab:blue")
    ax.scatter(trials, est, s=6, color="tab:blue", alpha=0.4)
    ax.set_xlabel("measured trials")
    ax.set_ylabel("estimated model latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png_path, ours) as tmp:  # in the log folder
        fig.savefig(tmp, format="png")
    plt.close(fig)
