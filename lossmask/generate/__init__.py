"""Synthetic training data the project generates itself (the embedded demo needs no downloads).

``GENERATORS`` maps each generator's name to its function; every one has the signature
``generate_X(n, seed, languages=("en", "de"), held_out=False, **options) -> list[dict]`` and returns records
in the native JSONL schema (write them with ``format_lock.write_jsonl``). ``PHASES`` maps the curriculum's
phase keys ("1" to "6", and "1b" for context extension) to generator names; ``generate_phase`` runs one by
phase key or name and rejects options the generator does not take, naming the ones it does.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from lossmask.errors import LossmaskError
from lossmask.generate.chat import generate_chat
from lossmask.generate.format_lock import generate_format_lock
from lossmask.generate.longctx import generate_longctx
from lossmask.generate.multiturn import generate_multiturn
from lossmask.generate.operators import generate_operators
from lossmask.generate.tools import generate_agentic, generate_toolcall

GENERATORS: dict[str, Callable[..., list[dict]]] = {
    "format_lock": generate_format_lock,
    "operators": generate_operators,
    "chat": generate_chat,
    "multiturn": generate_multiturn,
    "toolcall": generate_toolcall,
    "agentic": generate_agentic,
    "longctx": generate_longctx,
}
PHASES: dict[str, str] = {
    "1": "format_lock",
    "2": "operators",
    "3": "chat",
    "4": "multiturn",
    "5": "toolcall",
    "6": "agentic",
    "1b": "longctx",
}
_FIXED = frozenset({"n", "seed", "languages", "held_out"})


def resolve_phase(phase_or_name: str | int) -> str:
    """The generator name for a phase key ("2", 2, "1b") or a generator name ("operators")."""
    key = str(phase_or_name).strip().lower()
    if key in PHASES:
        return PHASES[key]
    if key in GENERATORS:
        return key
    valid = ", ".join(f"{phase} ({name})" for phase, name in PHASES.items())
    raise LossmaskError(f"unknown phase {phase_or_name!r}; give a phase or a generator name: {valid}")


def generate_phase(
    phase_or_name: str | int,
    n: int,
    seed: int,
    languages: Iterable[str] = ("en", "de"),
    held_out: bool = False,
    **options: Any,
) -> list[dict]:
    """Run the generator of a phase (or named generator) with its options; see the module docstring."""
    name = resolve_phase(phase_or_name)
    generator = GENERATORS[name]
    _check_options(name, generator, options)
    return generator(n, seed, languages=tuple(languages), held_out=held_out, **options)


def _check_options(name: str, generator: Callable[..., list[dict]], options: dict[str, Any]) -> None:
    params = inspect.signature(generator).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in _FIXED]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "none"
        raise LossmaskError(f"generator {name!r} has no option {', '.join(map(repr, unknown))}; its options: {takes}")
