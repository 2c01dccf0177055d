"""What a Wan pipeline checkpoint says beyond its transformer config: the two-expert boundary,
per-token timesteps (TI2V-5B), and the image-to-video inputs the transformer takes.

The facts come from the pipeline's ``model_index.json`` and component configs (a local
directory, or the hub's copy of the json) and fall back to the flavour's published values, so
a config pointing at a hub id plans and trains like one pointing at a download of it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .flavours import BOUNDARY_RATIO, EXPAND_TIMESTEPS, VAE_CONFIGS

log = logging.getLogger(__name__)


def pipeline_index(model_cfg, fetch: bool = True) -> dict | None:
    """The pipeline's model_index.json (a local dir's, or with ``fetch`` the hub's for a hub id);
    None if absent."""
    src = model_cfg.resolved_path()
    p = Path(src).expanduser()
    if p.exists():
        f = p / "model_index.json"
        return json.loads(f.read_text()) if f.is_file() else None
    if not fetch:
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(src, "model_index.json", revision=model_cfg.revision)).read_text())
    except Exception as exc:  # offline, or not a pipeline repo: the flavour's published values apply
        log.info("no model_index.json from %s (%s)", src, exc)
        return None


def component_config(model_cfg, component: str) -> dict | None:
    """config.json of a pipeline component (``vae``, ``text_encoder``, ``image_encoder``,
    ``audio_encoder``) in a local checkpoint dir (``vae_path`` / ``text_encoder_path`` /
    ``audio_encoder_path`` first); None for hub ids."""
    override = {"vae": model_cfg.vae_path, "text_encoder": model_cfg.text_encoder_path,
                "audio_encoder": getattr(model_cfg, "audio_encoder_path", None)}.get(component)
    for p in (override, model_cfg.path):
        if not p:
            continue
        cand = Path(p).expanduser() / component / "config.json"
        if cand.is_file():
            return {k: v for k, v in json.loads(cand.read_text()).items() if not k.startswith("_")}
    return None


def vae_config(model_cfg) -> dict:
    """The VAE's config: the local checkpoint's, else the flavour's published one ({} = the Wan 2.1
    VAE, diffusers' AutoencoderKLWan defaults)."""
    return component_config(model_cfg, "vae") or dict(VAE_CONFIGS.get(model_cfg.flavour, {}))


def boundary_ratio(model_cfg, index: dict | None = None, say=print) -> float:
    """The two-expert boundary: the pipeline's ``boundary_ratio``, else the flavour's published
    value (one line says so)."""
    index = pipeline_index(model_cfg) if index is None else index
    ratio = (index or {}).get("boundary_ratio")
    if ratio is not None:
        return float(ratio)
    if model_cfg.flavour not in BOUNDARY_RATIO:
        raise ValueError(f"{model_cfg.resolved_path()}: no boundary_ratio in model_index.json and {model_cfg.flavour} "
                         f"has no published one; use a two-expert flavour ({', '.join(BOUNDARY_RATIO)})")
    ratio = BOUNDARY_RATIO[model_cfg.flavour]
    say(f"model: {model_cfg.resolved_path()} has no boundary_ratio in model_index.json; using the published "
        f"{ratio} of {model_cfg.flavour}")
    return ratio


@dataclass(frozen=True)
class WanInputs:
    """What one Wan transformer takes besides noisy latents, text and timesteps.

    ``i2v``: None (text only), ``"concat"`` (Wan 2.1/2.2 I2V: a 4-channel first-frame mask and the
    VAE latents of the first frame followed by zeros, concatenated to the noisy latents) or
    ``"first_frame"`` (TI2V-5B: the clean first latent frame replaces the noisy one and its tokens
    get t = 0; the same model also trains text-to-video). ``image_encoder``: Wan 2.1 I2V's CLIP
    image embedding as a second cross-attention context; ``paired_images``: it embeds a (first,
    last) pair (FLF2V's ``pos_embed_seq_len``). ``vae_spatial`` x the patch size is the pixel
    multiple of a training size."""

    i2v: str | None = None
    image_encoder: bool = False
    paired_images: bool = False
    vae_spatial: int = 8
    vae_temporal: int = 4
    patch: tuple[int, int, int] = (1, 2, 2)

    @property
    def side_multiple(self) -> int:
        return self.vae_spatial * max(self.patch[1], self.patch[2])


def wan_inputs(arch, model_cfg) -> WanInputs:
    """The inputs of the transformer ``arch`` in the pipeline ``model_cfg`` names (a local
    pipeline's files, else the flavour's published values: nothing is fetched)."""
    vae = vae_config(model_cfg)
    z = vae.get("z_dim", 16)
    index = pipeline_index(model_cfg, fetch=False) or {}
    expand = index.get("expand_timesteps", model_cfg.flavour in EXPAND_TIMESTEPS)
    if arch.in_channels == 2 * z + 4:
        i2v = "concat"
    elif expand:
        i2v = "first_frame"
    else:
        i2v = None
    return WanInputs(i2v=i2v, image_encoder=arch.image_dim is not None and i2v == "concat",
                     paired_images=arch.pos_embed_seq_len is not None,
                     vae_spatial=vae.get("scale_factor_spatial", 8), vae_temporal=vae.get("scale_factor_temporal", 4),
                     patch=tuple(arch.patch_size))
