"""Waiting for processes' threads to go idle, so that a timed run starts with no other
backend's thread spinning beside it.

Thread pools spin-wait after a run before they sleep, and a spinning thread takes a
core from whatever runs next. Measured on a 2-core Zen 4 (AMD EPYC, CPUID family 25
model 17) after a legacy_xception batch-1 run: ONNX Runtime's pool spins ~40 ms, TVM's
~140 ms; our run 50 ms after ONNX Runtime's took 88.2 ms (median of 16), 50 ms after our
own 82.8, and 84.1-85.1 either way once the pause outlasted the spinning (0.2-0.5 s) or
ONNX Runtime's spinning was switched off. A fixed pause long enough for every pool on
every machine wastes time where they are quick, so this watches the processes' CPU time
instead. Only the backends' processes count: the machine's other work (another tenant,
another test) is noise that interleaved rounds spread over every backend alike.
"""

from __future__ import annotations

import os
import time

# Idle: the watched processes used less than this share of one core over a window (a
# spinning thread uses all of it; a child's CPU time comes in 10 ms ticks, so the
# window spans several).
IDLE_SHARE = 0.2
WINDOW_S = 0.05
LIMIT_S = 1.0


def _ticks(pid: int) -> int:
    """User plus system CPU ticks of process ``pid`` so far, all its threads (0 where
    it cannot be read: gone, or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0
    # The fields after the command name (which may hold spaces, in parentheses):
    # state is the 3rd field of the line, utime and stime the 14th and 15th.
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pids=()) -> float:
    """CPU seconds used so far by this process (every thread) and the processes
    ``pids``."""
    ticks = sum(_ticks(pid) for pid in pids)
    return time.process_time() + ticks / os.sysconf("SC_CLK_TCK")


def wait_until_idle(min_s: float, pids=(), window_s: float = WINDOW_S,
                    limit_s: float = LIMIT_S) -> float:
    """Sleep ``min_s``, then until a ``window_s`` window in which this process and the
    processes ``pids`` used less than IDLE_SHARE of one core, at most ``limit_s`` in all
    (a pool that never sleeps is still timed). Returns the seconds waited."""
    start = time.perf_counter()
    time.sleep(min_s)
    while time.perf_counter() - start < limit_s:
        before = cpu_seconds(pids)
        time.sleep(window_s)
        if cpu_seconds(pids) - before < IDLE_SHARE * window_s:
            break
    return time.perf_counter() - start
