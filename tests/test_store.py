"""Reference store: exact search over shards equals the in-memory search; resumable index build;
one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dit_prune.cli import main as cli_main
from dit_prune.errors import DitPruneError
from dit_prune.metrics.copydetect import copy_report, load_copy_detector, nearest_cosine
from dit_prune.metrics.memorization import memorization_report, nearest_two
from dit_prune.store import (
    TensorSource,
    build_store,
    open_source,
    open_store,
    store_block_shape,
    store_copy_report,
    store_memorization_report,
    store_nearest_cosine,
    store_nearest_two,
    store_search_bound,
)

from .conftest import CHECKPOINTS, save_untrained_checkpoint

CHUNK = 8 * 64  # the search may hold 8 references of 64 pixels per slice


def reference_set(digits) -> torch.Tensor:
    """300 pool digits with 20 of them repeated later (duplicates): (320, 1, 8, 8)."""
    base = digits.pool_images[:300]
    return torch.cat([base, base[torch.arange(0, 200, 10)]])


def queries(digits, train: torch.Tensor) -> torch.Tensor:
    """Noisy held-out digits, exact copies (some duplicated), and midpoints (exact ties)."""
    gen = torch.Generator().manual_seed(0)
    noisy = digits.heldout_images[:120] + 0.2 * torch.randn(120, 1, 8, 8, generator=gen)
    mid = (train[:40:2] + train[1:40:2]) / 2  # dyadic: d1 == d2 exactly
    return torch.cat([noisy.clamp(-1, 1), train[:20], train[300:], mid])


def spy_reads(store, sizes: list[int]) -> None:
    """Record the rows of every slice the search reads from the store."""
    for name in ("map_images", "map_embeddings"):
        original = getattr(store, name)

        def read(*args, _original=original, **kwargs):
            part = _original(*args, **kwargs)
            sizes.append(len(part))
            return part

        object.__setattr__(store, name, read)


def test_pixel_search_over_store_matches_in_memory(digits, tmp_path):
    train = reference_set(digits)
    samples = queries(digits, train)
    store = build_store(TensorSource(train, None, "refs"), tmp_path / "s", shard_size=37,
                        progress=False)
    bound = store_search_bound(len(samples), 37, CHUNK, 64)
    assert bound < train.numel() * 4 / 2  # the search may use half of the store's size
    rows, cols, size = store_block_shape(len(samples), 37, CHUNK, 64)
    sizes: list[int] = []
    spy_reads(store, sizes)
    got = store_memorization_report(samples, store, chunk_elements=CHUNK)
    assert max(sizes) == size == rows == 8 and cols == 64  # 8 references read at once
    want = memorization_report(samples, train)  # in memory, one block
    assert torch.equal(got.d1, want.d1) and torch.equal(got.d2, want.d2)
    assert torch.equal(got.nearest, want.nearest)
    assert torch.equal(got.ratios, want.ratios) and got.rate == want.rate
    assert got.interval == want.interval
    copies = slice(120, 160)  # exact copies of distinct images, then of repeated ones
    assert (got.d1[copies] == 0).all() and (got.nearest[140:160] < 300).all()
    mids, pair = samples[160:], torch.arange(0, 40, 2)  # midpoint k of images 2k and 2k + 1
    tied = (got.d1[160:] == got.d2[160:]) & (
        (mids - train[pair]).flatten(1).norm(dim=1) == got.d1[160:])  # (20,) exact 2-way ties
    assert tied.sum() >= 5
    assert torch.equal(got.nearest[160:][tied], pair[tied])  # the lower index of the pair


def test_embedding_search_over_store_matches_in_memory(digits, tmp_path):
    detector = load_copy_detector(CHECKPOINTS / "digits-copydetect")
    train = digits.pool_images[:768]
    samples = queries(digits, train)
    store = build_store(TensorSource(train, digits.pool_labels[:768], "refs"), tmp_path / "s",
                        shard_size=256, detector=detector, progress=False)
    fp = detector.fingerprint
    stored = torch.cat([store.read_embeddings(fp, k) for k in range(store.num_shards)])
    assert torch.equal(stored, detector.embed(train))  # shards of 256 = the embed batches
    q = detector.embed(samples)
    sizes: list[int] = []
    spy_reads(store, sizes)
    sims, idx = store_nearest_cosine(q, store, fp, chunk_elements=8 * CHUNK)
    assert max(sizes) == 64
    want_sims, want_idx = nearest_cosine(q, stored)
    assert torch.equal(sims, want_sims) and torch.equal(idx, want_idx)
    held = digits.heldout_images[200:400]
    got = store_copy_report(samples, store, detector, heldout_images=held,
                            chunk_elements=8 * CHUNK)
    want = copy_report(samples, train, detector, heldout_images=held)
    assert got.threshold == want.threshold and got.rate == want.rate
    assert torch.equal(got.similarities, want.similarities)
    assert torch.equal(got.nearest, want.nearest)


@pytest.mark.parametrize("chunk, tile", [(1 << 16, (64, 128, 1024)),
                                         (1 << 19, (128, 512, 4096))])
def test_wide_tiles_match_in_memory(digits, tmp_path, chunk, tile):
    """Slices of several tiles of 128 or 512 columns: the grouped first pass, the skip
    of samples that a slice cannot improve, the merge of the few that it can, on exact copies,
    ties, near-duplicates and noisy queries."""
    gen = torch.Generator().manual_seed(1)
    train = torch.cat([digits.pool_images, digits.pool_images[:24]])  # (1024, 1, 8, 8) repeats
    noisy = [(train + 0.05 * k * torch.randn(1024, 1, 8, 8, generator=gen)).clamp(-1, 1)
             for k in (1, 2, 3)]
    train = torch.cat([train, *noisy])  # (4096, 1, 8, 8): near-duplicates of every image
    every = queries(digits, train)
    samples = torch.cat([every[:440], every[-20:]])  # noisy, copies, 300 more copies, ties
    store = build_store(TensorSource(train, None, "wide"), tmp_path / "s", shard_size=4096,
                        progress=False)
    assert store_block_shape(len(samples), 4096, chunk, 64) == tile
    got = store_memorization_report(samples, store, chunk_elements=chunk)
    want = memorization_report(samples, train)
    assert torch.equal(got.d1, want.d1) and torch.equal(got.d2, want.d2)
    assert torch.equal(got.nearest, want.nearest)
    refs = torch.nn.functional.normalize(train.flatten(1), dim=1)  # (4096, 64) as embeddings
    q = torch.nn.functional.normalize(samples.flatten(1), dim=1)  # (N, 64)
    emb = build_store(TensorSource(refs.view(-1, 64, 1, 1), None, "emb"), tmp_path / "e",
                      shard_size=4096, detector=IdentityDetector(), progress=False)
    sims, idx = store_nearest_cosine(q, emb, IdentityDetector.fingerprint, chunk_elements=chunk)
    stored = emb.read_embeddings(IdentityDetector.fingerprint, 0)  # (4096, 64)
    want_sims, want_idx = nearest_cosine(q, stored)
    assert torch.equal(sims, want_sims) and torch.equal(idx, want_idx)
    assert (sims[120:140] > 0.9999).all()  # exact copies find themselves


def improving_and_tied(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """1098 queries and 4096 references (64 pixels each) in 4 runs of 1024: each run holds,
    for each of the first 300 queries, a reference nearer than all earlier ones (those samples
    improve in every slice of 1024), then 790 more queries, and exact duplicate pairs
    straddling fine groups, coarse groups, tiles and slices, each the nearest pair of one of
    the queries 1090-1095: (queries (1098, 64), refs (4096, 64), the pairs)."""
    queries = torch.randn(300, 64, generator=gen)
    runs = []
    for s in range(4):
        near = queries + 2.0 ** -s * torch.randn(300, 64, generator=gen)  # nearer each run
        filler = 8 + torch.randn(724, 64, generator=gen)  # (724, 64) far from every query
        runs.append(torch.cat([near, filler])[torch.randperm(1024, generator=gen)])
    refs = (torch.cat(runs) / 16).clamp(-1, 1)  # (4096, 64) pixels in [-1, 1]
    queries = torch.cat([queries, torch.randn(790, 64, generator=gen)]) / 16  # (1090, 64)
    pairs = [(3, 35), (303, 67), (500, 520), (1000, 1030), (2040, 2050), (100, 4095)]
    extra = []
    for k, (a, b) in enumerate(pairs):
        refs[a] = refs[b] = (-8 - k + 0.1 * torch.randn(64, generator=gen)) / 16  # apart
        extra.append(refs[a] + (0.001 * torch.randn(64, generator=gen) if k % 2 else 0))
    return torch.cat([queries, torch.stack(extra), refs[[3, 500]]]), refs, pairs


@pytest.mark.parametrize("chunk", [1 << 16, 1 << 23])
def test_many_improving_samples_and_ties_across_boundaries(tmp_path, chunk):
    """Samples that improve in every slice (the candidate stage with most rows: 18 blocks of
    64, tiles of 128 at 1 << 16; one slice, one batch of blocks of 512, 512 and 74 (a short
    last one) and candidates scored 448 rows at a time at 1 << 23); exact ties between
    duplicates in one fine group, across coarse groups, tiles and slices go to the lower
    index, as in memory."""
    gen = torch.Generator().manual_seed(3)
    queries, refs, pairs = improving_and_tied(gen)
    lowest, tied = torch.tensor([min(p) for p in pairs]), slice(1090, 1096)
    store = build_store(TensorSource(refs.view(-1, 1, 8, 8), None, "ties"), tmp_path / "s",
                        shard_size=4096, progress=False)
    d1, d2, idx = store_nearest_two(queries.view(-1, 1, 8, 8), store, chunk_elements=chunk,
                                    distinct=False)
    want = nearest_two(queries.view(-1, 1, 8, 8), refs.view(-1, 1, 8, 8))
    assert torch.equal(d1, want[0]) and torch.equal(d2, want[1]) and torch.equal(idx, want[2])
    assert torch.equal(idx[tied], lowest) and torch.equal(d1[tied], d2[tied])
    units = torch.nn.functional.normalize(refs, dim=1)  # (4096, 64)
    emb = build_store(TensorSource(units.view(-1, 64, 1, 1), None, "ties-emb"), tmp_path / "e",
                      shard_size=4096, detector=IdentityDetector(), progress=False)
    q = torch.nn.functional.normalize(queries, dim=1)  # (N, 64)
    sims, found = store_nearest_cosine(q, emb, IdentityDetector.fingerprint, chunk_elements=chunk)
    want_sims, want_idx = nearest_cosine(q, emb.read_embeddings(IdentityDetector.fingerprint, 0))
    assert torch.equal(sims, want_sims) and torch.equal(found, want_idx)
    assert torch.equal(found[tied], lowest)

class IdentityDetector:
    """Unit vectors stored as (E, 1, 1) images, embedded as themselves."""

    name = "identity"
    fingerprint = "identity0000000"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(images.flatten(1).float(), dim=1)  # (n, E)


def test_interrupted_build_resumes_to_the_same_store(digits, tmp_path):
    source = TensorSource(digits.pool_images[:200], digits.pool_labels[:200], "refs")
    detector = load_copy_detector(CHECKPOINTS / "digits-copydetect")
    whole = build_store(source, tmp_path / "whole", 64, detector, progress=False)
    written: list[tuple[str, int]] = []

    def stop_after_two(kind: str, index: int) -> None:
        written.append((kind, index))
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_store(source, tmp_path / "part", 64, detector, progress=False,
                    on_shard=stop_after_two)
    with pytest.raises(DitPruneError, match="unfinished reference store"):
        open_store(tmp_path / "part")
    (tmp_path / "part" / ".images-00002.safetensors.tmpXYZ.safetensors").write_bytes(b"half")
    written.clear()
    resumed = build_store(source, tmp_path / "part", 64, detector, progress=False,
                          on_shard=lambda kind, index: written.append((kind, index)))
    assert written == [("images", 2), ("images", 3)] + [("embeddings", k) for k in range(4)]
    assert resumed.manifest == whole.manifest
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "part").iterdir())
    for name in (n for n in names if n.endswith(".safetensors")):
        a, b = (safe_open(str(tmp_path / d / name), "pt") for d in ("whole", "part"))
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_index_command_and_bad_inputs(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "imgs"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i + (label == "b")).save(folder / label / f"{i}.png")
    det = str(CHECKPOINTS / "digits-copydetect")
    out = tmp_path / "store"
    args = ["index", "--images", str(folder), "--out", str(out), "--shard-size", "4",
            "--copy-detector", det, "--no-progress"]
    assert cli_main(args) == 0
    store = open_store(out)
    from dit_prune.data import load_image_folder

    expected = load_image_folder(folder)
    assert torch.equal(torch.cat([store.read_images(0), store.read_images(1)]), expected.images)
    assert torch.equal(torch.cat([store.read_labels(0), store.read_labels(1)]), expected.labels)
    before = json.loads((out / "manifest.json").read_text())
    assert cli_main(args) == 0  # a rerun of a finished store changes nothing
    assert json.loads((out / "manifest.json").read_text()) == before
    capsys.readouterr()
    bad = {
        "--shard-size must be a positive integer": ["--images", "digits-pool", "--out",
                                                    str(tmp_path / "x"), "--shard-size", "0"],
        "image folder not found": ["--images", str(tmp_path / "nope"), "--out",
                                   str(tmp_path / "y")],
        "overlaps the input --images": ["--images", str(folder), "--out", str(folder / "s")],
        "holds a store of": ["--images", "digits-pool", "--out", str(out)],
        "takes (1, 8, 8) images": ["--images", str(tmp_path / "big"), "--out",
                                   str(tmp_path / "z"), "--copy-detector", det],
        "not found": ["--images", "digits-pool", "--out", str(tmp_path / "w"),
                      "--copy-detector", str(tmp_path / "missing.pt")],
    }
    (tmp_path / "big").mkdir()
    Image.new("L", (16, 16), 3).save(tmp_path / "big" / "0.png")
    (tmp_path / "eval-out").mkdir()
    (tmp_path / "eval-out" / ".dit_prune_run").write_text('{"command": "eval"}\n')
    bad["not `dit-prune index`"] = ["--images", "digits-pool", "--out",
                                    str(tmp_path / "eval-out")]
    for message, argv in bad.items():
        code, line = run_cli(["index", *argv, "--no-progress"], capsys)
        assert code == 2 and line.startswith("dit-prune index: error:") and message in line, line
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_store_errors_are_one_line(digits, tmp_path):
    store = build_store(open_source("digits-heldout"), tmp_path / "s", 500, progress=False)
    detector = load_copy_detector(CHECKPOINTS / "digits-copydetect")
    with pytest.raises(DitPruneError, match="no embeddings of the copy detector"):
        store_copy_report(digits.pool_images[:4], store, detector, threshold=0.9)
    with pytest.raises(DitPruneError, match="samples"):
        store_memorization_report(torch.zeros(2, 1, 4, 4), store)
    with pytest.raises(DitPruneError, match="shard-size"):
        build_store(open_source("digits-heldout"), tmp_path / "t", 0, progress=False)
    one = build_store(TensorSource(digits.pool_images[:1].repeat(3, 1, 1, 1), None, "same"),
                      tmp_path / "one", 2, progress=False)
    with pytest.raises(DitPruneError, match="at least 2 training images, got 1 distinct"):
        store_memorization_report(digits.pool_images[:2], one)


def test_faiss_recall_against_exact(digits, tmp_path):
    pytest.importorskip("faiss")
    from dit_prune.store.approx import build_ivf_index, recall_at_1

    detector = load_copy_detector(CHECKPOINTS / "digits-copydetect")
    store = build_store(open_source("digits-pool"), tmp_path / "s", 256, detector,
                        progress=False)
    q = detector.embed(queries(digits, digits.pool_images))
    exact_sims, exact_idx = store_nearest_cosine(q, store, detector.fingerprint)
    index = build_ivf_index(store, detector.fingerprint, nlist=16)
    sims, idx = index.search(q, nprobe=16)  # every cell: exact up to float rounding
    assert recall_at_1(idx, exact_idx) == 1.0
    assert torch.allclose(sims, exact_sims, atol=1e-5)
    assert 0.5 < recall_at_1(index.search(q, nprobe=2)[1], exact_idx) <= 1.0


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.mark.filterwarnings("ignore:20 generated samples")
def test_eval_with_a_train_store_gives_the_same_numbers(tiny_checkpoint, digits, tmp_path,
                                                         capsys):
    import numpy as np

    det = str(CHECKPOINTS / "digits-copydetect")
    store, other = tmp_path / "pool-store", tmp_path / "heldout-store"
    assert cli_main(["index", "--images", "digits-pool", "--out", str(store), "--shard-size",
                     "300", "--copy-detector", det, "--no-progress"]) == 0
    assert cli_main(["index", "--images", "digits-heldout", "--out", str(other),
                     "--no-progress"]) == 0
    base = ["eval", str(tiny_checkpoint), "--per-class", "2", "--steps", "2", "--device", "cpu",
            "--train", "digits-pool", "--stats-cache", str(tmp_path / "cache")]
    assert cli_main([*base, "--out", str(tmp_path / "mem")]) == 0
    assert cli_main([*base, "--out", str(tmp_path / "st"), "--train-store", str(store)]) == 0
    docs = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("mem", "st")]
    for key in ("memorization_rate", "memorization_interval", "copy_rate", "copy_interval",
                "copy_threshold", "heldout_false_copy_rate", "most_replicated", "most_copied"):
        assert docs[0][key] == docs[1][key], key
    assert docs[1]["train_store"] == str(store.resolve()) and "train_store" not in docs[0]
    assert docs[1]["train_store_content_hash"] == open_store(store).content_hash
    arrays = [np.load(tmp_path / d / "per_sample.npz") for d in ("mem", "st")]
    for key in ("d1", "d2", "nearest", "copy_similarities", "copy_nearest"):
        assert np.array_equal(arrays[0][key], arrays[1][key]), key
    capsys.readouterr()
    detector = load_copy_detector(det)
    flipped = build_store(TensorSource(digits.pool_images.flip(0), None, "flipped"),
                          tmp_path / "flipped", 300, detector, progress=False)
    no_emb = build_store(open_source("digits-pool"), tmp_path / "no-emb", 300, progress=False)
    bad = {"built over other images": flipped.root, "holds 797 images": other,
           "built with another copy detector": no_emb.root,
           "reference store not found": tmp_path / "none"}
    for message, root in bad.items():
        code, line = run_cli([*base, "--out", str(tmp_path / "bad"), "--train-store", str(root)],
                             capsys)
        assert code == 2 and line.startswith("dit-prune eval: error:") and message in line, line


def test_run_opens_and_checks_its_train_store(digits, tmp_path, capsys):
    """`dit-prune run --train-store`: the store of the checkpoint's training images is opened
    and checked with the inputs, before any sampling; another store is one line, exit 2."""
    from dit_prune.run.config import RunConfig
    from dit_prune.run.experiment import prepare_inputs

    from .conftest import train_tiny_checkpoint

    checkpoint = train_tiny_checkpoint(tmp_path / "tiny", digits)
    idx = json.loads((checkpoint / "dit_prune.json").read_text())["data"]["pool_indices"]
    detector = load_copy_detector(CHECKPOINTS / "digits-copydetect")
    store = build_store(TensorSource(digits.pool_images[idx], None, "train"), tmp_path / "s", 8,
                        detector, progress=False)
    inputs = prepare_inputs(RunConfig(str(checkpoint), out=str(tmp_path / "r"),
                                      train_store=str(store.root)))
    assert inputs.train_store is not None and inputs.train_store.root == store.root
    pool = build_store(open_source("digits-pool"), tmp_path / "pool", 500, progress=False)
    for root, message in ((pool.root, "holds 1000 images"),
                          (tmp_path / "none", "reference store not found")):
        code, line = run_cli(["run", str(checkpoint), "--out", str(tmp_path / "r2"),
                              "--train-store", str(root)], capsys)
        assert code == 2 and line.startswith("dit-prune run: error:") and message in line, line
    assert not (tmp_path / "r2" / "samples").exists()  # refused before any sampling
