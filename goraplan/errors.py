"""Typed errors. Library code raises these; the CLIs turn them into one sentence and exit code 2."""

from __future__ import annotations


class GoraError(Exception):
    """Bad input or bad usage that the user can fix: the message says what is wrong and how to fix it."""


class PlanFormatError(GoraError):
    """A file that is not a valid, intact `.gora` plan of a schema version this tool reads."""


def first_line(exc: BaseException | str, default: str = "no details") -> str:
    """The first non-empty line of an exception's message, to quote a library's error inside one sentence.

    >>> first_line(ValueError("bad value\\n  more detail"))
    'bad value'
    >>> first_line(RuntimeError())
    'no details'
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else default
