"""The task scheduler: which task's candidates are measured next.

MetaSchedule's gradient scheduler first sends a batch of every task without waiting for
any (a warm-up round), so nothing reaches the database, the progress line or the
convergence curve until all tasks have been through once: many minutes of silence, and
a kill in that window loses the whole round. This scheduler joins each batch (its
records are committed and shown) before it picks the next task: first every task once,
heaviest first, then the task whose share of the model's time (calls x best latency) is
largest, discounted by the rounds it already had, so heavy kernels get most trials and
none starve.
"""

from __future__ import annotations

from xcompile import signals


def joined_scheduler(weights: list[float], best_ms):
    """``weights[i]``: calls per inference of task i; ``best_ms(i)``: its best latency."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

    @derived_object
    class JoinedScheduler(PyTaskScheduler):
        def __init__(self):
            super().__init__()
            self.rounds = [0] * len(weights)

        def next_task_id(self) -> int:
            if signals.received() is not None:
                return -1  # interrupted: end the search (the driver finalises the log)
            tasks = self._outer().tasks_
            for i, task in enumerate(tasks):
                if task.runner_futures is not None:
                    self.join_running_task(i)
            live = [i for i, task in enumerate(tasks) if not task.is_terminated]
            if not live:
                return -1
            pick = max(live, key=lambda i: (self.rounds[i] == 0,
                                            weights[i] * best_ms(i) / (1 + self.rounds[i])))
            self.rounds[pick] += 1
            return pick

    return JoinedScheduler()
