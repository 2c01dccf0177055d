"""MFU: model FLOPs leave out what checkpointing recomputes, two ways that must agree; TREAD lowers
them; the device class of a GPU comes from its name."""
import pytest

from vidtune.config import config_from_dict
from vidtune.measure import devices as D
from vidtune.measure.mfu import flops_config, mfu, model_flops, recompute_flops
from vidtune.models.wan import WanConfig
from vidtune.planner import simulate_step, train_shape

ARCH = WanConfig(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=4, text_dim=32, freq_dim=16,
                 rope_max_seq_len=64)


def _cfg(**memory):
    return config_from_dict({
        "train": {"mixed_precision": "no", "optimizer": "adamw"}, "model": {"dtype": "fp32"},
        "adapter": {"type": "lora", "rank": 4}, "memory": memory,
        "dataset": [{"id": "d", "path": "/nonexistent", "resolution": 64, "resolution_type": "pixel", "num_frames": 5}],
    })


def _flops(cfg, recompute=False):
    sim = simulate_step(cfg, ARCH, train_shape(cfg))  # the planner's replayed step (Plan.sim)
    return model_flops(sim["fwd_flops"], sim["bwd_flops"], recompute_flops(sim) if recompute else 0)


def test_model_flops_without_recompute_agree():
    ckpt = _cfg(gradient_checkpointing=True, chunked_ff={"enabled": False})
    plain = flops_config(ckpt)
    assert not plain.memory.gradient_checkpointing and not plain.memory.chunked_ff.enabled
    assert _flops(ckpt) > _flops(plain)  # the counted step recomputes every block's forward
    assert _flops(ckpt, recompute=True) == _flops(plain)


def test_tread_lowers_model_flops_and_chunking_does_not_count():
    base = _cfg(gradient_checkpointing=False, chunked_ff={"enabled": False})
    routed = config_from_dict({**_as_dict(base), "tread": {"routes": [
        {"selection_ratio": 0.5, "start_layer": 1, "end_layer": -2}]}})
    assert _flops(flops_config(routed)) < _flops(base)
    chunked = _cfg(gradient_checkpointing=False, chunked_ff={"enabled": True, "chunk_size": 8})
    assert _flops(flops_config(chunked)) == _flops(base)


def _as_dict(cfg):
    from vidtune.config import _to_toml_data

    return _to_toml_data(cfg)


def test_mfu_and_missing_peaks():
    assert mfu(5e14, 1.0, 1e15) == pytest.approx(0.5)
    assert mfu(5e14, 1.0, None) is None and mfu(5e14, 0.0, 1e15) is None


@pytest.mark.parametrize("name,cls", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                      ("NVIDIA GeForce RTX 4090", "rtx4090"), ("AMD Instinct MI300X", "mi300x"),
                                      ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
                                      ("NVIDIA GeForce RTX 3090", "rtx3090"), ("NVIDIA L40S", "l40s"),
                                      ("NVIDIA RTX A4000", None)])
def test_gpu_class_from_device_name(name, cls):
    got = D.gpu_class(name)
    assert (got.name if got else None) == cls
