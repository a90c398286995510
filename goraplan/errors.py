"""Typed errors. Library code raises these; the CLIs turn them into one sentence and exit code 2."""

from __future__ import annotations


class GoraError(Exception):
    """Bad input or bad usage that the user can fix: the message says what is wrong and how to fix it."""


class PlanFormatError(GoraError):
    """A file that is not a valid, intact `.gora` plan of a schema version this tool reads."""
