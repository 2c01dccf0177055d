"""SimpleTuner -> vidtune conversion of the seed guides' example configs and dataloaders."""
import json
from pathlib import Path

import pytest

from vidtune.config import load_config
from vidtune.cli.convert import main
from vidtune.convert import NOTED, UNSUPPORTED, ConvertError, convert_simpletuner, read_simpletuner

FIX = Path(__file__).parents[1] / "fixtures" / "simpletuner"
DOCS = (Path(__file__).parents[2] / "docs" / "convert.md").read_text()
GUIDES = ["wan", "wan22_i2v", "wan_s2v", "sanavideo"]
EXPECTED_UNMAPPED: dict[str, list[str]] = {}


def _convert(name, tmp_path, edit=None):
    cfg = json.loads((FIX / name / "config.json").read_text())
    backends = json.loads((FIX / name / "multidatabackend.json").read_text())
    if edit:
        edit(cfg, backends)
    text, unmapped, notes = convert_simpletuner(cfg, backends)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_config(path), unmapped, notes


@pytest.mark.parametrize("name", GUIDES)
def test_guide_configs_convert_and_load(name, tmp_path):
    cfg, unmapped, notes = _convert(name, tmp_path)
    expected = EXPECTED_UNMAPPED.get(name, [])
    assert len(unmapped) == len(expected) and all(u.startswith(e) for u, e in zip(unmapped, expected)), unmapped
    for n in notes:  # every exception is in the docs, by its key
        key = n.split(":", 1)[0].split(".")[-1].split(" /")[0]
        assert f"`{key}`" in DOCS, n
    assert cfg.train.max_train_steps == 400000 and cfg.train.lr_scheduler == "cosine"
    assert cfg.validation.num_frames == 81 and cfg.validation.resolution == "832x480"
    assert cfg.ema.enabled and cfg.ema.validation == "ema_only" and cfg.ema.update_interval == 2
    assert cfg.train.resume == "latest" and cfg.cache.compress
    assert [d.id for d in cfg.dataset] == {"wan_s2v": ["s2v-videos"], "wan22_i2v": [
        "disney-black-and-white", "my-image-dataset"]}.get(name, ["disney-black-and-white"])


def test_wan_t2v_values(tmp_path):
    cfg, _, notes = _convert("wan", tmp_path)
    m, t = cfg.model, cfg.train
    assert (m.family, m.flavour, m.path, m.attention_backend, m.quantize_via) == (
        "wan", "t2v-480p-1.3b-2.1", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "sage", "cpu")
    assert m.text_encoder_path is None  # same repo as the model: vidtune's default
    assert (cfg.adapter.type, cfg.adapter.rank) == ("lora", 16)
    # optimi-lion with SimpleTuner's defaults for it (vidtune's are AdamW's).
    assert (t.optimizer, t.betas, t.weight_decay) == ("lion", [0.9, 0.99], 0.0)
    assert (t.max_grad_norm, t.grad_clip_method, t.batch_size, t.caption_dropout) == (0.01, "value", 2, 0.1)
    assert (t.timestep_sampling, t.flow_shift, t.checkpoint_every, t.keep_checkpoints) == ("shift", 3.0, 1000, 5)
    v = cfg.validation
    assert (v.guidance, v.steps, v.seed, v.every, v.skip_layers) == (5.2, 40, 42, 100, [9])
    assert v.prompt_library == "config/user_prompt_library.json"  # from the "--user_prompt_library" form
    assert v.preview_every == 1 and v.prompts[0].startswith("两只")
    assert cfg.memory.offload.type == "block_level" and cfg.memory.offload.use_stream
    assert cfg.memory.offload_during_startup and cfg.memory.gradient_checkpointing
    assert cfg.logging.report_to == "wandb" and cfg.logging.project == "lora-training"
    d = cfg.dataset[0]
    assert (d.path, d.resolution, d.resolution_type, d.crop, d.repeats) == (
        "datasets/disney-black-and-white", 480, "pixel_area", False, 0)
    # 75 frames: Wan's VAE keeps 4k+1 of them; the minimum length filter keeps its meaning.
    assert (d.num_frames, d.min_frames, d.bucket_strategy) == (73, 75, "aspect_ratio")
    assert any("75 -> 73" in n for n in notes)
    assert cfg.cache.dir == "cache" and cfg.cache.text_batch_size == 128
    assert any(n.startswith("hub_model_id:") for n in notes) and any(n.startswith("webhook_config:") for n in notes)


def test_tread_indices_keep_their_meaning(tmp_path):
    cfg, _, _ = _convert("wan", tmp_path)
    raw = json.loads((FIX / "wan" / "config.json").read_text())["tread_config"]["routes"]
    layers = 30  # Wan 2.1 1.3B
    # SimpleTuner's wan transformer: idx < 0 -> layers + idx; route starts before block start_layer_idx
    # and ends after block end_layer_idx (inclusive).
    simpletuner = [(r["selection_ratio"], r["start_layer_idx"] % layers, r["end_layer_idx"] % layers) for r in raw]
    assert cfg.tread.resolve(layers) == simpletuner
    assert simpletuner[-1] == (0.1, 24, 28)


def test_feed_forward_chunk_size_note(tmp_path):
    cfg, _, notes = _convert("wan", tmp_path)
    assert cfg.memory.chunked_ff.enabled
    assert cfg.memory.chunked_ff.chunk_size == 4096  # tokens; SimpleTuner's "2" counts samples
    note = next(n for n in notes if n.startswith("feed_forward_chunk_size:"))
    assert "BATCH dimension" in note and "tokens" in note


def test_wan22_i2v_and_int8(tmp_path):
    cfg, _, notes = _convert("wan22_i2v", tmp_path)
    # The guide's Wan 2.2 keys, each to its vidtune key: model_flavour i2v-14b-2.2-high is the
    # two-expert flavour training the high-noise expert; validation_using_datasets + eval_dataset_id
    # name the image dataset that starts the I2V validation videos (not an eval-loss set).
    assert (cfg.model.flavour, cfg.model.experts) == ("i2v-14b-2.2", "high")
    assert cfg.validation.load_other_stage is True
    assert cfg.model.force_2_1_time_embedding is True
    assert cfg.validation.dataset == "my-image-dataset"
    assert [d.id for d in cfg.datasets] == ["disney-black-and-white"]  # the validation images are not trained on
    assert cfg.model.base_precision == "int8" and cfg.train.optimizer == "paged_lion_8bit"
    assert cfg.train.max_grad_norm == 1.0
    assert any("conditioning_image_embeds" in n and "first-frame" in n for n in notes)
    low, _, _ = _convert("wan22_i2v", tmp_path, lambda c, b: c.update(model_flavour="i2v-14b-2.2-low",
                                                                     wan_validation_load_other_stage=False))
    assert (low.model.flavour, low.model.experts, low.validation.load_other_stage) == ("i2v-14b-2.2", "low", False)


def test_sana_video_ignores_shift(tmp_path):
    def edit(cfg, _):
        cfg["flow_schedule_shift"] = 3
    cfg, unmapped, notes = _convert("sanavideo", tmp_path, edit)
    assert (cfg.model.family, cfg.adapter.type, cfg.model.fps) == ("sana_video", "full", 16)
    assert cfg.train.timestep_sampling == "logit_norm" and not unmapped
    assert any(n.startswith("flow_schedule_shift:") and "canonical" in n for n in notes)
    assert (cfg.train.optimizer, cfg.train.eps, cfg.train.max_grad_norm) == ("adamw_bf16", 1e-6, 0.0)


def test_sana_video_keys_land_where_the_guide_means(tmp_path):
    """Each Sana-specific key of the guide's config and its masked-loss dataloader."""
    def edit(cfg, backends):
        cfg.update({"framerate": 24, "validation_num_video_frames": 81, "flow_schedule_auto_shift": True,
                    "flow_use_uniform_schedule": True})
        backends[0]["conditioning_data"] = "masks"
        backends.append({"id": "masks", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
                         "instance_data_dir": "datasets/masks"})
    cfg, unmapped, notes = _convert("sanavideo", tmp_path, edit)
    assert not unmapped, unmapped
    assert cfg.adapter.type == "full"  # model_type = "full"
    assert (cfg.model.family, cfg.model.flavour, cfg.model.fps) == ("sana_video", "2b-480p", 24)  # framerate
    assert cfg.validation.num_frames == 81  # validation_num_video_frames, already 4k+1
    assert cfg.train.timestep_sampling == "logit_norm"  # the shift keys: noted, never set
    for key in ("flow_schedule_auto_shift", "flow_use_uniform_schedule"):
        assert any(n.startswith(f"{key}:") and "canonical flow schedule" in n for n in notes), key
    assert [d.loss_mask_path for d in cfg.dataset] == ["datasets/masks"]  # masked loss, by stem
    assert any("conditioning_type mask" in n for n in notes)
    # the same dataloader for Wan: masks are refused as unmapped (the Wan guide: no masked loss)
    wan = json.loads((FIX / "wan" / "config.json").read_text())
    backends = json.loads((FIX / "sanavideo" / "multidatabackend.json").read_text())
    edit({}, backends)
    _, unmapped, _ = convert_simpletuner(wan, backends)
    assert sum("masked loss is a Sana Video option" in u for u in unmapped) == 2


def test_unknown_and_unsupported_keys_are_listed(tmp_path):
    def edit(cfg, backends):
        cfg.update({"frobnicate_level": 3, "crepa_scheduler": "cosine", "validation_using_datasets": True,
                    "optimizer": "prodigy"})
        backends[0]["video"]["mystery"] = 1
    cfg, unmapped, _ = _convert("wan", tmp_path, edit)
    keys = {u.split("=", 1)[0]: u for u in unmapped}
    assert set(keys) == {"frobnicate_level", "crepa_scheduler", "validation_using_datasets", "optimizer",
                         "dataset[disney-black-and-white].video.mystery"}
    assert UNSUPPORTED["crepa"] in keys["crepa_scheduler"]
    assert "prodigy" in keys["optimizer"] and cfg.train.optimizer == "adamw"


@pytest.mark.parametrize("precision", ["nf4-bnb", "int4-quanto"])
def test_low_bit_wan_refused(precision):
    cfg = json.loads((FIX / "wan" / "config.json").read_text())
    cfg["base_model_precision"] = precision
    with pytest.raises(ConvertError, match="Wan is sensitive to quantization and cannot be used with NF4 or INT4"):
        convert_simpletuner(cfg, None)


def test_bad_values_refused():
    with pytest.raises(ConvertError, match="model_family='flux'"):
        convert_simpletuner({"model_family": "flux"})
    with pytest.raises(ConvertError, match="model_flavour='vace-1.3b-2.1'"):
        convert_simpletuner({"model_family": "wan", "model_flavour": "vace-1.3b-2.1"})
    with pytest.raises(ConvertError, match="not valid for vidtune"):
        convert_simpletuner({"model_family": "wan", "lora_rank": 0})


def test_cli_finds_the_backend_and_writes(tmp_path, capsys):
    (tmp_path / "config").mkdir()
    cfg = json.loads((FIX / "wan" / "config.json").read_text())
    cfg["data_backend_config"] = "config/multidatabackend.json"  # relative to SimpleTuner's cwd
    (tmp_path / "config" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "config" / "multidatabackend.json").write_text((FIX / "wan" / "multidatabackend.json").read_text())
    out = tmp_path / "run.toml"
    assert main([str(tmp_path / "config" / "config.json"), "-o", str(out)]) == 0
    assert load_config(out).dataset[0].id == "disney-black-and-white"
    cfg["frobnicate"] = 1
    (tmp_path / "config" / "config.json").write_text(json.dumps(cfg))
    assert main([str(tmp_path / "config" / "config.json"), "--strict", "-o", str(out)]) == 2
    assert "unmapped: frobnicate=1" in capsys.readouterr().err
    cfg["data_backend_config"] = "config/elsewhere.json"
    (tmp_path / "config" / "config.json").write_text(json.dumps(cfg))
    _, backends, msgs = read_simpletuner(tmp_path / "config" / "config.json")
    assert backends is None and "not found" in msgs[0]


def test_docs_list_every_exception():
    for key in list(NOTED) + list(UNSUPPORTED):
        assert f"`{key}" in DOCS, key


# SimpleTuner's documented LoKr preset (its LYCORIS guide) and a factored variant.
LOKR_PRESET = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
               "apply_preset": {"target_module": ["Attention", "FeedForward"],
                                "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}}}


@pytest.mark.parametrize("lyc, rank, alpha, factor, both", [
    (LOKR_PRESET, 10000, 10000.0, 16, False),
    ({"algo": "lokr", "linear_dim": 8, "linear_alpha": 4, "factor": 4, "decompose_both": True}, 8, 4.0, 4, True),
])
def test_lycoris_config_maps_to_lokr(tmp_path, lyc, rank, alpha, factor, both):
    cfg = json.loads((FIX / "wan" / "config.json").read_text())
    cfg.update(lora_type="lycoris", lycoris_config="config/wan/lycoris_config.json")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "lycoris_config.json").write_text(json.dumps(lyc))  # found beside config.json
    config, backends, msgs = read_simpletuner(tmp_path / "config.json", FIX / "wan" / "multidatabackend.json")
    assert any("lycoris:" in m for m in msgs)
    text, unmapped, notes = convert_simpletuner(config, backends)
    assert not unmapped, unmapped
    (tmp_path / "out.toml").write_text(text)
    a = load_config(tmp_path / "out.toml").adapter
    assert (a.type, a.rank, a.alpha, a.lokr_decompose_factor, a.lokr_decompose_both) == ("lokr", rank, alpha, factor, both)
    if lyc is LOKR_PRESET:
        assert a.target_modules == ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "net.0.proj", "net.2"]
        assert any(n.startswith("lycoris_config.linear_alpha") for n in notes)
        assert any(n.startswith("lycoris_config.module_algo_map") for n in notes)
    for n in (n for n in notes if n.startswith("lycoris")):
        assert f"`{n.split(':', 1)[0].split('.')[-1]}`" in DOCS, n
    bad = convert_simpletuner({**config, "lycoris_config": {"algo": "loha"}}, backends)[1]
    assert any(u.startswith("lycoris_config.algo") for u in bad)


def test_s2v_audio_block_and_separate_audio_dataset(tmp_path):
    """The S2V guide's two dataloaders: the audio block (auto_split), and s2v_datasets naming an
    audio backend (its folder, matched by stem)."""
    cfg, unmapped, notes = _convert("wan_s2v", tmp_path)
    a = cfg.dataset[0].audio
    assert not unmapped and (a.auto_split, a.sample_rate, a.channels, a.path) == (True, 16000, 1, None)
    # S2V validation needs reference media the SimpleTuner config does not name: off, with a note.
    assert cfg.validation.every == 0 and any("reference_media" in n for n in notes)

    def manual(_, backends):
        video = backends[0]
        del video["audio"]
        video["s2v_datasets"] = ["s2v-audio"]
        backends.insert(1, {"id": "s2v-audio", "type": "local", "dataset_type": "audio",
                            "instance_data_dir": "datasets/s2v-audio", "disabled": False})

    cfg, unmapped, _ = _convert("wan_s2v", tmp_path, manual)
    assert not unmapped and [d.id for d in cfg.dataset] == ["s2v-videos"]
    a = cfg.dataset[0].audio
    assert (a.auto_split, a.path, cfg.model.family, cfg.model.flavour) == (False, "datasets/s2v-audio", "wan_s2v",
                                                                          "s2v-14b-2.2")

    def orphan(_, backends):
        backends.append({"id": "loose", "type": "local", "dataset_type": "audio", "instance_data_dir": "x"})
        backends[0]["audio"]["bogus"] = 1

    _, unmapped, _ = _convert("wan_s2v", tmp_path, orphan)
    assert sorted(u.split("=")[0] for u in unmapped) == ["dataset[loose].dataset_type", "dataset[s2v-videos].audio.bogus"]


def test_crepa_keys_map(tmp_path):
    def edit(cfg, _):
        cfg.update({"crepa_enabled": True, "crepa_block_index": 10, "crepa_lambda": 0.3, "crepa_adjacent_distance": 2,
                    "crepa_adjacent_tau": 0.5, "crepa_encoder": "dinov2_vits14", "crepa_encoder_image_size": 224,
                    "crepa_spatial_align": False, "crepa_drop_vae_encoder": True, "crepa_normalize_by_frames": True})
    cfg, unmapped, _ = _convert("wan", tmp_path, edit)
    c = cfg.crepa
    assert (c.enabled, c.block_index, c.weight, c.adjacent_distance, c.adjacent_tau) == (True, 10, 0.3, 2, 0.5)
    assert (c.encoder, c.encoder_image_size, c.spatial_align, c.drop_vae_encoder) == \
        ("facebook/dinov2-small", 224, False, True)
    assert not any(u.startswith("crepa") for u in unmapped)

    def off(cfg, _):
        cfg.update({"crepa_enabled": True, "crepa_normalize_by_frames": False})
    _, unmapped, _ = _convert("wan", tmp_path, off)
    assert any(u.startswith("crepa_normalize_by_frames=") and "always averages" in u for u in unmapped)


def test_hub_keys_map(tmp_path):
    cfg, _, notes = _convert("wan", tmp_path)  # the guide: hub_model_id "wan-disney", no owner
    assert cfg.hub.repo_id is None and cfg.hub.push_every_checkpoint
    assert any(n.startswith("hub_model_id:") and '"<your user>/wan-disney"' in n for n in notes)

    def owned(cfg, _):
        cfg.update({"hub_model_id": "me/wan-disney", "push_checkpoints_to_hub": "false"})
    cfg, _, _ = _convert("wan", tmp_path, owned)
    assert (cfg.hub.repo_id, cfg.hub.push_every_checkpoint) == ("me/wan-disney", False)

    def off(cfg, _):
        cfg.update({"push_to_hub": "false"})
    cfg, _, notes = _convert("wan", tmp_path, off)
    assert cfg.hub.repo_id is None and any(n.startswith("hub_model_id: push_to_hub is off") for n in notes)
