"""User-facing errors: one line, says what and where, exits with status 2 from the CLI.

Example:
    >>> raise DitPruneError("checkpoint not found: /tmp/missing")
    Traceback (most recent call last):
    ...
    dit_prune.errors.DitPruneError: checkpoint not found: /tmp/missing
"""

from __future__ import annotations


class DitPruneError(ValueError):
    """An error caused by the user's input; the CLI prints its message on one line and exits 2."""
