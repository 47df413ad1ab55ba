"""Errors that point at the input: file, line, field, what is wrong and how to fix it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class LossmaskError(Exception):
    """Base class for every error lossmask raises on purpose (never a bare traceback for bad input)."""


@dataclass
class InputProblem:
    """One problem with one input line; also the record written to the rejects file."""

    file: str
    line: int
    reason: str  # short machine-friendly key, e.g. "bad_json", "unknown_role", "zero_trained_tokens"
    message: str  # what is wrong
    field: str | None = None  # JSON path of the field at fault, e.g. "messages[2].role"
    hint: str | None = None  # how to fix it

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        if self.field:
            where += f" (field {self.field})"
        text = f"{where}: {self.message}"
        if self.hint:
            text += f" — {self.hint}"
        return text

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "line": self.line,
            "reason": self.reason,
            "field": self.field,
            "message": self.message,
            "hint": self.hint,
        }


class InputError(LossmaskError):
    """Bad input: carries the InputProblem so callers can report or reject the line."""

    def __init__(self, problem: InputProblem):
        super().__init__(str(problem))
        self.problem = problem


class EpisodeError(LossmaskError):
    """A problem found while rendering or masking one episode, before file/line are attached.

    Raised deep inside renderers and the mask; the pipeline turns it into an InputProblem with the
    episode's source.
    """

    def __init__(self, reason: str, message: str, field: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field
        self.hint = hint

    def at(self, file: str, line: int) -> InputProblem:
        return InputProblem(file, line, self.reason, self.message, self.field, self.hint)


def json_kind(value: Any) -> str:
    """What kind of JSON value ``value`` is, as an error message says it ("a string", "an array", "null").

    Shared so that the input readers and the workspace tools name a wrong value's type in the same words.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
