"""The planner on Wan S2V: its predicted step peak against a real CPU step's (audio, reference and
motion tokens, audio injection included), and the audio encoder in the caching phase."""
import pytest

from vidtune.bench.real_step import real_step
from vidtune.config import config_from_dict
from vidtune.models.wan_s2v import WanS2VConfig
from vidtune.planner import plan, train_shape

SMALL = WanS2VConfig(num_attention_heads=2, attention_head_dim=64, ffn_dim=768, num_layers=6, text_dim=128,
                     freq_dim=64, rope_max_seq_len=64, audio_dim=32, audio_inject_layers=(0, 1, 3, 5))


def s2v_config(**memory):
    return config_from_dict({
        "model": {"family": "wan_s2v", "flavour": "s2v-14b-2.2", "dtype": "fp32"},
        "train": {"mixed_precision": "no", "optimizer": "adamw"},
        "adapter": {"type": "lora", "rank": 8},
        "memory": {"gradient_checkpointing": True, **memory},
        "dataset": [{"id": "d", "path": "/nonexistent", "resolution": 64, "resolution_type": "pixel",
                     "num_frames": 13, "audio": {"max_duration_seconds": 1.0}}],
    })


@pytest.mark.parametrize("ckpt", [True, False])
def test_step_peak_within_15_percent_of_measured(ckpt):
    cfg = s2v_config(gradient_checkpointing=ckpt)
    predicted = plan(cfg, "cpu", search=False, arch=SMALL)
    measured = real_step(cfg, SMALL, train_shape(cfg).latent)["peak_bytes"]
    peak = predicted.phase("training step").peak
    assert abs(peak - measured) <= 0.15 * measured, (peak, measured, peak / measured)
    labels = [i.label for i in predicted.phase("caching").items]
    assert "audio encoder (wav2vec2) weights" in labels and "audio encoder activations (1 s of audio)" in labels
