"""Two-expert checkpoints (Wan 2.2 A14B): flavour aliases, model.experts, the boundary, and the
timestep distribution each expert trains on (truncated and renormalised, checked by a KS test)."""
import json
import math

import pytest
import torch

from vidtune.config import EXPERT_FLAVOURS, ConfigError, config_from_dict, dump_config, load_config
from vidtune.models.wan import BOUNDARY_RATIO, boundary_ratio
from vidtune.train.flow import (draw_expert, expert_sigma_range, sample_sigmas, shift_sigmas, sigma_cdf,
                                sigma_icdf)

N = 10_000
KS_1PCT = 1.63 / math.sqrt(N)  # Kolmogorov-Smirnov critical distance at the 1% level
METHODS = {"logit_norm": dict(logit_mean=0.3, logit_std=1.2), "uniform": {}, "shift": dict(shift=3.0),
           "auto_shift": dict(tokens_per_frame=1560)}


def ks_distance(draws: torch.Tensor, cdf) -> float:
    """sup |empirical CDF - cdf| of the draws."""
    x, _ = draws.double().sort()
    f = cdf(x)
    n = len(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return max(upper.max().item(), lower.max().item())


def truncated_cdf(method, kw, lo, hi):
    a, b = (sigma_cdf(torch.tensor(v, dtype=torch.float64), method, **kw) for v in (lo, hi))
    return lambda x: ((sigma_cdf(x, method, **kw) - a) / (b - a)).clamp(0, 1)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("expert, boundary", [("high", 0.875), ("low", 0.875), ("high", 0.9), ("low", 0.9)])
def test_expert_draws_stay_in_range_and_follow_the_truncated_distribution(method, expert, boundary):
    kw = METHODS[method]
    lo, hi = expert_sigma_range(expert, boundary)
    s = sample_sigmas(N, method, torch.Generator().manual_seed(1), sigma_range=(lo, hi), **kw)
    assert s.dtype == torch.float32 and s.shape == (N,)
    # The range is on the level the model sees (timestep = sigma * 1000, compared with boundary * 1000).
    assert ((s * 1000 >= boundary * 1000) == (expert == "high")).all()
    assert ks_distance(s, truncated_cdf(method, kw, lo, hi)) < KS_1PCT
    # Clamping the untruncated draws instead would pile mass on the boundary: the test tells them apart.
    clamped = sample_sigmas(N, method, torch.Generator().manual_seed(1), **kw).clamp(lo, hi - 1e-7)
    assert ks_distance(clamped, truncated_cdf(method, kw, lo, hi)) > 3 * KS_1PCT


@pytest.mark.parametrize("method", list(METHODS))
def test_cdf_and_its_inverse_match_the_sampler(method):
    kw = METHODS[method]
    p = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(sigma_cdf(sigma_icdf(p, method, **kw), method, **kw), p)
    full = sample_sigmas(N, method, torch.Generator().manual_seed(2), **kw)
    assert ks_distance(full, lambda x: sigma_cdf(x, method, **kw)) < KS_1PCT
    if method == "shift":
        torch.testing.assert_close(sigma_icdf(p, method, **kw), shift_sigmas(p, 3.0))


@pytest.mark.parametrize("method", ["logit_norm", "shift"])
def test_both_experts_keep_the_configured_distribution(method):
    """experts = "both": pick the expert by the mass of its range, then draw in it; the noise
    levels together have the configured (untruncated) distribution."""
    kw, b = METHODS[method], 0.875
    g = torch.Generator().manual_seed(3)
    draws, owners = [], []
    for _ in range(N):
        e = draw_expert(g, b, method, **kw)
        draws.append(sample_sigmas(1, method, g, sigma_range=expert_sigma_range(e, b), **kw))
        owners.append(e)
    s = torch.cat(draws)
    assert all((x >= b) == (e == "high") for x, e in zip(s.tolist(), owners))
    assert ks_distance(s, lambda x: sigma_cdf(x, method, **kw)) < KS_1PCT
    share = owners.count("high") / N
    assert abs(share - (1 - float(sigma_cdf(b, method, **kw)))) < 0.02


def test_aliases_resolve_at_load_and_experts_are_required():
    cfg = config_from_dict({"model": {"flavour": "i2v-14b-2.2-low"}})
    assert (cfg.model.flavour, cfg.model.experts) == ("i2v-14b-2.2", "low")
    assert 'flavour = "i2v-14b-2.2"' in dump_config(cfg) and 'experts = "low"' in dump_config(cfg)
    assert config_from_dict({"model": {"flavour": "i2v-14b-2.1"}}).model.flavour == "i2v-480p-14b-2.1"
    assert config_from_dict({"model": {"flavour": "t2v-a14b-2.2", "experts": "both"}}).model.experts == "both"
    cases = [
        ({"flavour": "i2v-14b-2.2"}, "model.experts: i2v-14b-2.2 holds two experts"),
        ({"flavour": "i2v-14b-2.2-high", "experts": "low"}, "means 'i2v-14b-2.2' with experts = 'high'"),
        ({"experts": "high"}, "has a single transformer; unset model.experts"),
        ({"flavour": "t2v-a14b-2.2", "experts": "both", "transformer_subfolder": "transformer"},
         "each expert loads from its own subfolder"),
    ]
    for model, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            config_from_dict({"model": model})
    with pytest.raises(ConfigError, match="validation.load_other_stage: t2v-480p-1.3b-2.1 has no other stage"):
        config_from_dict({"validation": {"load_other_stage": True}})


def test_validation_dataset_and_i2v_keys(tmp_path):
    ds = [{"id": "clips", "path": "a"}, {"id": "frames", "path": "b", "type": "image"}]
    cfg = config_from_dict({"validation": {"dataset": "frames"}, "dataset": ds})
    assert [d.id for d in cfg.datasets] == ["clips"]  # the validation images are not trained on
    for validation, needle in (({"dataset": "frame"}, "did you mean 'frames'"),
                               ({"dataset": "clips"}, "must be an enabled image dataset")):
        with pytest.raises(ConfigError, match=needle):
            config_from_dict({"validation": validation, "dataset": ds})
    with pytest.raises(ConfigError, match=r"dataset\[0\] \('clips'\).last_image: .* needs i2v"):
        config_from_dict({"dataset": [{"id": "clips", "path": "a", "i2v": False, "last_image": True}]})
    with pytest.raises(ConfigError, match=r"an image has no frames after the first"):
        config_from_dict({"dataset": [{"id": "f", "path": "b", "type": "image", "i2v": True}]})
    path = tmp_path / "c.toml"
    path.write_text('[model]\nflavour = "i2v-14b-2.2-high"\n')
    assert load_config(path, ['model.flavour="t2v-a14b-2.2"', 'model.experts="both"']).model.experts == "both"


def test_boundary_from_model_index_or_the_published_default(tmp_path):
    from vidtune.config import ModelConfig

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.8}))
    lines = []
    assert boundary_ratio(ModelConfig(flavour="t2v-a14b-2.2", experts="low", path=str(tmp_path)), say=lines.append) == 0.8
    assert not lines
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    for flavour, published in (("t2v-a14b-2.2", 0.875), ("i2v-14b-2.2", 0.9)):
        m = ModelConfig(flavour=flavour, experts="high", path=str(tmp_path))
        assert boundary_ratio(m, say=lines.append) == published == BOUNDARY_RATIO[flavour]
        assert len(lines) == 1 and f"using the published {published} of {flavour}" in lines.pop()
    assert sorted(BOUNDARY_RATIO) == sorted(EXPERT_FLAVOURS["wan"])
