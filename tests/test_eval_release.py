"""`dit-prune eval` under torchrun without a training store: once the samples are gathered the
main process evaluates alone, and the other processes leave at once (`release_others`) instead
of waiting at the command's last barrier, a wait the process group's timeout (30 minutes by
default) would bound."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import CHECKPOINTS

SLOW_MAIN = """
import os, sys, time
import torch.distributed as dist
import dit_prune.commands.eval as command
from dit_prune.cli import main
from dit_prune.store.distributed import partial_state

evaluate = command.evaluate_samples

def slow(*args, **kwargs):  # the main process's evaluation takes 6 s more
    time.sleep(6)
    return evaluate(*args, **kwargs)

command.evaluate_samples = slow
code = main(sys.argv[1:])
rank = partial_state().process_index
os.write(2, f"rank {rank} done at {time.monotonic():.3f}\\n".encode())  # one machine: one clock
sys.exit(17 if dist.is_initialized() else code)  # 17: the command left its group open
"""


def test_other_processes_do_not_wait_for_the_main_evaluation(digits, tmp_path):
    from .conftest import train_tiny_checkpoint

    ck = train_tiny_checkpoint(tmp_path / "ck", digits)
    (tmp_path / "slow.py").write_text(SLOW_MAIN)
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "two"
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(tmp_path / "slow.py"),
               "eval", str(ck), "--out", str(out), "--seeds", "0-19", "--steps", "2",
               "--batch-size", "8", "--stats-cache", "none", "--device", "cpu",
               "--copy-detector", str(CHECKPOINTS / "digits-copydetect"), "--grid-pairs", "4"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = {int(r): float(t) for r, t in re.findall(r"^rank (\d) done at ([\d.]+)$",
                                                    proc.stderr, re.M)}
    assert sorted(done) == [0, 1], proc.stderr[-2000:]
    assert done[0] - done[1] > 4.0, done  # rank 1 left while rank 0 was still evaluating
    assert (out / "metrics.json").is_file()
