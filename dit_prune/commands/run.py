"""`dit-prune run`: the whole before/after experiment into one run directory.

Every option is parsed into one validated `RunConfig` (its defaults are the command's), and the
checks that need the checkpoint (sampling steps, scorer timesteps, budgets in units) run right
after loading it, before any sampling; nothing is written to --out before they pass, and a run
that fails before any work removes the --out it created. The run directory is claimed under a
lock: a second run into the same --out *while the first is working* fails at once instead of
mixing its files with the first one's. Once a run has stopped, the same command again continues
from the sample shards and scores it finished (and a finished run writes its report again);
path options count as the absolute paths they resolve to (`./ck`, `ck` and its absolute path
are one checkpoint; hub ids compare as typed), other options need --overwrite. A finished
run's `.dit_prune_run` marker lists every file it wrote, at any depth, so `--overwrite` refuses
a run directory that holds anything else, also inside its folders (samples/, pruned/).

Example:
    $ dit-prune run checkpoints/digits-memorized --out runs/demo --budget 0.1,0.2
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import uuid
from dataclasses import fields
from pathlib import Path
from typing import IO, Any

from dit_prune.commands.common import (
    DEVICE_HELP,
    GUIDANCE_HELP,
    MARKER_NAME,
    RESOLVED_CONFIG_NAME,
    check_sampling_steps,
    check_scorer_timesteps,
    claim_out,
    dump_resolved_config,
    foreign_entries,
    mark_finished,
    mark_started,
    missing_root,
    pick_device,
    undone_on_failure,
)
from dit_prune.errors import DitPruneError
from dit_prune.evaluate import evaluation_net_inputs
from dit_prune.keyvalue import parse_key_values
from dit_prune.pruning.recovery import RecoveryConfig, check_recovery_flags
from dit_prune.pruning.recovery_data import RECOVERY_SOURCES
from dit_prune.pruning.selection import (
    BUDGET_MODE_HELP,
    check_budget_for,
    model_mode_kinds,
    parse_budgets,
)
from dit_prune.run.config import BUDGET_MODES, RECOVERIES, TARGETS, RunConfig
from dit_prune.sampling import parse_seeds, seed_option
from dit_prune.scorers import SCORERS
from dit_prune.store.distributed import command_processes, partial_state

DEFAULTS = {f.name: f.default for f in fields(RunConfig)}  # one source for the CLI's defaults
DEFAULTS["recover_option"] = []
# the recovery flags of `run` -> their attribute of the parsed arguments (--copy-detector also
# serves the copy rate, so it is no recovery option here)
_RECOVERY_ARGS = {"--recover-steps": "recover_steps", "--recover-data": "recover_data",
                  "--recover-t-min": "recover_t_min", "--recover-t-max": "recover_t_max",
                  "--recover-pool": "recover_pool", "--recover-option": "recover_option"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="baseline, score, prune, evaluate on the same seeds, compare with random",
        description="Everything is validated before long work starts; an interrupted run "
                    "continues where it stopped when started again with the same options.")
    p.add_argument("checkpoint", help="DiT checkpoint directory (or hub id)")
    p.add_argument("--out", default="runs/run", help="run directory (default: runs/run)")
    p.add_argument("--scorer", default=DEFAULTS["scorer"],
                   help=f"how units are scored: one of {', '.join(sorted(SCORERS))}")
    p.add_argument("--budget", default=",".join(f"{b:g}" for b in DEFAULTS["budgets"]),
                   help="budget(s), comma-separated: fractions of units in (0, 1) or whole "
                        "numbers of units such as 3")
    p.add_argument("--budget-mode", default=DEFAULTS["budget_mode"], choices=BUDGET_MODES,
                   help=f"{BUDGET_MODE_HELP} (default: {DEFAULTS['budget_mode']})")
    p.add_argument("--seeds", default=DEFAULTS["seeds"], help="sampling seeds, e.g. 0-999")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="sampling steps")
    p.add_argument("--sampler", default=DEFAULTS["sampler"], choices=("ddim", "ddpm"),
                   help="sampler of every arm: ddim (deterministic) or ddpm")
    p.add_argument("--guidance-scale", type=float, default=DEFAULTS["guidance_scale"],
                   help=GUIDANCE_HELP)
    p.add_argument("--scorer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="scorer option, e.g. timesteps=beta:0.8,2 or batches=8 (repeatable)")
    p.add_argument("--recover", default=DEFAULTS["recover"], choices=RECOVERIES,
                   help="recovery after pruning, as dit-prune prune --recover: one of "
                        "%(choices)s")
    # recovery options default to None ("not given"): one that --recover (or --recover-data)
    # would ignore is refused; config_from_args fills in RunConfig's defaults
    p.add_argument("--recover-steps", type=int, default=None,
                   help=f"recovery steps (default: {DEFAULTS['recover_steps']})")
    p.add_argument("--recover-data", default=None,
                   help="images recovery trains on: train (the checkpoint's training images, "
                   "each once), train-multiset (with the duplicated ones repeated as in training), "
                   "unused (digits pool images it never saw), heldout (contaminates FD, which is "
                   "measured against them), generated-novel (samples of the unpruned model that "
                   "the copy detector calls novel) or an image folder (default: "
                   f"{DEFAULTS['recover_data']})")
    p.add_argument("--recover-t-min", type=int, default=DEFAULTS["recover_t_min"],
                   help="smallest distillation t (distill, adversarial; default: 500 for "
                        "distill, 0 for adversarial)")
    p.add_argument("--recover-t-max", type=int, default=None,
                   help="largest distillation t (distill, adversarial; default: "
                        f"{DEFAULTS['recover_t_max']})")
    p.add_argument("--recover-pool", type=int, default=None,
                   help="generated-novel: samples drawn from the unpruned model before the "
                        f"copies are dropped (default: {DEFAULTS['recover_pool']}); at least "
                        "one recovery batch of them must be novel")
    p.add_argument("--recover-option", action="append", default=[], metavar="KEY=VALUE",
                   help="adversarial recovery option, e.g. inner_steps=2, margin=0.05, "
                        "weight=1, restart_every=20, ddim_steps=8, lr=1e-4 (repeatable)")
    p.add_argument("--seed", type=seed_option, default=DEFAULTS["seed"],
                   help="scoring, noise-control and re-trigger attack seed")
    p.add_argument("--random-seeds", default=",".join(map(str, DEFAULTS["random_seeds"])),
                   help="seeds of the random unit draws that random pruning is judged with at "
                        "equal FD, e.g. 0,1,2 or 0-4 (default: 0,1,2)")
    p.add_argument("--random-budgets", default=None,
                   help="budgets random pruning is measured at, as --budget (default: the "
                        "--budget list); add larger ones when the scorer's FD lies beyond "
                        "random's")
    p.add_argument("--target", default=DEFAULTS["target"], choices=TARGETS,
                   help="copies the equal-quality comparison counts: auto (the duplicated images "
                        "when the checkpoint records some, else all), all, duplicated")
    p.add_argument("--retrigger-targets", type=int, default=DEFAULTS["retrigger_targets"],
                   help="re-trigger robustness: copied training images (the duplicated ones, "
                        "else a seeded sample) and as many held-out images whose initial noise "
                        "is optimised to reproduce them, per table arm; 0 turns it off "
                        "(default: %(default)s)")
    p.add_argument("--retrigger-steps", type=int, default=DEFAULTS["retrigger_steps"],
                   help="Adam steps on the noise per re-trigger attack (default: %(default)s)")
    p.add_argument("--retrigger-ddim-steps", type=int,
                   default=DEFAULTS["retrigger_ddim_steps"],
                   help="steps of the differentiable DDIM sampler attacked (default: "
                        "%(default)s)")
    p.add_argument("--retrigger-lr", type=float, default=DEFAULTS["retrigger_lr"],
                   help="Adam learning rate of the attack (default: %(default)s)")
    p.add_argument("--retrigger-prior-weight", type=float,
                   default=DEFAULTS["retrigger_prior_weight"],
                   help="weight of the penalty keeping the noise's mean 0 and std 1 (default: "
                        "%(default)s)")
    p.add_argument("--train", help="training image folder (default: the checkpoint's digits)")
    p.add_argument("--heldout", help="held-out image folder (default: held-out digits)")
    p.add_argument("--features", help="feature network for FD (default: digits-features)")
    p.add_argument("--copy-detector", help="copy-detection model (default: digits-copydetect)")
    p.add_argument("--train-store",
                   help="reference store of the same training images with the copy detector's "
                        "embeddings (dit-prune index): the ratio test and the copy rate search "
                        "it (same numbers; the training set is not re-embedded)")
    p.add_argument("--device", default=DEFAULTS["device"], help=DEVICE_HELP)
    p.add_argument("--shard-size", type=int, default=DEFAULTS["shard_size"],
                   help="images per sample shard (the unit of resuming and of multi-process work)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an earlier `dit-prune run` in --out whose options differ")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's one validated configuration (scorer options and device included)."""
    pick_device(args.device)
    parse_seeds(args.seeds, "--seeds")  # named as the flag (RunConfig checks them again)
    given = [flag for flag, name in _RECOVERY_ARGS.items()
             if getattr(args, name, None) not in (None, [])]
    check_recovery_flags(args.recover, given, data=args.recover_data)
    for name in _RECOVERY_ARGS.values():
        if getattr(args, name, None) is None:
            setattr(args, name, DEFAULTS[name])
    return RunConfig(
        checkpoint=args.checkpoint, out=args.out, scorer=args.scorer,
        budgets=parse_budgets(args.budget), budget_mode=args.budget_mode, seeds=args.seeds,
        steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale,
        scorer_options=parse_key_values(args.scorer_option, "--scorer-option"),
        recover=args.recover, recover_steps=args.recover_steps,
        recover_data=args.recover_data, recover_t_min=args.recover_t_min,
        recover_t_max=args.recover_t_max, recover_pool=args.recover_pool,
        recover_options=parse_key_values(args.recover_option, "--recover-option"),
        seed=args.seed,
        train=args.train, heldout=args.heldout, features=args.features,
        copy_detector=args.copy_detector, train_store=args.train_store, device=args.device,
        shard_size=args.shard_size, random_seeds=_random_seeds(args.random_seeds),
        random_budgets=parse_budgets(args.random_budgets) if args.random_budgets else None,
        target=args.target, retrigger_targets=args.retrigger_targets,
        retrigger_steps=args.retrigger_steps, retrigger_ddim_steps=args.retrigger_ddim_steps,
        retrigger_lr=args.retrigger_lr, retrigger_prior_weight=args.retrigger_prior_weight,
        num_classes=checkpoint_classes(args.checkpoint, RunConfig.num_classes),
    )


def checkpoint_classes(checkpoint: str, default: int) -> int:
    """The class count a DiT checkpoint's config records (`num_embeds_ada_norm`), read before
    loading so that seeds get labels s mod that count; `default` when there is none to read
    (a text pipeline, a missing or broken config: `load_dit` reports those in one line)."""
    root = Path(checkpoint).expanduser()
    for name in ("config.json", "transformer/config.json"):
        try:
            config = json.loads((root / name).read_text())
        except (OSError, ValueError):
            continue
        classes = config.get("num_embeds_ada_norm") if isinstance(config, dict) else None
        if str(config.get("_class_name", "")).startswith("DiT") and isinstance(classes, int) \
                and not isinstance(classes, bool) and classes > 0:
            return classes
    return default


def run(args: argparse.Namespace) -> int:
    """The whole experiment; under a launcher of N processes every process meets at a last
    barrier and closes the process group, also when the run fails
    (`distributed.command_processes`)."""
    with command_processes():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from dit_prune.pruning import save_pruned
    from dit_prune.run.experiment import (
        evaluation_nets,
        prepare_inputs,
        run_experiment,
        target_subset,
    )
    from dit_prune.run.report import summary_lines, write_outputs

    started = time.perf_counter()
    cfg = config_from_args(args)
    recover_folder = None if cfg.recover_data in RECOVERY_SOURCES else cfg.recover_data
    created = missing_root(Path(cfg.out))  # what a run that fails before any work removes
    run_dir = claim_out(cfg.out, "run", {
        "checkpoint": cfg.checkpoint, "--train": cfg.train, "--heldout": cfg.heldout,
        **evaluation_net_inputs(cfg.features, cfg.copy_detector),
        "--recover-data": recover_folder, "--train-store": cfg.train_store}, args.overwrite,
        resume=True)
    was_empty = run_dir.is_dir() and not any(run_dir.iterdir())
    inputs = prepare_inputs(cfg)  # loads and checks everything before long work
    check_loaded(cfg, inputs.loaded)
    target_subset(cfg, inputs.loaded.meta.extra, len(inputs.train_images))
    evaluation_nets(cfg)  # the feature and copy-detection nets load (kind, weights) before --out
    state = partial_state()  # CPU processes under torchrun too (a bare PartialState: one each)
    lock = None
    foreign: tuple[str, ...] = ()
    main = state.is_main_process  # it alone claims (and undoes) --out
    with undone_on_failure(run_dir, created if main else None, was_empty and main):
        if state.is_main_process:
            foreign = foreign_entries(run_dir)  # files someone else put beside a resumed run
            lock = _claim_run_dir(run_dir, cfg, args.overwrite, foreign)
            dump_resolved_config(run_dir, args, resolved=cfg.to_json(),
                                 resolved_paths=resolved_paths(cfg))
        state.wait_for_everyone()
        result = run_experiment(cfg, inputs, progress=state.is_main_process)
    if not state.is_main_process:
        return 0
    _check_still_ours(run_dir, lock)
    report = write_outputs(result, run_dir)
    entry = result["entries"][0]
    if inputs.text is not None:  # text-to-image: the whole pipeline, loadable with diffusers
        from dit_prune.pipelines.io import save_pipeline

        save_pipeline(inputs.text.with_transformer(entry["model"]), run_dir / "pruned",
                      overwrite=True)
    else:
        save_pruned(entry["model"], run_dir / "pruned", scheduler=inputs.loaded.scheduler,
                    plan=entry["after_plan"], base_hash=inputs.loaded.meta.weights_sha256,
                    overwrite=True)
    assert lock is not None  # claimed by the main process above
    mark_finished(run_dir, "run", foreign, run_id=lock.run_id)  # what --overwrite may replace
    print("\n".join(summary_lines(report)))
    print(f"\nwrote {run_dir}/report.md, report.json, samples_before_after.png"
          + ", tradeoff.png"
          + f", pruned/ in {time.perf_counter() - started:.0f} s")
    return 0


def check_loaded(cfg: RunConfig, loaded: Any) -> None:
    """The checks that need the checkpoint: sampling steps and scorer timesteps within its
    noise schedule, and budgets that remove at least one unit (and no more than exist)."""
    from dit_prune.run.experiment import check_reachable
    from dit_prune.sampling import check_steps
    from dit_prune.scorers import get_scorer
    from dit_prune.units import enumerate_units

    check_sampling_steps(cfg.steps, loaded.scheduler)
    options = cfg.recovery_options()
    if options:
        num_train_timesteps = int(loaded.scheduler.config.num_train_timesteps)
        RecoveryConfig(t_min=options["t_min"], t_max=options["t_max"]).check_timesteps(
            num_train_timesteps)
        if "config" in options:
            check_steps(options["config"].ddim_steps, loaded.scheduler,
                        "--recover-option ddim_steps")
    if cfg.retrigger_targets:
        check_steps(cfg.retrigger_ddim_steps, loaded.scheduler, "--retrigger-ddim-steps")
    scorer = get_scorer(cfg.scorer, seed=cfg.seed, **cfg.scorer_options)
    check_scorer_timesteps(scorer, loaded.scheduler)
    kinds = model_mode_kinds(cfg.budget_mode, loaded.model)
    counts: dict[str, int] = {}
    units = enumerate_units(loaded.model, list(kinds))
    for unit in units:
        counts[unit.kind] = counts.get(unit.kind, 0) + 1
    scorer.check_units(units)  # e.g. `given`: every named unit is among the mode's units
    for budget in cfg.budgets + cfg.random_budget_list():
        check_budget_for(budget, cfg.budget_mode, counts, loaded.model)
    check_reachable(cfg, loaded.model)  # the block rule can make a count unreachable


class _Lock:
    """An exclusive lock on the run directory's marker, held while the run works."""

    def __init__(self, run_dir: Path, run_id: str) -> None:
        self.run_id = run_id
        self.handle: IO[str] | None = _locked(run_dir / MARKER_NAME, run_dir)


def _locked(marker: Path, run_dir: Path) -> IO[str] | None:
    try:
        import fcntl
    except ImportError:  # no advisory locks here: the run-id check at the end still holds
        return None
    handle = open(marker)  # noqa: SIM115 - kept open (and locked) for the run's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DitPruneError(f"{run_dir} is in use by another dit-prune run; wait for it or "
                            "choose another --out") from None
    return handle


def _claim_run_dir(run_dir: Path, cfg: RunConfig, overwrite: bool,
                   foreign: tuple[str, ...] = ()) -> _Lock:
    """Resume a run with identical options; otherwise refuse (or, with overwrite, start over).

    Whatever it does, the directory ends up marked (`mark_started`, naming the `foreign`
    entries a resumed run keeps) with this run's id and locked."""
    if run_dir.exists() and not run_dir.is_dir():
        raise DitPruneError(f"run directory {run_dir} is a file")
    previous = run_dir / RESOLVED_CONFIG_NAME
    held = _locked(run_dir / MARKER_NAME, run_dir) if (run_dir / MARKER_NAME).is_file() else None
    try:
        if previous.is_file():
            try:
                same = _same_options(json.loads(previous.read_text()), cfg)
            except (json.JSONDecodeError, AttributeError):
                same = False
            if not same and not overwrite:
                raise DitPruneError(f"{run_dir} holds a run with other options (pass "
                                    "--overwrite to discard it, or choose another --out)")
        else:
            same = False
            if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
                raise DitPruneError(f"{run_dir} is not empty and is not a dit-prune run "
                                    "(pass --overwrite or choose another --out)")
        if not same and run_dir.is_dir():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex
        mark_started(run_dir, "run", foreign if same else (), run_id=run_id)
        return _Lock(run_dir, run_id)
    finally:
        if held is not None:
            held.close()


# RunConfig's path options: compared by the absolute paths they resolve to when deciding
# whether a run resumes (--out is the run directory itself: not compared)
PATH_OPTIONS = ("checkpoint", "train", "heldout", "features", "copy_detector", "train_store",
                "recover_data")


def resolved_paths(cfg: RunConfig) -> dict[str, str | None]:
    """`cfg`'s path options, each as the absolute path it names (symlinks followed) when it
    exists, else as typed (a hub id, a recovery source such as 'train', unset)."""
    paths: dict[str, str | None] = {}
    for name in PATH_OPTIONS:
        value = getattr(cfg, name)
        if name == "recover_data" and value in RECOVERY_SOURCES:
            paths[name] = value
        elif value is not None and str(value).strip() and Path(value).expanduser().exists():
            paths[name] = str(Path(value).expanduser().resolve())
        else:
            paths[name] = value
    return paths


def _same_options(previous: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether an earlier run's `config.resolved.json` (`previous`) holds `cfg`'s options:
    path options compare by the absolute paths they resolved to (`resolved_paths`), so `./ck`,
    `ck` and its absolute path are one checkpoint, and --out is not compared (it is this run
    directory). A dump of an older version, without resolved paths, compares as typed."""
    current = cfg.to_json()
    recorded = previous.get("resolved")
    paths = previous.get("resolved_paths")
    if not isinstance(recorded, dict):
        return False
    if not isinstance(paths, dict):
        return recorded == current
    ignored = {"out", *PATH_OPTIONS}
    return (paths == resolved_paths(cfg)
            and {k: v for k, v in recorded.items() if k not in ignored}
            == {k: v for k, v in current.items() if k not in ignored})


def _check_still_ours(run_dir: Path, lock: _Lock | None) -> None:
    """Refuse to write the report when another run has taken the directory over meanwhile."""
    try:
        current = json.loads((run_dir / MARKER_NAME).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        current = None
    if lock is not None and current != lock.run_id:
        raise DitPruneError(f"another dit-prune run took over {run_dir} while this one ran; "
                            "this run's report was not written")


def _random_seeds(text: str) -> tuple[int, ...]:
    return tuple(parse_seeds(text, "--random-seeds"))
