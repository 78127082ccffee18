"""Helpers shared by subcommands: output safety, run directories, resolved-config dumps, devices.

Every subcommand claims its `--out` with `claim_out` before any long work: the output may not
be, contain or lie inside an input, and `--overwrite` replaces only a directory that an earlier
run of the same subcommand wrote (it carries `.dit_prune_run`). Outputs are then built in a
temporary sibling (`staged_output`) and renamed into place, so a failed or interrupted command
leaves nothing half-written.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> out = claim_out(str(root / "run"), "eval", {"checkpoint": root / "ck"}, overwrite=False)
    >>> with staged_output(out, "eval") as tmp:
    ...     _ = (tmp / "metrics.json").write_text("{}")
    >>> sorted(p.name for p in out.iterdir()), previous_command(out)
    (['.dit_prune_run', 'metrics.json'], 'eval')
    >>> claim_out(str(root / "run"), "score", {}, overwrite=True)
    Traceback (most recent call last):
    ...
    dit_prune.errors.DitPruneError: --out ... was written by `dit-prune eval`, not `dit-prune \
score`; --overwrite replaces only an earlier `dit-prune score` output
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dit_prune.checkpoint import atomic_directory, atomic_write_text
from dit_prune.errors import DitPruneError

RESOLVED_CONFIG_NAME = "config.resolved.json"
MARKER_NAME = ".dit_prune_run"  # {"command": "eval", ...}: what `--overwrite` may replace
LEGACY_MARKERS = (RESOLVED_CONFIG_NAME, "dit_prune.json", "config.json")  # hold "command"


def dump_resolved_config(run_dir: Path, args: argparse.Namespace, **extra: Any) -> None:
    """Write every resolved argument (plus `extra`) into `run_dir/config.resolved.json`."""
    resolved = {k: v for k, v in vars(args).items() if k != "func"}
    resolved.update(extra)
    resolved["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    atomic_write_text(run_dir / RESOLVED_CONFIG_NAME, json.dumps(resolved, indent=2, default=str))


def write_marker(run_dir: Path, command: str, **extra: Any) -> None:
    """Mark `run_dir` as the output of `dit-prune <command>` (what `--overwrite` checks)."""
    atomic_write_text(run_dir / MARKER_NAME, json.dumps({"command": command, **extra}) + "\n")


def previous_command(path: Path) -> str | None:
    """The subcommand that wrote directory `path` (its marker; for outputs of older versions
    the "command" recorded in its resolved config or metadata), or None."""
    marker = path / MARKER_NAME
    names = (MARKER_NAME,) if marker.is_file() else LEGACY_MARKERS
    for name in names:
        try:
            recorded = json.loads((path / name).read_text()).get("command")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(recorded, str) and recorded.strip():
            words = recorded.split()
            return words[1] if words[0] == "dit-prune" and len(words) > 1 else words[0]
    return None


def check_out_path(out: str | os.PathLike[str] | None,
                   inputs: Mapping[str, str | os.PathLike[str] | None]) -> Path:
    """`--out` resolved (symlinks followed); refused when empty, the current directory (or one
    holding it), an existing file, or when it is, contains or lies inside an input path (inputs
    that do not exist are skipped, as hub ids are, except caches: names ending in '-cache')."""
    if out is None or not str(out).strip():
        raise DitPruneError("--out is empty: name a new directory to write into")
    target = Path(out).expanduser().resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise DitPruneError(f"--out {out} is the current directory or holds it: name a new "
                            "subdirectory")
    for name, value in inputs.items():
        if value is None or not str(value).strip():
            continue
        if not name.endswith("-cache") and not Path(value).expanduser().exists():
            continue
        source = Path(value).expanduser().resolve()
        relation = ("is" if target == source else "contains" if target in source.parents
                    else "lies inside" if source in target.parents else None)
        if relation:
            raise DitPruneError(f"--out {out} overlaps the input {name} {value} (it {relation} "
                                "it); choose another --out: inputs are never modified")
    if target.exists() and not target.is_dir():
        raise DitPruneError(f"--out {out} is an existing file, not a directory")
    return target


def claim_out(out: str | os.PathLike[str] | None, command: str,
              inputs: Mapping[str, str | os.PathLike[str] | None], overwrite: bool,
              resume: bool = False) -> Path:
    """Check `--out` before any work (see check_out_path) and that it can be written.

    A non-empty directory is refused unless `overwrite` (or `resume`, for `run`) and it holds
    an earlier output of the same `command`. Returns the resolved output path.
    """
    target = check_out_path(out, inputs)
    if target.is_dir() and any(target.iterdir()):
        if not (overwrite or resume):
            raise DitPruneError(f"--out {out} is not empty (pass --overwrite to replace an "
                                f"earlier dit-prune {command} output, or choose another --out)")
        found = previous_command(target)
        if found != command:
            written = f"was written by `dit-prune {found}`" if found else \
                "is not a dit-prune output"
            raise DitPruneError(f"--out {out} {written}, not `dit-prune {command}`; --overwrite "
                                f"replaces only an earlier `dit-prune {command}` output")
    check_writable(target.parent, out)
    return target


def check_writable(folder: Path, out: str | os.PathLike[str] | None = None) -> None:
    """Create `folder` if needed and make (then remove) a temporary directory in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tempfile.mkdtemp(prefix=".dit_prune_probe.", dir=folder))
    except OSError as exc:
        raise DitPruneError(f"cannot write --out {out or folder}: {folder}: "
                            f"{exc.strerror or exc}") from None


@contextmanager
def staged_output(target: Path, command: str, **marker: Any) -> Iterator[Path]:
    """Yield a temporary sibling directory (already marked) that replaces `target` only when
    the block succeeds; OSError and safetensors write errors become one-line errors."""
    from safetensors import SafetensorError

    try:
        with atomic_directory(target, overwrite=True) as tmp:
            write_marker(tmp, command, **marker)
            yield tmp
    except (OSError, SafetensorError) as exc:
        detail = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:200]
        where = getattr(exc, "filename", None) or target
        raise DitPruneError(f"cannot write --out {target}: {where}: {detail}") from None


def pick_device(name: str | None) -> torch.device:
    """'auto' -> cuda when available, else cpu; a CUDA device on a machine without CUDA (or
    an unknown name) is a one-line error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DitPruneError(f"unknown device {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DitPruneError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DitPruneError(f"--device {name}: this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DitPruneError(f"--device {name}: MPS is not available on this machine")
    return device


def check_positive(value: Any, flag: str) -> None:
    """Refuse anything but an integer >= 1 (bools included)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DitPruneError(f"{flag} must be a positive integer, got {value}")


def check_finite(value: Any, flag: str, low: float | None = None) -> None:
    """Refuse NaN, infinities and (when `low` is given) values <= low."""
    if not math.isfinite(value) or (low is not None and value <= low):
        bound = f" greater than {low:g}" if low is not None else ""
        raise DitPruneError(f"{flag} must be a finite number{bound}, got {value}")


def check_cache_dir(path: str | None, flag: str) -> Path | None:
    """A cache directory option: None for 'none', refused when it names an existing file."""
    if path is None or path == "none":
        return None
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DitPruneError(f"{flag} {path} is an existing file, not a directory")
    return folder


def check_sampling_steps(steps: int, scheduler: Any) -> None:
    """Refuse sampling steps outside [1, the scheduler's training steps], naming `--steps`."""
    from dit_prune.sampling import check_steps

    check_steps(steps, scheduler, "--steps")


def check_scorer_timesteps(scorer: Any, scheduler: Any) -> None:
    """Refuse a scorer whose timesteps lie outside the checkpoint's noise schedule."""
    distribution = scorer.options.timestep_distribution(scorer.default_timesteps)
    distribution.check(int(scheduler.config.num_train_timesteps))


def check_train_args(args: argparse.Namespace) -> Path:
    """`dit-prune train`'s numeric options and its --out, before any work (TrainConfig does not
    check these yet: patch size, learning rate)."""
    for flag in ("steps", "batch_size", "patch_size"):
        if hasattr(args, flag):
            check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if hasattr(args, "lr"):
        check_finite(args.lr, "--lr", low=0.0)
    data = getattr(args, "data", "digits")
    return claim_out(args.out, "train", {"--data": None if data == "digits" else data},
                     args.overwrite)
