"""`dit-prune run`: baseline → scores → selection → structural pruning → (recovery) →
evaluation on the same seeds → random control → noise control → verdict → report."""

from dit_prune.run.config import RunConfig
from dit_prune.run.experiment import run_experiment

__all__ = ["RunConfig", "run_experiment"]
