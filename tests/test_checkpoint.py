"""Checkpoint round trips and loader errors (missing, corrupt, not a DiT, pipeline layout)."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

from dit_prune.checkpoint import load_dit, save_checkpoint
from dit_prune.errors import DitPruneError


def _outputs(model):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, model.config.in_channels, 8, 8, generator=gen)  # (3, C, 8, 8)
    t, y = torch.tensor([1, 400, 999]), torch.tensor([0, 5, 10])
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def test_round_trip_is_bit_exact(tiny_model, tmp_path):
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    save_checkpoint(tiny_model, sched, tmp_path / "ckpt", extra={"note": "x"})
    model, scheduler, meta = load_dit(tmp_path / "ckpt")
    pairs = zip(tiny_model.state_dict().items(), model.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        assert torch.equal(a, b), name
    assert torch.equal(_outputs(tiny_model), _outputs(model))
    assert (meta.image_size, meta.channels, meta.num_classes, meta.null_class) == (8, 1, 10, 10)
    assert meta.extra == {"note": "x"} and type(scheduler).__name__ == "DDPMScheduler"
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            assert module.dropout_prob == 0.0


def test_existing_output_is_refused_and_kept(tiny_model, tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(DitPruneError, match="not empty"):
        save_checkpoint(tiny_model, None, target)
    assert (target / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_missing_checkpoint(tmp_path):
    with pytest.raises(DitPruneError, match="checkpoint not found"):
        load_dit(tmp_path / "missing")


def test_truncated_weights(tiny_model, tmp_path):
    save_checkpoint(tiny_model, None, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DitPruneError, match="corrupt or truncated") as err:
        load_dit(tmp_path / "ckpt")
    assert "\n" not in str(err.value)


def test_config_that_is_not_a_dit(tiny_model, tmp_path):
    save_checkpoint(tiny_model, None, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["_class_name"] = "UNet2DModel"
    config_file.write_text(json.dumps(config))
    with pytest.raises(DitPruneError, match="not a DiT"):
        load_dit(tmp_path / "ckpt")


def test_config_shapes_disagree_with_weights(tiny_model, tmp_path):
    save_checkpoint(tiny_model, None, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["attention_head_dim"] = 16
    config_file.write_text(json.dumps(config))
    with pytest.raises(DitPruneError, match="does not match its config"):
        load_dit(tmp_path / "ckpt")


def test_pickle_weights_are_not_read(tiny_model, tmp_path):
    save_checkpoint(tiny_model, None, tmp_path / "ckpt")
    transformer = tmp_path / "ckpt" / "transformer"
    (transformer / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), transformer / "diffusion_pytorch_model.bin")
    with pytest.raises(DitPruneError, match="only safetensors"):
        load_dit(tmp_path / "ckpt")


def test_latent_dit_pipeline_directory(tmp_path):
    """A tiny latent DiT pipeline in the layout of facebook/DiT-XL-2-256 loads through load_dit."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4, sample_size=8,
    )
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1,
    )
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae,
                                 scheduler=diffusers.DDIMScheduler())
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    model, scheduler, meta = load_dit(tmp_path / "pipe")
    assert meta.pipeline_dir == str(tmp_path / "pipe")
    assert (meta.channels, meta.num_classes, meta.null_class) == (4, 1000, 1000)
    assert type(scheduler).__name__ == "DDIMScheduler"
    for a, b in zip(transformer.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
