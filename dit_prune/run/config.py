"""The validated configuration of one `dit-prune run` (everything is checked before long work).

Example:
    >>> cfg = RunConfig(checkpoint="checkpoints/digits-memorized", out="runs/x", budgets=(0.1,))
    >>> cfg.labels()[:12].tolist()
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from dit_prune.errors import DitPruneError
from dit_prune.metrics.retrigger import AttackBudget
from dit_prune.pruning.recovery import RECOVERY_METHODS, RecoveryConfig, check_recovery_flags
from dit_prune.pruning.selection import BUDGET_MODES as SELECTION_MODES
from dit_prune.pruning.selection import DEFAULT_BUDGET_MODE, check_budget
from dit_prune.sampling import (
    SAMPLERS,
    check_guidance_scale,
    format_seeds,
    labels_for_seeds,
    parse_seeds,
    seed_value,
)

RECOVERIES = RECOVERY_METHODS
TARGETS = ("auto", "all", "duplicated")
MIN_SAMPLES = 2  # FD fits a covariance; bootstrap intervals resample
# every selection mode; cross_heads needs a text-to-image model (cross-attention heads), which
# `dit-prune run` checks once the checkpoint is loaded (check_budget_for)
BUDGET_MODES = SELECTION_MODES


@dataclass(frozen=True)
class RunConfig:
    """Options of `dit-prune run`; see `dit-prune run --help` for each."""

    checkpoint: str
    out: str
    scorer: str = "taylor-gap"
    budgets: tuple[float, ...] = (0.2,)
    budget_mode: str = DEFAULT_BUDGET_MODE
    seeds: str = "0-999"
    steps: int = 50
    sampler: str = "ddim"
    guidance_scale: float = 1.0
    num_classes: int = 10
    scorer_options: dict[str, Any] = field(default_factory=dict)
    recover: str = "none"
    recover_steps: int = RecoveryConfig.steps
    # train, unused (pool digits the model never saw), heldout, generated-novel (teacher samples
    # the copy detector calls novel) or a folder
    recover_data: str = "train"
    # distillation t range (distill, adversarial); None: the method's default (distill 500,
    # adversarial 0: all t)
    recover_t_min: int | None = None
    recover_t_max: int = RecoveryConfig.t_max
    recover_pool: int = 1000  # generated-novel: teacher samples drawn before the novel filter
    recover_options: dict[str, Any] = field(default_factory=dict)  # adversarial KEY=VALUE
    seed: int = 0
    train: str | None = None  # image folder; default: the checkpoint's recorded digits subset
    heldout: str | None = None  # image folder; default: the digits held-out set
    features: str | None = None  # feature network for FD (TorchScript file or our directory)
    copy_detector: str | None = None
    # a reference store of the training images (`dit-prune index`) searched by the ratio test
    # and the copy rate instead of memory; same numbers
    train_store: str | None = None
    device: str = "auto"
    batch_size: int = 250
    shard_size: int = 250
    # random pruning, judged at equal FD: seeds of the random unit draws, and the budgets they
    # are pruned at (None: the scorer's budgets)
    random_seeds: tuple[int, ...] = (0, 1, 2)
    random_budgets: tuple[float, ...] | None = None
    # which copies the equal-quality comparison counts: "auto" (the checkpoint's duplicated
    # images when its training recorded some, else all), "all", or "duplicated"
    target: str = "auto"
    # re-trigger robustness (docs/evaluator.md#re-trigger-success): copied and held-out targets
    # attacked per table arm (0: not measured), Adam steps on the noise, DDIM steps, lr, prior
    # weight; the attack's seed is `seed`
    retrigger_targets: int = AttackBudget.targets
    retrigger_steps: int = AttackBudget.attack_steps
    retrigger_ddim_steps: int = AttackBudget.ddim_steps
    retrigger_lr: float = AttackBudget.lr
    retrigger_prior_weight: float = AttackBudget.prior_weight

    def __post_init__(self) -> None:
        if not self.budgets:
            raise DitPruneError("give at least one budget")
        object.__setattr__(self, "budgets", tuple(check_budget(b) for b in self.budgets))
        if self.budget_mode not in BUDGET_MODES:
            raise DitPruneError(f"unknown budget mode {self.budget_mode!r}; use {BUDGET_MODES}")
        if self.recover not in RECOVERIES:
            raise DitPruneError(f"unknown recovery {self.recover!r}; use {RECOVERIES}")
        if self.sampler not in SAMPLERS:
            raise DitPruneError(f"unknown sampler {self.sampler!r}; use {SAMPLERS}")
        for name in ("steps", "batch_size", "shard_size", "recover_steps", "recover_pool"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DitPruneError(f"{name.replace('_', ' ')} must be a positive integer, "
                                    f"got {value}")
        check_guidance_scale(self.guidance_scale, minimum=1.0)
        seed_value(self.seed, "--seed")  # scripts pass --pruning-seeds here
        if len(parse_seeds(self.seeds, "--seeds")) < MIN_SAMPLES:
            raise DitPruneError(f"--seeds {self.seeds!r} gives one sample; FD and the intervals "
                                f"need at least {MIN_SAMPLES} (e.g. --seeds 0-99)")
        self._check_recovery_flags()
        self.recovery_options()  # validates the recovery's t range and adversarial options
        self._check_scorer()
        if not self.random_seeds or len(set(self.random_seeds)) != len(self.random_seeds):
            raise DitPruneError(f"random seeds must be distinct and at least one, got "
                                f"{self.random_seeds}")
        if self.random_budgets is not None:
            if not self.random_budgets:
                raise DitPruneError("give at least one random budget (or none for the scorer's)")
            object.__setattr__(self, "random_budgets",
                               tuple(check_budget(b) for b in self.random_budgets))
        if len({isinstance(b, int) for b in self.random_budget_list()}) > 1:
            raise DitPruneError("random budgets must be all fractions or all unit counts (the "
                                "random path is ordered by budget)")
        if self.target not in TARGETS:
            raise DitPruneError(f"unknown target {self.target!r}; use {TARGETS}")
        targets = self.retrigger_targets
        if isinstance(targets, bool) or not isinstance(targets, int) or targets < 0:
            raise DitPruneError(f"re-trigger targets must be an integer >= 0 (0: not measured), "
                                f"got {targets!r}")
        self._attack_budget(max(targets, 1))  # validates the other attack options

    def _check_recovery_flags(self) -> None:
        """Refuse a recovery option set away from its default that the recovery would ignore
        (e.g. a t range for finetune, a pool without generated-novel); `dit-prune run` checks
        the options given on its command line the same way, defaults included."""
        names = {"--recover-steps": "recover_steps", "--recover-data": "recover_data",
                 "--recover-t-min": "recover_t_min", "--recover-t-max": "recover_t_max",
                 "--recover-pool": "recover_pool"}
        defaults = {f.name: f.default for f in fields(self)}
        given = [flag for flag, name in names.items() if getattr(self, name) != defaults[name]]
        if self.recover_options:
            given.append("--recover-option")
        check_recovery_flags(self.recover, given, data=self.recover_data)

    def recovery_options(self) -> dict[str, Any]:
        """The keyword options of `recover` for this run ({} without recovery), validated:
        steps, seed, the t range and (adversarial) `config`, an AdversarialConfig."""
        from dit_prune.pruning.adversarial import adversarial_config

        if self.recover_options and self.recover != "adversarial":
            raise DitPruneError(f"--recover-option applies to --recover adversarial only, not "
                                f"{self.recover!r}")
        if self.recover == "none":
            return {}
        t_min = self.recover_t_min
        if t_min is None:
            t_min = 0 if self.recover == "adversarial" else RecoveryConfig.t_min
        if isinstance(t_min, bool) or not isinstance(t_min, int) or \
                isinstance(self.recover_t_max, bool) or not isinstance(self.recover_t_max, int):
            raise DitPruneError(f"recovery t range must be integers, got [{t_min}, "
                                f"{self.recover_t_max}]")
        RecoveryConfig(steps=self.recover_steps, t_min=t_min, t_max=self.recover_t_max,
                       seed=self.seed)
        options: dict[str, Any] = {"steps": self.recover_steps, "seed": self.seed,
                                   "t_min": t_min, "t_max": self.recover_t_max}
        if self.recover == "adversarial":
            flags = {"steps": "--recover-steps", "seed": "--seed", "t_min": "--recover-t-min",
                     "t_max": "--recover-t-max"}
            reserved = sorted(set(flags) & set(self.recover_options))
            if reserved:
                raise DitPruneError(f"recovery option {reserved[0]!r} is set by "
                                    f"{flags[reserved[0]]}")
            options["config"] = adversarial_config(self.recover_options, **options)
        return options

    def retrigger_budget(self) -> AttackBudget | None:
        """The re-trigger attack's budget, or None when it is not measured (0 targets)."""
        return self._attack_budget(self.retrigger_targets) if self.retrigger_targets else None

    def _attack_budget(self, targets: int) -> AttackBudget:
        return AttackBudget(targets=targets, attack_steps=self.retrigger_steps,
                            ddim_steps=self.retrigger_ddim_steps, lr=self.retrigger_lr,
                            prior_weight=self.retrigger_prior_weight, seed=self.seed)

    def random_budget_list(self) -> tuple[float, ...]:
        """Budgets random pruning is measured at: the scorer's unless set, in increasing order."""
        return tuple(sorted(set(self.random_budgets or self.budgets)))

    def _check_scorer(self) -> None:
        """The scorer and its options, validated as the run will build it (seed from --seed)."""
        from dit_prune.scorers import get_scorer

        reserved = sorted({"seed", "progress"} & set(self.scorer_options))
        if reserved:
            raise DitPruneError(f"scorer option {reserved[0]!r} is set by the run itself "
                                f"(use --seed for the scoring seed)")
        scorer = get_scorer(self.scorer, seed=self.seed, **self.scorer_options)
        scorer.check_budgets(self.budgets, self.budget_mode)

    def seed_list(self) -> list[int]:
        return parse_seeds(self.seeds)

    def labels(self) -> torch.Tensor:
        """Class-balanced labels: the image of seed s gets class s mod num_classes."""
        return labels_for_seeds(self.seed_list(), self.num_classes)  # (N,)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["budgets"] = list(self.budgets)
        data["random_seeds"] = list(self.random_seeds)
        data["random_budgets"] = list(self.random_budget_list())
        data["seeds"] = format_seeds(self.seed_list())
        return data
