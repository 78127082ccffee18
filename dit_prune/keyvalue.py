"""The one KEY=VALUE parser of the command line (`--option`, `--scorer-option`, scorer specs).

Values are read as JSON when they parse (numbers, true/false, null, lists, quoted strings) and
kept as bare strings otherwise; keys use underscores (`batch-size` and `batch_size` are one key).

Example:
    >>> parse_key_values(["batches=8", "timesteps=beta:0.8,2", "reference=heldout"], "--option")
    {'batches': 8, 'timesteps': 'beta:0.8,2', 'reference': 'heldout'}
    >>> parse_value("0.5"), parse_value("[10, 50]"), parse_value("uniform")
    (0.5, [10, 50], 'uniform')
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from dit_prune.errors import DitPruneError


def parse_value(text: str) -> Any:
    """A JSON value when `text` is one (NaN and Infinity are not), else the stripped string."""
    text = text.strip()
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError):
        return text


def parse_key_value(item: str, flag: str) -> tuple[str, Any]:
    """'batch-size=32' -> ('batch_size', 32); a one-line error naming `flag` otherwise."""
    key, sep, value = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise DitPruneError(f"{flag} takes KEY=VALUE, got {item!r}")
    return key, parse_value(value)


def parse_key_values(items: Iterable[str], flag: str) -> dict[str, Any]:
    """Every KEY=VALUE of a repeatable option; a key given twice is an error."""
    options: dict[str, Any] = {}
    for item in items:
        key, value = parse_key_value(item, flag)
        if key in options:
            raise DitPruneError(f"{flag} {key} is given twice")
        options[key] = value
    return options


def _no_constant(name: str) -> Any:
    raise ValueError(name)  # NaN / Infinity stay strings; the option's check refuses them


__all__ = ["parse_key_value", "parse_key_values", "parse_value"]
