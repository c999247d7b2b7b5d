"""Persistent worker processes for the tuner.

MetaSchedule's own builder starts fresh worker processes on every batch, and each spends
tens of seconds importing TVM's tensor intrinsics; here workers are spawned once, import
TVM once, and serve every batch. A worker that crashes (a bad candidate can segfault)
or hangs is replaced, and only the candidate that caused it is reported as failed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

log = logging.getLogger(__name__)


def _init_worker(env: dict[str, str]) -> None:
    os.environ.update(env)
    import tvm  # noqa: F401  (import once, here, not per task)


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"


class WorkerPool:
    """``workers`` spawned processes with ``env`` set before TVM loads in them."""

    def __init__(self, workers: int, env: dict[str, str] | None = None):
        self.workers = workers
        self.env = dict(env or {})
        self._pool: ProcessPoolExecutor | None = None

    def _start(self, workers: int | None = None) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers or self.workers,
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.env,))

    def _kill(self, pool: ProcessPoolExecutor) -> None:
        # A hung worker cannot be cancelled; end the processes themselves.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def map(self, fn, jobs: list[tuple], timeout: float) -> list[tuple[bool, object]]:
        """``fn(*job)`` for each job: ``(True, result)`` or ``(False, one-line error)``.

        Jobs a crash or a timeout interrupted are run again one at a time, so a crash is
        charged to the job that caused it."""
        if self._pool is None:
            self._pool = self._start()
        results: list[tuple[bool, object] | None] = [None] * len(jobs)
        futures = [self._pool.submit(fn, *job) for job in jobs]
        interrupted = []
        for i, fut in enumerate(futures):
            try:
                results[i] = (True, fut.result(timeout=timeout))
            except (BrokenProcessPool, FutureTimeout):
                interrupted.append(i)
            except Exception as e:  # the job's own error, reported by the worker
                results[i] = (False, one_line(e))
        if interrupted:
            self._kill(self._pool)
            self._pool = None
            for i in interrupted:
                results[i] = self._alone(fn, jobs[i], timeout)
        return results

    def _alone(self, fn, job: tuple, timeout: float) -> tuple[bool, object]:
        pool = self._start(1)
        try:
            return True, pool.submit(fn, *job).result(timeout=timeout)
        except BrokenProcessPool:
            return False, "the worker process crashed on this candidate"
        except FutureTimeout:
            return False, f"timed out after {timeout:.0f} s"
        except Exception as e:
            return False, one_line(e)
        finally:
            self._kill(pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
