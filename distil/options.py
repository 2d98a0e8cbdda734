"""The vocabulary every config section is written in: a field with its help text, range checks
collected into one list, and the one error type a user sees for a bad config.

A section's `__post_init__` calls `require` for each check and `raise_if` once at the end, so the
loader (distil/config.py) can report every problem of a file together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

LANGUAGES = ("en", "es", "fr", "pt")


class ConfigError(ValueError):
    """All problems found in one config file, one per line."""


def option(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A dataclass field with its help text (the config reference in docs/config.md is built from it)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def require(problems: list[str], ok: bool, key: str, message: str) -> None:
    if not ok:
        problems.append(f"{key}: {message}")


def raise_if(problems: list[str]) -> None:
    if problems:
        raise ValueError("\n".join(problems))
