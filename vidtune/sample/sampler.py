"""Validation sampling with our transformer and diffusers' flow schedulers.

``sample`` reproduces ``diffusers.WanPipeline.__call__`` step for step so that the same seed,
scheduler config, CFG scale and step count give the same latents (tests/integration/
test_sampler.py checks it against the real pipeline for UniPC and flow-match Euler):

- noise: ``randn_tensor`` of shape (B, C, (F-1)//4+1, H//8, W//8) in fp32 from a
  ``torch.Generator(generator_device).manual_seed(seed)``, exactly ``WanPipeline.prepare_latents``;
- ``scheduler.set_timesteps(steps)`` then ``set_begin_index(0)``;
- per step a conditional and (when ``guidance > 1``) a separate unconditional forward on the
  latents cast to the transformer dtype, ``uncond + guidance * (cond - uncond)``, then
  ``scheduler.step`` on the fp32 latents.

Two experts (Wan 2.2 A14B) switch like ``WanPipeline`` with ``transformer_2``: steps with
``t >= boundary_ratio * num_train_timesteps`` run ``transformer`` (high noise), the others
``transformer_2``. Image-to-video inputs follow ``WanImageToVideoPipeline``: ``condition`` (mask +
first-frame latents) is concatenated to the latents; ``image_embeds`` is the CLIP context; with
``expand_timesteps`` (TI2V-5B) every token gets its own timestep and ``first_frame`` (the clean
first latent frame) replaces latent frame 0 at t = 0, before every step and in the result.

Skip-layer guidance (SLG) follows diffusers' StableDiffusion3Pipeline: on steps ``i`` with
``skip_layers_start <= i / steps <= skip_layers_stop`` one more conditional forward runs with
``skip_layers=...`` and ``noise_pred += (cond - cond_skip) * skip_layers_scale`` (SimpleTuner's
``validation_guidance_skip_scale``, default 2.8). Unlike SD3 it is applied with or without CFG.
SimpleTuner's own Wan pipeline does something else (it drops the layers from the unconditional
pass, outside the window); we keep the SD3 form because it is the documented one and leaves the
CFG terms untouched.

Decoding un-normalises like WanPipeline (``latents / (1/std) + mean``) and returns uint8 frames.
``save_video`` writes mp4 with torchcodec's encoder (ffmpeg through a pipe when torchcodec cannot
be imported), ``save_contact_sheet`` a PNG of labelled frames and ``save_comparison_sheet`` one
that compares videos row by row (``vidtune.sample.sheets``); all write atomically.
"""
from __future__ import annotations

import inspect
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..fsutil import atomic_path

log = logging.getLogger(__name__)

# Wan's published scheduler (Wan2.1-T2V-*-Diffusers/scheduler/scheduler_config.json): UniPC with
# flow sigmas; used when the pipeline directory has no scheduler/ to read.
WAN_UNIPC_CONFIG = dict(
    num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True,
    flow_shift=3.0, predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
    timestep_spacing="linspace", steps_offset=0,
)
SCHEDULERS = ("unipc", "euler")


# ---------------------------------------------------------------------------------------------
# Prompts.

def prompt_slug(text: str, max_chars: int = 48) -> str:
    """A file name from a prompt: its first words (any script), lower case, joined by ``_``."""
    words = re.findall(r"\w+", text.lower())
    slug = ""
    for w in words:
        if slug and len(slug) + 1 + len(w) > max_chars:
            break
        slug = f"{slug}_{w}" if slug else w[:max_chars]
    return slug


def load_prompts(prompts: Sequence[str] = (), library: str | Path | dict | None = None) -> list[tuple[str, str]]:
    """[(name, prompt)]: the listed prompts named by a slug of their text (``a_red_cat``; a second
    prompt with the same slug gets ``_2``...), then the library's ``{nickname: prompt}`` entries
    (a JSON file or a dict) in file order."""
    out, used = [], {}
    for i, p in enumerate(prompts):
        slug = prompt_slug(p) or f"prompt{i}"
        used[slug] = used.get(slug, 0) + 1
        out.append((slug if used[slug] == 1 else f"{slug}_{used[slug]}", p))
    if library is not None:
        where = "prompt library" if isinstance(library, dict) else str(library)
        if not isinstance(library, dict):
            try:
                library = json.loads(Path(library).read_text())
            except FileNotFoundError:
                raise FileNotFoundError(f"{where}: no such prompt library file") from None
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON: {exc}") from None
        if not isinstance(library, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in library.items()):
            raise ValueError(f"{where}: expected a JSON object {{\"nickname\": \"prompt\", ...}}")
        out += list(library.items())
    seen = set()
    for name, _ in out:
        if safe_name(name) in seen:
            raise ValueError(f"validation prompt name {name!r} is used twice (file names must be unique)")
        seen.add(safe_name(name))
    return out


def safe_name(name: str) -> str:
    """A file-system-safe version of a prompt nickname (letters of any script, digits, ``._-``)."""
    return re.sub(r"_+", "_", re.sub(r"[^\w.-]", "_", name)).strip("._") or "prompt"


# ---------------------------------------------------------------------------------------------
# Schedulers.

def load_scheduler_config(pipeline: str | Path) -> dict | None:
    """The ``scheduler/scheduler_config.json`` of a pipeline dir or hub id; None when absent."""
    p = Path(pipeline).expanduser()
    if p.is_dir():
        f = p / "scheduler" / "scheduler_config.json"
        return json.loads(f.read_text()) if f.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(pipeline), "scheduler_config.json",
                                               subfolder="scheduler")).read_text())
    except Exception as exc:  # offline, no such file: the Wan default is still right for Wan
        log.info("no scheduler config from %s (%s); using Wan's UniPC defaults", pipeline, exc)
        return None


def make_scheduler(kind: str = "unipc", flow_shift: float | None = None, config: dict | None = None):
    """A fresh diffusers scheduler: ``unipc`` (UniPCMultistepScheduler with flow sigmas, Wan's
    default) or ``euler`` (FlowMatchEulerDiscreteScheduler). ``config`` (e.g. from
    ``load_scheduler_config``) supplies the other settings, whichever class wrote it;
    ``flow_shift`` (None: the config's) becomes UniPC's ``flow_shift`` or Euler's ``shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler {kind!r}: choose one of {SCHEDULERS}")
    cfg = {k: v for k, v in (config or WAN_UNIPC_CONFIG).items() if not k.startswith("_")}
    src_shift = cfg.get("flow_shift", cfg.get("shift", 3.0))
    shift = float(src_shift if flow_shift is None else flow_shift)
    if kind == "unipc":
        cls = UniPCMultistepScheduler
        if config is None or config.get("_class_name") != cls.__name__:
            # Settings from another class (or none): UniPC must predict flow with flow sigmas.
            cfg = {**WAN_UNIPC_CONFIG, **{k: v for k, v in cfg.items() if k == "num_train_timesteps"}}
        cfg.update(flow_shift=shift, prediction_type="flow_prediction", use_flow_sigmas=True)
    else:
        cls = FlowMatchEulerDiscreteScheduler
        cfg["shift"] = shift
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in cfg.items() if k in accepted})


# ---------------------------------------------------------------------------------------------
# Sampling.

def _model_dtype(transformer) -> torch.dtype:
    if isinstance(getattr(transformer, "dtype", None), torch.dtype):
        return transformer.dtype
    pe = getattr(transformer, "patch_embedding", None)
    if pe is not None:
        return pe.weight.dtype
    return next(p.dtype for p in transformer.parameters() if p.is_floating_point())


def _vae_scale_factors(vae) -> tuple[int, int]:
    """(temporal, spatial) compression like WanPipeline: the VAE config's, else Wan's 4 and 8."""
    if vae is None:
        return 4, 8
    return vae.config.scale_factor_temporal, vae.config.scale_factor_spatial


def initial_latents(batch: int, channels: int, num_frames: int, height: int, width: int, seed: int,
                    device, generator_device="cpu", vae=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The starting noise, exactly ``WanPipeline.prepare_latents`` with a seeded generator (or
    ``generator`` as it is, when the caller goes on drawing from it)."""
    from diffusers.utils.torch_utils import randn_tensor

    ft, sp = _vae_scale_factors(vae)
    shape = (batch, channels, (num_frames - 1) // ft + 1, int(height) // sp, int(width) // sp)
    generator = generator or torch.Generator(generator_device).manual_seed(int(seed))
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)


def check_sampling(output_type: str, vae, guidance: float, negative) -> bool:
    """Errors for a sampling call that cannot run; returns whether CFG runs (the pipelines'
    ``do_classifier_free_guidance``: guidance > 1)."""
    if output_type not in ("latent", "video"):
        raise ValueError(f"output_type {output_type!r}: choose 'latent' or 'video'")
    if output_type == "video" and vae is None:
        raise ValueError("output_type='video' needs the VAE (vae=AutoencoderKLWan)")
    if guidance > 1.0 and negative is None:
        raise ValueError(f"guidance {guidance} > 1 runs CFG and needs negative prompt embeddings")
    return guidance > 1.0


@torch.no_grad()
def sample(
    transformer,
    *,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None = None,
    num_frames: int,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    seed: int,
    scheduler="unipc",
    flow_shift: float | None = None,
    scheduler_config: dict | None = None,
    skip_layers: Sequence[int] = (),
    skip_layers_start: float = 0.0,
    skip_layers_stop: float = 1.0,
    skip_layers_scale: float = 2.8,
    generator_device: str = "cpu",
    device: str | torch.device | None = None,
    vae=None,
    output_type: str = "latent",
    latents: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    transformer_2=None,
    boundary_ratio: float | None = None,
    condition: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    first_frame: torch.Tensor | None = None,
    expand_timesteps: bool = False,
    extra: dict | None = None,
    extra_uncond: dict | None = None,
):
    """Sample videos for ``prompt_embeds`` (B, L, D) (padded like ``WanPipeline.encode_prompt``).

    scheduler: "unipc" | "euler" (built by ``make_scheduler`` from ``scheduler_config`` and
    ``flow_shift``) or a ready diffusers scheduler instance (used as is). CFG runs when
    ``guidance > 1`` and needs ``negative_prompt_embeds``. ``device``: where the forward runs
    (default: the transformer's first parameter's device). ``callback(i, latents)`` after each
    step (streaming previews). ``output_type``: "latent" returns the fp32 latents (B, C, F', H', W')
    before decoding; "video" decodes with ``vae`` and returns uint8 frames (B, F, 3, H, W).
    ``transformer_2`` + ``boundary_ratio``: the low-noise expert and where it takes over.
    ``condition`` (B, 4 + C, F', H', W'), ``image_embeds`` (B, tokens, D), ``first_frame``
    (B, C, 1, H', W') and ``expand_timesteps``: the image-to-video inputs (module docstring).
    ``extra`` / ``extra_uncond``: keyword inputs of the conditional / unconditional forward (Wan S2V's
    audio and reference latents; the unconditional pass takes ``extra`` when not given its own).
    """
    cfg_on = check_sampling(output_type, vae, guidance, negative_prompt_embeds)
    if not 0.0 <= skip_layers_start <= skip_layers_stop <= 1.0:
        raise ValueError("skip-layer guidance needs 0 <= skip_layers_start <= skip_layers_stop <= 1")
    if isinstance(scheduler, str):
        scheduler = make_scheduler(scheduler, flow_shift, scheduler_config)

    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    dtype = _model_dtype(transformer)
    cond = prompt_embeds.to(device, dtype)
    uncond = negative_prompt_embeds.to(device, dtype) if cfg_on else None
    batch = cond.shape[0]
    if uncond is not None and uncond.shape[0] != batch:
        uncond = uncond.expand(batch, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond
    channels = transformer.config.out_channels  # the latents' (in_channels also counts I2V conditioning)
    if (transformer_2 is None) != (boundary_ratio is None):
        raise ValueError("two experts need both transformer_2 and boundary_ratio")
    if condition is not None:
        condition = condition.to(device, torch.float32)
    if image_embeds is not None:
        image_embeds = image_embeds.to(device, dtype)

    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    if latents is None:
        latents = initial_latents(batch, channels, num_frames, height, width, seed, device,
                                  generator_device, vae)
    else:
        latents = latents.to(device, torch.float32)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)

    extra = extra or {}
    extra_uncond = extra if extra_uncond is None else extra_uncond
    if image_embeds is not None:  # Wan 2.1 I2V's CLIP context goes to both passes, like the pipeline
        extra = {**extra, "encoder_hidden_states_image": image_embeds}
        extra_uncond = {**extra_uncond, "encoder_hidden_states_image": image_embeds}
    mask = None
    if expand_timesteps:  # per-token timesteps; 0 where the clean first frame conditions
        mask = torch.ones(1, 1, *latents.shape[2:], device=device)
        if first_frame is not None:
            first_frame = first_frame.to(device, torch.float32)
            mask[:, :, 0] = 0
    boundary_t = None if boundary_ratio is None else boundary_ratio * scheduler.config.num_train_timesteps
    models = [m for m in (transformer, transformer_2) if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()  # no TREAD routes, no dropout while sampling
    patch = transformer.config.patch_size
    try:
        for i, t in enumerate(timesteps):
            model = transformer if boundary_t is None or t >= boundary_t else transformer_2
            x = latents
            if mask is not None:
                if first_frame is not None:
                    x = (1 - mask) * first_frame + mask * latents
                timestep = (mask[0, 0][:, ::patch[1], ::patch[2]] * t).flatten().unsqueeze(0).expand(batch, -1)
            else:
                timestep = t.expand(batch)
            if condition is not None:
                x = torch.cat([latents, condition], dim=1)
            x = x.to(dtype)
            noise_pred = model(x, timestep, cond, **extra)
            cond_pred = noise_pred
            if cfg_on:
                noise_uncond = model(x, timestep, uncond, **extra_uncond)
                noise_pred = noise_uncond + guidance * (noise_pred - noise_uncond)
            if skip_layers and skip_layers_start <= i / steps <= skip_layers_stop:
                cond_skip = model(x, timestep, cond, skip_layers=tuple(skip_layers), **extra)
                noise_pred = noise_pred + (cond_pred - cond_skip) * skip_layers_scale
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if callback is not None:
                callback(i, latents)
    finally:
        for m, training in zip(models, was_training):
            m.train(training)
    if first_frame is not None and mask is not None:
        latents = (1 - mask) * first_frame + mask * latents
    if output_type == "latent":
        return latents
    return decode(vae, latents)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, z, F', H', W') -> uint8 frames (B, F, 3, H, W), un-normalised with
    the VAE's latents_mean/std exactly like WanPipeline, rounded like diffusers' numpy_to_pil."""
    vdev = next(vae.parameters()).device
    z = latents.to(vdev, vae.dtype)
    zd = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, zd, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, zd, 1, 1, 1).to(z.device, z.dtype)
    video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
    video = (video.float() / 2 + 0.5).clamp(0, 1)
    return (video * 255).round().to(torch.uint8).permute(0, 2, 1, 3, 4).cpu().contiguous()


# ---------------------------------------------------------------------------------------------
# Writing results.

def save_video(frames: torch.Tensor, path: str | Path, fps: int = 16, audio: torch.Tensor | None = None,
               sample_rate: int = 16000) -> Path:
    """Write uint8 frames (F, 3, H, W) as an H.264 mp4 (yuv420p; odd sizes are padded by one
    pixel, which yuv420p needs). torchcodec encodes; ffmpeg through a pipe if it is missing.
    ``audio``: mono samples at ``sample_rate``, muxed in as the soundtrack (AAC; torchcodec)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = frames.to("cpu", torch.uint8).contiguous()
    f, _, h, w = frames.shape
    if h % 2 or w % 2:
        frames = torch.nn.functional.pad(frames, (0, w % 2, 0, h % 2), mode="replicate")
    try:
        from torchcodec.encoders import VideoEncoder
    except ImportError:
        VideoEncoder = None
    with atomic_path(path) as tmp:
        if audio is not None:
            _encode_with_audio(frames, audio, tmp, fps, sample_rate)
        elif VideoEncoder is not None:
            VideoEncoder(frames, frame_rate=fps).to_file(tmp, codec="libx264", pixel_format="yuv420p")
        else:
            _ffmpeg_encode(frames, tmp, fps)
    return path


def _encode_with_audio(frames: torch.Tensor, audio: torch.Tensor, path: Path, fps: int, sample_rate: int) -> None:
    from torchcodec.encoders import Encoder

    enc = Encoder()
    video = enc.add_video(height=frames.shape[2], width=frames.shape[3], frame_rate=fps, codec="libx264",
                          pixel_format="yuv420p")
    sound = enc.add_audio(sample_rate=sample_rate, num_channels=1)
    with enc.open_file(path):
        video.add_frames(frames)
        sound.add_samples(audio.reshape(1, -1).float().cpu())


def _ffmpeg_encode(frames: torch.Tensor, path: Path, fps: int) -> None:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("saving validation videos needs torchcodec or ffmpeg: pip install torchcodec "
                           "or sudo apt-get install -y ffmpeg")
    _, _, h, w = frames.shape
    raw = frames.permute(0, 2, 3, 1).contiguous().numpy().tobytes()  # rgb24, frame after frame
    subprocess.run([ffmpeg, "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(path)], input=raw, check=True)


def save_contact_sheet(frames: torch.Tensor, path: str | Path, max_frames: int = 8, columns: int = 4,
                       title: Sequence[str] = ()) -> Path:
    """A PNG of up to ``max_frames`` evenly spaced frames (F, 3, H, W uint8), first and last
    included, ``columns`` per row, each labelled with its frame number, under ``title`` lines."""
    from .sheets import contact_sheet

    return _save_png(contact_sheet(frames, title, max_frames, columns), path)


def save_comparison_sheet(videos: Sequence[tuple[str, torch.Tensor]], numbers: Sequence[int], path: str | Path,
                          title: Sequence[str] = ()) -> Path:
    """A PNG comparing videos (label, frames numbered ``numbers``): one labelled row each."""
    from .sheets import comparison_sheet

    return _save_png(comparison_sheet(videos, numbers, title), path)


def _save_png(image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def save_outputs(frames: torch.Tensor, out_dir: str | Path, name: str, fps: int = 16,
                 title: Sequence[str] = (), audio: torch.Tensor | None = None) -> tuple[Path, Path]:
    """``<out_dir>/<name>.mp4`` (with ``audio``, 16 kHz mono, as its soundtrack) and
    ``<out_dir>/<name>.png`` (contact sheet under ``title``) for one video (F, 3, H, W uint8)."""
    out_dir = Path(out_dir)
    stem = safe_name(name)
    return (save_video(frames, out_dir / f"{stem}.mp4", fps, audio),
            save_contact_sheet(frames, out_dir / f"{stem}.png", title=title))
