"""Wan S2V against golden tensors of the official Wan2.2 ``WanModel_S2V`` (fp32, CPU).

Goldens are found, by their JSON, in tests/fixtures/wan_s2v (made by scripts/s2v_official_golden.py
from the official code), in the lead's reference folder ``../shared/reference/wan_s2v`` when it is
beside the repository, and in every folder of ``VIDTUNE_S2V_GOLDEN_DIRS`` (os.pathsep-separated).
Each golden's model config and call come from its JSON; nothing about a config is written here.
"""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidtune.models import from_pretrained
from vidtune.models.wan_s2v import checkpoint_key

REPO = Path(__file__).parents[2]
DIRS = [REPO / "tests" / "fixtures" / "wan_s2v", REPO.parent / "shared" / "reference" / "wan_s2v",
        *(Path(p) for p in os.environ.get("VIDTUNE_S2V_GOLDEN_DIRS", "").split(os.pathsep) if p)]
GOLDENS = sorted({p.with_suffix("") for d in DIRS if d.is_dir() for p in d.glob("*.json")
                  if p.with_suffix(".weights.safetensors").is_file()})


def golden_inputs(stem: Path):
    """(meta, batched inputs with the text zero-padded to the config's text_len, io tensors)."""
    meta = json.loads(stem.with_suffix(".json").read_text())
    io = load_file(f"{stem}.io.safetensors")
    x, ctx = io["x"], io["context"]
    if x.ndim == 4:  # the reference stores one sample unbatched
        x, ctx = x[None], ctx[None]
    text_len = meta["model_config"]["text_len"]
    ctx = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], text_len - ctx.shape[1], ctx.shape[2])], dim=1)
    inputs = dict(hidden_states=x, timestep=io["t"], encoder_hidden_states=ctx, audio=io["audio_input"],
                  ref_latents=io["ref_latents"], pose_latents=io["cond_states"],
                  motion_frames=tuple(meta["call"]["motion_frames"]))
    return meta, inputs, io


def official_config(meta) -> dict:
    return {"_class_name": "WanModel_S2V", **meta["model_config"]}


def run(model, inputs, io, drop: bool):
    with torch.no_grad():
        out = model(**inputs, motion_latents=None if drop else io["motion_latents"])
    want = io["out_drop_motion" if drop else "out_keep_motion"]
    return out, want.reshape(out.shape)


@pytest.mark.parametrize("stem", GOLDENS, ids=lambda s: s.name)
def test_equals_official_golden(stem):
    meta, inputs, io = golden_inputs(stem)
    model = from_pretrained(f"{stem}.weights.safetensors", config=official_config(meta)).eval()
    for drop in (False, True):
        out, want = run(model, inputs, io, drop)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{stem.name} drop={drop}: {m}")
        assert not torch.equal(out, torch.zeros_like(out))


def _older_port_key(key: str) -> str:
    return key.replace("weighted_avg.weights", "weights").replace(".conv.conv.", ".conv.")


@pytest.mark.skipif(not GOLDENS, reason="no golden found")
def test_loads_every_layout_from_dir_shards_and_one_file(tmp_path):
    """The official layout from a directory, the newer diffusers port sharded with an index, the
    older port as one file with its config in the metadata: all load to the same weights."""
    stem = GOLDENS[0]
    meta, inputs, io = golden_inputs(stem)
    official = load_file(f"{stem}.weights.safetensors")
    ours = {checkpoint_key(k): v for k, v in official.items()}
    assert any("weighted_avg" in k for k in ours) and any(".conv.conv." in k for k in ours)

    d1 = tmp_path / "official"
    d1.mkdir()
    save_file(official, d1 / "diffusion_pytorch_model.safetensors")
    (d1 / "config.json").write_text(json.dumps(official_config(meta)))

    model = from_pretrained(d1)
    cfg = model.config.to_dict()
    d2 = tmp_path / "port_new" / "transformer"
    d2.mkdir(parents=True)
    names = sorted(ours)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for f, keys in shards.items():
        save_file({k: ours[k] for k in keys}, d2 / f)
    (d2 / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (d2 / "config.json").write_text(json.dumps(cfg))

    one = tmp_path / "port_old.safetensors"
    save_file({_older_port_key(k): v for k, v in ours.items()}, one, metadata={"config": json.dumps(cfg)})
    assert len({_older_port_key(k) for k in ours} ^ set(ours)) > 0

    want, _ = run(model.eval(), inputs, io, False)
    for src in (d2.parent, one):
        other = from_pretrained(src).eval()
        assert other.state_dict().keys() == model.state_dict().keys()
        torch.testing.assert_close(run(other, inputs, io, False)[0], want, rtol=0, atol=0)


def test_unknown_keys_are_named(tmp_path):
    stem = GOLDENS[0]
    meta, _, _ = golden_inputs(stem)
    w = load_file(f"{stem}.weights.safetensors")
    w["blocks.0.self_attn.bogus.weight"] = torch.zeros(1)
    save_file(w, tmp_path / "w.safetensors")
    with pytest.raises(KeyError, match="blocks.0.self_attn.bogus.weight"):
        from_pretrained(tmp_path / "w.safetensors", config=official_config(meta))


def test_lora_exports_under_the_official_names(tmp_path):
    """The original (ComfyUI) layout names every LoRA module by an official WanModel_S2V weight: the
    blocks' attention and the audio injector's, which S2V LoRAs train too."""
    from vidtune.adapters import apply_lora, export_lora
    from vidtune.config import AdapterConfig

    stem = GOLDENS[0]
    meta, _, _ = golden_inputs(stem)
    official = set(load_file(f"{stem}.weights.safetensors"))
    model = from_pretrained(f"{stem}.weights.safetensors", config=official_config(meta))
    cfg = AdapterConfig(rank=2, alpha=2.0)
    apply_lora(model, cfg)
    keys = set(load_file(export_lora(model, tmp_path / "wan.safetensors", cfg, "wan")))
    modules = {k[len("diffusion_model."):].rsplit(".lora_", 1)[0] for k in keys if k.endswith("lora_down.weight")}
    assert modules and all(f"{m}.weight" in official for m in modules)
    assert any(m.startswith("audio_injector.injector.") for m in modules)
    assert len(modules) == 4 * (2 * meta["model_config"]["num_layers"] + len(meta["model_config"]["audio_inject_layers"]))
