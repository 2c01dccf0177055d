"""Validation during training: sample the validation prompts with the model being trained.

Prompt embeddings go through the same text cache as the captions: the data preparation encodes
``validation_texts`` with the captions, while the text encoder is loaded anyway, so the loop
never holds a text encoder. The VAE is loaded once and waits on the CPU between validations.
Sampling is ``vidtune.sample.sample`` (WanPipeline's loop) or, for Sana Video,
``vidtune.sample.sample_sana`` (SanaVideoPipeline's loop with the pipeline's own scheduler; I2V
flavours condition on the first training clip's first frame): the model in eval mode, so no TREAD
routing and no dropout. Outputs per prompt: ``<run>/validation/step_XXXXXX/<name>.mp4``
and ``<name>.png`` (contact sheet); with EMA, the EMA weights' are ``<name>_ema.*``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..config import Config, ConfigError, ValidationConfig
from ..data.cache import pad_prompt_embeds
from ..data.prepare import LATENTS, TEXT
from ..models import family
from ..runtime import DTYPES
from ..sample import load_prompts, load_scheduler_config, sample, sample_sana, save_outputs
from ..sample.sampler import safe_name


def validation_prompts(v: ValidationConfig) -> list[tuple[str, str]]:
    try:
        prompts = load_prompts(v.prompts, v.prompt_library or None)  # "" (from --set): no library
    except (OSError, ValueError) as exc:
        raise ConfigError(f"validation.prompt_library: {exc}") from None
    if v.every > 0 and not prompts:
        raise ConfigError("validation.every > 0 needs validation.prompts or validation.prompt_library "
                          "(or set validation.every = 0)")
    return prompts


def validation_texts(v: ValidationConfig) -> list[str]:
    """Every text validation encodes: the prompts and the negative prompt."""
    return sorted({p for _, p in validation_prompts(v)} | {v.negative_prompt})


class Validator:
    """Everything validation needs, set up once before the loop."""

    def __init__(self, cfg: Config, prepared, device: torch.device, run_dir: Path, log=print):
        """``prepared``: the run's PreparedData, whose text cache holds ``validation_texts``."""
        from diffusers import AutoencoderKLWan

        self.v, self.device, self.log = cfg.validation, device, log
        self.root = Path(run_dir) / "validation"
        self.fps = cfg.model.resolved_fps()
        self.width, self.height = (int(x) for x in self.v.resolution.lower().split("x"))
        store, keys = prepared.store, prepared.text_keys
        missing = [t for t in validation_texts(self.v) if t not in keys]
        if missing:
            raise ConfigError(f"validation: {len(missing)} prompt(s) were not encoded with the data, e.g. "
                              f"{missing[0]!r}; prepare the data with this config's validation section")
        m = cfg.model
        self.family = m.family
        text_len = family(m.family).TEXT_LEN

        def text(key):  # (embeds (1, L, D), mask (1, L) or None)
            entry = store.load(TEXT, key)
            mask = entry.get("prompt_attention_mask")
            return pad_prompt_embeds([entry["prompt_embeds"]], text_len), None if mask is None else mask[None]

        embed = {t: text(keys[t]) for t in validation_texts(self.v)}
        self.prompts = [(name, embed[text]) for name, text in validation_prompts(self.v)]
        neg = self.v.negative_prompt
        self.negative = text(prepared.negative_keys[neg]) if neg in prepared.negative_keys else embed[neg]
        # I2V flavours condition on an image: the first training clip's first frame (cached latents).
        self.image_latents = None
        if prepared.entries and "image_latents" in store.load(LATENTS, prepared.entries[0].latent_key):
            self.image_latents = store.load(LATENTS, prepared.entries[0].latent_key)["image_latents"][None]
        self.vae = AutoencoderKLWan.from_pretrained(m.vae_path or m.resolved_path(), subfolder="vae",
                                                    torch_dtype=DTYPES[m.vae_dtype], revision=m.revision)
        self.vae.eval().requires_grad_(False)
        self.scheduler_config = load_scheduler_config(m.resolved_path())

    def due(self, step: int) -> bool:
        return self.v.every > 0 and step % self.v.every == 0

    def variants(self, ema) -> list[tuple[str, object]]:
        """(file suffix, EMA or None for the live weights) per pass, from ema.validation."""
        if ema is None:
            return [("", None)]
        mode = ema.cfg.validation
        return {"ema_only": [("_ema", ema)], "both": [("", None), ("_ema", ema)], "none": [("", None)]}[mode]

    @torch.no_grad()
    def run(self, model, step: int, ema=None) -> dict[str, tuple[Path, Path]]:
        """Sample every prompt (per variant); returns tag -> (mp4, png)."""
        out_dir = self.root / f"step_{step:06d}"
        v, outputs = self.v, {}
        self.vae.to(self.device)
        try:
            for suffix, e in self.variants(ema):
                with e.swapped_in() if e is not None else contextlib.nullcontext():
                    for name, (pe, mask) in self.prompts:
                        shape = dict(num_frames=v.num_frames, height=self.height, width=self.width, steps=v.steps,
                                     guidance=v.guidance, seed=v.seed, scheduler_config=self.scheduler_config,
                                     device=self.device, vae=self.vae, output_type="video")
                        if self.family == "sana_video":  # the pipeline's own scheduler
                            frames = sample_sana(model, prompt_embeds=pe, prompt_mask=mask,
                                                 negative_prompt_embeds=self.negative[0],
                                                 negative_mask=self.negative[1], image_latents=self.image_latents,
                                                 **shape)
                        else:
                            frames = sample(model, prompt_embeds=pe, negative_prompt_embeds=self.negative[0],
                                            scheduler=v.scheduler, skip_layers=v.skip_layers,
                                            skip_layers_start=v.skip_layers_start,
                                            skip_layers_stop=v.skip_layers_stop,
                                            skip_layers_scale=v.skip_layers_scale, **shape)
                        tag = safe_name(name) + suffix
                        outputs[tag] = save_outputs(frames[0], out_dir, tag, self.fps)
        finally:
            self.vae.to("cpu")
        self.log(f"validation: step {step}: {len(outputs)} video(s) in {out_dir}")
        return outputs
