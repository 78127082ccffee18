"""Save and reload (pruned) diffusers pipelines.

`pipe.save_pretrained(path)` works on a pruned pipeline, but diffusers' `from_pretrained`
builds the transformer from its unpruned config and fails on the smaller weights.
`load_pruned_pipeline` rebuilds the transformer from the `dit_prune_structure` key of its config
(as `load_dit` does) and lets diffusers load every other component around it; an unpruned
directory loads through diffusers alone.

`save_pipeline` follows the command line's output rules (dit_prune/commands/common.py): the
target may not be, contain or lie inside the directory the pipeline was loaded from
(`pipeline_source`), and `overwrite` replaces only a directory an earlier `save_pipeline`
marked as its own (its `.dit_prune_run` marker lists every file it wrote, and it holds nothing
else), or the `pruned/` folder of a `dit-prune run` directory holding only what the run wrote.
A pipeline loaded from one of our directories keeps its training record: `dit_prune.json` is
carried over (with a `saved_pipeline` entry naming the source), and a source with a
`MODEL_CARD.md` gets a short card saying what the copy is.

Example:
    >>> import diffusers, tempfile
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.pipelines import pixel_dit_pipeline, prune_pipeline
    >>> from dit_prune.units import Unit
    >>> pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDIMScheduler())
    >>> pruned = prune_pipeline(pipe, [Unit("head", 2, 0)])
    >>> path = tempfile.mkdtemp() + "/pruned"
    >>> _ = save_pipeline(pruned, path)
    >>> load_pruned_pipeline(path).transformer.transformer_blocks[2].attn1.heads
    3
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diffusers
import torch

from dit_prune.checkpoint import (
    META_NAME,
    STRUCTURE_KEY,
    WEIGHTS_NAME,
    atomic_directory,
    file_sha256,
    load_dit,
)
from dit_prune.commands.common import (
    MARKER_NAME,
    foreign_entries,
    mark_finished,
    path_relation,
    previous_command,
)
from dit_prune.errors import DitPruneError
from dit_prune.models import disable_block_label_dropout
from dit_prune.pipelines.prune import _transformer, sync_structure_config

MODEL_INDEX = "model_index.json"
CARD_NAME = "MODEL_CARD.md"
SAVE_COMMAND = "save_pipeline"  # what the `.dit_prune_run` marker of a saved pipeline names
RUN_COMMAND = "run"  # `dit-prune run` saves its text pipeline into its own `pruned/` folder
SOURCE_ATTRIBUTE = "dit_prune_source"  # on a pipeline: the directory it was loaded from


def save_pipeline(pipe: Any, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """`pipe.save_pretrained` into `path` atomically, with the transformer's structure recorded.

    Refused in one line (`check_save_target`): a `path` that is, contains or lies inside the
    directory the pipeline was loaded from, and a non-empty `path` unless `overwrite` and an
    earlier `save_pipeline` wrote it (or it is a `dit-prune run`'s own folder). The source's
    `dit_prune.json` (and a short `MODEL_CARD.md`, when the source has a card) go with it; the
    directory is marked as this function's output. On error nothing is left behind.

    Example:
        >>> import diffusers, tempfile
        >>> from dit_prune.models import new_dit
        >>> from dit_prune.pipelines import pixel_dit_pipeline
        >>> pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDIMScheduler())
        >>> path = Path(tempfile.mkdtemp()) / "p"
        >>> _ = save_pipeline(pipe, path)
        >>> _ = save_pipeline(pipe, path, overwrite=True)  # an earlier save_pipeline output
        >>> _ = (path / "NOTES.txt").write_text("mine")
        >>> save_pipeline(pipe, path, overwrite=True)
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: save_pipeline: ... holds NOTES.txt, which save_pipeline \
did not write; overwrite would delete it: move it out or choose another path
    """
    sync_structure_config(_transformer(pipe))
    target = Path(path)
    source = pipeline_source(pipe)
    check_save_target(target, source, overwrite)
    with atomic_directory(target, overwrite) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if source is not None:
            _carry_records(source, tmp, pipe, target.name)
        mark_finished(tmp, SAVE_COMMAND)  # last: it lists every file the save wrote
    return target


def pipeline_source(pipe: Any) -> Path | None:
    """The directory `pipe` was loaded from (`load_pruned_pipeline`, kept by `prune_pipeline`'s
    copies; else diffusers' `_name_or_path` when it is a local directory), resolved, or None.

    Example:
        >>> import diffusers
        >>> from dit_prune.models import new_dit
        >>> from dit_prune.pipelines import pixel_dit_pipeline
        >>> pipeline_source(pixel_dit_pipeline(new_dit("tiny", 10, 8, 1),
        ...                                    diffusers.DDIMScheduler())) is None
        True
    """
    recorded = getattr(pipe, SOURCE_ATTRIBUTE, None)
    if recorded is None:
        config = getattr(pipe, "config", None)
        recorded = config.get("_name_or_path") if hasattr(config, "get") else None
    if not recorded or not Path(recorded).expanduser().is_dir():
        return None
    return Path(recorded).expanduser().resolve()


def remember_source(pipe: Any, path: str | os.PathLike[str] | None) -> Any:
    """Record on `pipe` the directory it was loaded from (what `save_pipeline` never writes
    into); returns `pipe`. None, or a path that is no local directory (a hub id), records
    nothing.

    Example:
        >>> class Pipe: ...
        >>> remember_source(Pipe(), ".").dit_prune_source == Path(".").resolve()
        True
    """
    if path is not None and Path(path).expanduser().is_dir():
        setattr(pipe, SOURCE_ATTRIBUTE, Path(path).expanduser().resolve())
    return pipe


def check_save_target(target: Path, source: Path | None, overwrite: bool) -> None:
    """Refuse, in one line, a `save_pipeline` target that is, contains or lies inside `source`
    (or the current directory), an existing file, or a non-empty directory unless `overwrite`
    and it is replaceable (`_check_replaceable`). Writes nothing.

    Example:
        >>> check_save_target(Path("x/y"), Path("x").resolve(), overwrite=True)
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: save_pipeline: x/y lies inside the pipeline's source \
directory ...; choose another path: the source is never modified
    """
    resolved = target.expanduser().resolve()
    if source is not None:
        relation = path_relation(resolved, source)
        if relation:
            raise DitPruneError(f"save_pipeline: {target} {relation} the pipeline's source "
                                f"directory {source}; choose another path: the source is "
                                "never modified")
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise DitPruneError(f"save_pipeline: {target} is the current directory or holds it; "
                            "name a new subdirectory")
    if resolved.exists() and not resolved.is_dir():
        raise DitPruneError(f"save_pipeline: {target} is an existing file, not a directory")
    if not resolved.is_dir() or not any(resolved.iterdir()):
        return
    if not overwrite:
        raise DitPruneError(f"save_pipeline: output {target} exists and is not empty (pass "
                            "overwrite=True to replace an earlier save_pipeline output, or "
                            "choose another path)")
    _check_replaceable(resolved, target)


def _check_replaceable(resolved: Path, shown: Path) -> None:
    """Pass when non-empty directory `resolved` is an earlier `save_pipeline` output holding
    only what that save wrote, or a folder of a `dit-prune run` directory (`pruned/`, saved
    by an older version without its own marker) holding only what the run wrote; else a
    one-line DitPruneError naming `shown`."""
    found = previous_command(resolved)
    if found == SAVE_COMMAND:
        _refuse_foreign(shown, foreign_entries(resolved))
        return
    if found is None and previous_command(resolved.parent) == RUN_COMMAND:
        prefix = f"{resolved.name}/"
        inside = [e for e in foreign_entries(resolved.parent) if e.startswith(prefix)]
        _refuse_foreign(shown, tuple(e[len(prefix):] for e in inside))
        return
    what = f"was written by `dit-prune {found}`" if found else f"has no {MARKER_NAME} marker"
    raise DitPruneError(f"save_pipeline: {shown} {what}: overwrite replaces only an earlier "
                        "save_pipeline output (never a checkpoint or a folder with other "
                        "files); choose another path")


def _refuse_foreign(shown: Path, extra: tuple[str, ...]) -> None:
    if extra:
        raise DitPruneError(f"save_pipeline: {shown} holds {', '.join(extra[:3])}"
                            f"{' ...' if len(extra) > 3 else ''}, which save_pipeline did not "
                            "write; overwrite would delete it: move it out or choose another "
                            "path")


def _carry_records(source: Path, tmp: Path, pipe: Any, name: str) -> None:
    """Into the staged directory `tmp`: the source's `dit_prune.json` (its training record,
    which `load_dit` reads as `meta.extra`), with a `saved_pipeline` entry naming the source;
    and, when the source has a model card, a short card saying what this copy is."""
    weights = source / "transformer" / WEIGHTS_NAME
    origin = {"source": str(source),
              "source_weights_sha256": file_sha256(weights) if weights.is_file() else None}
    if (source / META_NAME).is_file():
        record = _read_json(source / META_NAME)
        record["saved_pipeline"] = origin
        (tmp / META_NAME).write_text(json.dumps(record, indent=2) + "\n")
    if (source / CARD_NAME).is_file():
        (tmp / CARD_NAME).write_text(_model_card(name, source, _transformer(pipe)))


def _model_card(name: str, source: Path, model: Any) -> str:
    """A short model card for a saved (pruned) copy of `source`."""
    from dit_prune.structure import original_counts, read_structure

    counts = read_structure(model)["counts"]
    base = original_counts(model)
    kept = ", ".join(f"{kind}: {sum(counts[kind])} of {sum(base[kind])}" for kind in counts)
    pruned = any(sum(counts[kind]) != sum(base[kind]) for kind in counts)
    what = "A pruned copy" if pruned else "A copy (transformer not pruned)"
    return (f"# {name}\n\n{what} of `{source}`, saved by `dit_prune.pipelines.save_pipeline`.\n"
            f"Units kept per kind ({type(model).__name__}): {kept}.\n\n"
            f"`{source / CARD_NAME}` describes the model before this save: its training record "
            f"still holds (`{META_NAME}`, copied here), but its measurements do not; measure "
            "this copy with `dit-prune eval`.\n")


def load_pruned_pipeline(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", **from_pretrained: Any
) -> Any:
    """Load a pipeline directory whose transformer may be pruned; returns a diffusers pipeline.

    `path` is a `save_pretrained` directory (`model_index.json`); one of our transformer +
    scheduler checkpoints (no `model_index.json`) becomes a pixel-space DiTPipeline with
    `IdentityVAE`. Extra keyword arguments go to the pipeline class's `from_pretrained` for the
    other components; a `torch_dtype` is applied to the rebuilt transformer as well.
    """
    root = Path(path)
    if not root.is_dir():
        raise DitPruneError(f"pipeline directory not found: {root}")
    if not (root / MODEL_INDEX).is_file():
        if (root / "transformer").is_dir():
            from dit_prune.pipelines.dit import dit_pipeline_from_checkpoint

            return remember_source(dit_pipeline_from_checkpoint(root, device=device), root)
        raise DitPruneError(f"{root} has neither {MODEL_INDEX} nor a transformer/ directory")
    index = _read_json(root / MODEL_INDEX)
    cls = getattr(diffusers, str(index.get("_class_name")), None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.DiffusionPipeline):
        raise DitPruneError(f"{root / MODEL_INDEX} names no diffusers pipeline: "
                            f"{index.get('_class_name')!r}")
    if "transformer" not in index:
        raise DitPruneError(f"{root / MODEL_INDEX} lists no transformer component")
    components: dict[str, Any] = {}
    if _is_pruned(root):  # diffusers cannot build it: rebuild from dit_prune_structure
        transformer = load_dit(root).model
        dtype = from_pretrained.get("torch_dtype")
        if isinstance(dtype, torch.dtype):
            transformer = transformer.to(dtype)
        sync_structure_config(transformer)  # keep the structure in the config for the next save
        components["transformer"] = transformer
    for name, entry in index.items():  # components saved as absent (SD3 without T5): None
        if isinstance(entry, list) and entry[:1] == [None] and name not in from_pretrained:
            components.setdefault(name, None)
    try:
        with _quiet_identity_vae(index):
            pipe = cls.from_pretrained(str(root), **components, **from_pretrained)
    except (OSError, ValueError, TypeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DitPruneError(f"cannot load the pipeline components of {root}: {first}") from None
    # as every DiT of ours: docs/definitions.md#class-conditioning-and-label-dropout
    disable_block_label_dropout(pipe.transformer)
    return remember_source(pipe.to(device), root)


def is_pixel_space(path: str | os.PathLike[str]) -> bool:
    """True when pipeline directory `path` decodes with `IdentityVAE` (its `model_index.json`
    names it as the VAE): its transformer works on pixels, as our checkpoints do.

    Example:
        >>> is_pixel_space("/nonexistent")
        False
    """
    index_file = Path(path) / MODEL_INDEX
    if not index_file.is_file():
        return False
    return _names_identity_vae(_read_json(index_file))


def _names_identity_vae(index: dict[str, Any]) -> bool:
    return list(index.get("vae") or [])[-1:] == ["IdentityVAE"]


def _is_pruned(root: Path) -> bool:
    """True when the transformer config records a pruned structure (unpruned ones, including
    hub layouts such as `Transformer2DModel` configs, load through diffusers itself)."""
    config_file = root / "transformer" / "config.json"
    if not config_file.is_file():
        raise DitPruneError(f"transformer config missing: {config_file}")
    return STRUCTURE_KEY in _read_json(config_file)


@contextmanager
def _quiet_identity_vae(index: dict[str, Any]) -> Iterator[None]:
    """Mute diffusers' "expected AutoencoderKL" warning while loading an IdentityVAE pipeline."""
    if not _names_identity_vae(index):
        yield
        return
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(level)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DitPruneError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(index, dict):
        raise DitPruneError(f"{path} is not a JSON object")
    return index
