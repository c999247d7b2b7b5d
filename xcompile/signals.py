"""Ctrl-C and SIGTERM end a command cleanly: ``error: interrupted``, exit 130 (SIGINT) or
143 (SIGTERM), outputs not half-written, a tuning log finalised with the trials made.

The command line installs ``handle()``; from then on either signal raises
``KeyboardInterrupt`` in the main thread and is remembered. A ``KeyboardInterrupt``
raised inside Python code that TVM called (a tuning callback) comes back out of TVM as
TVM's own error type: ``received()`` tells such an error from a real failure.
"""

from __future__ import annotations

import signal

from xcompile.errors import XCompileError

_received: int | None = None


class Interrupted(XCompileError):
    """The command was interrupted by a signal; exit status 128 + the signal."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + signum


def _handler(signum, _frame):
    global _received
    _received = signum
    raise KeyboardInterrupt


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
