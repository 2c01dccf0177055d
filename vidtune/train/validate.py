"""Validation during training: sample the validation prompts with the model being trained.

Prompt embeddings go through the same text cache as the captions: the data preparation encodes
``validation_texts`` with the captions, while the text encoder is loaded anyway, so the loop
never holds a text encoder. The VAE is loaded once and waits on the CPU between validations.
Sampling is ``vidtune.sample.sample`` (WanPipeline's loop) or, for Sana Video,
``vidtune.sample.sample_sana`` (SanaVideoPipeline's loop with the pipeline's own scheduler; I2V
flavours condition on the first training clip's first frame): the model in eval mode, so no TREAD
routing and no dropout. Outputs per prompt: ``<run>/validation/step_XXXXXX/<name>.mp4``
and ``<name>.png`` (contact sheet titled with the prompt and step, frames numbered), ``<name>`` the
prompt's library nickname or a slug of its text; with EMA, the EMA weights' are ``<name>_ema.*``.
Per step, ``<run>/validation/step_XXXXXX.png`` puts every prompt (and variant) side by side. Wan
S2V clips are driven by ``validation.reference_media`` (reference frame + audio), whose audio
becomes the mp4's soundtrack (``vidtune.sample.s2v``). With ``preview_every = K``, sampling steps
K, 2K, ... also write ``previews/<name>_stepNNN.png`` (``vidtune.sample.preview``: a linear
latent-to-RGB decode fitted once from this VAE); previews and contact sheets go to ``webhook_url``
when set.

Image-to-video (Wan): ``validation.dataset`` names an image dataset; each image (with its caption as
the prompt) is the first frame of one video, its conditioning cached by the data preparation
like a training clip's (WanImageToVideoPipeline's inputs). Two-expert checkpoints: a run training
both experts samples with both; ``load_other_stage`` loads the expert not trained (frozen,
through the build path, sharing the trained one's offload streamer) and switches to it at the
boundary, as WanPipeline does with ``transformer_2``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..build import expert_boundary, model_inputs
from ..config import Config, ConfigError, ValidationConfig
from ..data.cache import pad_prompt_embeds
from ..data.prepare import LATENTS, TEXT
from ..fsutil import atomic_write_bytes
from ..models import family
from ..runtime import DTYPES
from ..sample import load_prompts, load_scheduler_config, sample, sample_sana, save_comparison_sheet, save_outputs
from ..sample.preview import LatentRGB, Previewer, Webhook, fit_latent_rgb
from ..sample.s2v import sample_s2v
from ..sample.sampler import safe_name
from ..sample.sheets import frame_indices


def validation_prompts(v: ValidationConfig) -> list[tuple[str, str]]:
    try:
        prompts = load_prompts(v.prompts, v.prompt_library or None)  # "" (from --set): no library
    except (OSError, ValueError) as exc:
        raise ConfigError(f"validation.prompt_library: {exc}") from None
    if v.every > 0 and not prompts and not v.dataset:
        raise ConfigError("validation.every > 0 needs validation.prompts or validation.prompt_library "
                          "(or validation.dataset for image-to-video; or set validation.every = 0)")
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
        self.cfg, self.family = cfg, m.family
        text_len = family(m.family).TEXT_LEN

        def text(key):  # (embeds (1, L, D), mask (1, L) or None)
            entry = store.load(TEXT, key)
            mask = entry.get("prompt_attention_mask")
            return pad_prompt_embeds([entry["prompt_embeds"]], text_len), None if mask is None else mask[None]

        embed = {t: text(keys[t]) for t in validation_texts(self.v)}
        self.inputs = model_inputs(m)
        i2v = getattr(self.inputs, "i2v", None)
        # (name, prompt text, (prompt embeddings, mask or None), image-to-video conditioning)
        self.prompts = [(name, t, embed[t], {}) for name, t in validation_prompts(self.v)]
        if i2v == "concat" and not self.v.dataset:
            raise ConfigError("validation: this image-to-video model renders from first frames: set "
                              "validation.dataset to an image [[dataset]] (its captions are the prompts)")
        if i2v == "concat" and self.prompts:
            log(f"validation: {len(self.prompts)} prompt(s) without a first frame are not rendered by this "
                f"image-to-video model; the captions of validation.dataset are its prompts")
            self.prompts = []
        self.prompts += [(name, caption, text(tkey), store.load(LATENTS, lkey))
                         for name, caption, tkey, lkey in prepared.validation]
        self.expand = i2v == "first_frame"
        neg = self.v.negative_prompt
        self.negative = text(prepared.negative_keys[neg]) if neg in prepared.negative_keys else embed[neg]
        # I2V flavours of Sana Video condition on an image: the first training clip's first frame
        # (cached latents).
        self.image_latents = None
        if prepared.entries and "image_latents" in store.load(LATENTS, prepared.entries[0].latent_key):
            self.image_latents = store.load(LATENTS, prepared.entries[0].latent_key)["image_latents"][None]
        self.boundary = expert_boundary(m, log) if m.experts else None
        self.model_2 = None  # the low-noise expert, set by a run that trains both
        self._other = None  # the expert not trained, with load_other_stage
        self.vae = AutoencoderKLWan.from_pretrained(m.vae_path or m.resolved_path(), subfolder="vae",
                                                    torch_dtype=DTYPES[m.vae_dtype], revision=m.revision)
        self.vae.eval().requires_grad_(False)
        self.scheduler_config = load_scheduler_config(m.resolved_path())
        self.s2v = self._s2v_inputs(cfg, device) if m.family == "wan_s2v" else None
        self.prepared = prepared  # its cached latents fit the preview decode
        self.projection: LatentRGB | None = None
        self.webhook = Webhook(self.v.webhook_url, self.v.webhook_timeout, log) if self.v.webhook_url else None

    def latent_rgb(self) -> LatentRGB:
        """The preview decode: fitted once per run (least squares against this VAE's decodes of up
        to four cached training latents, their first two latent frames), kept in the run dir."""
        path = self.root / "latent_rgb.json"
        if self.projection is None and path.is_file():
            self.projection = LatentRGB.from_json(path.read_text())
        if self.projection is None:
            store = self.prepared.store
            latents = [store.load(LATENTS, e.latent_key)["latents"][:, :2].to(self.device, self.vae.dtype)
                       for e in self.prepared.entries[:4]]
            self.projection = fit_latent_rgb(self.vae, latents)
            atomic_write_bytes(path, self.projection.to_json().encode())
        return self.projection

    def _previewer(self, out_dir: Path, step: int, tag: str, on_preview):
        """The sampling callback writing (and sending) previews of ``tag``; None when previews are off."""
        if not self.v.preview_every:
            return None

        def sent(path: Path, n: int) -> None:
            if on_preview is not None:
                on_preview(step, tag, n, path)
            if self.webhook is not None:
                self.webhook.post(path, {"content": f"step {step}: {tag}, sampling step {n}/{self.v.steps}",
                                         "type": "preview", "step": step, "sampling_step": n, "prompt": tag})

        return Previewer(self.latent_rgb(), self.v.preview_every, out_dir / "previews", tag, sent)

    def _s2v_inputs(self, cfg: Config, device):
        """Per prompt, the reference latents, audio features and soundtrack of its reference_media."""
        from ..data import Encoders
        from ..sample.s2v import s2v_inputs

        media = self.v.reference_media
        if len(media) != len(self.prompts):
            raise ConfigError(f"validation.reference_media: Wan S2V validation needs one image or video per prompt "
                              f"({len(self.prompts)} prompt(s), {len(media)} given); its first frame is the "
                              f"reference and its audio (or the audio file of the same stem) drives the clip")
        missing = [m for m in media if not Path(m).is_file()]
        if missing:
            raise ConfigError(f"validation.reference_media: no such file {missing[0]!r}")
        encoders = Encoders(cfg.model, device)
        try:
            return [s2v_inputs(m, self.width, self.height, self.v.num_frames, self.fps, encoders) for m in media]
        finally:
            encoders.release()

    def sample_inputs(self, transformer_2, cond: dict) -> dict:
        """``sample``'s two-expert and image-to-video arguments for one validation sample."""
        kw = dict(transformer_2=transformer_2, boundary_ratio=self.boundary if transformer_2 is not None else None,
                  expand_timesteps=self.expand)
        if "condition" in cond:
            kw["condition"] = cond["condition"][None]
        if "image_embeds" in cond:
            kw["image_embeds"] = cond["image_embeds"]  # (images, tokens, D): batch 1
        if "first_frame" in cond:
            kw["first_frame"] = cond["first_frame"][None]
        return kw

    def due(self, step: int) -> bool:
        return self.v.every > 0 and step % self.v.every == 0

    def variants(self, ema) -> list[tuple[str, object]]:
        """(file suffix, EMA or None for the live weights) per pass, from ema.validation."""
        if ema is None:
            return [("", None)]
        mode = ema.cfg.validation
        return {"ema_only": [("_ema", ema)], "both": [("", None), ("_ema", ema)], "none": [("", None)]}[mode]

    def experts(self, model):
        """(transformer, transformer_2 or None): who samples above and below the boundary."""
        if self.model_2 is not None:
            return model, self.model_2
        if not self.v.load_other_stage:
            return model, None
        from ..build import build_frozen_model, expert_config
        from ..memory.offload import place_resident

        trained = self.cfg.model.experts
        if self._other is None:
            other = "low" if trained == "high" else "high"
            self.log(f"validation: loading the {other}-noise expert (frozen) for the steps it denoises")
            self._other = build_frozen_model(expert_config(self.cfg.model, other), self.cfg.memory, self.device,
                                             offload_share=getattr(model, "_vidtune_group_offload", None))
        else:
            place_resident(self._other, self.device)
        return (model, self._other) if trained == "high" else (self._other, model)

    @torch.no_grad()
    def run(self, model, step: int, ema=None, on_preview=None) -> dict[str, tuple[Path, Path]]:
        """Sample every prompt (per variant); returns tag -> (mp4, png). ``on_preview(step, tag,
        sampling_step, png)`` gets each preview (``validation.preview_every``)."""
        out_dir = self.root / f"step_{step:06d}"
        v, outputs, shown, numbers = self.v, {}, [], []
        transformer, transformer_2 = self.experts(model)
        self.vae.to(self.device)
        try:
            for suffix, e in self.variants(ema):
                weights = " (EMA weights)" if suffix else ""
                with e.swapped_in() if e is not None else contextlib.nullcontext():
                    for n, (name, prompt, (pe, mask), cond) in enumerate(self.prompts):
                        tag = safe_name(name) + suffix
                        title = [f"{name}: {prompt}", f"step {step}{weights}, seed {v.seed}, {v.steps} sampling steps"]
                        callback = self._previewer(out_dir, step, tag, on_preview)
                        if self.family == "sana_video":  # the pipeline's own scheduler
                            frames = sample_sana(transformer, prompt_embeds=pe, prompt_mask=mask,
                                                 negative_prompt_embeds=self.negative[0],
                                                 negative_mask=self.negative[1], image_latents=self.image_latents,
                                                 num_frames=v.num_frames, height=self.height, width=self.width,
                                                 steps=v.steps, guidance=v.guidance, seed=v.seed,
                                                 scheduler_config=self.scheduler_config, device=self.device,
                                                 vae=self.vae, output_type="video", callback=callback)
                            outputs[tag] = save_outputs(frames[0], out_dir, tag, self.fps, title)
                        else:
                            kw = dict(prompt_embeds=pe, negative_prompt_embeds=self.negative[0],
                                      num_frames=v.num_frames, height=self.height, width=self.width, steps=v.steps,
                                      guidance=v.guidance, seed=v.seed, scheduler=v.scheduler,
                                      scheduler_config=self.scheduler_config, skip_layers=v.skip_layers,
                                      skip_layers_start=v.skip_layers_start, skip_layers_stop=v.skip_layers_stop,
                                      skip_layers_scale=v.skip_layers_scale, device=self.device, vae=self.vae,
                                      callback=callback)
                            if self.s2v is not None:  # driven by its audio, which becomes the soundtrack
                                frames = sample_s2v(transformer, self.s2v[n], **kw)
                                outputs[tag] = save_outputs(frames[0], out_dir, tag, self.fps, title,
                                                            audio=self.s2v[n].soundtrack)
                            else:
                                frames = sample(transformer, output_type="video", **kw,
                                                **self.sample_inputs(transformer_2, cond))
                                outputs[tag] = save_outputs(frames[0], out_dir, tag, self.fps, title)
                        if self.webhook is not None:
                            self.webhook.post(outputs[tag][1], {"content": f"step {step}: {tag}", "type": "validation",
                                                                "step": step, "prompt": tag})
                        # the sheet's frames only, not the whole video, until the step's comparison
                        # (every prompt has as many frames; S2V's are num_frames - 1, past the reference)
                        numbers = frame_indices(frames.shape[1])
                        shown.append((f"{name}{weights}", frames[0][numbers]))
        finally:
            self.vae.to("cpu")
            if self._other is not None:
                from ..memory.offload import place_resident

                place_resident(self._other, "cpu")  # waits in host RAM until the next validation
        if not shown:  # every first frame of validation.dataset was skipped
            self.log(f"validation: step {step}: nothing to render")
            return outputs
        save_comparison_sheet(shown, numbers, self.root / f"{out_dir.name}.png",
                              [f"validation at step {step}: {len(shown)} video(s), seed {v.seed}"])
        self.log(f"validation: step {step}: {len(outputs)} video(s) in {out_dir}, side by side in "
                 f"{out_dir.name}.png")
        return outputs
