"""Validation during training: sample the validation prompts with the model being trained.

Prompt embeddings go through the same text cache as the captions: the data preparation encodes
``validation_texts`` with the captions, while the text encoder is loaded anyway, so the loop
never holds a text encoder. The VAE is loaded once and waits on the CPU between validations.
Sampling is ``vidtune.sample.sample`` (WanPipeline's loop): the model in eval mode, so no
TREAD routing and no dropout. Outputs per prompt: ``<run>/validation/step_XXXXXX/<name>.mp4``
and ``<name>.png`` (contact sheet titled with the prompt and step, frames numbered), ``<name>`` the
prompt's library nickname or a slug of its text; with EMA, the EMA weights' are ``<name>_ema.*``.
Per step, ``<run>/validation/step_XXXXXX.png`` puts every prompt (and variant) side by side.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..config import Config, ConfigError, ValidationConfig
from ..data.cache import pad_prompt_embeds
from ..data.prepare import TEXT
from ..runtime import DTYPES
from ..sample import load_prompts, load_scheduler_config, sample, save_comparison_sheet, save_outputs
from ..sample.sampler import safe_name
from ..sample.sheets import frame_indices


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
        embed = {t: pad_prompt_embeds([store.load(TEXT, keys[t])["prompt_embeds"]])
                 for t in validation_texts(self.v)}
        self.prompts = [(name, text, embed[text]) for name, text in validation_prompts(self.v)]
        self.negative = embed[self.v.negative_prompt]
        m = cfg.model
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
        v, outputs, shown = self.v, {}, []
        numbers = frame_indices(v.num_frames)
        self.vae.to(self.device)
        try:
            for suffix, e in self.variants(ema):
                weights = " (EMA weights)" if suffix else ""
                with e.swapped_in() if e is not None else contextlib.nullcontext():
                    for name, text, pe in self.prompts:
                        frames = sample(model, prompt_embeds=pe, negative_prompt_embeds=self.negative,
                                        num_frames=v.num_frames, height=self.height, width=self.width,
                                        steps=v.steps, guidance=v.guidance, seed=v.seed, scheduler=v.scheduler,
                                        scheduler_config=self.scheduler_config, skip_layers=v.skip_layers,
                                        skip_layers_start=v.skip_layers_start, skip_layers_stop=v.skip_layers_stop,
                                        skip_layers_scale=v.skip_layers_scale, device=self.device, vae=self.vae,
                                        output_type="video")
                        tag = safe_name(name) + suffix
                        title = [f"{name}: {text}", f"step {step}{weights}, seed {v.seed}, {v.steps} sampling steps"]
                        outputs[tag] = save_outputs(frames[0], out_dir, tag, self.fps, title)
                        # the sheet's frames only, not the whole video, until the step's comparison
                        shown.append((f"{name}{weights}", frames[0][numbers]))
        finally:
            self.vae.to("cpu")
        save_comparison_sheet(shown, numbers, self.root / f"{out_dir.name}.png",
                              [f"validation at step {step}: {len(shown)} video(s), seed {v.seed}"])
        self.log(f"validation: step {step}: {len(outputs)} video(s) in {out_dir}, side by side in "
                 f"{out_dir.name}.png")
        return outputs
