"""The VAE, the text encoder (Wan: UMT5, Sana Video: Gemma2), Wan 2.1 I2V's CLIP image encoder and
(Wan S2V) the wav2vec2 audio encoder used to fill the caches, loaded lazily from ``[model]``.

Latents are normalised the way Wan trains on them: ``(mu - latents_mean) * (1 / latents_std)``
per channel, from the VAE config, with ``mu`` the posterior mean (deterministic, so cacheable).
Text embeddings are exactly ``WanPipeline.encode_prompt``'s (same cleaning, tokenizer call with
512-token padding, encoder, trim to the true length); they are returned trimmed and the loader
zero-pads them back to 512 (``cache.pad_prompt_embeds``), which saves most of the disk.

Sana Video (Gemma2): embeddings and attention masks are exactly ``SanaVideoPipeline.encode_prompt``'s
(called here) with the arguments ``SanaVideoPipeline.__call__`` gives it: captions and validation
prompts with its default complex-human-instruction prefix and ``max_sequence_length`` 300 (so
300 tokens: the first and the last 299 of prefix + prompt + padding), negative prompts without the
prefix. They are stored whole with their mask: Gemma's states at padding positions are not zero.

With ``offload_during_startup`` only the encoder in use sits on the device; the others wait on
the CPU. Nothing is loaded until an entry is actually missing from the cache.
"""
from __future__ import annotations

import gc
import hashlib
import json
from functools import cached_property
from pathlib import Path

import torch

from ..config import ModelConfig
from ..models import family
from ..runtime import DTYPES
from .cache import TEXT_MAX_LENGTH, model_fingerprint


def sana_instruction() -> list[str]:
    """``SanaVideoPipeline.__call__``'s default complex-human-instruction lines."""
    import inspect

    from diffusers import SanaVideoPipeline

    return list(inspect.signature(SanaVideoPipeline.__call__).parameters["complex_human_instruction"].default)


def _local_component(src: str, subfolder: str, revision: str | None) -> tuple[Path | None, str]:
    """(local dir of the component or None for a hub id, fingerprint)."""
    p = Path(src).expanduser()
    if p.is_dir():
        d = p / subfolder
        if not d.is_dir():
            raise FileNotFoundError(f"{p}: no {subfolder}/ folder (expected a diffusers pipeline directory)")
        return d, model_fingerprint(d)
    # A hub id: the snapshot's commit hash names the content (resolved from the local HF cache
    # when offline); only model_index.json is fetched here, the weights when first needed.
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download(src, revision=revision, allow_patterns=["model_index.json"]))
    return None, f"hub:{src}@{snap.name}/{subfolder}"


class Encoders:
    """Lazily loaded VAE + text encoder for one model config."""

    def __init__(self, model: ModelConfig, device: str | torch.device = "cpu",
                 offload_during_startup: bool = False):
        self.model = model
        self.device = torch.device(device)
        self.offload_during_startup = offload_during_startup
        self.vae_src = model.vae_path or model.resolved_path()
        self.text_src = model.text_encoder_path or model.resolved_path()
        self.vae_dtype = DTYPES[model.vae_dtype]
        self.text_dtype = DTYPES[model.text_encoder_dtype]
        self.audio_src = model.audio_encoder_path or model.resolved_path()
        self._vae = None
        self._text_encoder = None
        self._tokenizer = None
        self._image_encoder = None
        self._image_processor = None
        self._audio_encoder = None
        self._feature_extractor = None

    @cached_property
    def vae_fingerprint(self) -> str:
        return _local_component(self.vae_src, "vae", self.model.revision)[1]

    @cached_property
    def text_fingerprint(self) -> str:
        te = _local_component(self.text_src, "text_encoder", self.model.revision)[1]
        tok = _local_component(self.text_src, "tokenizer", self.model.revision)[1]
        return f"{te}+{tok}"

    @cached_property
    def image_fingerprint(self) -> str:
        src = self.model.resolved_path()
        enc = _local_component(src, "image_encoder", self.model.revision)[1]
        return f"{enc}+{_local_component(src, 'image_processor', self.model.revision)[1]}"

    @cached_property
    def audio_fingerprint(self) -> str:
        enc = _local_component(self.audio_src, "audio_encoder", self.model.revision)[1]
        proc = _local_component(self.audio_src, "audio_processor", self.model.revision)[1]
        return f"{enc}+{proc}"

    # -- device placement --------------------------------------------------------------------
    def _encoders(self) -> dict:
        return {"vae": self._vae, "text": self._text_encoder, "image": self._image_encoder,
                "audio": self._audio_encoder}

    def _activate(self, name: str) -> None:
        """Put ``name`` ("vae" | "text" | "image" | "audio") on the device; with offload_during_startup,
        park the others."""
        for other, m in self._encoders().items():
            if self.offload_during_startup and other != name and m is not None:
                m.to("cpu")
        self._encoders()[name].to(self.device)

    def placement(self) -> dict[str, str | None]:
        """Where each loaded encoder sits (None: not loaded; the image and audio encoders listed once loaded)."""
        def dev(m):
            return None if m is None else str(next(m.parameters()).device)
        out = {"vae": dev(self._vae), "text_encoder": dev(self._text_encoder)}
        if self._image_encoder is not None:
            out["image_encoder"] = dev(self._image_encoder)
        if self._audio_encoder is not None:
            out["audio_encoder"] = dev(self._audio_encoder)
        return out

    @property
    def vae(self):
        if self._vae is None:
            from diffusers import AutoencoderKLWan

            self._vae = AutoencoderKLWan.from_pretrained(
                self.vae_src, subfolder="vae", torch_dtype=self.vae_dtype, revision=self.model.revision
            ).eval().requires_grad_(False)
        self._activate("vae")
        return self._vae

    def _load_text(self):
        if self._text_encoder is None:
            from transformers import AutoModel, AutoTokenizer, UMT5EncoderModel

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.text_src, subfolder="tokenizer", revision=self.model.revision)
            cls = AutoModel if self.model.family == "sana_video" else UMT5EncoderModel  # Gemma2Model for Sana
            self._text_encoder = cls.from_pretrained(
                self.text_src, subfolder="text_encoder", dtype=self.text_dtype, revision=self.model.revision
            ).eval().requires_grad_(False)
        self._activate("text")
        return self._tokenizer, self._text_encoder

    def text_form(self, negative: bool = False) -> dict:
        """What besides the text and the encoder decides a text-cache entry: for Sana Video the
        instruction prefix (hashed), the length and whether it is a negative prompt; nothing for
        Wan, whose captions and negative prompts are encoded alike."""
        if self.model.family != "sana_video":
            return {}
        if negative:
            return {"form": "negative", "max_length": family("sana_video").TEXT_LEN}
        chi = hashlib.sha256(json.dumps(sana_instruction()).encode()).hexdigest()[:16]
        return {"form": "caption", "max_length": family("sana_video").TEXT_LEN, "instruction": chi}

    @torch.no_grad()
    def text_entries(self, prompts: list[str], negative: bool = False) -> list[dict[str, torch.Tensor]]:
        """Per prompt, the tensors of its text-cache entry: ``prompt_embeds`` (Wan: trimmed to the
        true length; Sana Video: the pipeline's full 300 tokens, with ``prompt_attention_mask``)."""
        if self.model.family != "sana_video":
            return [{"prompt_embeds": e} for e in self.encode_text(prompts)]
        from diffusers import SanaVideoPipeline

        tokenizer, encoder = self._load_text()
        pipe = SanaVideoPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
        embeds, mask, _, _ = pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.device,
            complex_human_instruction=None if negative else sana_instruction(),
            max_sequence_length=family("sana_video").TEXT_LEN)
        return [{"prompt_embeds": e, "prompt_attention_mask": m} for e, m in zip(embeds, mask)]

    # -- encoding ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1], F = 4k+1 -> normalised latents (B, z, k+1, H/8, W/8)."""
        vae = self.vae
        x = pixels.to(self.device, self.vae_dtype)
        mu = vae.encode(x).latent_dist.mode()
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(mu.device, mu.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(mu.device, mu.dtype)
        return (mu - mean) * inv_std

    @torch.no_grad()
    def encode_text(self, prompts: list[str], max_length: int = TEXT_MAX_LENGTH) -> list[torch.Tensor]:
        """Per prompt, the UMT5 embedding trimmed to its true token count: (len_i, D)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokenizer, encoder = self._load_text()
        inputs = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_length,
                           truncation=True, add_special_tokens=True, return_attention_mask=True,
                           return_tensors="pt")
        ids, mask = inputs.input_ids, inputs.attention_mask
        lengths = mask.gt(0).sum(dim=1).tolist()
        hidden = encoder(ids.to(self.device), mask.to(self.device)).last_hidden_state.to(self.text_dtype)
        return [h[:n] for h, n in zip(hidden, lengths)]

    @torch.no_grad()
    def encode_image(self, images: list) -> torch.Tensor:
        """CLIP image embeddings of PIL images exactly as ``WanImageToVideoPipeline.encode_image``:
        the pipeline's image processor, then the penultimate hidden state (n, tokens, D). The
        encoder runs in fp32, as diffusers' Wan I2V examples load it."""
        if self._image_encoder is None:
            import transformers

            from ..models.wan.pipeline import pipeline_index

            src, rev = self.model.resolved_path(), self.model.revision
            cls = ((pipeline_index(self.model) or {}).get("image_processor") or [None, "CLIPImageProcessor"])[1]
            self._image_processor = getattr(transformers, cls).from_pretrained(src, subfolder="image_processor",
                                                                               revision=rev)
            self._image_encoder = transformers.CLIPVisionModel.from_pretrained(
                src, subfolder="image_encoder", dtype=torch.float32, revision=rev).eval().requires_grad_(False)
        self._activate("image")
        inputs = self._image_processor(images=images, return_tensors="pt").to(self.device)
        return self._image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]

    def _load_audio(self):
        if self._audio_encoder is None:
            from transformers import AutoConfig, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

            kw = dict(subfolder="audio_encoder", revision=self.model.revision)
            arch = AutoConfig.from_pretrained(self.audio_src, **kw).architectures or []
            if "Wav2Vec2ForCTC" not in arch:
                raise ValueError(
                    f"{self.audio_src}/audio_encoder holds {arch or 'an unnamed architecture'}, not Wav2Vec2ForCTC: Wan "
                    f"S2V was trained on the English CTC fine-tune of XLS-R-53 (the official checkpoint's "
                    f"wav2vec2-large-xlsr-53-english), not the base wav2vec2-large-xlsr-53; point "
                    f"model.audio_encoder_path at a pipeline with that model in audio_encoder/")
            self._feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(
                self.audio_src, subfolder="audio_processor", revision=self.model.revision)
            self._audio_encoder = Wav2Vec2ForCTC.from_pretrained(
                self.audio_src, dtype=DTYPES[self.model.audio_encoder_dtype], **kw).eval().requires_grad_(False)
        self._activate("audio")
        return self._audio_encoder, self._feature_extractor

    def audio_shape(self) -> tuple[int, int]:
        """(hidden states, width) of the audio encoder's features, from its config (no weights read)."""
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.audio_src, subfolder="audio_encoder", revision=self.model.revision)
        return cfg.num_hidden_layers + 1, cfg.hidden_size

    @torch.no_grad()
    def encode_audio(self, wave: torch.Tensor) -> torch.Tensor:
        """Mono 16 kHz samples -> all wav2vec2 hidden states (L, T50, C) in fp32."""
        from .audio import wav2vec2_hidden_states

        return wav2vec2_hidden_states(*self._load_audio(), wave)

    def release(self) -> None:
        """Drop every encoder and free its memory (training needs none of it)."""
        self._vae = self._text_encoder = self._tokenizer = self._audio_encoder = self._feature_extractor = None
        self._image_encoder = self._image_processor = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
