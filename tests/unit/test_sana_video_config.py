"""Sana Video's config rules and its canonical training schedule."""
import pytest
import torch

from vidtune.config import ConfigError, TrainConfig, config_from_dict
from vidtune.models.sana_video import sigma_sampler
from vidtune.models.sana_video.flow import canonical_table

DS = [{"id": "d", "path": "/data"}]


def test_defaults_are_the_guides():
    cfg = config_from_dict({"model": {"family": "sana_video"}, "dataset": DS})
    assert cfg.model.flavour == "2b-480p" and cfg.model.fps == 16  # the guide: 16 fps unless set
    assert cfg.dataset[0].num_frames == 81 and cfg.validation.num_frames == 81  # and 81 frames
    assert cfg.model.resolved_path() == "Efficient-Large-Model/SANA-Video_2B_480p_diffusers"
    assert config_from_dict({"model": {"family": "sana_video", "flavour": "i2v-2b-480p"}}).model.fps == 16


@pytest.mark.parametrize("data,message", [
    ({"adapter": {"export_format": "wan"}}, "Sana Video LoRAs have no original-Wan key layout"),
    ({"validation": {"skip_layers": [3]}}, "skip-layer guidance is a Wan option"),
    ({"model": {"family": "sana_video", "force_2_1_time_embedding": True}}, "force_2_1_time_embedding is a Wan 2.2"),
])
def test_sana_refuses_wan_options(data, message):
    data = {**data, "model": {"family": "sana_video", **data.get("model", {})}}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_wan_refuses_loss_masks():
    with pytest.raises(ConfigError, match="masked loss is a Sana Video option"):
        config_from_dict({"dataset": [{**DS[0], "loss_mask_path": "/masks"}]})
    assert config_from_dict({"model": {"family": "sana_video"}, "dataset": [{**DS[0], "loss_mask_path": "/m"}]})


def test_canonical_schedule_draws_the_checkpoints_table_and_warns_once():
    published = {"_class_name": "DPMSolverMultistepScheduler", "flow_shift": 8.0, "use_flow_sigmas": True,
                 "num_train_timesteps": 1000}
    sigmas, n, shift = canonical_table(published)
    assert (n, shift) == (1000, 8.0) and sigmas.shape == (1000,)
    s = torch.arange(1000, 0, -1) / 1000  # the unshifted table, high noise first
    torch.testing.assert_close(sigmas, 8 * s / (1 + 7 * s))
    assert canonical_table({"shift": 3.0})[2] == 3.0  # a flow-match Euler config's own key

    logs = []
    draw = sigma_sampler(TrainConfig(timestep_sampling="shift", flow_shift=5.0), published, logs.append)
    assert len(logs) == 1 and logs[0].startswith("warning: train.timestep_sampling = 'shift' (train.flow_shift 5)")
    got = draw(4096, torch.Generator().manual_seed(0))
    assert torch.isin(got, sigmas).all()  # only table values
    assert 0.80 < got.median() < 0.95  # shift 8 puts half the draws above 8 * 0.5 / 4.5 = 0.89
    assert torch.equal(draw(8, torch.Generator().manual_seed(1)), draw(8, torch.Generator().manual_seed(1)))
    logs.clear()
    sigma_sampler(TrainConfig(), published, logs.append)
    assert len(logs) == 1 and logs[0].startswith("timesteps: Sana Video trains on its checkpoint's canonical")
