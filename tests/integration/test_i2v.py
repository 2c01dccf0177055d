"""Wan 2.1 / 2.2 image-to-video, two-expert checkpoints and TI2V-5B against diffusers, on tiny
random pipelines saved in the diffusers layout (vidtune.testing.build_tiny_wan_variant):

- the conditioning cached with the latents equals WanImageToVideoPipeline.prepare_latents /
  encode_image for the same frame;
- validation latents equal WanImageToVideoPipeline / WanPipeline (one or two experts, TI2V's
  expand_timesteps) with output_type="latent";
- every flavour trains end to end through vidtune-train, and the LoRA files load in diffusers
  (load_into_transformer_2 for the low-noise expert) in both key layouts.
"""
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vidtune.adapters import DIFFUSERS_FILE, WAN_FILE, apply_lora
from vidtune.cli.train import main as cli_main
from vidtune.config import AdapterConfig, config_from_dict
from vidtune.data.prepare import LATENTS
from vidtune.data.video import load_video_clip
from vidtune.models import from_pretrained
from vidtune.sample import load_scheduler_config, make_scheduler, sample
from vidtune.testing import build_tiny_wan_variant_dir, make_test_image, write_captioned_clips
from vidtune.train.checkpoint import checkpoint_dirs
from vidtune.train.log import loss_values

if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg missing: apt-get install -y ffmpeg", allow_module_level=True)

FLAVOUR = {"i2v-2.1": "i2v-480p-14b-2.1", "i2v-2.2": "i2v-14b-2.2", "t2v-a14b": "t2v-a14b-2.2", "ti2v": "ti2v-5b-2.2"}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("wan22")


@pytest.fixture(scope="module")
def pipes(root):
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = build_tiny_wan_variant_dir(root / kind, kind)
        return made[kind]
    return get


@pytest.fixture(scope="module")
def clips(root):
    return write_captioned_clips(root / "clips")


@pytest.fixture(scope="module")
def frames(root):
    """Validation first frames (64x32, the validation size) with captions."""
    d = root / "frames"
    make_test_image(d / "cat.png", 64, 32, seed=4)
    (d / "cat.txt").write_text("a red cat")
    return d


def config(root, pipe, kind, out, *, model=None, datasets=None, validation=None, **sections):
    """A run config as a dict (tiny, fp32, CPU)."""
    cfg = {"model": {"path": str(pipe), "flavour": FLAVOUR[kind], "dtype": "fp32", "text_encoder_dtype": "fp32",
                     **(model or {})},
           "adapter": {"rank": 4, "target_modules": TARGETS, **sections.pop("adapter", {})},
           "train": {"output_dir": str(root / out), "device": "cpu", "max_train_steps": 2, "mixed_precision": "no",
                     "checkpoint_every": 0, "learning_rate": 1e-2, "seed": 7, **sections.pop("train", {})},
           "cache": {"dir": str(root / f"cache-{kind}")},
           "logging": {"report_to": "none", "progress_bar": False},
           "validation": {"negative_prompt": "the video", "steps": 4, "guidance": 4.5, "num_frames": 5,
                          "resolution": "64x32", "seed": 11, **(validation or {})},
           "dataset": datasets or [],
           **sections}
    return cfg


def clip_ds(clips, **kw):
    return {"id": "clips", "path": str(clips), "resolution": 32, "num_frames": 9, **kw}


def frames_ds(frames):
    return {"id": "frames", "path": str(frames), "type": "image", "resolution": 32}


def write(root, name, cfg):
    import tomli_w

    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def prepared_for(cfg_dict):
    from vidtune.train.trainer import prepare

    cfg = config_from_dict(cfg_dict)
    return cfg, prepare(cfg, log=lambda m: None)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def i2v_pipeline(pipe_dir, kind):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if kind != "ti2v":
        return WanImageToVideoPipeline.from_pretrained(pipe_dir, torch_dtype=torch.float32)
    t2v = WanPipeline.from_pretrained(pipe_dir, torch_dtype=torch.float32)  # TI2V's I2V mode: same parts
    return WanImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                   scheduler=t2v.scheduler, transformer=t2v.transformer, expand_timesteps=True)


# -- 1. the cached conditioning is the pipeline's -----------------------------------------------

@pytest.mark.parametrize("kind, last", [("i2v-2.1", False), ("i2v-2.2", True), ("ti2v", False)])
def test_cached_conditioning_equals_prepare_latents_and_encode_image(root, pipes, clips, kind, last):
    from PIL import Image

    ds = clip_ds(clips, i2v=True, last_image=last)
    cfg, prepared = prepared_for(config(root, pipes(kind), kind, "prep", datasets=[ds],
                                        model={"experts": "high"} if kind == "i2v-2.2" else None))
    pipe = i2v_pipeline(pipes(kind), kind)
    assert prepared.entries
    for entry in prepared.entries:
        cached = prepared.store.load(LATENTS, entry.latent_key)
        px = load_video_clip(entry.source, 9, 16, 32, 32)  # the clip as cached: (3, F, H, W) in [-1, 1]
        first, final = px[:, 0][None], px[:, -1][None]
        out = pipe.prepare_latents(first, 1, pipe.vae.config.z_dim, 32, 32, 9, torch.float32, "cpu",
                                   torch.Generator().manual_seed(0), None, final if last else None)
        if kind == "ti2v":
            assert set(cached) == {"latents", "first_frame"}
            assert torch.equal(cached["first_frame"], out[1][0])  # (48, 1, H', W'): the first frame alone
            continue
        assert torch.equal(cached["condition"], out[1][0])  # (4 + 16, F', H', W'): mask then latents
        assert cached["condition"][:4, 0].eq(1).all() and cached["condition"][:4, 1].eq(0).all()
        if kind == "i2v-2.1":
            u8 = ((first[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            ref = pipe.encode_image(Image.fromarray(u8), "cpu")  # the same frame, as a user hands it over
            assert cached["image_embeds"].shape == ref.shape and torch.equal(cached["image_embeds"], ref)
        else:
            assert "image_embeds" not in cached  # Wan 2.2 I2V has no image encoder: none is built
            assert cached["condition"][3, -1].eq(1).all()  # last_image marks the last pixel frame


def test_text_to_video_data_on_an_i2v_model_is_refused(root, pipes, clips, capsys):
    cfg = config(root, pipes("i2v-2.1"), "i2v-2.1", "refused", datasets=[clip_ds(clips, i2v=False)])
    assert cli_main([str(write(root, "refused", cfg))]) == 2
    err = capsys.readouterr().err
    assert "dataset 'clips': i2v = false, but this model is image-to-video" in err


def test_validation_size_off_the_wan22_vae_stride_is_refused(root, pipes, clips, capsys):
    cfg = config(root, pipes("ti2v"), "ti2v", "stride", datasets=[clip_ds(clips)],
                 validation={"every": 1, "prompts": ["a red cat"], "resolution": "48x32"})
    assert cli_main([str(write(root, "stride", cfg))]) == 2
    assert "validation.resolution = '48x32': this model needs sides in multiples of 32" in capsys.readouterr().err


# -- 3 and 4. validation equals diffusers' pipelines ---------------------------------------------

def our_experts(pipe_dir, kind):
    high = from_pretrained(pipe_dir, subfolder="transformer", torch_dtype=torch.float32)
    low = from_pretrained(pipe_dir, subfolder="transformer_2", torch_dtype=torch.float32) \
        if kind in ("i2v-2.2", "t2v-a14b") else None
    return high, low


@pytest.mark.parametrize("kind, trained", [("i2v-2.1", None), ("i2v-2.2", "high"), ("t2v-a14b", "low"),
                                           ("ti2v", None), ("ti2v-t2v", None)])
def test_validation_latents_equal_the_pipeline(root, pipes, clips, frames, kind, trained):
    from diffusers import WanPipeline
    from PIL import Image

    from vidtune.train.validate import Validator

    i2v = kind != "t2v-a14b" and kind != "ti2v-t2v"
    kind = kind.removesuffix("-t2v")
    model = {"experts": trained} if trained else {}
    validation = {"every": 1, "load_other_stage": trained is not None}
    validation.update({"dataset": "frames"} if i2v else {"prompts": ["a red cat"]})
    cfg, prepared = prepared_for(config(root, pipes(kind), kind, "val", model=model, validation=validation,
                                        datasets=[clip_ds(clips, i2v=i2v or None), frames_ds(frames)]))
    v = Validator(cfg, prepared, torch.device("cpu"), root / "val-run", log=lambda m: None)
    assert len(v.prompts) == 1
    name, _, (pe, _), cond = v.prompts[0]  # (name, prompt, (embeddings, attention mask: None for Wan), cond)
    high, low = our_experts(pipes(kind), kind)
    trained_model = low if trained == "low" else high
    transformer, transformer_2 = v.experts(trained_model)  # load_other_stage: the other one, frozen
    if trained:
        assert transformer_2 is not None and (transformer is trained_model) == (trained == "high")
    scfg = load_scheduler_config(pipes(kind))
    got = sample(transformer, prompt_embeds=pe, negative_prompt_embeds=v.negative[0], num_frames=5, height=32,
                 width=64, steps=4, guidance=4.5, seed=11, scheduler="unipc", scheduler_config=scfg,
                 vae=v.vae, output_type="latent", **v.sample_inputs(transformer_2, cond))

    pipe = i2v_pipeline(pipes(kind), kind) if i2v else WanPipeline.from_pretrained(pipes(kind))
    pipe.scheduler = make_scheduler("unipc", None, scfg)
    calls = {}
    for m in (pipe.transformer, getattr(pipe, "transformer_2", None)):
        if m is not None:
            m.register_forward_hook(lambda mod, *a: calls.__setitem__(id(mod), calls.get(id(mod), 0) + 1))
    # The prompt embeddings are the cached ones (equal to WanPipeline.encode_prompt's: test_sampler.py);
    # WanImageToVideoPipeline's own prompt cleaning needs ftfy unconditionally.
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=v.negative[0], num_frames=5, height=32, width=64,
              num_inference_steps=4, guidance_scale=4.5, generator=torch.Generator().manual_seed(11),
              output_type="latent")
    if i2v:
        kw["image"] = Image.open(frames / "cat.png")
    ref = pipe(**kw).frames
    assert got.shape == ref.shape
    assert rel(got, ref) < 1e-5
    if trained:  # both experts denoised part of the trajectory
        assert len(calls) == 2 and all(n > 0 for n in calls.values())


# -- end to end through vidtune-train ------------------------------------------------------------

def test_wan21_i2v_trains_and_its_lora_loads_with_image_keys(root, pipes, clips, frames):
    from diffusers import WanImageToVideoPipeline

    kind = "i2v-2.1"
    cfg = config(root, pipes(kind), kind, "run21", datasets=[clip_ds(clips), frames_ds(frames)],
                 adapter={"export_format": "both"},
                 validation={"every": 2, "dataset": "frames", "steps": 2, "baseline": False})
    assert cli_main([str(write(root, "run21", cfg))]) == 0
    out = root / "run21"
    assert len(loss_values(out)) == 2 and (out / "validation" / "step_000002" / "cat.mp4").is_file()
    with safe_open(out / WAN_FILE, "pt") as f:
        assert "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight" in f.keys()
    weights = load_file(checkpoint_dirs(out / "checkpoints")[-1] / "weights.safetensors")
    ours = from_pretrained(pipes(kind), torch_dtype=torch.float32)
    apply_lora(ours, AdapterConfig(rank=4, alpha=4.0, target_modules=TARGETS))
    assert not ours.load_state_dict(weights, strict=False).unexpected_keys
    x, t, ctx, img = torch.randn(1, 36, 3, 4, 4), torch.tensor([600.0]), torch.randn(1, 512, 32), torch.randn(1, 5, 16)
    with torch.no_grad():
        ref = ours.eval()(x, t, ctx, img)
    for name in (DIFFUSERS_FILE, WAN_FILE):
        pipe = WanImageToVideoPipeline.from_pretrained(pipes(kind))
        pipe.load_lora_weights(str(out / name))
        with torch.no_grad():
            theirs = pipe.transformer(x, t, ctx, img, return_dict=False)[0]
        assert rel(theirs, ref) < 1e-5, name


def test_two_expert_single_runs_and_timestep_ranges(root, pipes, clips, capsys):
    from vidtune.adapters import export_lora
    from vidtune.train.trainer import Run

    # A Wan 2.1 I2V LoRA (with image cross-attention) to start from: its k_img / v_img are left out.
    wan21 = from_pretrained(pipes("i2v-2.1"), torch_dtype=torch.float32)
    adapter = AdapterConfig(rank=4, alpha=4.0, target_modules=TARGETS)
    apply_lora(wan21, adapter)
    lora21 = export_lora(wan21, root / "wan21_i2v_lora.safetensors", adapter, "wan")
    kind = "t2v-a14b"
    base = config(root, pipes(kind), kind, "a14b-low", model={"experts": "low"}, datasets=[clip_ds(clips)],
                  validation={"every": 2, "prompts": ["a red cat"], "steps": 2, "load_other_stage": True,
                              "resolution": "32x32", "baseline": False}, adapter={"init_from": str(lora21)})
    assert cli_main([str(write(root, "a14b-low", base))]) == 0
    assert "4 image-branch module(s) (cross-attention k_img / v_img, img_emb) left out" in capsys.readouterr().out
    meta = safe_open(root / "a14b-low" / WAN_FILE, "pt").metadata()  # the default: one file, original keys
    assert meta["vidtune.expert"] == "low"
    for expert in ("high", "low"):
        cfg, prepared = prepared_for({**base, "model": {**base["model"], "experts": expert}, "validation": {},
                                      "adapter": {**base["adapter"], "init_from": None}})
        run = Run(cfg, prepared, log=lambda m: None)
        assert run.boundary == 0.875  # from the pipeline's model_index.json
        s = run.draw_sigmas(10_000, 4)
        assert ((s >= 0.875) == (expert == "high")).all()
        # the right subfolder: transformer/ is the high-noise expert, transformer_2/ the low-noise one
        sub = "transformer" if expert == "high" else "transformer_2"
        ref = load_file(pipes(kind) / sub / "diffusion_pytorch_model.safetensors")["blocks.0.attn1.to_q.weight"]
        assert torch.equal(run.model.blocks[0].attn1.to_q.base_layer.weight, ref)


def test_ti2v_trains_text_and_image_to_video(root, pipes, clips, frames):
    kind = "ti2v"
    cfg = config(root, pipes(kind), kind, "ti2v", datasets=[
        clip_ds(clips), {**clip_ds(clips, i2v=True), "id": "clips-i2v"}, frames_ds(frames)],
        validation={"every": 3, "dataset": "frames", "prompts": ["a blue dog"], "steps": 2, "baseline": False},
        train={"max_train_steps": 3, "seed": 2})
    assert cli_main([str(write(root, "ti2v", cfg))]) == 0
    out = root / "ti2v"
    assert len(loss_values(out)) == 3
    assert sorted(p.name for p in (out / "validation" / "step_000003").glob("*.mp4")) == ["a_blue_dog.mp4", "cat.mp4"]
    # The loader (as the trainer seeds it) drew both datasets: a text-to-video and an image-to-video step.
    from vidtune.data import CachedLoader

    _, prepared = prepared_for(cfg)
    loader = CachedLoader(prepared, 1, seed=2, caption_dropout=0.1)
    batches = [next(loader) for _ in range(3)]
    assert {b.dataset_ids[0] for b in batches} == {"clips", "clips-i2v"}
    assert all(("first_frame" in b.cond) == (b.dataset_ids[0] == "clips-i2v") for b in batches)


# -- experts = "both": one run, two adapters, the idle expert offloaded; killed and resumed bitwise

BOTH = ["train.max_train_steps=6", "train.checkpoint_every=2", "train.caption_dropout=0.3", "adapter.dropout=0.1",
        'train.timestep_sampling="shift"', "train.flow_shift=8.0",  # about half the steps for each expert
        "ema.enabled=true", 'memory.offload.type="block_level"', 'memory.offload.backend="python"',
        'adapter.export_format="both"', 'train.lr_scheduler="cosine"', "train.lr_warmup_steps=2"]


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_both_experts_killed_and_resumed_bitwise(root, pipes, clips):
    import os
    import signal
    import subprocess
    import sys
    import time

    kind = "i2v-2.2"
    cfg = config(root, pipes(kind), kind, "both-ref", model={"experts": "both"}, datasets=[clip_ds(clips)])
    assert cli_main([str(write(root, "both-ref", cfg))] + sets(BOTH)) == 0
    ref, out = root / "both-ref", root / "both-killed"
    reference = loss_values(ref)
    assert len(reference) == 6

    killed = write(root, "both-killed", {**cfg, "train": {**cfg["train"], "output_dir": str(out)}})
    proc = subprocess.Popen([sys.executable, "-m", "vidtune.cli.train", str(killed), *sets(BOTH)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(loss_values(out)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= len(loss_values(out)) < 6, "the run ended before it was killed"
    assert cli_main([str(killed)] + sets(BOTH + ['train.resume="latest"'])) == 0
    assert [float.hex(v) for v in loss_values(out)] == [float.hex(v) for v in reference]
    names = [f"{stem}_{e}_noise.safetensors" for stem in ("pytorch_lora_weights", "wan_lora") for e in ("high", "low")]
    for name in names + [f"ema/{n}" for n in names]:
        a, b = load_file(out / name), load_file(ref / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # Both experts trained (a LoRA's B starts at zero), each into its own file.
    weights = load_file(checkpoint_dirs(out / "checkpoints")[-1] / "weights.safetensors")
    for e in ("high", "low"):
        assert any(v.abs().sum() > 0 for k, v in weights.items() if k.startswith(f"{e}.") and "lora_B" in k), e
    with safe_open(out / "wan_lora_low_noise.safetensors", "pt") as f:
        assert not any("k_img" in k or "v_img" in k for k in f.keys())  # Wan 2.2 I2V has no image branch
        assert f.metadata()["vidtune.expert"] == "low"

    # Each file loads in diffusers into its expert (load_into_transformer_2 for the low-noise one).
    from diffusers import WanImageToVideoPipeline

    x, t, ctx = torch.randn(1, 36, 3, 4, 4), torch.tensor([600.0]), torch.randn(1, 512, 32)
    for stem in ("pytorch_lora_weights", "wan_lora"):
        pipe = WanImageToVideoPipeline.from_pretrained(pipes(kind))
        pipe.load_lora_weights(str(out / f"{stem}_high_noise.safetensors"))
        pipe.load_lora_weights(str(out / f"{stem}_low_noise.safetensors"), load_into_transformer_2=True)
        for e, sub, theirs_model in (("high", "transformer", pipe.transformer), ("low", "transformer_2", pipe.transformer_2)):
            ours = from_pretrained(pipes(kind), subfolder=sub, torch_dtype=torch.float32)
            apply_lora(ours, AdapterConfig(rank=4, alpha=4.0, target_modules=TARGETS))
            mine = {k[len(e) + 1:]: v for k, v in weights.items() if k.startswith(f"{e}.")}
            assert not ours.load_state_dict(mine, strict=False).unexpected_keys
            with torch.no_grad():
                assert rel(theirs_model(x, t, ctx, return_dict=False)[0], ours.eval()(x, t, ctx)) < 1e-5, (stem, e)


def test_both_experts_share_one_slot_pool_and_park_the_idle_one(root, pipes, clips):
    from vidtune.train.experts import ExpertsRun

    kind = "i2v-2.2"
    cfg, prepared = prepared_for(config(
        root, pipes(kind), kind, "both-mem", model={"experts": "both"}, datasets=[clip_ds(clips)],
        memory={"offload": {"type": "block_level", "backend": "python", "blocks_per_group": 1}},
        train={"timestep_sampling": "shift", "flow_shift": 8.0}))
    run = ExpertsRun(cfg, prepared, log=lambda m: None)
    offs = {n: e.model._vidtune_group_offload for n, e in run.experts.items()}
    assert offs["high"].streamer is offs["low"].streamer and offs["high"].streamer.num_slots == 2
    seen = set()
    for _ in range(6):
        run.train_step()
        seen.add(run.active.name)
        idle = "low" if run.active.name == "high" else "high"
        assert offs[idle].resident_groups() == []  # the idle expert holds no slot
        assert offs[run.active.name].resident_groups()
        assert all(p.grad is None for p in run.experts[idle].trainable.values())
    assert seen == {"high", "low"}
