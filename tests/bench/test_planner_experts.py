"""The planner for Wan 2.2: experts = "both" (one expert on the device, the idle one in host RAM),
the host-RAM projection, and the Wan 2.2 VAE's 16x stride (TI2V-5B)."""
import json

import pytest

from vidtune.config import config_from_dict, override
from vidtune.models.wan import WanConfig
from vidtune.planner import plan, train_shape
from vidtune.testing import tiny_vae_config

SMALL = WanConfig(num_attention_heads=2, attention_head_dim=64, ffn_dim=768, num_layers=6, text_dim=128,
                  freq_dim=64, rope_max_seq_len=64, in_channels=36)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A pipeline dir with only tiny text-encoder and VAE configs: the planner sizes them from it."""
    d = tmp_path_factory.mktemp("a14b")
    (d / "text_encoder").mkdir()
    (d / "text_encoder" / "config.json").write_text(json.dumps(dict(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")))
    (d / "vae").mkdir()
    (d / "vae" / "config.json").write_text(json.dumps(tiny_vae_config()))
    return d


def a14b(path, **model):
    return config_from_dict({
        "model": {"flavour": "i2v-14b-2.2", "experts": "high", "base_precision": "int8", "path": str(path),
                  **model},
        "train": {"optimizer": "adamw_8bit"},
        "memory": {"offload": {"type": "block_level", "blocks_per_group": 2}},
        "ema": {"enabled": True},
        "dataset": [{"id": "d", "path": "/nonexistent", "resolution": 64, "resolution_type": "pixel",
                     "num_frames": 13}]})


def test_both_experts_keep_the_device_peak_and_add_the_idle_expert_to_host_ram(encoders):
    one = plan(a14b(encoders), "rtx4090", search=False, arch=SMALL)
    both = plan(a14b(encoders, experts="both"), "rtx4090", search=False, arch=SMALL)
    assert both.phase("training step").peak == one.phase("training step").peak
    h1, h2 = ({it.label.split(",")[0].split(" (")[0]: it.bytes for it in p.host.items} for p in (one, both))
    blocks = sum(one.counters["group_bytes"])
    assert blocks > 0 and h1["streamed blocks"] == blocks and h2["streamed blocks"] == 2 * blocks
    step = {it.label: it.bytes for it in one.phase("training step").items}
    idle = (step["weights resident (frozen base, int8)"] + step["adapter weights (lora)"]
            + step["optimizer state (adamw_8bit)"] + step["EMA"])
    assert h1["idle expert"] == 0 and h2["idle expert"] == idle
    # Loading the second expert in bf16 while the first one's blocks already wait in RAM.
    assert h2["loading a model: bf16 weights before int8/offload"] == blocks + h1["loading a model: bf16 weights before int8/offload"]
    assert both.host.peak >= 2 * blocks + idle
    assert "experts both" in both.report() and "[host RAM]" in both.report()
    on_disk = override(a14b(encoders, experts="both"), ['memory.offload.to_disk_path="/fast-ssd/offload"'])
    assert plan(on_disk, "rtx4090", search=False, arch=SMALL).host.items[0].bytes == 0


def test_ti2v_sizes_follow_the_wan22_vae():
    cfg = config_from_dict({"model": {"flavour": "ti2v-5b-2.2"}, "validation": {"resolution": "1280x704"},
                            "dataset": [{"id": "d", "path": "/x", "resolution": 704, "resolution_type": "pixel",
                                         "num_frames": 121}]})
    s = train_shape(cfg)
    assert (s.width, s.height) == (1216, 704) and s.width % 32 == 0  # 16x VAE x 2x2 patches
    assert s.latent == (31, 44, 76) and s.tokens() == 31 * 22 * 38
