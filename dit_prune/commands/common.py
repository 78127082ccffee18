"""Helpers shared by subcommands: output safety, run directories, resolved-config dumps, devices.

Every subcommand claims its `--out` with `claim_out` before any long work (claiming writes
nothing): the output may not be, contain or lie inside an input, and `--overwrite` replaces only
a directory that an earlier run of the same subcommand wrote: it carries the `.dit_prune_run`
marker, and when the marker lists the files that run wrote (every file, at any depth, as a path
relative to --out: a finished output), it holds nothing else, in any subfolder, nor anything
the marker names as foreign (an unfinished `run` or `index` resumed
in a directory holding files it did not write). A directory
without the marker (a shipped checkpoint, one written by hand or by an older version) is never
replaced. Outputs are then built in a temporary sibling (`staged_output`) and renamed into place,
so a failed or interrupted command leaves nothing half-written; `run` and `index`, which write
into --out as they go (to resume), remove an --out they created when they fail before any work
(`undone_on_failure`).

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
import errno
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
DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"
GUIDANCE_HELP = "classifier-free guidance scale; 1 samples without guidance"
# {"command": "eval", "files": ["metrics.json", "samples/0.png", ...], "nested": true}: the
# entries --overwrite may replace, as paths relative to --out, at any depth
MARKER_NAME = ".dit_prune_run"
RECORDED_COMMAND = (RESOLVED_CONFIG_NAME, "dit_prune.json", "config.json")  # hold "command"


def dump_resolved_config(run_dir: Path, args: argparse.Namespace, **extra: Any) -> None:
    """Write every resolved argument (plus `extra`) into `run_dir/config.resolved.json`."""
    resolved = {k: v for k, v in vars(args).items() if k != "func"}
    resolved.update(extra)
    resolved["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    atomic_write_text(run_dir / RESOLVED_CONFIG_NAME, json.dumps(resolved, indent=2, default=str))


def write_marker(run_dir: Path, command: str, **extra: Any) -> None:
    """Mark `run_dir` as the output of `dit-prune <command>` (what `--overwrite` checks)."""
    atomic_write_text(run_dir / MARKER_NAME, json.dumps({"command": command, **extra}) + "\n")


def output_entries(root: Path) -> set[str]:
    """Every entry of output directory `root` as a path relative to it ('samples/0.png'): its
    files, its symbolic links and its empty folders, at any depth (the marker aside). This is
    what a marker's file list must cover for `--overwrite` to replace the directory."""
    found: set[str] = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder).relative_to(root)
        for name in list(dirs):
            if (Path(folder) / name).is_symlink():  # a link to a folder: one entry, not walked
                dirs.remove(name)
                files.append(name)
        found.update((here / name).as_posix() for name in files)
        if not dirs and not files and here != Path("."):
            found.add(here.as_posix())
    found.discard(MARKER_NAME)
    return found


def mark_finished(run_dir: Path, command: str, foreign: tuple[str, ...] = (),
                  **extra: Any) -> None:
    """Mark `run_dir` as a finished `dit-prune <command>` output: the marker lists every entry
    in it, at any depth (`output_entries`), but `foreign` (what someone else put there before a
    resumed command, see `mark_started`), and `--overwrite` refuses the directory once it holds
    more."""
    files = sorted(output_entries(run_dir) - set(foreign))
    write_marker(run_dir, command, files=files, nested=True, **extra)


def mark_started(run_dir: Path, command: str, foreign: tuple[str, ...] = (),
                 **extra: Any) -> None:
    """Mark `run_dir` as the unfinished output of a command that writes into it as it goes
    (`run`, `index`): the marker lists no files yet (`--overwrite` may then replace whatever
    the command wrote), but names the `foreign` entries (`foreign_entries`, taken before this
    call) so that `--overwrite` still refuses the directory while they are there."""
    write_marker(run_dir, command, **({"foreign": sorted(foreign)} if foreign else {}), **extra)


def foreign_entries(path: Path) -> tuple[str, ...]:
    """Entries of output directory `path` (relative paths, at any depth: `output_entries`)
    that its marker says the tool did not write: those a finished output's file list does not
    cover, and those an unfinished one records as foreign (sorted; empty without a marker, or
    for an unfinished output that recorded none). Take them before the marker is rewritten.

    A marker written by an older version (without "nested": true) lists top-level names only:
    a listed name that is a folder then covers what lies inside it."""
    marker = read_marker(path) if path.is_dir() else None
    if marker is None:
        return ()
    listed = marker.get("files")
    recorded = marker.get("foreign")
    names = output_entries(path)
    found = set()
    if isinstance(listed, list):
        covered = {str(name) for name in listed}
        folders = () if marker.get("nested") is True else tuple(
            f"{name}/" for name in covered
            if (path / name).is_dir() and not (path / name).is_symlink())
        found |= {name for name in names - covered if not name.startswith(folders)}
    if isinstance(recorded, list):
        kept = {str(name) for name in recorded}
        found |= {name for name in names
                  if name in kept or any(name.startswith(f"{k}/") for k in kept)}
    return tuple(sorted(found))


def read_marker(path: Path) -> dict[str, Any] | None:
    """The `.dit_prune_run` marker of directory `path` (a dict holding "command"), or None."""
    try:
        marker = json.loads((path / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    command = marker.get("command") if isinstance(marker, dict) else None
    return marker if isinstance(command, str) and command.strip() else None


def previous_command(path: Path) -> str | None:
    """The subcommand whose output directory `path` is, by its `.dit_prune_run` marker, or None.

    Only the marker counts: the "command" a checkpoint's metadata records (`dit_prune.json`,
    `config.resolved.json`) says how it was made, not that every file in it is the tool's (a
    shipped checkpoint holds a hand-written model card), so it never makes a directory
    replaceable."""
    marker = read_marker(path)
    return None if marker is None else _subcommand(marker["command"])


def recorded_command(path: Path) -> str | None:
    """The subcommand an unmarked directory's metadata says made it (for messages only)."""
    for name in RECORDED_COMMAND:
        try:
            recorded = json.loads((path / name).read_text()).get("command")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(recorded, str) and recorded.strip():
            return _subcommand(recorded)
    return None


def _subcommand(recorded: str) -> str:
    words = recorded.split()
    return words[1] if words[0] == "dit-prune" and len(words) > 1 else words[0]


def path_relation(target: Path, source: Path) -> str | None:
    """How resolved path `target` overlaps resolved path `source`: "is", "contains",
    "lies inside", or None when they are apart.

    Example:
        >>> path_relation(Path("/a/b"), Path("/a")), path_relation(Path("/a"), Path("/b"))
        ('lies inside', None)
    """
    return ("is" if target == source else "contains" if target in source.parents
            else "lies inside" if source in target.parents else None)


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
        relation = path_relation(target, Path(value).expanduser().resolve())
        if relation:
            raise DitPruneError(f"--out {out} overlaps the input {name} {value} (it {relation} "
                                "it); choose another --out: inputs are never modified")
    if target.exists() and not target.is_dir():
        raise DitPruneError(f"--out {out} is an existing file, not a directory")
    return target


def check_written_outside_inputs(path: str | os.PathLike[str] | None, flag: str,
                                 inputs: Mapping[str, str | os.PathLike[str] | None]) -> None:
    """Refuse a directory the command writes besides --out (a cache named by `flag`) that is,
    contains or lies inside an existing input: inputs are never modified.

    Example:
        >>> check_written_outside_inputs("/tmp", "--stats-cache", {"--train": None})
    """
    if path is None:
        return
    target = Path(path).expanduser().resolve()
    for name, value in inputs.items():
        if name == flag or value is None or not str(value).strip():
            continue
        if not Path(value).expanduser().exists():
            continue
        relation = path_relation(target, Path(value).expanduser().resolve())
        if relation:
            raise DitPruneError(f"{flag} {path} overlaps the input {name} {value} (it "
                                f"{relation} it); {flag} is written to: choose a directory "
                                "outside the inputs")


def claim_out(out: str | os.PathLike[str] | None, command: str,
              inputs: Mapping[str, str | os.PathLike[str] | None], overwrite: bool,
              resume: bool = False) -> Path:
    """Check `--out` before any work (see check_out_path) and that it can be written; nothing
    is created or written. Returns the resolved output path.

    A non-empty directory is refused unless `overwrite` (or `resume`, for `run` and `index`)
    and its `.dit_prune_run` marker says `command` wrote it. With `overwrite`, a marker that
    lists the files of a finished output must cover every entry: files added to it afterwards
    (a model card, notes) would be deleted, so the directory is refused.
    """
    target = check_out_path(out, inputs)
    if target.is_dir() and any(target.iterdir()):
        if not (overwrite or resume):
            raise DitPruneError(f"--out {out} is not empty (pass --overwrite to replace an "
                                f"earlier dit-prune {command} output, or choose another --out)")
        marker = read_marker(target)
        found = None if marker is None else _subcommand(marker["command"])
        if found is None:
            recorded = recorded_command(target)
            if recorded is not None:
                raise DitPruneError(
                    f"--out {out} has no {MARKER_NAME} marker (it records `dit-prune "
                    f"{recorded}`: a shipped checkpoint or an older version's output, which may "
                    "hold files added by hand); --overwrite replaces only a marked `dit-prune "
                    f"{command}` output: choose another --out")
            raise DitPruneError(f"--out {out} is not a dit-prune output (no {MARKER_NAME} "
                                f"marker); --overwrite replaces only an earlier `dit-prune "
                                f"{command}` output")
        if found != command:
            raise DitPruneError(f"--out {out} was written by `dit-prune {found}`, not "
                                f"`dit-prune {command}`; --overwrite replaces only an earlier "
                                f"`dit-prune {command}` output")
        if overwrite:
            extra = foreign_entries(target)
            if extra:
                raise DitPruneError(f"--out {out} holds {', '.join(extra[:3])}"
                                    f"{' ...' if len(extra) > 3 else ''}, which `dit-prune "
                                    f"{command}` did not write; --overwrite would delete it: "
                                    "move it out or choose another --out")
    check_writable(target, out)
    return target


def check_writable(target: Path, out: str | os.PathLike[str] | None = None) -> None:
    """Make (then remove) a temporary directory in `target`'s nearest existing ancestor (the
    folder the output will be created in), creating nothing else; a one-line error says why
    --out cannot be created there.

    Example:
        >>> check_writable(Path("/proc/x"))
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: cannot create --out /proc/x: /proc does not accept new \
folders (a virtual file system such as /proc or /sys?): No such file or directory
    """
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".dit_prune_probe.", dir=folder))
    except OSError as exc:
        why = _CANNOT_CREATE.get(exc.errno or 0, "{folder} refuses new folders")
        raise DitPruneError(f"cannot create --out {out or target}: {why.format(folder=folder)}: "
                            f"{exc.strerror or exc}") from None


# errno of a failed folder creation -> why --out cannot be created ({folder}: its parent)
_CANNOT_CREATE = {
    errno.EACCES: "no permission to write in {folder}",
    errno.EPERM: "no permission to write in {folder}",
    errno.EROFS: "{folder} is on a read-only file system",
    errno.ENOSPC: "the disk of {folder} is full",
    errno.EDQUOT: "the disk quota of {folder} is used up",
    errno.ENOENT: "{folder} does not accept new folders (a virtual file system such as /proc "
                  "or /sys?)",
    errno.ENOTDIR: "{folder} is not a directory",
}


def missing_root(target: Path) -> Path | None:
    """The outermost of `target` and its ancestors that does not exist yet (what a command
    creates for its output), or None when `target` exists. Take it before claiming --out."""
    target = Path(target).expanduser().resolve()
    if os.path.lexists(target):
        return None
    root = target
    while not os.path.lexists(root.parent) and root.parent != root:
        root = root.parent
    return root


@contextmanager
def undone_on_failure(target: Path, created: Path | None, was_empty: bool = False,
                      bookkeeping: tuple[str, ...] = (MARKER_NAME, RESOLVED_CONFIG_NAME)
                      ) -> Iterator[None]:
    """When the block fails (or is interrupted) before any work landed in `target`, undo what
    the command did to it: remove `target` and its new parents up to `created` (from
    `missing_root`), or, when `target` was an empty directory before (`was_empty`), empty it
    again. Once `target` holds any file but the `bookkeeping` ones (work to resume), or when it
    held something before the command, nothing is removed."""
    try:
        yield
    except BaseException:
        if (created is not None or was_empty) and _holds_only(target, bookkeeping):
            if created is None:  # the user's empty directory: keep it, empty
                for child in list(target.iterdir()):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            else:
                shutil.rmtree(target, ignore_errors=True)
                folder = target.parent
                while folder == created or created in folder.parents:
                    try:
                        folder.rmdir()  # only while empty
                    except OSError:
                        break
                    folder = folder.parent
        raise


def _holds_only(target: Path, names: tuple[str, ...]) -> bool:
    """True when directory `target` holds no file but top-level `names` (empty folders aside)."""
    if not target.is_dir() or target.is_symlink():
        return False
    for folder, _, files in os.walk(target):
        if any(Path(folder) != target or name not in names for name in files):
            return False
    return True


@contextmanager
def staged_output(target: Path, command: str, **marker: Any) -> Iterator[Path]:
    """Yield a temporary sibling directory (already marked) that replaces `target` only when
    the block succeeds; OSError and safetensors write errors become one-line errors."""
    from safetensors import SafetensorError

    try:
        with atomic_directory(target, overwrite=True) as tmp:
            write_marker(tmp, command, **marker)
            yield tmp
            mark_finished(tmp, command, **marker)  # lists its files: --overwrite's check
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


SUBSET_DEFAULT = "64"  # `dit-prune train --subset`: images of the digits pool


def check_train_args(args: argparse.Namespace) -> Path:
    """`dit-prune train`'s numeric options and its --out, before any work (TrainConfig does not
    check these yet: patch size, learning rate)."""
    for flag in ("steps", "batch_size", "patch_size"):
        if hasattr(args, flag):
            check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if hasattr(args, "lr"):
        check_finite(args.lr, "--lr", low=0.0)
    data = getattr(args, "data", "digits")
    if data != "digits" and str(getattr(args, "subset", SUBSET_DEFAULT)) != SUBSET_DEFAULT:
        raise DitPruneError(f"--subset {args.subset} chooses images from the embedded digits "
                            f"pool; with --data {data} every image of the folder is used (drop "
                            "--subset, or make a folder of the images to train on)")
    return claim_out(args.out, "train", {"--data": None if data == "digits" else data},
                     args.overwrite)
