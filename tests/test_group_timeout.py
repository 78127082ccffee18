"""The process group's barrier timeout (`distributed.group_timeout`): `DIT_PRUNE_GROUP_TIMEOUT`
minutes reach the group that `partial_state` opens under torchrun, and a bad value is refused
with one line before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from dit_prune.errors import DitPruneError
from dit_prune.store.distributed import DEFAULT_GROUP_TIMEOUT_MIN, group_timeout

MAIN_LATE = """
import sys, time
from dit_prune.store.distributed import partial_state

state = partial_state()
if state.is_main_process:
    time.sleep(5)  # the main process works alone while the other waits at the barrier
state.wait_for_everyone()
print(f"rank {state.process_index} passed", flush=True)
"""


def test_default_and_parsed_values():
    assert group_timeout({}) == timedelta(minutes=DEFAULT_GROUP_TIMEOUT_MIN)
    assert group_timeout({"DIT_PRUNE_GROUP_TIMEOUT": " 1.5 "}) == timedelta(seconds=90)


@pytest.mark.parametrize("text", ["0", "-3", "ten", "nan", "inf", "1e300", "2e12", "1e-9"])
def test_bad_values_are_refused(text):
    with pytest.raises(DitPruneError, match="DIT_PRUNE_GROUP_TIMEOUT"):
        group_timeout({"DIT_PRUNE_GROUP_TIMEOUT": text})


def _two_processes(tmp_path: Path, minutes: str) -> subprocess.CompletedProcess:
    (tmp_path / "late.py").write_text(MAIN_LATE)
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "late.py")], capture_output=True, text=True,
                          timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "DIT_PRUNE_GROUP_TIMEOUT": minutes})


def test_the_timeout_reaches_the_process_group(tmp_path):
    short = _two_processes(tmp_path, "0.02")  # 1.2 s: the waiting process gives up
    assert short.returncode != 0
    assert "rank 1 passed" not in short.stdout
    assert "Timed out waiting 1200ms" in short.stderr, short.stderr[-2000:]
    long = _two_processes(tmp_path, "1")  # 60 s: both pass the 5 s wait
    assert long.returncode == 0, long.stderr[-2000:]
    assert "rank 0 passed" in long.stdout and "rank 1 passed" in long.stdout


def test_a_bad_value_stops_a_command_in_one_line(tmp_path):
    env = {**os.environ, "DIT_PRUNE_GROUP_TIMEOUT": "soon"}
    proc = subprocess.run([sys.executable, "-m", "dit_prune.cli", "index", "--images",
                           "digits-pool", "--out", str(tmp_path / "store")], capture_output=True,
                          text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "DIT_PRUNE_GROUP_TIMEOUT='soon'" in lines[0], proc.stderr
    assert not (tmp_path / "store").exists()
