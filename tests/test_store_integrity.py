"""Reference-store integrity: byte-reproducible shard files, per-shard sizes and SHA-256 in the
manifest (image and embedding shards), verified by `check_store` before any sampling; old
stores refused; `eval` records the store's resolved path and content hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dit_prune.cli import main as cli_main
from dit_prune.errors import DitPruneError
from dit_prune.metrics.copydetect import load_copy_detector
from dit_prune.store import TensorSource, build_store, check_store, open_source, open_store
from dit_prune.store.format import embedding_shard_name, image_shard_name, write_shard

from .conftest import CHECKPOINTS, save_untrained_checkpoint


@pytest.fixture(scope="module")
def detector():
    return load_copy_detector(CHECKPOINTS / "digits-copydetect")


def small_source(digits) -> TensorSource:
    """200 labelled pool digits: 4 shards of 64 (the last one 8)."""
    return TensorSource(digits.pool_images[:200], digits.pool_labels[:200], "refs")


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every shard file and the manifest of a store directory, by name."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())
            if p.suffix == ".safetensors" or p.name == "manifest.json"}


def reverse_rows_keep_metadata(file: Path, key: str) -> None:
    """Rewrite a shard with tensor `key`'s rows reversed and its metadata kept (safetensors'
    own writer), as a tampered store would be."""
    with safe_open(str(file), "pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, str(file), metadata=meta)


def test_a_store_built_twice_has_identical_files(digits, tmp_path, detector):
    first = build_store(small_source(digits), tmp_path / "a", 64, detector, progress=False)
    build_store(small_source(digits), tmp_path / "b", 64, detector, progress=False)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert len(a) == 9 and a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    with safe_open(str(tmp_path / "a" / image_shard_name(1)), "pt") as handle:
        assert handle.metadata()["start"] == "64"
        assert torch.equal(handle.get_tensor("images"), digits.pool_images[64:128])
        assert torch.equal(handle.get_tensor("labels"), digits.pool_labels[64:128])
    assert torch.equal(first.read_labels(3), digits.pool_labels[192:200])


def test_write_shard_is_reproducible_and_readable(tmp_path):
    tensors = {"z": torch.arange(5, dtype=torch.uint8), "a": torch.randn(3, 2),
               "m": torch.arange(3)}
    meta = {k: str(i) for i, k in enumerate("qwertyuiop")}
    write_shard(tmp_path / "one.safetensors", tensors, meta)
    write_shard(tmp_path / "two.safetensors", dict(reversed(tensors.items())),
                dict(reversed(meta.items())))
    data = (tmp_path / "one.safetensors").read_bytes()
    assert data == (tmp_path / "two.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    assert size % 8 == 0 and json.loads(data[8 : 8 + size])["m"]["data_offsets"] == [0, 24]
    with safe_open(str(tmp_path / "one.safetensors"), "pt") as handle:
        assert handle.metadata() == meta
        assert all(torch.equal(handle.get_tensor(k), v) for k, v in tensors.items())


def test_the_manifest_records_every_shard_file(digits, tmp_path, detector):
    store = build_store(small_source(digits), tmp_path / "s", 64, detector, progress=False)
    entry = store.manifest["embeddings"][detector.fingerprint]
    for k in range(4):
        for name, record in ((image_shard_name(k), store.manifest["shards"][k]),
                             (embedding_shard_name(detector.fingerprint, k), entry["shards"][k])):
            file = tmp_path / "s" / name
            assert record["file"] == name and record["bytes"] == file.stat().st_size
            from dit_prune.checkpoint import file_sha256

            assert record["file_sha256"] == file_sha256(file)


def test_tampered_embeddings_are_refused_and_a_rerun_rewrites_them(digits, tmp_path, detector):
    source = small_source(digits)
    build_store(source, tmp_path / "s", 64, detector, progress=False)
    before = file_bytes(tmp_path / "s")
    name = embedding_shard_name(detector.fingerprint, 1)
    reverse_rows_keep_metadata(tmp_path / "s" / name, "embeddings")
    store = open_store(tmp_path / "s")
    check_store(store, source.images)  # the image shards are intact
    with pytest.raises(DitPruneError, match=f"--train-store {tmp_path / 's'}: shard {name} "
                                            "differs from the file that was indexed") as err:
        check_store(store, source.images, detector)
    assert "\n" not in str(err.value) and "dit-prune index" in str(err.value)
    rewritten: list[tuple[str, int]] = []
    build_store(source, tmp_path / "s", 64, detector, progress=False,
                on_shard=lambda kind, k: rewritten.append((kind, k)))
    assert rewritten == [("embeddings", 1)]  # metadata kept, content changed: written again
    assert file_bytes(tmp_path / "s") == before
    check_store(open_store(tmp_path / "s"), source.images, detector)


def test_damaged_image_shards_are_refused(digits, tmp_path, detector):
    source = small_source(digits)
    build_store(source, tmp_path / "s", 64, detector, progress=False)
    root = tmp_path / "s"
    reverse_rows_keep_metadata(root / image_shard_name(2), "hashes")  # same size, other bytes
    with pytest.raises(DitPruneError, match=f"shard {image_shard_name(2)} differs"):
        check_store(open_store(root), source.images)
    with open(root / image_shard_name(0), "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(DitPruneError, match=f"shard {image_shard_name(0)} is 1000 bytes, but the "
                                            "manifest records"):
        check_store(open_store(root), source.images)
    (root / image_shard_name(0)).unlink()
    with pytest.raises(DitPruneError, match=f"shard {image_shard_name(0)} is missing"):
        check_store(open_store(root), source.images)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["shards"][0]["file_sha256"]  # checked before the file is looked for
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DitPruneError, match=f"records no size and SHA-256 for shard "
                                            f"{image_shard_name(0)}"):
        check_store(open_store(root), source.images)


def test_shards_are_hashed_once_per_store_object(digits, tmp_path, detector, monkeypatch):
    import dit_prune.store.reuse as reuse

    source = small_source(digits)
    store = build_store(source, tmp_path / "s", 64, detector, progress=False)
    hashed: list[str] = []
    original = reuse.file_sha256
    monkeypatch.setattr(reuse, "file_sha256", lambda f: hashed.append(f.name) or original(f))
    check_store(store, source.images)  # `run` checks the images first ...
    check_store(store, source.images, detector)  # ... then its context the embeddings too
    assert sorted(hashed) == sorted(file_bytes(tmp_path / "s").keys() - {"manifest.json"})


def test_a_store_of_version_1_is_refused(digits, tmp_path):
    build_store(small_source(digits), tmp_path / "s", 64, progress=False)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["version"] = 1
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DitPruneError, match="store version 1 is not 2 .* rebuild it with "
                                            "dit-prune index --images refs"):
        open_store(tmp_path / "s")
    with pytest.raises(DitPruneError, match="pass --overwrite to rebuild it"):
        build_store(small_source(digits), tmp_path / "s", 64, progress=False)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.mark.filterwarnings("ignore:20 generated samples")
def test_eval_refuses_a_damaged_store_before_sampling_and_records_the_resolved_store(
        tiny_checkpoint, tmp_path, capsys, monkeypatch, detector):
    import dit_prune.commands.eval as eval_command

    monkeypatch.chdir(tmp_path)
    store = build_store(open_source("digits-pool"), tmp_path / "store", 300, detector,
                        progress=False)
    base = ["eval", str(tiny_checkpoint), "--per-class", "2", "--steps", "2", "--device", "cpu",
            "--train", "digits-pool", "--stats-cache", "none"]
    for typed, out in (("store", "rel"), (str(tmp_path / "store"), "abs")):
        assert cli_main([*base, "--out", out, "--train-store", typed]) == 0
    docs = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("rel", "abs")]
    for doc in docs:
        assert doc["train_store"] == str((tmp_path / "store").resolve())
        assert doc["train_store_content_hash"] == store.content_hash
    capsys.readouterr()

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled with a damaged store")

    monkeypatch.setattr(eval_command, "sample_images", no_sampling)
    reverse_rows_keep_metadata(tmp_path / "store" / embedding_shard_name(detector.fingerprint,
                                                                         2), "embeddings")
    first_shard = tmp_path / "store" / image_shard_name(0)
    indexed = first_shard.read_bytes()
    with open(first_shard, "r+b") as handle:
        handle.truncate(1000)
    for damage in ("images-00000.safetensors is 1000 bytes",
                   f"{embedding_shard_name(detector.fingerprint, 2)} differs"):
        assert cli_main([*base, "--out", "bad", "--train-store", "store"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dit-prune eval: error: --train-store "
                                                   "store: shard ") and damage in err[0], err
        first_shard.write_bytes(indexed)  # the image shard repaired, the embeddings not (a
        # rebuild without the detector now refuses a store whose listed embeddings are damaged)
