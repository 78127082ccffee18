"""Store work split across 2 CPU processes (`torchrun`, the launcher `accelerate launch` uses for
several devices; on CPUs accelerate itself needs MPI): `dit-prune index` writes and embeds every
other shard, and a store search scans every other slice; the store and the search results are
identical to one process's; the command's processes meet at a last barrier and close their
process group, on success and on error. Both write byte-identical shard files and manifests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_prune.metrics.copydetect import load_copy_detector
from dit_prune.store import build_store, open_source, open_store
from dit_prune.store.distributed import Processes
from dit_prune.store.search import Candidates, merge_parts, store_nearest_cosine, store_nearest_two

from .conftest import CHECKPOINTS

SCRIPT = """
import sys, torch
from dit_prune.cli import main
from dit_prune.store import open_store
from dit_prune.store.distributed import current_processes
from dit_prune.store.search import store_nearest_cosine, store_nearest_two
out, det = sys.argv[1], sys.argv[2]
procs = current_processes()  # opened here, so the index command leaves the group open for us
code = main(["index", "--images", "digits-pool", "--out", out + "/store", "--shard-size", "128",
             "--copy-detector", det, "--no-progress"])
assert code == 0
store = open_store(out + "/store")
samples, queries = torch.load(out + "/queries.pt")
two = store_nearest_two(samples, store, chunk_elements=1 << 12, processes=procs)
cos = store_nearest_cosine(queries, store, store.embedding_fingerprints()[0],
                           chunk_elements=1 << 12, processes=procs)
if procs.is_main:
    torch.save({"two": two, "cos": cos, "count": procs.count}, out + "/result.pt")
procs.barrier()  # no process leaves while the other still talks to it
import torch.distributed as dist
if dist.is_initialized():
    dist.destroy_process_group()
"""


def test_two_processes_index_and_search_like_one(digits, tmp_path):
    det = CHECKPOINTS / "digits-copydetect"
    detector = load_copy_detector(det)
    gen = torch.Generator().manual_seed(0)
    samples = torch.cat([digits.pool_images[::7], (digits.heldout_images[:100] + 0.2 * torch.randn(
        100, 1, 8, 8, generator=gen)).clamp(-1, 1)])  # (243, 1, 8, 8) copies and noisy digits
    queries = detector.embed(samples)  # (243, 64)
    torch.save((samples, queries), tmp_path / "queries.pt")
    (tmp_path / "split.py").write_text(SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2",
               str(tmp_path / "split.py"), str(tmp_path), str(det)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "result.pt")
    assert got["count"] == 2
    one = build_store(open_source("digits-pool"), tmp_path / "one", 128, detector,
                      progress=False)
    two = open_store(tmp_path / "store")
    assert json.loads((tmp_path / "store" / "manifest.json").read_text()) == one.manifest
    for file in sorted((tmp_path / "one").glob("*.safetensors")) + [tmp_path / "one" /
                                                                    "manifest.json"]:
        assert (tmp_path / "store" / file.name).read_bytes() == file.read_bytes(), file.name
    fp = detector.fingerprint
    for k in range(one.num_shards):
        assert torch.equal(two.read_images(k), one.read_images(k))
        assert torch.equal(two.read_embeddings(fp, k), one.read_embeddings(fp, k))
    want_two = store_nearest_two(samples, one, chunk_elements=1 << 12)
    want_cos = store_nearest_cosine(queries, one, fp, chunk_elements=1 << 12)
    assert all(torch.equal(a, b) for a, b in zip(got["two"], want_two, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(got["cos"], want_cos, strict=True))
    assert (got["two"][0][:143] == 0).all()  # the pool copies are found exactly


CLI = """
import os
import sys
import torch.distributed as dist
from dit_prune.cli import main
from dit_prune.store.distributed import partial_state
code = main(sys.argv[1:])  # the group is opened (and must be closed) by the command itself
state = partial_state()
# one write call per line: both ranks share torchrun's stderr pipe, and print() may write the
# text and its newline separately, so two ranks' lines could run together
os.write(2, f"rank {state.process_index} of {state.num_processes}\\n".encode())
if dist.is_initialized():
    sys.exit(17)  # the command left its process group open
sys.exit(code)
"""


def _launch_two(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2` of dit-prune's CLI with `argv`; each rank prints "rank i
    of n" and exits with the command's status, or 17 when it left its process group open."""
    (tmp_path / "cli.py").write_text(CLI)
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(tmp_path / "cli.py"),
               *argv]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode == 0:  # a rank that ends early may write after another's progress bar
        assert set(re.findall(r"rank (\d) of 2$", proc.stderr, re.M)) == {"0", "1"}, proc.stderr
    return proc


def test_index_under_two_processes_closes_its_group(tmp_path):
    """Both ranks of `dit-prune index` exit 0 with the group closed; on a bad input (an absent
    copy detector, found once the group is open) each rank prints the one-line error, closes
    the group and exits 2 (torchrun may SIGTERM the slower rank once the first has failed)."""
    store = tmp_path / "store"
    proc = _launch_two(tmp_path, "index", "--images", "digits-pool", "--out", str(store),
                       "--shard-size", "512", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]  # torchrun: 0 only when every rank is
    assert json.loads((store / "manifest.json").read_text())["count"] == 1000
    missing = tmp_path / "missing-detector"
    proc = _launch_two(tmp_path, "index", "--images", "digits-pool", "--out",
                       str(tmp_path / "bad"), "--shard-size", "512", "--no-progress",
                       "--copy-detector", str(missing))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dit-prune index:")]
    assert all(f"error: copy detector not found: {missing} " in line for line in errors)
    codes = re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", proc.stderr, re.M)  # torchrun's summary
    # a rank that exits 2 first makes torchrun stop the other with SIGTERM (-15) if it is
    # still closing: timing, not a failure; no rank may end any other way, and every rank that
    # exited 2 printed its one line
    assert "2" in codes and set(codes) <= {"2", "-15"} and len(codes) == 2, proc.stderr[-2000:]
    assert codes.count("2") <= len(errors) <= 2, proc.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


def test_parts_merge_to_the_whole_search(digits, tmp_path):
    """The same, in one process: three parts of a search, merged, equal the whole search."""
    from dit_prune.store.search import store_candidates_two

    store = build_store(open_source("digits-pool"), tmp_path / "s", 100, progress=False)
    samples = torch.cat([digits.pool_images[:50], digits.heldout_images[:50]])
    whole = store_candidates_two(samples, store, chunk_elements=1 << 12)
    parts = [store_candidates_two(samples, store, chunk_elements=1 << 12, part=(i, 3))
             for i in range(3)]
    merged = merge_parts(parts, descending=False)
    for name in ("score", "index", "exact"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    alone = Processes(0, 1, lambda: None)
    assert alone.part is None and alone.mine(5) and isinstance(whole, Candidates)


@pytest.mark.filterwarnings("ignore:40 generated samples")
def test_eval_under_two_processes_writes_what_one_writes(digits, tmp_path):
    """`dit-prune eval` under torchrun: the sampling batches split across the processes (5
    batches: 3 and 2), with and without a training store (its searches split too); metrics.json
    and per_sample.npz (the samples as uint8 included) equal one process's."""
    import numpy as np

    from dit_prune.cli import main

    from .conftest import train_tiny_checkpoint

    ck = train_tiny_checkpoint(tmp_path / "ck", digits)
    det = CHECKPOINTS / "digits-copydetect"
    store = tmp_path / "pool-store"
    build_store(open_source("digits-pool"), store, 256, load_copy_detector(det), progress=False)
    common = ["--seeds", "0-39", "--steps", "3", "--batch-size", "8", "--stats-cache", "none",
              "--device", "cpu", "--copy-detector", str(det), "--grid-pairs", "8"]
    cases = {"memory": [], "store": ["--train", "digits-pool", "--train-store", str(store)]}
    for name, extra in cases.items():
        one, two = tmp_path / f"{name}-one", tmp_path / f"{name}-two"
        assert main(["eval", str(ck), "--out", str(one), *common, *extra]) == 0
        proc = _launch_two(tmp_path, "eval", str(ck), "--out", str(two), *common, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got, want = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
        assert got == want, name
        assert got["num_samples"] == 40
        with np.load(two / "per_sample.npz") as a, np.load(one / "per_sample.npz") as b:
            assert sorted(a.files) == sorted(b.files) and "samples_uint8" in a.files
            for key in a.files:
                assert np.array_equal(a[key], b[key]), (name, key)
