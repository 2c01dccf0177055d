"""CREPA end to end: a tiny random DINOv2 (transformers) encodes the clips' frames once into the
cache, the run logs the regulariser, its head is checkpointed but not exported, and with
drop_vae_encoder a second run trains from the cached latents and features alone."""
import math
import shutil

import pytest
from safetensors import safe_open

from vidtune.cli.train import main as cli_main
from vidtune.testing import tiny_run_toml, write_captioned_clips
from vidtune.train.checkpoint import checkpoint_dirs
from vidtune.train.log import read_losses

if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg missing: apt-get install -y ffmpeg", allow_module_level=True)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("dinov2") / "enc"
    Dinov2Model(Dinov2Config(hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                             patch_size=4, image_size=16)).save_pretrained(path)
    return path


def test_crepa_run(tmp_path, tiny_wan_dir, dinov2, capsys):
    clips = write_captioned_clips(tmp_path / "clips")
    cfg = tmp_path / "crepa.toml"
    cfg.write_text(tiny_run_toml(tiny_wan_dir, tmp_path / "cache", {"clips": clips}, tmp_path / "run",
                                 "max_train_steps = 2\ncheckpoint_every = 1", f"""
[crepa]
enabled = true
block_index = 0
encoder = "{dinov2}"
encoder_image_size = 16
encoder_dtype = "fp32"
head_dim = 8
"""))
    assert cli_main([str(cfg)]) == 0
    assert "CREPA: encoding the frames of 2 clip(s)" in capsys.readouterr().out
    rows = read_losses(tmp_path / "run")
    bound = 1 + 2 * math.exp(-1)  # a frame's similarity: its own plus two neighbours at distance 1, tau 1
    for r in rows:  # lambda * L_align = -0.5 * the mean similarity
        assert r["crepa_loss"] == pytest.approx(-0.5 * r["crepa_similarity"], rel=1e-5)
        assert 0 < abs(r["crepa_similarity"]) <= bound
    ck = checkpoint_dirs(tmp_path / "run" / "checkpoints")[-1]
    names = set()
    for f in ck.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            names |= set(s.keys())
    assert any(n.startswith("crepa.") for n in names)  # the head resumes with the run
    with safe_open(tmp_path / "run" / "wan_lora.safetensors", "pt") as s:
        assert not any("crepa" in k for k in s.keys())  # and is not part of the LoRA

    # From the caches alone: the VAE encoder may not load, the features are reused.
    shutil.rmtree(tmp_path / "run")
    assert cli_main([str(cfg), "--set", "crepa.drop_vae_encoder=true"]) == 0
    assert "CREPA: encoding" not in capsys.readouterr().out
    again = read_losses(tmp_path / "run")
    assert [(r["loss"], r["crepa_loss"]) for r in again] == [(r["loss"], r["crepa_loss"]) for r in rows]

    # Nothing cached for these settings: drop_vae_encoder refuses to load the VAE encoder, in one line.
    assert cli_main([str(cfg), "--set", "crepa.drop_vae_encoder=true", "--set", "train.output_dir=\"%s\"" %
                     (tmp_path / "run2"), "--set", "dataset.0.resolution=16"]) != 0
    assert "crepa.drop_vae_encoder = true, but some clips have no cached latents" in capsys.readouterr().err
