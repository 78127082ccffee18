"""Selection, structural removal, the pruned-model format and recovery after pruning.

Example:
    >>> import torch
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.units import enumerate_units
    >>> model = new_dit("tiny", 10, 8, 1)
    >>> units = enumerate_units(model)
    >>> chosen = select_units(units, torch.rand(len(units)), 0.25, mode="heads", model=model)
    >>> plan = prune_units(model, chosen)
    >>> plan.counts
    {'head': 4}
"""

from dit_prune.pruning.format import load_pruned, read_plan, save_pruned
from dit_prune.pruning.recovery import RecoveryResult, distill, finetune, recover
from dit_prune.pruning.selection import BUDGET_MODES, check_budget, select_units
from dit_prune.pruning.structural import PrunePlan, count_parameters, prune_units, unit_cost

__all__ = [
    "BUDGET_MODES", "PrunePlan", "RecoveryResult", "check_budget",
    "count_parameters", "distill", "finetune", "load_pruned", "prune_units",
    "read_plan", "recover", "save_pruned", "select_units", "unit_cost",
]
