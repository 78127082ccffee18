"""Helpers shared by subcommands: run directories, resolved-config dumps, data selection."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch

from dit_prune.checkpoint import atomic_write_text
from dit_prune.errors import DitPruneError

RESOLVED_CONFIG_NAME = "config.resolved.json"


def dump_resolved_config(run_dir: Path, args: argparse.Namespace, **extra: Any) -> None:
    """Write every resolved argument (plus `extra`) into `run_dir/config.resolved.json`."""
    resolved = {k: v for k, v in vars(args).items() if k != "func"}
    resolved.update(extra)
    resolved["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    atomic_write_text(run_dir / RESOLVED_CONFIG_NAME, json.dumps(resolved, indent=2, default=str))


def prepare_run_dir(path: str | Path, overwrite: bool) -> Path:
    """Create the run directory; refuse a non-empty one unless `overwrite`."""
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise DitPruneError(f"run directory {run_dir} exists and is a file")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise DitPruneError(f"run directory {run_dir} is not empty (pass --overwrite to reuse it)")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def pick_device(name: str | None) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DitPruneError(f"unknown device {name!r}") from None
