"""Checkpoint I/O. Files written through `checkpoint.atomic_write_with`: a full disk
inside safetensors is an OSError naming the file (one line on the command line, exit 2), and
finished files get the permissions a plain open() gives, not mkstemp's private 0600; a checkpoint
without scheduler/ warns which schedule is assumed (new-user findings)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from dit_prune.checkpoint import atomic_write_with


def test_a_full_disk_in_safetensors_is_an_oserror_naming_the_file(tmp_path):
    def full(tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    target = tmp_path / "shard.safetensors"
    with pytest.raises(OSError, match="No space left on device") as caught:
        atomic_write_with(target, full)
    assert caught.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_other_safetensors_errors_are_not_disguised(tmp_path):
    def broken(tmp):
        raise SafetensorError("some other failure")

    with pytest.raises(SafetensorError):
        atomic_write_with(tmp_path / "x.safetensors", broken)


def test_written_files_are_not_private(tmp_path):
    target = tmp_path / "w.safetensors"
    atomic_write_with(target, lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_checkpoint_without_its_scheduler_warns(tmp_path):
    import shutil

    from dit_prune.checkpoint import load_dit

    from .conftest import CHECKPOINTS

    copy = tmp_path / "nosched"
    shutil.copytree(CHECKPOINTS / "digits-memorized", copy)
    shutil.rmtree(copy / "scheduler")
    with pytest.warns(UserWarning, match="has no scheduler/.*assumes diffusers' default"):
        loaded = load_dit(copy)
    assert loaded.scheduler.config.num_train_timesteps == 1000


def test_a_full_disk_while_saving_a_checkpoint_names_it(tmp_path, monkeypatch):
    import dit_prune.checkpoint as checkpoint
    from dit_prune.models import new_dit

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    target = tmp_path / "ck"
    with pytest.raises(OSError, match="No space left on device") as caught:
        checkpoint.save_checkpoint(new_dit("tiny", 10, 8, 1), None, target)
    assert caught.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_an_unnamed_oserror_gets_the_path_and_directories_are_not_private(tmp_path):
    from dit_prune.checkpoint import atomic_directory

    with pytest.raises(OSError) as caught:
        with atomic_directory(tmp_path / "d") as tmp:
            raise OSError(28, "No space left on device")
    assert caught.value.filename == str(tmp_path / "d")
    with atomic_directory(tmp_path / "e") as tmp:
        (tmp / "f").write_text("x")
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "e").stat().st_mode & 0o777 == 0o777 & ~mask
