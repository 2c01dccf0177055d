"""The run configuration: nested dataclasses loaded from one TOML file.

Each section is its own dataclass and each component receives only its section (the data
pipeline gets ``DatasetConfig`` entries and ``CacheConfig``, the offload code ``OffloadConfig``...).
Every field carries a one-line ``help``: ``vidtune-train --help-config`` prints it and
``docs/config.md`` is generated from it (``python -m vidtune.config > docs/config.md``).

Loading is strict: an unknown key is an error naming the key, the file and the closest valid
key; a value of the wrong type or outside its choices is an error naming the key and the fix.
``--set section.key=value`` overrides are applied to the parsed TOML before validation, the value
parsed as TOML (bare words fall back to strings). Datasets are addressed by id or index:
``--set dataset.clips.repeats=3`` or ``--set dataset.0.repeats=3``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key, the source and the fix."""


def opt(default=dataclasses.MISSING, help: str = "", *, factory=None):
    """A config field with its one-line help text (``factory`` for mutable defaults)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# Model families and flavours: flavour -> default diffusers checkpoint (hub id or local dir).
FLAVOURS: dict[str, dict[str, str]] = {
    "wan": {
        "t2v-480p-1.3b-2.1": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "t2v-480p-14b-2.1": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
        "i2v-480p-14b-2.1": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        "i2v-720p-14b-2.1": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
        "i2v-14b-2.2": "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        "t2v-a14b-2.2": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        "ti2v-5b-2.2": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    },
    "wan_s2v": {"s2v-14b-2.2": "tolgacangoz/Wan2.2-S2V-14B-Diffusers"},
    "sana_video": {"2b-480p": "Efficient-Large-Model/SANA-Video_2B_480p_diffusers",
                   "i2v-2b-480p": "Efficient-Large-Model/SANA-Video_2B_480p_diffusers"},
}
# Flavours whose checkpoint holds two experts: ``transformer`` (high noise) and ``transformer_2``
# (low noise); ``model.experts`` picks what trains.
EXPERT_FLAVOURS = {"wan": ("i2v-14b-2.2", "t2v-a14b-2.2")}
# Other names a flavour is known by (SimpleTuner's): alias -> (flavour, experts or None). Resolved
# at load, so the resolved config shows what runs.
FLAVOUR_ALIASES = {"wan": {
    "i2v-14b-2.2-high": ("i2v-14b-2.2", "high"), "i2v-14b-2.2-low": ("i2v-14b-2.2", "low"),
    "t2v-a14b-2.2-high": ("t2v-a14b-2.2", "high"), "t2v-a14b-2.2-low": ("t2v-a14b-2.2", "low"),
    "i2v-14b-2.1": ("i2v-480p-14b-2.1", None), "i2v-14b-2.1-720p": ("i2v-720p-14b-2.1", None),
}}
# Frames per second each flavour was trained at; videos are resampled to it.
FLAVOUR_FPS = {"ti2v-5b-2.2": 24}
DEFAULT_FPS = 16

Dtype = Literal["bf16", "fp16", "fp32"]


@dataclass
class ModelConfig:
    family: Literal["wan", "wan_s2v", "sana_video"] = opt("wan", "Model family.")
    flavour: str = opt("t2v-480p-1.3b-2.1", "Model flavour within the family (see the flavour table); "
                       "default: the family's first.")
    path: Optional[str] = opt(None, "Diffusers pipeline dir or hub id; default: the flavour's checkpoint.")
    transformer_path: Optional[str] = opt(
        None, "Other transformer (dir, hub id or single .safetensors) for custom fine-tunes.")
    transformer_subfolder: Optional[str] = opt(
        None, "Subfolder of the transformer in its repo; default: the flavour's; \"\" for none.")
    vae_path: Optional[str] = opt(None, "Pipeline dir or hub id to take the VAE from; default: path.")
    text_encoder_path: Optional[str] = opt(
        None, "Pipeline dir or hub id to take the text encoder and tokenizer from; default: path.")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) for hub ids.")
    dtype: Dtype = opt("bf16", "Dtype of the transformer weights.")
    vae_dtype: Dtype = opt("fp32", "Dtype the VAE runs in while caching latents.")
    text_encoder_dtype: Dtype = opt("bf16", "Dtype the text encoder runs in while caching embeddings.")
    fps: Optional[int] = opt(None, "Frame rate the model was trained at; default: the flavour's (16; 24 for ti2v-5b).")
    attention_backend: Literal["sdpa", "flash", "sage"] = opt(
        "sdpa", "Attention kernel: torch SDPA, flash-attn or SageAttention.")
    experts: Optional[Literal["high", "low", "both"]] = opt(
        None, "Two-expert flavours (Wan 2.2 A14B): train the high-noise expert (transformer/), the low-noise one "
        "(transformer_2/) or both in one run; each trains only on its own timesteps. Required for them.")
    force_2_1_time_embedding: bool = opt(
        False, "Use Wan 2.1-style time embeddings (fixes Wan 2.2 time-embedding shape mismatches).")
    base_precision: Literal["bf16", "int8"] = opt(
        "bf16", "Precision of the frozen base transformer: bf16, or int8 weights via torchao.")
    quantize_via: Literal["device", "cpu"] = opt(
        "device", "Where int8 quantization runs: on the training device (fast) or on the CPU (less VRAM).")
    audio_encoder_path: Optional[str] = opt(
        None, "Wan S2V: pipeline dir or hub id with audio_encoder/ (Wav2Vec2ForCTC, the English XLS-R-53 CTC "
        "fine-tune) and audio_processor/; default: path.")
    audio_encoder_dtype: Dtype = opt("fp32", "Wan S2V: dtype the audio encoder runs in while caching features.")

    def resolved_path(self) -> str:
        return self.path or FLAVOURS[self.family][self.flavour]

    def resolved_fps(self) -> int:
        return self.fps or FLAVOUR_FPS.get(self.flavour, DEFAULT_FPS)


@dataclass
class AdapterConfig:
    type: Literal["lora", "lokr", "full"] = opt("lora", "What is trained: a LoRA, a LoKr, or all weights.")
    rank: int = opt(16, "LoRA/LoKr rank.")
    alpha: Optional[float] = opt(None, "LoRA/LoKr alpha (scale alpha/rank); default: rank.")
    dropout: float = opt(0.0, "Dropout on the adapter input.")
    target_modules: list[str] = opt(
        help="Module name suffixes the adapter wraps.", factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lokr_decompose_factor: int = opt(-1, "LoKr Kronecker factor (-1: as square as possible).")
    lokr_decompose_both: bool = opt(False, "LoKr: factor the small Kronecker matrix into rank-r factors too.")
    dtype: Literal["auto", "bf16", "fp32"] = opt(
        "auto", "Adapter weights' dtype. auto: bf16 on a bf16 model (fp32 update precision kept by the optimizer: "
        "Kahan summation for adamw_bf16/lion, fp32 master copies for adamw and the 8-bit ones), else fp32.")
    init_from: Optional[str] = opt(None, "Start from an existing adapter (.safetensors, any supported key layout).")
    export_format: Literal["auto", "wan", "diffusers", "both"] = opt(
        "auto", "Final adapter key layout. auto/wan: original Wan keys, one file ComfyUI and diffusers both load "
        "(plus a diffusers file when diffusers cannot read a module from it, e.g. patch_embedding); diffusers: "
        "peft keys for load_lora_weights; both. auto is diffusers for families without an original layout.")


@dataclass
class TrainConfig:
    output_dir: str = opt("output/vidtune", "Run directory: checkpoints, logs, resolved config, final adapter.")
    max_train_steps: int = opt(1000, "Optimizer steps to train for.")
    batch_size: int = opt(1, "Samples per device per micro-step.")
    gradient_accumulation_steps: int = opt(1, "Micro-steps accumulated per optimizer step.")
    learning_rate: float = opt(1e-4, "Peak learning rate.")
    lr_scheduler: Literal["constant", "cosine", "linear", "polynomial"] = opt(
        "constant", "Learning-rate schedule after warmup (diffusers' get_scheduler).")
    lr_power: float = opt(1.0, "polynomial: decay power (1 = linear to 1e-7).")
    lr_warmup_steps: int = opt(0, "Linear warmup steps.")
    optimizer: Literal["adamw", "adamw_bf16", "lion", "adamw_8bit", "lion_8bit", "paged_adamw_8bit",
                       "paged_lion_8bit"] = opt(
        "adamw", "Optimizer: torch AdamW; adamw_bf16 (torch-optimi, bf16 weights with Kahan summation); "
        "lion (torch-optimi); 8-bit AdamW/Lion and paged variants (bitsandbytes).")
    weight_decay: float = opt(0.01, "Decoupled weight decay.")
    betas: list[float] = opt(help="Optimizer betas.", factory=lambda: [0.9, 0.999])
    eps: float = opt(1e-8, "Optimizer epsilon.")
    max_grad_norm: float = opt(1.0, "Gradient clipping threshold (global norm, or each value); 0 disables clipping.")
    grad_clip_method: Literal["norm", "value"] = opt("norm", "Clip the global gradient norm or each value.")
    mixed_precision: Literal["bf16", "fp16", "no"] = opt("bf16", "Autocast dtype of the forward pass.")
    seed: int = opt(42, "Seed of noise, timesteps, data order and adapter init.")
    device: str = opt("auto", "Training device: auto (cuda when present, else cpu), cuda, cuda:1, cpu...")
    caption_dropout: float = opt(0.1, "Probability of training a sample on the empty caption.")
    timestep_sampling: Literal["logit_norm", "shift", "auto_shift", "uniform"] = opt(
        "logit_norm", "How training timesteps are drawn.")
    logit_mean: float = opt(0.0, "Mean of the logit-normal timestep distribution.")
    logit_std: float = opt(1.0, "Std of the logit-normal timestep distribution.")
    flow_shift: float = opt(3.0, "Flow-matching shift for timestep_sampling = \"shift\".")
    checkpoint_every: int = opt(500, "Save a checkpoint every N optimizer steps (0: only at the end).")
    keep_checkpoints: int = opt(5, "Checkpoints kept on disk (oldest removed first; 0 keeps all).")
    resume: Optional[str] = opt(
        None, "\"latest\" (the newest intact checkpoint) or a checkpoint dir: weights, optimizer, RNGs and data "
        "position from it; learning rate, schedule, warmup, clipping and steps from this config.")
    max_consecutive_nonfinite: int = opt(
        3, "Non-finite steps in a row that stop the run (each such step is skipped; 0: never stop, but "
        "diverged weights are still never checkpointed or exported).")


@dataclass
class ChunkedFFConfig:
    enabled: bool = opt(False, "Run the feed-forward in token chunks (bounds its tokens x ffn_dim intermediate).")
    chunk_size: int = opt(4096, "Tokens per chunk; env WAN_FEED_FORWARD_CHUNK_SIZE overrides.")


@dataclass
class OffloadConfig:
    type: Literal["none", "block_level"] = opt("none", "Group offload of transformer blocks to CPU RAM (or disk).")
    blocks_per_group: int = opt(1, "Blocks moved to the device together.")
    use_stream: bool = opt(True, "Prefetch the next groups while the current one computes (forward and backward).")
    prefetch_depth: int = opt(1, "Groups loaded ahead; resident block weights <= (prefetch_depth + 1) groups.")
    to_disk_path: Optional[str] = opt(None, "Spill offloaded weights to this directory instead of RAM.")
    backend: Literal["auto", "native", "python"] = opt(
        "auto", "Streamer: native extension, Python fallback, or auto (native when built).")
    num_workers: int = opt(1, "I/O worker threads of the streamer.")

    def validate(self) -> None:
        if self.blocks_per_group < 1:
            raise ConfigError(f"memory.offload.blocks_per_group must be >= 1, got {self.blocks_per_group}")
        if self.prefetch_depth < 0:
            raise ConfigError(f"memory.offload.prefetch_depth must be >= 0, got {self.prefetch_depth}")
        if self.type not in ("none", "block_level") or self.backend not in ("auto", "native", "python"):
            raise ConfigError(f"memory.offload: type must be none|block_level and backend auto|native|python "
                              f"(got type={self.type!r}, backend={self.backend!r})")

    @property
    def depth(self) -> int:
        """Effective prefetch depth: without a stream each group loads on demand."""
        return self.prefetch_depth if self.use_stream else 0


@dataclass
class MemoryConfig:
    gradient_checkpointing: bool = opt(True, "Recompute block activations in backward.")
    gradient_checkpointing_every_n: int = opt(1, "Checkpoint every N-th block (1: all).")
    offload_during_startup: bool = opt(
        False, "While caching, keep only the encoder in use on the device (VAE or text encoder).")
    model_cpu_offload: bool = opt(False, "Whole-model CPU offload (exclusive with offload.type = block_level).")
    plan_check: Literal["auto", "on", "off"] = opt(
        "auto", "Before caching, refuse a run whose predicted peak memory does not fit the device "
        "(auto: on GPUs only).")
    chunked_ff: ChunkedFFConfig = opt(help="Chunked feed-forward.", factory=ChunkedFFConfig)
    offload: OffloadConfig = opt(help="Group offload of transformer blocks.", factory=OffloadConfig)


@dataclass
class CompileConfig:
    enabled: Literal["auto", "on", "off"] = opt(
        "auto", "Regional torch.compile of the transformer blocks (one compiled graph serves every block). "
        "auto: on for NVIDIA GPUs with a bf16/fp32 base and no offload (0.95x step time and 8 GiB less peak "
        "for 9-12 s of compile, measured on an H200), off on CPU (1-3.5% faster steps do not repay 5-15 s of "
        "compile), with int8 bases, offload and ROCm (not yet measured); benchmarks/README.md.")
    backend: str = opt("inductor", "torch.compile backend (inductor; aot_eager compiles without code generation).")
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = opt(
        "default", "torch.compile mode.")
    dynamic: Literal["auto", "on", "off"] = opt(
        "auto", "Token count (TREAD routes, buckets): auto recompiles once with it symbolic when a second count "
        "appears; on: symbolic from the start; off: one graph per count.")


@dataclass
class ParallelConfig:
    data: Literal["ddp", "fsdp"] = opt(
        "ddp", "Under torchrun with several ranks: ddp (each rank holds the whole model, gradients averaged) or "
        "fsdp (FSDP2: parameters, gradients and optimizer state sharded across ranks, block by block).")
    sequence: int = opt(
        1, "Ulysses sequence parallelism: groups of this many ranks split each clip's video tokens and swap "
        "them for attention heads around self-attention (1: off). Divides the world size and the head count.")
    backend: Literal["auto", "nccl", "gloo"] = opt(
        "auto", "Collective backend: auto is nccl on GPUs (rccl on ROCm; CPU tensors over gloo) and gloo on CPU.")
    timeout_s: float = opt(
        600.0, "Seconds a collective of the training step waits for the other ranks before the run stops with "
        "an error (a rank died or hangs).")
    wait_timeout_s: float = opt(
        7200.0, "Seconds ranks wait for work done by one rank or in shares (caching, checkpoint writes, "
        "validation, exports) before the run stops with an error.")


@dataclass
class TreadRoute:
    selection_ratio: float = opt(help="Fraction of video tokens routed around the layers (0 <= r < 1).")
    start_layer: int = opt(help="First routed layer (negative counts from the end).")
    end_layer: int = opt(help="Last routed layer, inclusive (negative counts from the end).")


@dataclass
class TreadConfig:
    routes: list[TreadRoute] = opt(help="TREAD token routes, sorted and non-overlapping.", factory=list)

    def resolve(self, num_layers: int) -> list[tuple[float, int, int]]:
        """Routes as (ratio, start, end) with absolute layer indices; checks order and overlap."""
        return resolve_routes(self.routes, num_layers)


@dataclass
class CacheConfig:
    dir: str = opt("cache", "Directory of the latent and text-embedding caches (shared between runs).")
    compress: bool = opt(False, "Compress cache entries (zlib); smaller on disk, slower to read.")
    vae_batch_size: int = opt(1, "Clips per VAE encode call.")
    text_batch_size: int = opt(16, "Captions per text-encoder call.")


@dataclass
class LoggingConfig:
    report_to: Literal["tensorboard", "wandb", "none"] = opt("tensorboard", "Metrics backend.")
    log_every: int = opt(1, "Log metrics every N optimizer steps.")
    log_dir: Optional[str] = opt(None, "Where metrics go; default: <output_dir>/logs.")
    project: str = opt("vidtune", "Project name (wandb).")
    run_name: Optional[str] = opt(None, "Run name; default: the output_dir name.")
    progress_bar: bool = opt(True, "Show a progress bar with step time, tokens/s, loss, lr, memory.")


@dataclass
class ValidationConfig:
    every: int = opt(0, "Run validation every N optimizer steps (0: never).")
    baseline: bool = opt(True, "Also validate before the first step (not on resume), as a baseline.")
    prompts: list[str] = opt(help="Validation prompts.", factory=list)
    prompt_library: Optional[str] = opt(None, "JSON file {nickname: prompt} of extra prompts.")
    negative_prompt: str = opt("", "Negative prompt for classifier-free guidance.")
    guidance: float = opt(5.0, "CFG scale.")
    steps: int = opt(40, "Sampling steps.")
    num_frames: int = opt(81, "Frames per validation video (4k+1).")
    resolution: str = opt("832x480", "WxH of validation videos (multiples of 16).")
    seed: int = opt(42, "Seed of the validation noise.")
    scheduler: Literal["unipc", "euler"] = opt(
        "unipc", "Sampler (Wan): UniPC multistep or flow-match Euler; Sana Video samples with its pipeline's own "
        "scheduler (scheduler/scheduler_config.json).")
    skip_layers: list[int] = opt(help="Skip-layer guidance layers (empty: off).", factory=list)
    skip_layers_start: float = opt(0.0, "Fraction of sampling where skip-layer guidance starts.")
    skip_layers_stop: float = opt(1.0, "Fraction of sampling where skip-layer guidance stops.")
    skip_layers_scale: float = opt(2.8, "Skip-layer guidance scale: pred += (cond - cond_skipped) * scale (SD3 form).")
    load_other_stage: bool = opt(
        False, "Wan 2.2 two-expert models trained one expert at a time: load the other expert (frozen) and "
        "switch to it at the boundary while sampling, like WanPipeline with transformer_2.")
    dataset: Optional[str] = opt(
        None, "Image-to-video: id of an image [[dataset]] whose images (with their captions) are the first "
        "frames of the validation videos; it is not trained on.")
    preview_every: int = opt(
        0, "Every K sampling steps, write a preview frame strip (linear latent-to-RGB decode) and send it to "
        "TensorBoard / wandb and the webhook (0: off).")
    webhook_url: Optional[str] = opt(
        None, "POST each preview and validation contact sheet here (multipart PNG + JSON); failures never stop a run.")
    webhook_timeout: float = opt(5.0, "Seconds a webhook POST may take before it is given up.")
    reference_media: list[str] = opt(
        help="Wan S2V: an image or video per prompt, in order: its first frame is the reference; the audio file "
        "of the same stem beside it (.wav .mp3 .flac .ogg .m4a), else its own track, drives the clip and becomes "
        "the mp4's soundtrack.", factory=list)


@dataclass
class EmaConfig:
    enabled: bool = opt(False, "Keep an EMA of the trained weights.")
    decay: float = opt(0.999, "EMA decay cap; update n uses min(decay, (1+n)/(10+n)) (diffusers' EMAModel).")
    update_interval: int = opt(1, "Update the EMA every N optimizer steps.")
    device: Literal["same", "cpu"] = opt("same", "Where the EMA weights live: with the model, or in CPU RAM.")
    validation: Literal["ema_only", "both", "none"] = opt("both", "Validate with the EMA weights, both, or the live ones.")


@dataclass
class AudioConfig:
    auto_split: bool = opt(
        True, "Take each video's own audio track (decoded with torchcodec); false: the file of the same stem in path.")
    path: Optional[str] = opt(
        None, "Folder of audio files (.wav .mp3 .flac .ogg .m4a) matched to the videos by stem, same subfolders "
        "first (SimpleTuner's s2v_datasets); used when auto_split = false.")
    sample_rate: int = opt(16000, "Sample rate the audio is decoded at; wav2vec2 takes 16000.")
    channels: int = opt(1, "Audio channels; wav2vec2 takes mono (1): every channel is averaged.")
    allow_zero_audio: bool = opt(
        False, "Videos without audio train on silent (zero) features instead of being skipped.")
    max_duration_seconds: Optional[float] = opt(
        None, "Skip videos whose audio is longer than this (seconds); default: no limit.")
    duration_interval: float = opt(
        3.0, "bucket_strategy = resolution_frames: clip lengths step by this many seconds (in 4-frame steps), so "
        "audio windows fall in duration buckets; 0: by frame_interval.")
    truncation_mode: Literal["beginning", "end", "random"] = opt(
        "beginning", "Which window of a longer video (and its audio) a clip takes: the start, the end, or a random "
        "one (fixed per file).")
    motion: Literal["off", "auto"] = opt(
        "off", "auto: a video with 72 frames more than the clip (and 64+ pixels a side) trains the window after its "
        "first 73 frames, those becoming its motion frames (the later windows of a long S2V generation); off: "
        "every clip is a first window, without motion frames.")


@dataclass
class EvalConfig:
    every: int = opt(
        0, "Evaluation loss every N optimizer steps (0: off), and before the first step: MSE on held-out samples "
        "at fixed timesteps with fixed noise, so evaluations compare.")
    dataset: Optional[str] = opt(None, "Id of a [[dataset]] used only for evaluation (never trained on).")
    split_fraction: float = opt(
        0.0, "Without eval.dataset: share of each training dataset's files held out for evaluation (0 < f < 1).")
    max_samples: int = opt(8, "Held-out samples scored at most (a fixed, seeded choice).")
    timesteps: list[float] = opt(help="Timesteps (0..1000) every evaluation sample is scored at.",
                                 factory=lambda: [100.0, 300.0, 500.0, 700.0, 900.0])
    seed: int = opt(0, "Seed of the evaluation noise and of the split_fraction choice.")


@dataclass
class CrepaConfig:
    enabled: bool = opt(False, "CREPA temporal regulariser (cross-frame representation alignment).")
    block_index: int = opt(8, "Block whose output hidden states are aligned (0-based; negative counts from the end).")
    weight: float = opt(0.5, "lambda: weight of the CREPA loss added to the flow-matching loss.")
    adjacent_distance: int = opt(
        1, "d: each frame is also aligned to the features of frames f-d and f+d (0: per frame).")
    adjacent_tau: float = opt(1.0, "Temporal decay tau: a neighbour at distance d weighs exp(-d / tau).")
    encoder: str = opt(
        "facebook/dinov2-giant", "Vision encoder (transformers model dir or hub id); DINOv2 giant is SimpleTuner's "
        "dinov2_vitg14.")
    encoder_image_size: int = opt(518, "Frames are resized to this square size for the encoder.")
    encoder_dtype: Dtype = opt("bf16", "Dtype the encoder runs in while caching features.")
    spatial_align: bool = opt(
        True, "Align patch by patch (features resampled to the transformer's token grid); false: one pooled "
        "feature per frame (a far smaller cache).")
    head_dim: int = opt(2048, "Hidden width of the trained projection head (LayerNorm, Linear, SiLU, Linear).")
    drop_vae_encoder: bool = opt(
        False, "Train purely from cached latents: the VAE encoder is never loaded (a clip without cached latents "
        "is an error); CREPA features come from the pixel frames.")


@dataclass
class RolloutConfig:
    probability: float = opt(
        0.0, "Scheduled sampling (experimental): chance that a sample's training input is the model's own "
        "rollout from a higher noise level instead of the noised clip.")
    max_step_offset: int = opt(0, "Rollout length k, drawn from 1..max_step_offset sampler steps (0: off).")
    sampler_steps: int = opt(40, "Steps of the denoising grid the rollout walks (flow-matching Euler).")
    shift: float = opt(3.0, "Flow shift of that grid (Wan's sampler uses 3.0).")


@dataclass
class HubConfig:
    repo_id: Optional[str] = opt(None, "Hub model repo (user/name) the final adapter is pushed to (unset: no push).")
    private: bool = opt(True, "Create the repo private.")
    push_every_checkpoint: bool = opt(False, "Also push each checkpoint's adapter (as checkpoints/step-N/).")


@dataclass
class DatasetConfig:
    id: str = opt(help="Unique dataset name (cache subdirectory, logs).")
    path: str = opt(help="Directory of videos/images and their captions (searched recursively).")
    type: Literal["video", "image"] = opt("video", "What the directory holds.")
    caption_strategy: Literal["textfile", "filename", "instanceprompt"] = opt(
        "textfile", "Caption from <stem>.txt, from the file name, or caption_prefix alone.")
    caption_prefix: str = opt("", "Trigger word / instance prompt put before every caption.")
    resolution: float = opt(480, "pixel_area: side of the target area (480 -> 480*480 pixels); pixel: short edge.")
    resolution_type: Literal["pixel_area", "pixel"] = opt(
        "pixel_area", "How resolution is read; aspect ratio kept, sides rounded to multiples of 16.")
    crop: bool = opt(False, "Crop to the bucket's aspect after resizing (else resize to it, slight stretch).")
    crop_style: Literal["center", "random"] = opt("center", "Where the crop is taken (random: fixed per file).")
    aspect_bucket_rounding: int = opt(2, "Decimals aspect ratios are rounded to when bucketing.")
    repeats: int = opt(0, "Extra times each sample is seen per epoch (0: once).")
    weight: float = opt(1.0, "Sampling weight against other datasets, relative to their sizes.")
    num_frames: int = opt(81, "Frames per training clip (4k+1), taken from the start at the model fps.")
    min_frames: Optional[int] = opt(None, "Videos shorter than this (at the model fps) are skipped; default: num_frames.")
    max_frames: Optional[int] = opt(None, "Videos longer than this (at the model fps) are skipped; default: no limit.")
    frame_interval: int = opt(4, "resolution_frames: clip lengths are 1 + multiples of this (a multiple of 4).")
    loss_mask_path: Optional[str] = opt(
        None, "Masked loss (Sana Video): directory of mask images matched to the clips by file stem; white = full "
        "loss, black = none, grey = partial; a clip without its mask is skipped.")
    bucket_strategy: Literal["aspect_ratio", "resolution_frames"] = opt(
        "aspect_ratio", "Bucket by aspect ratio only, or by WxH@F (mixed resolutions and durations).")
    disabled: bool = opt(False, "Leave this dataset out of the run.")
    i2v: Optional[bool] = opt(
        None, "Image-to-video training: condition each clip on its own first frame. Default: the model's "
        "kind (I2V models: on; TI2V-5B: off, set true for its I2V mode).")
    last_image: bool = opt(
        False, "With i2v: condition on the last frame too (first-and-last-frame, as WanImageToVideoPipeline's "
        "last_image).")
    audio: AudioConfig = opt(help="Wan S2V: where each video's audio comes from and how it is cut.",
                             factory=AudioConfig)


@dataclass
class Config:
    model: ModelConfig = opt(help="Which model is trained and how it is loaded.", factory=ModelConfig)
    adapter: AdapterConfig = opt(help="What is trained.", factory=AdapterConfig)
    train: TrainConfig = opt(help="The optimization loop.", factory=TrainConfig)
    memory: MemoryConfig = opt(help="Memory features.", factory=MemoryConfig)
    tread: TreadConfig = opt(help="TREAD token routing (training only).", factory=TreadConfig)
    compile: CompileConfig = opt(help="torch.compile of the transformer blocks.", factory=CompileConfig)
    parallel: ParallelConfig = opt(help="Several GPUs or machines (torchrun): DDP, FSDP2, sequence parallelism.",
                                   factory=ParallelConfig)
    cache: CacheConfig = opt(help="Latent and text-embedding caches.", factory=CacheConfig)
    logging: LoggingConfig = opt(help="Metrics and progress.", factory=LoggingConfig)
    validation: ValidationConfig = opt(help="Sampling during training.", factory=ValidationConfig)
    ema: EmaConfig = opt(help="EMA of trained weights.", factory=EmaConfig)
    eval: EvalConfig = opt(help="Evaluation loss on held-out samples.", factory=EvalConfig)
    crepa: CrepaConfig = opt(help="CREPA temporal regulariser.", factory=CrepaConfig)
    rollout: RolloutConfig = opt(help="Scheduled sampling (rollout), experimental.", factory=RolloutConfig)
    hub: HubConfig = opt(help="Pushing the final adapter to a hub repository.", factory=HubConfig)
    dataset: list[DatasetConfig] = opt(help="Datasets, one [[dataset]] table each.", factory=list)

    @property
    def datasets(self) -> list[DatasetConfig]:
        """The enabled training datasets (the one named by validation.dataset only feeds validation)."""
        return [d for d in self.dataset if not d.disabled and d.id != self.validation.dataset]


# --------------------------------------------------------------------------------------------
# Building dataclasses from dicts, strictly.

def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp)).replace("'", '"')
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " (optional)"
    if origin is list:
        inner = typing.get_args(tp)[0]
        return f"list of {'tables' if _is_dataclass_type(inner) else _type_name(inner)}"
    if _is_dataclass_type(tp):
        return "table"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(tp, str(tp))


def _hint(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value, tp, where: str, errors: list[str]):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where, errors)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = _hint(value, choices) if isinstance(value, str) else ""
            errors.append(f"{where}: {value!r} is not one of {_type_name(tp)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {value!r}")
            return value
        inner = typing.get_args(tp)[0]
        return [_coerce(v, inner, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a table, got {value!r}")
            return tp()
        return _build(tp, value, where, errors)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (bool, int, float, str) and (type(value) is not tp):
        errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls, data: dict, where: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            close = _hint(key, fields)
            if close:
                close = close.replace("'", f"'{where}." if where else "'", 1)
            errors.append(f"unknown key {name!r}{close}")
            continue
        kwargs[key] = _coerce(value, hints[key], name, errors)
    for f in fields.values():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            errors.append(f"{where}: missing required key {f.name!r} ({f.metadata.get('help', '')})")
            kwargs[f.name] = _placeholder(hints[f.name])
    return cls(**kwargs)


def _placeholder(tp):
    # Stands in for a missing required value so every error of a file is reported in one go.
    return {str: "", int: 0, float: 0.0, bool: False}.get(tp)


# --------------------------------------------------------------------------------------------
# Validation of values (types are checked while building).

def resolve_routes(routes, num_layers: int) -> list[tuple[float, int, int]]:
    """The one TREAD route resolver: ``TreadRoute`` entries (or dicts with the same keys) ->
    absolute ``(ratio, start, end)`` tuples, the form the models take. Errors (a ConfigError, so
    a ValueError) on a bad ratio, bounds, order or overlap. Ratio 0 routes nothing (a no-op)."""
    out = []
    for i, r in enumerate(routes or ()):
        if isinstance(r, dict):
            r = TreadRoute(**r)
        start = r.start_layer + num_layers if r.start_layer < 0 else r.start_layer
        end = r.end_layer + num_layers if r.end_layer < 0 else r.end_layer
        if not (0 <= r.selection_ratio < 1):
            raise ConfigError(f"tread.routes[{i}]: selection_ratio must be in [0, 1), got {r.selection_ratio}")
        if not (0 <= start <= end < num_layers):
            raise ConfigError(
                f"tread.routes[{i}]: layers {r.start_layer}..{r.end_layer} resolve to {start}..{end}, "
                f"outside 0..{num_layers - 1} or reversed")
        if out and start <= out[-1][2]:
            raise ConfigError(
                f"tread.routes[{i}]: starts at layer {start}, not after the previous route's end "
                f"{out[-1][2]}; routes must be sorted and non-overlapping")
        out.append((float(r.selection_ratio), start, end))
    return out


def _is_4k1(n: int) -> bool:
    return n >= 1 and (n - 1) % 4 == 0


def _frames_fix(n: int) -> str:
    lo = max(1, n - (n - 1) % 4)
    return f"{lo} or {lo + 4}"


def validate(cfg: Config) -> list[str]:
    """Every value problem of the config, as messages naming the key and the fix."""
    e: list[str] = []
    m, t, mem, a = cfg.model, cfg.train, cfg.memory, cfg.adapter
    e += _expert_errors(cfg)
    if m.flavour in FLAVOUR_ALIASES.get(m.family, {}):
        pass  # an alias left unresolved: _expert_errors said why
    elif m.flavour not in FLAVOURS[m.family]:
        e.append(f"model.flavour: {m.flavour!r} is not a {m.family} flavour; choose one of "
                 f"{sorted(FLAVOURS[m.family])}{_hint(m.flavour, FLAVOURS[m.family])}")
    if m.fps is not None and m.fps < 1:
        e.append(f"model.fps: must be >= 1, got {m.fps}")
    if a.type != "full" and a.rank < 1:
        e.append(f"adapter.rank: must be >= 1, got {a.rank}")
    if not 0 <= a.dropout < 1:
        e.append(f"adapter.dropout: must be in [0, 1), got {a.dropout}")
    if a.type == "full" and m.base_precision == "int8":
        e.append("adapter.type = \"full\" cannot train int8 weights: set model.base_precision = \"bf16\" "
                 "or train a LoRA/LoKr")
    for key in ("max_train_steps", "batch_size", "gradient_accumulation_steps"):
        if getattr(t, key) < 1:
            e.append(f"train.{key}: must be >= 1, got {getattr(t, key)}")
    for key in ("lr_warmup_steps", "checkpoint_every", "keep_checkpoints", "max_consecutive_nonfinite"):
        if getattr(t, key) < 0:
            e.append(f"train.{key}: must be >= 0, got {getattr(t, key)}")
    if t.learning_rate <= 0:
        e.append(f"train.learning_rate: must be > 0, got {t.learning_rate}")
    if t.max_grad_norm < 0:
        e.append(f"train.max_grad_norm: must be >= 0 (0 disables clipping), got {t.max_grad_norm}")
    if not 0 <= t.caption_dropout <= 1:
        e.append(f"train.caption_dropout: must be in [0, 1], got {t.caption_dropout}")
    if len(t.betas) != 2:
        e.append(f"train.betas: expected 2 values, got {t.betas}")
    if t.timestep_sampling == "shift" and t.flow_shift <= 0:
        e.append(f"train.flow_shift: must be > 0, got {t.flow_shift}")
    if mem.gradient_checkpointing_every_n < 1:
        e.append(f"memory.gradient_checkpointing_every_n: must be >= 1, got {mem.gradient_checkpointing_every_n}")
    if mem.chunked_ff.chunk_size < 1:
        e.append(f"memory.chunked_ff.chunk_size: must be >= 1, got {mem.chunked_ff.chunk_size}")
    if mem.offload.blocks_per_group < 1:
        e.append(f"memory.offload.blocks_per_group: must be >= 1, got {mem.offload.blocks_per_group}")
    if mem.offload.type == "block_level" and a.type == "full":
        e.append("memory.offload.type = \"block_level\" streams frozen base weights, but adapter.type = \"full\" "
                 "trains them all: set memory.offload.type = \"none\" or train a LoRA")
    if m.family == "sana_video":
        if a.export_format in ("wan", "both") and a.type != "full":
            e.append(f"adapter.export_format = {a.export_format!r}: Sana Video LoRAs have no original-Wan key layout; "
                     f"use \"diffusers\" (SanaVideoPipeline.load_lora_weights reads it)")
        if m.force_2_1_time_embedding:
            e.append("model.force_2_1_time_embedding is a Wan 2.2 option; remove it for Sana Video")
        if cfg.validation.skip_layers:
            e.append("validation.skip_layers: skip-layer guidance is a Wan option; Sana Video validates as "
                     "SanaVideoPipeline does (CFG only): set validation.skip_layers = []")
    elif any(d.loss_mask_path for d in cfg.dataset):
        e.append(f"dataset.loss_mask_path: masked loss is a Sana Video option; {m.family} trains without loss masks "
                 f"(the Wan guide: do not use masked loss with Wan): remove loss_mask_path")
    if mem.offload.type == "block_level" and mem.model_cpu_offload:
        e.append("memory.model_cpu_offload and memory.offload.type = \"block_level\" are mutually "
                 "exclusive: keep one")
    # Routes: what is decidable without the layer count (negative and positive indices only
    # compare once the model is known; TreadConfig.resolve does the full check).
    prev = None
    for i, r in enumerate(cfg.tread.routes):
        if not 0 <= r.selection_ratio < 1:
            e.append(f"tread.routes[{i}].selection_ratio: must be in [0, 1), got {r.selection_ratio}")
        if (r.start_layer < 0) == (r.end_layer < 0) and r.start_layer > r.end_layer:
            e.append(f"tread.routes[{i}]: start_layer {r.start_layer} is after end_layer {r.end_layer}")
        if prev is not None and (prev.end_layer < 0) == (r.start_layer < 0) and r.start_layer <= prev.end_layer:
            e.append(f"tread.routes[{i}]: starts at layer {r.start_layer}, not after the previous route's "
                     f"end {prev.end_layer}; routes must be sorted and non-overlapping")
        prev = r
    par = cfg.parallel
    if par.sequence < 1:
        e.append(f"parallel.sequence: must be >= 1 (1: off), got {par.sequence}")
    for key in ("timeout_s", "wait_timeout_s"):
        if getattr(par, key) <= 0:
            e.append(f"parallel.{key}: must be > 0 seconds, got {getattr(par, key)}")
    for key in ("vae_batch_size", "text_batch_size"):
        if getattr(cfg.cache, key) < 1:
            e.append(f"cache.{key}: must be >= 1, got {getattr(cfg.cache, key)}")
    v = cfg.validation
    if not _is_4k1(v.num_frames):
        e.append(f"validation.num_frames: Wan needs 4k+1 frames, got {v.num_frames}; use {_frames_fix(v.num_frames)}")
    try:
        w, h = (int(x) for x in v.resolution.lower().split("x"))
        if w % 16 or h % 16 or w < 16 or h < 16:
            e.append(f"validation.resolution: width and height must be multiples of 16, got {v.resolution!r}; "
                     f"use {max(16, w // 16 * 16)}x{max(16, h // 16 * 16)}")
    except ValueError:
        e.append(f"validation.resolution: expected \"WxH\" such as \"832x480\", got {v.resolution!r}")
    if not 0 <= v.skip_layers_start <= v.skip_layers_stop <= 1:
        e.append("validation.skip_layers_start/stop: need 0 <= start <= stop <= 1")
    e += _validate_eval(cfg)
    if m.family == "wan_s2v" and v.every > 0 and not v.reference_media:
        e.append("validation.reference_media: Wan S2V validation needs an image or video per prompt (its first "
                 "frame is the reference; the audio file of the same stem beside it drives the clip); set it, or "
                 "validation.every = 0")
    if cfg.ema.update_interval < 1:
        e.append(f"ema.update_interval: must be >= 1, got {cfg.ema.update_interval}")
    if not 0 < cfg.ema.decay < 1:
        e.append(f"ema.decay: must be in (0, 1), got {cfg.ema.decay}")
    if v.dataset is not None:
        by_id = {d.id: d for d in cfg.dataset}
        d = by_id.get(v.dataset)
        if d is None:
            e.append(f"validation.dataset: no [[dataset]] with id {v.dataset!r}{_hint(v.dataset, by_id)}; "
                     f"datasets: {sorted(by_id)}")
        elif d.type != "image" or d.disabled:
            e.append(f"validation.dataset: {v.dataset!r} must be an enabled image dataset (type = \"image\"): "
                     f"its images are the first frames of the validation videos")
    seen = set()
    for i, d in enumerate(cfg.dataset):
        where = f"dataset[{i}] ({d.id!r})"
        if d.id in seen:
            e.append(f"{where}: duplicate id; dataset ids must be unique")
        seen.add(d.id)
        if not d.path:
            e.append(f"{where}.path: empty")
        if d.resolution < 16:
            e.append(f"{where}.resolution: must be >= 16 pixels, got {d.resolution}")
        if d.repeats < 0:
            e.append(f"{where}.repeats: must be >= 0, got {d.repeats}")
        if d.weight <= 0:
            e.append(f"{where}.weight: must be > 0, got {d.weight}")
        if d.caption_strategy == "instanceprompt" and not d.caption_prefix:
            e.append(f"{where}: caption_strategy = \"instanceprompt\" needs caption_prefix (the prompt)")
        if d.last_image and d.i2v is False:
            e.append(f"{where}.last_image: conditions an image-to-video clip on its last frame too; it needs "
                     f"i2v (unset i2v or set it true)")
        if (d.i2v or d.last_image) and d.type == "image":
            e.append(f"{where}.i2v: an image has no frames after the first to learn; train image-to-video on "
                     f"videos (an image dataset can feed validation: validation.dataset = {d.id!r})")
        if m.family == "wan_s2v":
            e += _s2v_dataset_errors(d, where)
        if d.type != "video":
            continue
        if not _is_4k1(d.num_frames):
            e.append(f"{where}.num_frames: Wan needs 4k+1 frames, got {d.num_frames}; use {_frames_fix(d.num_frames)}")
        if d.min_frames is not None and d.min_frames < 1:
            e.append(f"{where}.min_frames: must be >= 1, got {d.min_frames}")
        if d.max_frames is not None and d.max_frames < (d.min_frames or 1):
            e.append(f"{where}.max_frames: {d.max_frames} is below min_frames {d.min_frames}")
        if d.frame_interval < 4 or d.frame_interval % 4:
            e.append(f"{where}.frame_interval: must be a positive multiple of 4 (Wan's 4k+1 frames), "
                     f"got {d.frame_interval}; use {max(4, round(d.frame_interval / 4) * 4)}")
    return e


def _expert_errors(cfg: Config) -> list[str]:
    """Flavour aliases, model.experts and the settings that depend on it."""
    m, e = cfg.model, []
    alias = FLAVOUR_ALIASES.get(m.family, {}).get(m.flavour)
    if alias is not None:  # _finalize resolves an alias unless model.experts contradicts it
        return [f"model.flavour = {m.flavour!r} means {alias[0]!r} with experts = {alias[1]!r}, but "
                f"model.experts = {m.experts!r}: set model.flavour = {alias[0]!r} and the experts you want"]
    two = m.flavour in EXPERT_FLAVOURS.get(m.family, ())
    if two and m.experts is None:
        e.append(f"model.experts: {m.flavour} holds two experts (transformer/ = high noise, transformer_2/ = low "
                 f"noise): set model.experts = \"high\", \"low\" or \"both\"")
    if m.experts is not None and not two and m.flavour in FLAVOURS.get(m.family, {}):
        e.append(f"model.experts: {m.flavour} has a single transformer; unset model.experts (two-expert "
                 f"flavours: {', '.join(EXPERT_FLAVOURS.get(m.family, ()))})")
    if m.experts == "both" and m.transformer_subfolder is not None:
        e.append("model.transformer_subfolder: with model.experts = \"both\" each expert loads from its own "
                 "subfolder (transformer/, transformer_2/); unset it")
    if cfg.validation.load_other_stage and not two:
        e.append(f"validation.load_other_stage: {m.flavour} has no other stage; it is for two-expert flavours "
                 f"({', '.join(EXPERT_FLAVOURS.get(m.family, ()))})")
    return e


def _s2v_dataset_errors(d: DatasetConfig, where: str) -> list[str]:
    a, e = d.audio, []
    if d.type != "video":
        e.append(f"{where}.type: Wan S2V trains on videos with audio, not {d.type}s; use type = \"video\"")
    elif d.num_frames < 5:
        e.append(f"{where}.num_frames: Wan S2V needs the reference frame and at least 4 more (one latent), got "
                 f"{d.num_frames}; use 5 or more")
    if a.sample_rate != 16000 or a.channels != 1:
        e.append(f"{where}.audio: wav2vec2 takes 16 kHz mono; set sample_rate = 16000 and channels = 1 "
                 f"(got {a.sample_rate}, {a.channels})")
    if not a.auto_split and not a.path:
        e.append(f"{where}.audio.path: auto_split = false needs the folder of audio files matched by stem")
    if a.max_duration_seconds is not None and a.max_duration_seconds <= 0:
        e.append(f"{where}.audio.max_duration_seconds: must be > 0, got {a.max_duration_seconds}")
    if a.duration_interval < 0:
        e.append(f"{where}.audio.duration_interval: must be >= 0, got {a.duration_interval}")
    return e


def _validate_eval(cfg: Config) -> list[str]:
    """Problems of the [eval], [crepa], [rollout] and [hub] sections and the preview keys."""
    e, ev = [], cfg.eval
    if ev.every < 0 or ev.max_samples < 1:
        e.append(f"eval.every must be >= 0 and eval.max_samples >= 1, got {ev.every} and {ev.max_samples}")
    if ev.every > 0:
        ids = [d.id for d in cfg.datasets]
        if ev.dataset is not None and ev.dataset not in ids:
            e.append(f"eval.dataset: no enabled [[dataset]] with id {ev.dataset!r}{_hint(ev.dataset, ids)}; "
                     f"datasets: {ids}")
        elif ev.dataset is not None and len(ids) < 2:
            e.append(f"eval.dataset = {ev.dataset!r} is the only dataset: add a training [[dataset]], or hold out "
                     f"part of it with eval.split_fraction instead")
        if ev.dataset is None and not 0 < ev.split_fraction < 1:
            e.append(f"eval.every > 0 needs eval.dataset (a held-out [[dataset]] id) or 0 < eval.split_fraction < 1, "
                     f"got split_fraction {ev.split_fraction}")
        if not ev.timesteps or not all(0 <= t <= 1000 for t in ev.timesteps):
            e.append(f"eval.timesteps: need one or more values in 0..1000, got {ev.timesteps}")
    cr = cfg.crepa
    if cr.enabled:
        if cr.weight < 0 or cr.adjacent_distance < 0 or cr.adjacent_tau <= 0:
            e.append(f"crepa: need weight >= 0, adjacent_distance >= 0 and adjacent_tau > 0, got {cr.weight}, "
                     f"{cr.adjacent_distance} and {cr.adjacent_tau}")
        if cr.encoder_image_size < 14 or cr.head_dim < 1:
            e.append(f"crepa: encoder_image_size must be >= 14 and head_dim >= 1, got {cr.encoder_image_size} "
                     f"and {cr.head_dim}")
    ro = cfg.rollout
    if not 0 <= ro.probability <= 1 or ro.max_step_offset < 0 or ro.sampler_steps < 1 or ro.shift <= 0:
        e.append(f"rollout: need 0 <= probability <= 1, max_step_offset >= 0, sampler_steps >= 1 and shift > 0, got "
                 f"{ro.probability}, {ro.max_step_offset}, {ro.sampler_steps} and {ro.shift}")
    v = cfg.validation
    if v.preview_every < 0 or v.webhook_timeout <= 0:
        e.append(f"validation: preview_every must be >= 0 and webhook_timeout > 0, got {v.preview_every} and "
                 f"{v.webhook_timeout}")
    if v.webhook_url and not v.webhook_url.startswith(("http://", "https://")):
        e.append(f"validation.webhook_url: expected an http(s):// URL, got {v.webhook_url!r}")
    if cfg.hub.repo_id is not None and cfg.hub.repo_id.count("/") != 1:
        e.append(f"hub.repo_id: expected \"user/name\", got {cfg.hub.repo_id!r}")
    return e


def _finalize(cfg: Config) -> Config:
    """Fill defaults that depend on other values, so the resolved config says what runs."""
    m = cfg.model
    if m.family != "wan" and m.flavour == ModelConfig.flavour and m.family in FLAVOURS:
        m.flavour = next(iter(FLAVOURS[m.family]))  # the default flavour is Wan's: use the family's first
    alias = FLAVOUR_ALIASES.get(m.family, {}).get(m.flavour)
    if alias is not None and (alias[1] is None or m.experts in (None, alias[1])):
        m.flavour = alias[0]
        m.experts = m.experts or alias[1]
    for d in cfg.dataset:
        if d.min_frames is None:
            d.min_frames = 1 if d.type == "image" else d.num_frames
    if cfg.adapter.alpha is None:
        cfg.adapter.alpha = float(cfg.adapter.rank)
    if cfg.model.fps is None and cfg.model.flavour in FLAVOURS.get(cfg.model.family, {}):
        cfg.model.fps = cfg.model.resolved_fps()
    return cfg


# --------------------------------------------------------------------------------------------
# Overrides, loading, dumping.

def _parse_value(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # bare words and paths: --set model.path=/data/wan


def apply_override(data: dict, assignment: str) -> str:
    """Apply one ``section.key=value`` (``dataset.<id|index>.key=value`` for datasets) in place;
    return the key's canonical name (``dataset[0].repeats`` for datasets)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    value = _parse_value(raw.strip())
    if parts[0] == "dataset":
        datasets = data.setdefault("dataset", [])
        if len(parts) < 3:
            raise ConfigError(f"--set {assignment!r}: address a dataset as dataset.<id or index>.key=value")
        ref = parts[1]
        ids = [d.get("id") for d in datasets]
        if ref in ids:
            index = ids.index(ref)
        elif ref.isdigit() and int(ref) < len(datasets):
            index = int(ref)
        else:
            raise ConfigError(f"--set {assignment!r}: no dataset with id or index {ref!r}{_hint(ref, ids)}; "
                              f"datasets: {ids}")
        node, prefix, parts = datasets[index], f"dataset[{index}].", parts[2:]
    else:
        node, prefix = data, ""
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {assignment!r}: {p!r} is not a table")
        node = nxt
    node[parts[-1]] = value
    return prefix + ".".join(parts)


def config_from_dict(data: dict, source: str = "<dict>", overrides: list[str] = ()) -> Config:
    """Build, finalize and validate a Config; one ConfigError lists every problem found."""
    data = copy.deepcopy(data)
    overridden = {apply_override(data, o) for o in overrides}
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if not errors:
        errors = validate(_finalize(cfg))
    # Say where a bad key came from when it was a --set rather than the file.
    errors = [f"{e} [from --set]" if any(f"'{k}'" in e.split(" (")[0] or e.startswith(f"{k}:") for k in overridden)
              else e for e in errors]
    if errors:
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(errors))
    return cfg


def override(cfg: Config, overrides: list[str], source: str = "<overrides>") -> Config:
    """A new, validated Config: ``cfg`` with ``--set``-style ``overrides`` applied."""
    return config_from_dict(_to_toml_data(cfg), source, overrides)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a TOML config (None: all defaults) and apply ``--set`` overrides."""
    if path is None:
        return config_from_dict({}, "<defaults>", overrides)
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data, str(path), overrides)


def _to_toml_data(obj):
    if dataclasses.is_dataclass(obj):
        # TOML has no null: None fields are left out and come back as their None default.
        return {f.name: _to_toml_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if getattr(obj, f.name) is not None}
    if isinstance(obj, list):
        return [_to_toml_data(v) for v in obj]
    return obj


def dump_config(cfg: Config) -> str:
    """The resolved config as TOML; ``load_config`` of it gives back an equal Config."""
    import tomli_w

    data = _to_toml_data(cfg)
    if not data["dataset"]:
        del data["dataset"]  # an empty array of tables would print as a stray `dataset = []`
    return tomli_w.dumps(data)


def save_resolved_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write ``<run_dir>/config.resolved.toml`` atomically."""
    from .fsutil import atomic_write_bytes

    path = Path(run_dir) / "config.resolved.toml"
    atomic_write_bytes(path, dump_config(cfg).encode())
    return path


# --------------------------------------------------------------------------------------------
# Schema documentation (``--help-config`` and docs/config.md).

def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        d = f.default
    elif f.default_factory is not dataclasses.MISSING:
        d = f.default_factory()
        if dataclasses.is_dataclass(d):
            return ""
    else:
        return "required"
    if d is None:
        return "unset"
    import tomli_w

    return "`" + tomli_w.dumps({"v": d}).strip()[4:] + "`"


def _doc_section(cls, name: str, array: bool, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    sub = []
    header = f"[[{name}]]" if array else f"[{name}]"
    lines += [f"## `{header}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if _is_dataclass_type(tp):
            sub.append((tp, f"{name}.{f.name}", False))
            continue
        if inner is not None and _is_dataclass_type(inner):
            sub.append((inner, f"{name}.{f.name}", True))
        help_ = f.metadata.get("help", "").replace("|", "\\|")
        lines.append(f"| `{f.name}` | {_type_name(tp).replace('|', 'or')} | {_default_repr(f)} | {help_} |")
    lines.append("")
    for tp, sub_name, sub_array in sub:
        _doc_section(tp, sub_name, sub_array, lines)


def render_config_docs() -> str:
    """Markdown reference of every section and key, generated from the dataclasses."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m vidtune.config > docs/config.md`; do not edit by hand. -->",
        "",
        "One TOML file configures a run: `vidtune-train config.toml`. Unknown keys are errors.",
        "Override any key from the command line with `--set section.key=value` (the value is read",
        "as TOML; datasets as `dataset.<id or index>.key=value`); `--print-config` prints the",
        "resolved config, which is also saved to the run directory as `config.resolved.toml`.",
        "",
        "Model flavours (`[model] family / flavour` -> default checkpoint):",
        "",
    ]
    for fam, flavours in FLAVOURS.items():
        for fl, repo in flavours.items():
            lines.append(f"- `{fam}` / `{fl}`: `{repo}`")
    lines.append("")
    for f in dataclasses.fields(Config):
        tp = typing.get_type_hints(Config)[f.name]
        if typing.get_origin(tp) is list:
            _doc_section(typing.get_args(tp)[0], f.name, True, lines)
        else:
            _doc_section(tp, f.name, False, lines)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_config_docs())
