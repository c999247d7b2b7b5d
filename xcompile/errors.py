"""The one exception type that reaches users as a one-line message."""


class XCompileError(Exception):
    """A problem with the user's input or environment, stated in one line.

    The CLI prints ``error: <message>`` and exits non-zero; library callers can catch it.
    """

    exit_code = 2


class VerificationError(XCompileError):
    """Compiled output differs from the reference beyond tolerance."""

    exit_code = 1


class InternalError(XCompileError):
    """Our own failure, not the user's: e.g. generated code a compiler rejects. One line
    too, but exit status 3."""

    exit_code = 3


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, or its type's name when it has none (a bare
    ``str(e).splitlines()[0]`` fails on an empty message)."""
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else type(e).__name__


def last_line(e: BaseException) -> str:
    """The last line of ``e``'s message (TVM puts its own there), or its type's name."""
    lines = str(e).strip().splitlines()
    return lines[-1].strip() if lines else type(e).__name__
