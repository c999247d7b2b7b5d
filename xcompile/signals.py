"""Ctrl-C and SIGTERM end a command cleanly: ``error: interrupted``, exit 130 (SIGINT) or
143 (SIGTERM), outputs not half-written, a tuning log finalised with the trials made.

The command line installs ``handle()``; from then on either signal raises
``KeyboardInterrupt`` in the main thread and is remembered (only remembered inside
``deferred()``). A ``KeyboardInterrupt``
raised inside Python code that TVM called (a tuning callback) comes back out of TVM as
TVM's own error type: ``received()`` tells such an error from a real failure.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

from xcompile.errors import XCompileError

_received: int | None = None


class Interrupted(XCompileError):
    """The command was interrupted by a signal; exit status 128 + the signal."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + signum


_deferred = False


def _handler(signum, _frame):
    global _received
    _received = signum
    if not _deferred:
        raise KeyboardInterrupt


@contextmanager
def deferred():
    """Within: a signal is only recorded, and the code polls ``received()`` where it may
    stop. For TVM's C++ loops that call back into Python (MetaSchedule's search): a
    ``KeyboardInterrupt`` raised at an arbitrary point of such a callback once ended in
    ``std::terminate`` (a segfault report, exit -6) instead of a finalised log."""
    global _deferred
    before = _deferred
    _deferred = True
    try:
        yield
    finally:
        _deferred = before


def handle() -> None:
    """Install the handlers (main thread only)."""
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def received() -> int | None:
    """The signal that interrupted this process, if one did."""
    return _received


def interrupted(message: str = "interrupted") -> Interrupted:
    """The error to end with after a signal (SIGINT when none was recorded: a plain
    ``KeyboardInterrupt``)."""
    return Interrupted(message, _received or signal.SIGINT)
