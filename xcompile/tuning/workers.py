"""Worker processes for the tuner: TVM's ``PopenPoolExecutor``, kept for the whole run.

MetaSchedule's own ``LocalBuilder`` starts a fresh pool for every batch, and each worker
spends tens of seconds importing TVM's tensor intrinsics (about 16 trials a minute
here); these workers start once, import TVM once (the initializer), and serve every
batch. What the pool does for us: a worker that crashes on a candidate (a bad schedule
can segfault) or runs past the timeout is killed and restarted on the next job, and
only that job fails; ``maximum_process_uses`` restarts a worker after that many jobs,
bounding what a long run can leak in it. What we add: each worker dies with the tuner
(``PR_SET_PDEATHSIG``), even in the middle of a job, so a ``kill -9`` of ``tune``
leaves no worker behind.
"""

from __future__ import annotations

import logging
import os

from xcompile.errors import last_line

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Have the kernel kill this process when the process that started it ends (Linux;
    elsewhere the worker ends when its pipe to the tuner closes, after its job)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the tuner ended before the line above ran
        os._exit(1)


def _init_worker(env: dict[str, str]) -> None:
    _die_with_parent()
    os.environ.update(env)
    import tvm  # noqa: F401  (import once, here, not per job)


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {last_line(e)}"


class WorkerPool:
    """``workers`` processes with ``env`` set before TVM loads in them; each job gets
    ``timeout`` seconds; a process is replaced after ``max_uses`` jobs."""

    def __init__(self, workers: int, env: dict[str, str] | None = None,
                 timeout: float | None = None, max_uses: int | None = None):
        from tvm.support.popen_pool import PopenPoolExecutor

        self._pool = PopenPoolExecutor(max_workers=workers, timeout=timeout,
                                       initializer=_init_worker, initargs=(dict(env or {}),),
                                       maximum_process_uses=max_uses)
        self.timeout = timeout

    def map(self, fn, jobs: list[tuple]) -> list[tuple[bool, object]]:
        """``fn(*job)`` for each job, on the workers in parallel: ``(True, result)`` or
        ``(False, one-line error)`` (a crash or a timeout charged to that job alone)."""
        return [self.outcome(fut) for fut in [self.submit(fn, *job) for job in jobs]]

    def submit(self, fn, *args):
        """Start ``fn(*args)`` on a worker; ``outcome`` of the returned future waits."""
        return self._pool.submit(fn, *args)

    def outcome(self, fut) -> tuple[bool, object]:
        """``(True, result)`` of a submitted job, or ``(False, one-line error)``."""
        try:
            return True, fut.result()
        except ChildProcessError:
            return False, "the worker process crashed on this job"
        except TimeoutError:
            return False, f"timed out after {self.timeout:.0f} s"
        except Exception as e:  # the job's own error, with the worker's traceback
            return False, one_line(e)

    def close(self) -> None:
        """End every worker (killing any still running a job)."""
        self._pool.shutdown(wait=True)
