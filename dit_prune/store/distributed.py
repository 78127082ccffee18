"""Reference-store work split across processes (`torchrun`, or `accelerate launch` on GPUs).

Each process takes every n-th piece of the work, in a fixed order (process i of n: pieces i,
i + n, ...): `dit-prune index` writes and embeds every n-th shard, and a store search scans
every n-th slice. A search's parts are gathered (`accelerate.utils.gather_object`) and merged
by `merge_parts`, which keeps what one process keeps (the best two by matmul score, equal
scores to the lower store index), so the answer is identical to a single process's. On one
process nothing changes. `dit-prune eval` draws every n-th sampling batch (`split_batches`)
and gathers them. Every process must make the same calls in the same order (as `dit-prune run`
does); a search run by the main process alone must not ask for parts.

Launching: on GPUs `accelerate launch --multi_gpu --num_processes N -m dit_prune.cli ...`; on
CPUs `torchrun --nproc_per_node N -m dit_prune.cli ...` (gloo). `accelerate launch --cpu
--num_processes N` starts N processes only through MPI (`--mpirun_hostfile`); without it, it
starts one.

Example (2 CPU processes):
    $ torchrun --nproc_per_node 2 -m dit_prune.cli index --images digits-pool \\
        --out runs/pool-store --copy-detector checkpoints/digits-copydetect --shard-size 256
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dit_prune.store.search import Candidates


@dataclass(frozen=True)
class Processes:
    """This process's index and the number of processes; `barrier` waits for all of them."""

    index: int
    count: int
    barrier: Callable[[], None]
    release: Callable[[], None] | None = None  # closes the group early (`release_others`)

    @property
    def part(self) -> tuple[int, int] | None:
        """(index, count) of this process's share, None when it is alone."""
        return (self.index, self.count) if self.count > 1 else None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def mine(self, piece: int) -> bool:
        """Whether piece number `piece` is this process's."""
        return piece % self.count == self.index


GROUP_TIMEOUT_ENV = "DIT_PRUNE_GROUP_TIMEOUT"  # minutes a process waits for the others
DEFAULT_GROUP_TIMEOUT_MIN = 24 * 60
MAX_GROUP_TIMEOUT_MIN = 365 * 24 * 60  # beyond it torch's timeout overflows (1e300 crashed)


def group_timeout(environ: Mapping[str, str] | None = None) -> timedelta:
    """How long a process waits at a barrier for the others: `DIT_PRUNE_GROUP_TIMEOUT` minutes
    (a positive number), 24 hours by default. torch's own default, 30 minutes, is shorter than
    the stages one process does alone while the others wait (`run`'s scoring, an evaluation
    without a store); a process that dies still ends the others' wait at once (its connection
    closes), so only a hang waits this long.

    Raises:
        DitPruneError: the variable is set but not a positive number of minutes.

    Example:
        >>> group_timeout({"DIT_PRUNE_GROUP_TIMEOUT": "90"})
        datetime.timedelta(seconds=5400)
    """
    from dit_prune.errors import DitPruneError

    text = (os.environ if environ is None else environ).get(GROUP_TIMEOUT_ENV, "").strip()
    if not text:
        return timedelta(minutes=DEFAULT_GROUP_TIMEOUT_MIN)
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not math.isfinite(minutes) or not 1 / 60 <= minutes <= MAX_GROUP_TIMEOUT_MIN:
        raise DitPruneError(f"{GROUP_TIMEOUT_ENV}={text!r}: expected a number of minutes from "
                            f"1/60 (one second) to {MAX_GROUP_TIMEOUT_MIN} (a year)")
    return timedelta(minutes=minutes)


def partial_state() -> Any:
    """accelerate's `PartialState`, told to use CPU processes (gloo) when there is no GPU or
    `ACCELERATE_USE_CPU` is set: a bare `PartialState()` treats CPU processes started by
    `torchrun` as unrelated single processes. The process group it opens waits `group_timeout()`
    at a barrier. The state is shared: the first call decides."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=not torch.cuda.is_available()
                        or parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=group_timeout())


def current_processes() -> Processes:
    """The processes of this launch (`torchrun` / `accelerate launch`), or one process.

    Example:
        >>> current_processes().count
        1
    """
    state = partial_state()
    return Processes(state.process_index, state.num_processes, state.wait_for_everyone)


@contextmanager
def command_processes() -> Iterator[Processes]:
    """The processes of this launch for the length of one command, closed when it ends.

    On success every process meets at a last barrier (none leaves while another still talks
    to it) and the process group is destroyed; on an error it is destroyed without the barrier
    (the other processes may never reach it) and the error goes on. The group is closed only
    when this call opened it: a caller that opened it first (a script running several commands
    and searches) keeps it and closes it itself. A closed group is not opened again: one
    command per launch (a second one in the same processes hung in a trial). On one process
    nothing is opened and nothing is closed.

    Example:
        >>> with command_processes() as processes:
        ...     processes.count
        1
    """
    import torch.distributed as dist

    opened_here = not (dist.is_available() and dist.is_initialized())
    processes = replace(current_processes(), release=_close_group if opened_here else None)
    try:
        yield processes
    except BaseException:
        if opened_here:
            _close_group()
        raise
    if dist.is_available() and dist.is_initialized():  # not released by the command
        processes.barrier()
    if opened_here:
        _close_group()


def release_others(processes: Processes) -> bool:
    """Every process meets here and the process group is closed (when the command opened it,
    `command_processes`): from here the main process works on alone (no more collective calls)
    and the others return at once instead of waiting at the command's last barrier (a wait
    `group_timeout` bounds). The command's last barrier is then skipped.
    A group a caller opened before the command stays open, and its barrier the caller's.
    Returns whether this process goes on: the main process, or a process alone.

    Example:
        >>> release_others(Processes(0, 1, lambda: None))
        True
    """
    if processes.count > 1 and processes.release is not None:
        processes.barrier()
        processes.release()
    return processes.is_main


def _close_group() -> None:
    """Destroys the default process group, if one is open."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def split_batches(draw: Callable[[int, int], torch.Tensor], count: int, batch_size: int,
                  processes: Processes | None) -> torch.Tensor:
    """Rows [0, count) made in batches of `batch_size` (the last one shorter): `draw(start,
    stop)` returns rows start..stop-1, a tensor (stop - start, ...). Process i of n draws
    batches i, i + n, ...; every process gets all of them, concatenated in order (on the CPU),
    so each row is computed in the same batch as one process computes it and the result is
    identical. Every process must call it with the same `count` and `batch_size`.

    Example:
        >>> split_batches(lambda a, b: torch.arange(a, b), 5, 2, None).tolist()
        [0, 1, 2, 3, 4]
    """
    starts = range(0, count, batch_size)
    if processes is None or processes.count == 1:
        parts = [draw(start, min(start + batch_size, count)) for start in starts]
        return torch.cat(parts) if parts else torch.empty(0)
    from accelerate.utils import gather_object

    mine = [(k, draw(start, min(start + batch_size, count)).cpu())
            for k, start in enumerate(starts) if processes.mine(k)]
    drawn = dict(gather_object(mine))  # batch number -> rows, from every process
    return torch.cat([drawn[k] for k in range(len(starts))]) if drawn else torch.empty(0)


def gather_candidates(run: Candidates, processes: Processes, descending: bool) -> Candidates:
    """The whole search's candidates (N, 2) from every process's part, in process order."""
    if processes.count == 1:
        return run
    from accelerate.utils import gather_object

    from dit_prune.store.search import Candidates, merge_parts

    device = run.score.device
    mine = [(run.score.cpu(), run.index.cpu(), run.exact.cpu())]
    parts = [Candidates(*(t.to(device) for t in part)) for part in gather_object(mine)]
    return merge_parts(parts, descending)


def split_search(search: Callable[[tuple[int, int] | None], Candidates], descending: bool,
                 processes: Processes | None) -> Candidates:
    """`search(part)` on this process's part, gathered and merged (or the whole search when
    `processes` is None or a single process)."""
    if processes is None or processes.count == 1:
        return search(None)
    return gather_candidates(search(processes.part), processes, descending)
