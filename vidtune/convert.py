"""SimpleTuner ``config.json`` + ``multidatabackend.json`` -> vidtune TOML.

``convert_simpletuner(config, backends)`` returns ``(toml_text, unmapped, notes)``:
every SimpleTuner key ends up in exactly one place — a vidtune key in the TOML, ``notes`` (a
documented exception, with the reason; listed in docs/convert.md) or ``unmapped`` (not
understood or not supported, with the reason). Nothing is dropped silently. Keys may carry
SimpleTuner's CLI-style ``--`` prefix. A setting vidtune must refuse (NF4/INT4 for Wan, an
unsupported model family) raises ``ConvertError`` with the reason.

Command line: ``vidtune convert config.json [multidatabackend.json] -o run.toml``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .config import FLAVOUR_ALIASES, FLAVOURS, ConfigError, config_from_dict


class ConvertError(ValueError):
    """A SimpleTuner setting vidtune refuses; the message says why and what to use instead."""


FAMILIES = {"wan": "wan", "wan_s2v": "wan_s2v", "sanavideo": "sana_video", "sana_video": "sana_video"}
DEFAULT_FLAVOUR = {"wan": "t2v-480p-1.3b-2.1", "wan_s2v": "s2v-14b-2.2", "sana_video": "2b-480p"}

# SimpleTuner optimizer -> (vidtune optimizer, SimpleTuner's default betas, weight decay, eps).
# The defaults are carried because vidtune's are AdamW's (0.9, 0.999), 0.01, 1e-8.
OPTIMIZERS = {
    "adamw": ("adamw", (0.9, 0.999), 1e-2, 1e-8),
    "torch-adamw": ("adamw", (0.9, 0.999), 1e-2, 1e-8),
    "adamw_bf16": ("adamw_bf16", (0.9, 0.999), 1e-2, 1e-6),
    "optimi-adamw": ("adamw_bf16", (0.9, 0.99), 0.0, 1e-6),  # Kahan-summed AdamW, like ours
    "optimi-lion": ("lion", (0.9, 0.99), 0.0, None),
    "bnb-lion": ("lion", (0.9, 0.99), 0.0, None),
    "bnb-adamw": ("adamw", (0.9, 0.999), 1e-2, 1e-6),
    "bnb-adamw8bit": ("adamw_8bit", (0.9, 0.999), 1e-2, 1e-6),
    "adamw8bit": ("adamw_8bit", (0.9, 0.999), 1e-2, 1e-6),
    "bnb-adamw8bit-paged": ("paged_adamw_8bit", (0.9, 0.999), 1e-2, 1e-6),
    "bnb-lion8bit": ("lion_8bit", (0.9, 0.99), 0.0, None),
    "bnb-lion8bit-paged": ("paged_lion_8bit", (0.9, 0.99), 0.0, None),
}
LR_SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant", "cosine": "cosine",
                 "linear": "linear", "polynomial": "polynomial"}
ATTENTION = {"diffusers": "sdpa", "sdpa": "sdpa", "sageattention": "sage", "flash-attn": "flash",
             "flash_attn": "flash", "flash-attention": "flash"}
INT8 = ("int8-quanto", "int8-torchao")
LOW_BIT = ("nf4-bnb", "int4-quanto", "int4-torchao", "int2-quanto")
BF16 = ("no_change", "bf16")
EMA_VALIDATION = {"ema_only": "ema_only", "comparison": "both", "both": "both", "none": "none"}

# Documented exceptions: accepted, not carried over, reason given (docs/convert.md lists them).
NOTED = {
    "webhook_config": "the webhook JSON is not read: set validation.webhook_url to its URL (vidtune posts previews "
                      "and contact sheets as multipart PNG + payload_json, the form Discord takes)",
    "data_backend_config": "the dataloader JSON is converted when given as the second argument "
                           "(or found at this path) and becomes [[dataset]] tables",
    "disable_benchmark": "vidtune renders no base-model benchmark videos before training",
    "delete_problematic_images": "vidtune never deletes source files: unreadable samples are skipped and counted",
    "ignore_final_epochs": "vidtune counts optimizer steps only (train.max_train_steps); there are no epochs to ignore",
    "disable_bucket_pruning": "vidtune never prunes buckets: the part of a bucket that does not fill a batch "
                              "waits for the next epoch's shuffle",
    "vae_cache_ondemand": "vidtune always fills the caches before training (resumable)",
    "text_encoder_2_precision": "Wan and Sana Video have a single text encoder",
    "lycoris_config": "unused with lora_type=standard (with lora_type=lycoris the JSON is read: algo lokr -> "
                      "adapter.type = \"lokr\", see docs/convert.md)",
    "validation_preview_steps": "carried as validation.preview_every only when validation_preview is true",
    "minimum_image_size": "vidtune resizes every clip to its bucket (resolution, resolution_type) and has no "
                          "minimum-size filter; smaller clips are upscaled instead of skipped",
    "maximum_image_size": "vidtune resizes every clip straight to its bucket; no separate pre-downsample "
                          "is needed (same result when it equals the resolution, as in the guides)",
    "target_downsample_size": "vidtune resizes every clip straight to its bucket (see maximum_image_size)",
    "metadata_backend": "vidtune discovers files itself and keeps its own content-keyed metadata",
    "conditioning_image_embeds": "vidtune caches each clip's I2V conditioning (first-frame latents, and the "
                                 "CLIP image embedding for Wan 2.1 I2V; Wan 2.2 I2V has no image encoder) in "
                                 "the clip's latent cache entry; no separate conditioning-embeds dataset",
    "cache_dir_conditioning_image_embeds": "no conditioning-embeds cache in vidtune (see conditioning_image_embeds)",
    "is_i2v": "Sana Video: I2V follows model.flavour: i2v-* flavours condition on each clip's first frame",
    "conditioning_type": "a loss-mask dataset (conditioning_type mask): its directory becomes loss_mask_path of "
                         "the datasets that name it in conditioning_data (masks matched by file stem)",
    "default": "vidtune has one text-embedding cache",
    "vae_cache_clear_each_epoch": "vidtune cache entries are content-keyed and never cleared per epoch",
}

UNSUPPORTED = {
    "crepa": "this CREPA option (lambda schedules, cutoffs, backbone features, cumulative neighbours) is not in "
             "vidtune's [crepa]; the constant-weight CREPA of the guides is",
    "masked_loss": "masked loss is a Sana Video option (the Wan guide: do not use masked loss with Wan)",
}


class _Converter:
    def __init__(self):
        self.out: dict = {}
        self.unmapped: list[str] = []
        self.notes: list[str] = []

    def set(self, dotted: str, value) -> None:
        node = self.out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def get(self, dotted: str, default=None):
        node = self.out
        for p in dotted.split("."):
            if not isinstance(node, dict) or p not in node:
                return default
            node = node[p]
        return node

    def note(self, key: str, reason: str) -> None:
        self.notes.append(f"{key}: {reason}")

    def unmap(self, key: str, value, reason: str = "not a SimpleTuner option vidtune knows") -> None:
        self.unmapped.append(f"{key}={json.dumps(value)}: {reason}")


def _copy(c: "_Converter", cfg: dict, used: set, table) -> None:
    """Copy each present SimpleTuner key to its vidtune key through its converter."""
    for key, target, conv in table:
        if cfg.get(key) is not None:
            used.add(key)
            c.set(target, conv(cfg[key]))


# SimpleTuner loads DINOv2 through torch hub; vidtune through transformers (the same weights).
CREPA_ENCODERS = {"dinov2_vits14": "facebook/dinov2-small", "dinov2_vitb14": "facebook/dinov2-base",
                  "dinov2_vitl14": "facebook/dinov2-large", "dinov2_vitg14": "facebook/dinov2-giant"}


def _crepa(c: "_Converter", cfg: dict, used: set) -> None:
    """The guides' CREPA keys -> [crepa]."""
    _copy(c, cfg, used, (("crepa_enabled", "crepa.enabled", _truthy), ("crepa_block_index", "crepa.block_index", int),
                         ("crepa_lambda", "crepa.weight", float),
                         ("crepa_adjacent_distance", "crepa.adjacent_distance", int),
                         ("crepa_adjacent_tau", "crepa.adjacent_tau", float),
                         ("crepa_encoder_image_size", "crepa.encoder_image_size", int),
                         ("crepa_spatial_align", "crepa.spatial_align", _truthy),
                         ("crepa_drop_vae_encoder", "crepa.drop_vae_encoder", _truthy)))
    if cfg.get("crepa_encoder") is not None:
        used.add("crepa_encoder")
        enc = str(cfg["crepa_encoder"])
        c.set("crepa.encoder", CREPA_ENCODERS.get(enc, enc))
        if enc not in CREPA_ENCODERS:
            c.note("crepa_encoder", f"{enc!r} is taken as a transformers model id or directory")
    if "crepa_normalize_by_frames" in cfg:
        used.add("crepa_normalize_by_frames")
        if not _truthy(cfg["crepa_normalize_by_frames"]):
            c.unmap("crepa_normalize_by_frames", cfg["crepa_normalize_by_frames"],
                    "vidtune's CREPA always averages over frames (SimpleTuner's default)")


def _hub(c: "_Converter", cfg: dict, used: set) -> None:
    """push_to_hub / hub_model_id / push_checkpoints_to_hub -> [hub]. SimpleTuner takes a bare
    name as the token owner's repo; vidtune needs the owner spelled out."""
    used.update(k for k in ("push_to_hub", "hub_model_id", "push_checkpoints_to_hub") if k in cfg)
    if not _truthy(cfg.get("push_to_hub", False)):
        if "hub_model_id" in cfg:
            c.note("hub_model_id", "push_to_hub is off: nothing is pushed")
        return
    name = str(cfg.get("hub_model_id") or "")
    if name.count("/") == 1:
        c.set("hub.repo_id", name)
    else:
        c.note("hub_model_id", f"push_to_hub = true: vidtune needs the repo's owner; set hub.repo_id = "
                               f"\"<your user>/{name or 'name'}\" to push")
    if _truthy(cfg.get("push_checkpoints_to_hub", False)):
        c.set("hub.push_every_checkpoint", True)


def _choose(c: "_Converter", cfg: dict, used: set, key: str, target: str, table: dict, reason: str) -> None:
    """Map a present SimpleTuner choice through ``table`` to ``target``; unknown values are listed
    as unmapped with ``reason``."""
    if key not in cfg:
        return
    used.add(key)
    value = table.get(str(cfg[key]))
    if value:
        c.set(target, value)
    else:
        c.unmap(key, cfg[key], reason)


def _truthy(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def _frames_4k1(n: int) -> int:
    """What Wan's VAE keeps of n frames: 4k+1 (the last partial group of 4 is dropped)."""
    return max(1, (int(n) - 1) // 4 * 4 + 1)


def _strip(d: dict) -> dict:
    return {k.lstrip("-"): v for k, v in d.items()}


# ---------------------------------------------------------------------------------------------
# config.json

def _model(c: _Converter, cfg: dict, used: set) -> str:
    fam_raw = cfg.get("model_family", "wan")
    used.add("model_family")
    if fam_raw not in FAMILIES:
        raise ConvertError(f"model_family={fam_raw!r}: vidtune trains Wan 2.1/2.2 (wan), Wan S2V (wan_s2v) "
                           f"and Sana Video (sanavideo) only")
    family = FAMILIES[fam_raw]
    flavour = cfg.get("model_flavour") or DEFAULT_FLAVOUR[family]
    used.add("model_flavour")
    flavour, experts = FLAVOUR_ALIASES.get(family, {}).get(flavour, (flavour, None))
    if flavour not in FLAVOURS[family]:
        raise ConvertError(f"model_flavour={cfg['model_flavour']!r}: not a vidtune {family} flavour; choose one of "
                           f"{sorted(FLAVOURS[family]) + sorted(FLAVOUR_ALIASES.get(family, {}))}")
    c.set("model.family", family)
    c.set("model.flavour", flavour)
    if experts:  # SimpleTuner's -high / -low flavours train one expert
        c.set("model.experts", experts)

    path = cfg.get("pretrained_model_name_or_path")
    used.add("pretrained_model_name_or_path")
    if path:
        c.set("model.path", path)
    for key, target in (("pretrained_t5_model_name_or_path", "model.text_encoder_path"),
                        ("pretrained_vae_model_name_or_path", "model.vae_path")):
        used.add(key)
        if cfg.get(key) and cfg[key] != path:  # the same repo is vidtune's default
            c.set(target, cfg[key])
    for key in ("pretrained_transformer_model_name_or_path", "pretrained_transformer_name_or_path"):
        used.add(key)
        if cfg.get(key):
            c.set("model.transformer_path", cfg[key])
    if "pretrained_transformer_subfolder" in cfg:
        used.add("pretrained_transformer_subfolder")
        sub = cfg["pretrained_transformer_subfolder"]
        c.set("model.transformer_subfolder", "" if sub in (None, "none", "None", "") else sub)
    if cfg.get("revision"):
        used.add("revision")
        c.set("model.revision", cfg["revision"])
    if "framerate" in cfg:
        used.add("framerate")
        c.set("model.fps", int(cfg["framerate"]))

    if "base_model_precision" in cfg:
        used.add("base_model_precision")
        p = str(cfg["base_model_precision"]).lower()
        if p in INT8:
            c.set("model.base_precision", "int8")
        elif p in LOW_BIT:
            if family in ("wan", "wan_s2v"):
                raise ConvertError(
                    f"base_model_precision={p!r}: Wan is sensitive to quantization and cannot be used with "
                    f"NF4 or INT4 (SimpleTuner's Wan guide); use \"int8-quanto\" (model.base_precision = "
                    f"\"int8\") or \"no_change\"")
            raise ConvertError(f"base_model_precision={p!r}: vidtune quantizes the base model to int8 only; "
                               f"use \"int8-quanto\" or \"no_change\"")
        elif p not in BF16:
            c.unmap("base_model_precision", cfg["base_model_precision"],
                    "vidtune keeps the base in bf16 or int8 (torchao); use int8-quanto for the smallest base")
    _choose(c, cfg, used, "base_model_default_dtype", "model.dtype",
            {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}, "expected bf16, fp16 or fp32")
    if "text_encoder_1_precision" in cfg:
        used.add("text_encoder_1_precision")
        if cfg["text_encoder_1_precision"] not in BF16:
            c.unmap("text_encoder_1_precision", cfg["text_encoder_1_precision"],
                    "vidtune runs the text encoder in model.text_encoder_dtype (bf16/fp16/fp32), unquantized; "
                    "it is only used while caching")
    _choose(c, cfg, used, "quantize_via", "model.quantize_via",
            {"cpu": "cpu", "accelerator": "device", "device": "device"}, "expected cpu or accelerator")
    if "attention_mechanism" in cfg:
        used.add("attention_mechanism")
        a = str(cfg["attention_mechanism"])
        backend = ATTENTION.get(a, "sage" if a.startswith("sageattention") else None)
        if backend:
            c.set("model.attention_backend", backend)
        else:
            c.unmap("attention_mechanism", a, "vidtune has torch SDPA (diffusers), flash-attn and SageAttention")
    if "wan_force_2_1_time_embedding" in cfg:
        used.add("wan_force_2_1_time_embedding")
        c.set("model.force_2_1_time_embedding", _truthy(cfg["wan_force_2_1_time_embedding"]))
    return family


def _adapter(c: _Converter, cfg: dict, used: set) -> None:
    mt = cfg.get("model_type", "lora")
    lt = cfg.get("lora_type", "standard")
    used.update(("model_type", "lora_type"))
    # LyCORIS's JSON (below) has its own rank and alpha: the lora_* keys come first so it wins.
    _copy(c, cfg, used, (("lora_rank", "adapter.rank", int), ("lora_alpha", "adapter.alpha", float),
                         ("lora_dropout", "adapter.dropout", float), ("init_lora", "adapter.init_from", str)))
    if mt == "full":
        c.set("adapter.type", "full")
    elif mt == "lora":
        if lt == "standard":
            c.set("adapter.type", "lora")
        elif lt == "lycoris":
            c.set("adapter.type", "lokr")
            used.add("lycoris_config")
            lyc = cfg.get("lycoris_config")
            if isinstance(lyc, dict):
                _lycoris(c, lyc)
            elif lyc:
                c.note("lycoris_config", f"{lyc} was not found, so vidtune's LoKr defaults apply; convert with the "
                                         f"file beside config.json (or at that path from the working directory)")
        else:
            c.unmap("lora_type", lt, "expected standard or lycoris")
    else:
        c.unmap("model_type", mt, "expected lora or full")


# LyCORIS makes both Kronecker factors full matrices for any linear_dim this large (or with
# full_matrix), and then scales by 1 whatever linear_alpha says; peft scales by alpha / r, so the
# same adapter needs alpha = rank there.
LYCORIS_FULL_RANK = 10000
LYCORIS_TARGETS = {"Attention": ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"],
                   "FeedForward": ["net.0.proj", "net.2"]}
LYCORIS_TARGETS["WanAttention"] = LYCORIS_TARGETS["Attention"]


def _lycoris(c: _Converter, lyc: dict) -> None:
    """SimpleTuner's ``lycoris_config.json`` (LyCORIS ``create_lycoris`` arguments) -> adapter keys."""
    lyc = dict(lyc)
    algo = lyc.pop("algo", "lora")
    if algo != "lokr":
        c.unmap("lycoris_config.algo", algo, "vidtune trains LoKr among LyCORIS's algorithms (lora_type=standard "
                                             "for a LoRA)")
        return
    dim, alpha = int(lyc.pop("linear_dim", 4)), float(lyc.pop("linear_alpha", 1.0))
    full = _truthy(lyc.pop("full_matrix", False))
    if full or dim >= LYCORIS_FULL_RANK:
        rank = max(dim, LYCORIS_FULL_RANK)
        c.set("adapter.rank", rank)
        c.set("adapter.alpha", float(rank))
        c.note("lycoris_config.linear_alpha",
               f"linear_dim {dim}{' with full_matrix' if full else ''}: LyCORIS uses full Kronecker factors and "
               f"scales them by 1 whatever linear_alpha ({alpha:g}) says; peft scales by alpha / rank, so "
               f"adapter.rank = adapter.alpha = {rank} (full factors, scale 1)")
    else:
        c.set("adapter.rank", dim)
        c.set("adapter.alpha", alpha)
    if "factor" in lyc:
        c.set("adapter.lokr_decompose_factor", int(lyc.pop("factor")))
    if "decompose_both" in lyc:
        c.set("adapter.lokr_decompose_both", _truthy(lyc.pop("decompose_both")))
    if "module_dropout" in lyc:
        c.set("adapter.dropout", float(lyc.pop("module_dropout")))
    if float(lyc.get("multiplier", 1.0)) == 1.0:
        lyc.pop("multiplier", None)
    preset = lyc.pop("apply_preset", None) or {}
    targets = []
    for cls in preset.get("target_module", []):
        if cls in LYCORIS_TARGETS:
            targets += [t for t in LYCORIS_TARGETS[cls] if t not in targets]
        else:
            c.unmap("lycoris_config.apply_preset.target_module", cls,
                    f"vidtune maps the classes {sorted(LYCORIS_TARGETS)} to adapter.target_modules")
    if targets:
        c.set("adapter.target_modules", targets)
    factors = {cls: int(m["factor"]) for cls, m in preset.get("module_algo_map", {}).items() if "factor" in m}
    if len(set(factors.values())) > 1 or set(factors.values()) - {c.get("adapter.lokr_decompose_factor")}:
        c.note("lycoris_config.module_algo_map",
               f"per-class factors {factors}: vidtune has one adapter.lokr_decompose_factor "
               f"({c.get('adapter.lokr_decompose_factor', -1)}, the top-level factor)")
    for k in set(preset) - {"target_module", "module_algo_map"}:
        c.unmap(f"lycoris_config.apply_preset.{k}", preset[k], "vidtune targets modules by adapter.target_modules")
    for k, v in lyc.items():
        c.unmap(f"lycoris_config.{k}", v, "not a LoKr setting vidtune has (rank, alpha, factor, decompose_both, "
                                          "module_dropout, the target classes)")


def _train(c: _Converter, cfg: dict, used: set, family: str) -> None:
    simple = (("output_dir", "train.output_dir", str), ("seed", "train.seed", int),
              ("train_batch_size", "train.batch_size", int), ("learning_rate", "train.learning_rate", float),
              ("lr_warmup_steps", "train.lr_warmup_steps", int), ("max_grad_norm", "train.max_grad_norm", float),
              ("checkpoint_step_interval", "train.checkpoint_every", int),
              ("checkpointing_steps", "train.checkpoint_every", int),
              ("checkpoints_total_limit", "train.keep_checkpoints", int),
              ("caption_dropout_probability", "train.caption_dropout", float))
    _copy(c, cfg, used, simple)
    if "resume_from_checkpoint" in cfg:
        used.add("resume_from_checkpoint")
        if cfg["resume_from_checkpoint"]:
            c.set("train.resume", str(cfg["resume_from_checkpoint"]))
    if "gradient_accumulation_steps" in cfg:
        used.add("gradient_accumulation_steps")
        c.set("train.gradient_accumulation_steps", max(1, int(cfg["gradient_accumulation_steps"])))
    steps, epochs = cfg.get("max_train_steps"), cfg.get("num_train_epochs")
    used.update(("max_train_steps", "num_train_epochs"))
    if steps:
        c.set("train.max_train_steps", int(steps))
    elif epochs:
        c.unmap("num_train_epochs", epochs, "vidtune trains for train.max_train_steps optimizer steps; set it "
                "to epochs x samples / (batch x accumulation)")
    _choose(c, cfg, used, "lr_scheduler", "train.lr_scheduler", LR_SCHEDULERS,
            f"vidtune has {sorted(set(LR_SCHEDULERS.values()))}")
    if "optimizer" in cfg:
        used.add("optimizer")
        o = OPTIMIZERS.get(cfg["optimizer"])
        if o:
            name, betas, wd, eps = o
            c.set("train.optimizer", name)
            c.set("train.betas", list(betas))
            c.set("train.weight_decay", wd)
            if eps is not None:
                c.set("train.eps", eps)
        else:
            c.unmap("optimizer", cfg["optimizer"], f"vidtune has adamw, adamw_bf16, lion and the 8-bit/paged "
                    f"bitsandbytes ones; known SimpleTuner names: {sorted(OPTIMIZERS)}")
    if "grad_clip_method" in cfg:
        used.add("grad_clip_method")
        if cfg["grad_clip_method"] in ("norm", "value"):
            c.set("train.grad_clip_method", cfg["grad_clip_method"])
        else:
            c.unmap("grad_clip_method", cfg["grad_clip_method"], "vidtune clips by norm or by value")
    if "mixed_precision" in cfg:
        used.add("mixed_precision")
        if cfg["mixed_precision"] in ("bf16", "fp16", "no"):
            c.set("train.mixed_precision", cfg["mixed_precision"])
        else:
            c.unmap("mixed_precision", cfg["mixed_precision"], "vidtune has bf16, fp16 and no")

    shift_keys = [k for k in ("flow_schedule_shift", "flow_schedule_auto_shift", "flow_use_uniform_schedule")
                  if k in cfg]
    used.update(shift_keys)
    if family == "sana_video":
        for k in shift_keys:
            c.note(k, "Sana Video uses the checkpoint's canonical flow schedule and ignores user shift "
                      "(SimpleTuner's Sana Video guide)")
    elif _truthy(cfg.get("flow_schedule_auto_shift", False)):
        c.set("train.timestep_sampling", "auto_shift")
    elif cfg.get("flow_schedule_shift") not in (None, 0):
        c.set("train.timestep_sampling", "shift")
        c.set("train.flow_shift", float(cfg["flow_schedule_shift"]))
    elif _truthy(cfg.get("flow_use_uniform_schedule", False)):
        c.set("train.timestep_sampling", "uniform")

    _choose(c, cfg, used, "report_to", "logging.report_to",
            {"wandb": "wandb", "tensorboard": "tensorboard", "none": "none"},
            "vidtune logs to tensorboard, wandb or none")
    for key, target in (("tracker_project_name", "logging.project"), ("tracker_run_name", "logging.run_name")):
        if cfg.get(key):
            used.add(key)
            c.set(target, str(cfg[key]))


def _memory(c: _Converter, cfg: dict, used: set) -> None:
    for key, target in (("gradient_checkpointing", "memory.gradient_checkpointing"),
                        ("offload_during_startup", "memory.offload_during_startup"),
                        ("enable_model_cpu_offload", "memory.model_cpu_offload")):
        if key in cfg:
            used.add(key)
            c.set(target, _truthy(cfg[key]))
    if cfg.get("gradient_checkpointing_interval"):
        used.add("gradient_checkpointing_interval")
        c.set("memory.gradient_checkpointing_every_n", int(cfg["gradient_checkpointing_interval"]))

    if "enable_group_offload" in cfg:
        used.add("enable_group_offload")
        if _truthy(cfg["enable_group_offload"]):
            c.set("memory.offload.type", "block_level")
    if "group_offload_type" in cfg:
        used.add("group_offload_type")
        if cfg["group_offload_type"] != "block_level":
            c.unmap("group_offload_type", cfg["group_offload_type"], "vidtune offloads block_level groups only")
    _copy(c, cfg, used, (("group_offload_blocks_per_group", "memory.offload.blocks_per_group", int),
                         ("group_offload_use_stream", "memory.offload.use_stream", _truthy),
                         ("group_offload_to_disk_path", "memory.offload.to_disk_path", str)))

    if "enable_chunked_feed_forward" in cfg:
        used.add("enable_chunked_feed_forward")
        c.set("memory.chunked_ff.enabled", _truthy(cfg["enable_chunked_feed_forward"]))
    if "feed_forward_chunk_size" in cfg:
        used.add("feed_forward_chunk_size")
        c.set("memory.chunked_ff.enabled", True)
        c.note("feed_forward_chunk_size",
               f"SimpleTuner chunks the feed-forward over the BATCH dimension ({cfg['feed_forward_chunk_size']} "
               f"samples per chunk: no saving at batch 1, the usual video case); vidtune chunks over tokens, so "
               f"memory.chunked_ff is enabled with its own chunk_size (tokens per chunk) instead of this value")

    if "tread_config" in cfg:
        used.add("tread_config")
        tc = cfg["tread_config"] or {}
        routes = []
        for i, r in enumerate(tc.get("routes", [])):
            try:
                # Same meaning in both: 0-based block indices, end inclusive, negative from the end
                # (SimpleTuner's wan transformer resolves idx < 0 as num_layers + idx and ends the
                # route after block end_layer_idx); selection_ratio is the fraction routed around.
                routes.append({"selection_ratio": float(r["selection_ratio"]),
                               "start_layer": int(r["start_layer_idx"]), "end_layer": int(r["end_layer_idx"])})
            except (KeyError, TypeError, ValueError):
                c.unmap(f"tread_config.routes[{i}]", r, "expected {selection_ratio, start_layer_idx, end_layer_idx}")
        extra = {k: v for k, v in tc.items() if k != "routes"}
        for k, v in extra.items():
            c.unmap(f"tread_config.{k}", v)
        if routes:
            c.set("tread.routes", routes)

    _copy(c, cfg, used, (("vae_batch_size", "cache.vae_batch_size", int),
                         ("compress_disk_cache", "cache.compress", _truthy)))


def _validation(c: _Converter, cfg: dict, used: set) -> None:
    simple = (("validation_step_interval", "validation.every", int), ("validation_steps", "validation.every", int),
              ("validation_negative_prompt", "validation.negative_prompt", str),
              ("validation_guidance", "validation.guidance", float),
              ("validation_num_inference_steps", "validation.steps", int),
              ("validation_seed", "validation.seed", int),
              ("validation_guidance_skip_layers_start", "validation.skip_layers_start", float),
              ("validation_guidance_skip_layers_stop", "validation.skip_layers_stop", float),
              ("validation_guidance_skip_scale", "validation.skip_layers_scale", float),
              ("user_prompt_library", "validation.prompt_library", str))
    _copy(c, cfg, used, simple)
    if cfg.get("validation_prompt"):
        used.add("validation_prompt")
        c.set("validation.prompts", [cfg["validation_prompt"]])
    if "validation_guidance_skip_layers" in cfg:
        used.add("validation_guidance_skip_layers")
        layers = cfg["validation_guidance_skip_layers"]
        if isinstance(layers, str):
            layers = json.loads(layers)
        c.set("validation.skip_layers", [int(x) for x in (layers or [])])
        if layers:
            c.note("validation_guidance_skip_layers",
                   "vidtune applies skip-layer guidance in diffusers' SD3 form (an extra conditional pass without "
                   "the layers, pred += (cond - cond_skip) * validation.skip_layers_scale, SimpleTuner's "
                   "validation_guidance_skip_scale, default 2.8) on steps with start <= i/steps <= stop; "
                   "SimpleTuner's Wan pipeline drops the layers from the unconditional pass outside [start, stop) "
                   "instead, so validation renders differ")
    if "validation_num_video_frames" in cfg:
        used.add("validation_num_video_frames")
        n = int(cfg["validation_num_video_frames"])
        if _frames_4k1(n) != n:
            c.note("validation_num_video_frames", f"{n} -> {_frames_4k1(n)}: Wan's VAE decodes 4k+1 frames")
        c.set("validation.num_frames", _frames_4k1(n))
    if "validation_resolution" in cfg:
        used.add("validation_resolution")
        res = [r.strip() for r in str(cfg["validation_resolution"]).split(",") if r.strip()]
        first = res[0] if "x" in res[0] else f"{res[0]}x{res[0]}"
        c.set("validation.resolution", first)
        if len(res) > 1:
            c.note("validation_resolution", f"vidtune validates at one resolution; kept {first}, dropped {res[1:]}")
    _choose(c, cfg, used, "validation_noise_scheduler", "validation.scheduler", {"unipc": "unipc", "euler": "euler"},
            "vidtune samples Wan with unipc (default) or euler (flow matching)")
    if "validation_preview" in cfg or "validation_preview_steps" in cfg:
        used.update(("validation_preview", "validation_preview_steps"))
        if _truthy(cfg.get("validation_preview", False)):
            c.set("validation.preview_every", int(cfg.get("validation_preview_steps", 1)))
    if "validation_prompt_library" in cfg:
        used.add("validation_prompt_library")
        if _truthy(cfg["validation_prompt_library"]):
            c.unmap("validation_prompt_library", cfg["validation_prompt_library"],
                    "SimpleTuner's built-in prompt library is not shipped; point user_prompt_library "
                    "(validation.prompt_library) at a {nickname: prompt} JSON")
    _copy(c, cfg, used, (("wan_validation_load_other_stage", "validation.load_other_stage", _truthy),))
    if "validation_using_datasets" in cfg or "eval_dataset_id" in cfg:
        used.update(("validation_using_datasets", "eval_dataset_id"))
        on, ds = _truthy(cfg.get("validation_using_datasets", False)), cfg.get("eval_dataset_id")
        if on and ds:  # the guide's I2V recipe: the image dataset whose images start the validation videos
            c.set("validation.dataset", str(ds))
        elif on:
            c.unmap("validation_using_datasets", cfg["validation_using_datasets"],
                    "name the image dataset whose images start the validation videos with eval_dataset_id")
        elif ds:
            c.unmap("eval_dataset_id", ds, "without validation_using_datasets this names an eval-loss dataset; "
                    "vidtune's eval_dataset_id support is I2V validation (validation.dataset)")

    _choose(c, cfg, used, "ema_validation", "ema.validation", EMA_VALIDATION, "expected ema_only, comparison or none")
    _copy(c, cfg, used, (("use_ema", "ema.enabled", _truthy), ("ema_update_interval", "ema.update_interval", int),
                         ("ema_decay", "ema.decay", float)))


# ---------------------------------------------------------------------------------------------
# multidatabackend.json

# SimpleTuner's dataset "audio" block -> [dataset.audio] (same names and meanings).
AUDIO_KEYS = ("auto_split", "sample_rate", "channels", "allow_zero_audio", "max_duration_seconds",
              "duration_interval", "truncation_mode")


def _audio(c: _Converter, where: str, b: dict, d: dict, audio_backends: dict, linked: set) -> None:
    """A video dataset's ``audio`` block and ``s2v_datasets`` (audio backends, matched by stem)."""
    audio = dict(b.pop("audio", None) or {})
    out = {k: audio.pop(k) for k in AUDIO_KEYS if k in audio}
    if "auto_split" in out:
        out["auto_split"] = _truthy(out["auto_split"])
    _leftovers(c, f"{where}.audio", audio)
    ids = b.pop("s2v_datasets", None)
    if ids is not None:
        ids = [ids] if isinstance(ids, str) else list(ids)
        dirs = [audio_backends[i].get("instance_data_dir") for i in ids if i in audio_backends]
        for i in ids:
            if i not in audio_backends:
                c.unmap(f"{where}.s2v_datasets", i, "no dataset_type = audio backend with this id")
        if dirs:
            linked.update(i for i in ids if i in audio_backends)
            out.update(auto_split=False, path=dirs[0])
            for extra in dirs[1:]:
                c.unmap(f"{where}.s2v_datasets", extra, "vidtune matches a video dataset's audio from one folder "
                        "(dataset.audio.path); merge the audio folders")
    if out:
        d["audio"] = out


def _datasets(c: _Converter, backends: list, cfg: dict, used: set) -> None:
    defaults = {k: cfg[k] for k in ("resolution", "resolution_type", "aspect_bucket_rounding",
                                    "minimum_image_size", "maximum_image_size", "target_downsample_size")
                if k in cfg}
    used.update(defaults)
    audio_backends = {b.get("id"): b for b in backends if b.get("dataset_type") == "audio"}
    linked: set = set()
    cache_dirs, datasets = [], []
    # Masked loss (the Dreambooth guide's setup): a conditioning dataset of masks, named by the
    # training dataset's conditioning_data, becomes that dataset's loss_mask_path (Sana Video only).
    masks = {b.get("id"): b.get("instance_data_dir") for b in backends
             if b.get("dataset_type") == "conditioning" and b.get("conditioning_type") == "mask"}
    sana = c.get("model.family") == "sana_video"
    for i, raw in enumerate(backends):
        b = dict(raw)
        did = b.pop("id", f"dataset{i}")
        where = f"dataset[{did}]"
        if b.pop("type", "local") != "local":
            c.unmap(f"{where}.type", raw.get("type"), "vidtune reads local directories only")
            continue
        kind = b.pop("dataset_type", "image")
        if kind == "text_embeds":
            if b.get("cache_dir"):
                cache_dirs.append(b.pop("cache_dir"))
            if b.get("write_batch_size") is not None:
                c.set("cache.text_batch_size", int(b.pop("write_batch_size")))
            b.pop("disabled", None)
            _leftovers(c, where, b)
            continue
        if kind == "conditioning_image_embeds":
            c.note(f"{where}.dataset_type", f"conditioning_image_embeds: {NOTED['conditioning_image_embeds']}")
            continue
        if kind == "conditioning" and b.get("conditioning_type") == "mask":
            if sana:
                c.note(f"{where}.dataset_type", NOTED["conditioning_type"])
            else:
                c.unmap(f"{where}.dataset_type", kind, UNSUPPORTED["masked_loss"])
            continue
        if kind == "audio":  # read through the s2v_datasets of the video datasets that name it
            for k in ("instance_data_dir", "disabled"):
                b.pop(k, None)
            _leftovers(c, where, b)
            continue
        if kind not in ("video", "image"):
            c.unmap(f"{where}.dataset_type", kind, "vidtune datasets are video or image directories")
            continue
        d = {"id": did, "type": kind}
        if "instance_data_dir" in b:
            d["path"] = b.pop("instance_data_dir")
        strategy = b.pop("caption_strategy", "textfile")
        if strategy in ("textfile", "filename", "instanceprompt"):
            d["caption_strategy"] = strategy
        else:
            c.unmap(f"{where}.caption_strategy", strategy, "vidtune reads textfile, filename or instanceprompt")
        if b.get("instance_prompt"):
            d["caption_prefix"] = b.pop("instance_prompt")
        merged = {**defaults, **b}
        for k in ("resolution", "resolution_type", "aspect_bucket_rounding", "minimum_image_size",
                  "maximum_image_size", "target_downsample_size"):
            b.pop(k, None)
        if "resolution" in merged:
            d["resolution"] = float(merged["resolution"])
        rt = merged.get("resolution_type", "pixel_area")
        if rt in ("pixel_area", "pixel"):
            d["resolution_type"] = rt
        else:
            c.unmap(f"{where}.resolution_type", rt, "vidtune reads pixel_area or pixel")
        if "aspect_bucket_rounding" in merged:
            d["aspect_bucket_rounding"] = int(merged["aspect_bucket_rounding"])
        for k in ("minimum_image_size", "maximum_image_size", "target_downsample_size"):
            if merged.get(k):
                c.note(f"{where}.{k}" if k in raw else k, NOTED[k])
        if "crop" in b:
            d["crop"] = _truthy(b.pop("crop"))
        if "crop_style" in b:
            cs = {"center": "center", "centre": "center", "random": "random"}.get(b.pop("crop_style"))
            if cs:
                d["crop_style"] = cs
            else:
                c.unmap(f"{where}.crop_style", raw["crop_style"], "vidtune crops center or random")
        if "crop_aspect" in b and b.pop("crop_aspect") not in ("preserve", None):
            c.unmap(f"{where}.crop_aspect", raw["crop_aspect"], "vidtune keeps each clip's aspect (preserve)")
        if "repeats" in b:
            d["repeats"] = int(b.pop("repeats"))
        if "probability" in b:
            d["weight"] = float(b.pop("probability"))
        if "disabled" in b:
            d["disabled"] = _truthy(b.pop("disabled"))
        if b.get("cache_dir_vae"):
            cache_dirs.append(b.pop("cache_dir_vae"))
        for k in ("metadata_backend", "conditioning_image_embeds", "cache_dir_conditioning_image_embeds"):
            if k in b:
                b.pop(k)
                c.note(f"{where}.{k}", NOTED[k])
        if "conditioning_data" in b:
            ref = b.pop("conditioning_data")
            if ref in masks and sana:
                d["loss_mask_path"] = masks[ref]
            else:
                c.unmap(f"{where}.conditioning_data", ref, UNSUPPORTED["masked_loss"] if ref in masks else
                        "only loss-mask conditioning datasets (conditioning_type mask) are converted")
        if kind == "video" and "video" in b:
            _video(c, where, b.pop("video"), d)
        _audio(c, where, b, d, audio_backends, linked)
        _leftovers(c, where, b)
        datasets.append(d)
    for i in sorted(set(audio_backends) - linked):
        c.unmap(f"dataset[{i}].dataset_type", "audio", "no video dataset names this audio backend in s2v_datasets")
    if datasets:
        c.set("dataset", datasets)
    if cache_dirs:
        try:
            target = os.path.commonpath(cache_dirs) or cache_dirs[0]
        except ValueError:  # absolute and relative paths mixed
            target = cache_dirs[0]
        c.set("cache.dir", target)
        c.note("cache_dir / cache_dir_vae",
               f"vidtune keeps latents and text embeddings under one cache.dir ({target!r}, content-keyed "
               f"subfolders) instead of per-dataset dirs {sorted(set(cache_dirs))}; SimpleTuner's cache files "
               f"are not reused")


def _video(c: _Converter, where: str, v: dict, d: dict) -> None:
    v = dict(v)
    if "num_frames" in v:
        n = int(v.pop("num_frames"))
        d["num_frames"] = _frames_4k1(n)
        if d["num_frames"] != n:
            c.note(f"{where}.video.num_frames",
                   f"{n} -> {d['num_frames']}: Wan's VAE encodes 4k+1 frames (SimpleTuner's VAE drops the "
                   f"trailing partial group, so it trained on {d['num_frames']} too)")
    for k in ("min_frames", "max_frames"):
        if v.get(k) is not None:
            d[k] = int(v.pop(k))
    if "bucket_strategy" in v:
        bs = v.pop("bucket_strategy")
        if bs in ("aspect_ratio", "resolution_frames"):
            d["bucket_strategy"] = bs
        else:
            c.unmap(f"{where}.video.bucket_strategy", bs, "vidtune has aspect_ratio and resolution_frames")
    if "frame_interval" in v:
        fi = int(v.pop("frame_interval"))
        d["frame_interval"] = max(4, round(fi / 4) * 4)
        if d["frame_interval"] != fi:
            c.note(f"{where}.video.frame_interval", f"{fi} -> {d['frame_interval']}: clip lengths must stay 4k+1")
    if "is_i2v" in v:
        if c.get("model.family") == "sana_video":  # the flavour decides; dataset.i2v is Wan's
            v.pop("is_i2v")
            c.note(f"{where}.video.is_i2v", NOTED["is_i2v"])
        else:
            d["i2v"] = _truthy(v.pop("is_i2v"))
    _leftovers(c, f"{where}.video", v)


def _leftovers(c: _Converter, where: str, b: dict) -> None:
    for k, v in b.items():
        if k in NOTED:
            c.note(f"{where}.{k}", NOTED[k])
        else:
            c.unmap(f"{where}.{k}", v)


# ---------------------------------------------------------------------------------------------

def convert_simpletuner(config: dict, backends: list | None = None, *, source: str = "config.json"
                        ) -> tuple[str, list[str], list[str]]:
    """(TOML text, unmapped, notes) for a SimpleTuner config dict and its dataloader list.

    The TOML is validated with vidtune's schema before it is returned (ConvertError otherwise).
    """
    import tomli_w

    cfg = _strip(config)
    c = _Converter()
    used: set = set()
    family = _model(c, cfg, used)
    _adapter(c, cfg, used)
    _train(c, cfg, used, family)
    _memory(c, cfg, used)
    _validation(c, cfg, used)
    _crepa(c, cfg, used)
    _hub(c, cfg, used)
    if family == "wan_s2v" and c.get("validation.every"):
        c.set("validation.every", 0)
        c.note("validation_step_interval", "Wan S2V validation needs validation.reference_media (a reference "
               "image or video + its audio per prompt), which the SimpleTuner config does not name: validation is "
               "off until you set it and validation.every")
    if backends is not None:
        _datasets(c, [_strip(b) for b in backends], cfg, used)
    for key in ("resolution", "resolution_type", "aspect_bucket_rounding"):
        if key in cfg and backends is None:
            used.add(key)
            c.note(key, "a dataset default: applied to the datasets when the dataloader JSON is converted too")
    for key in sorted(set(cfg) - used):
        prefix = key.split("_", 1)[0]
        if key in NOTED:
            c.note(key, NOTED[key])
        elif prefix in UNSUPPORTED or key in UNSUPPORTED:
            c.unmap(key, cfg[key], UNSUPPORTED.get(key, UNSUPPORTED.get(prefix)))
        elif key.startswith("ema_"):
            c.unmap(key, cfg[key], "vidtune's EMA has enabled, decay, update_interval and validation only")
        else:
            c.unmap(key, cfg[key])

    c.notes = list(dict.fromkeys(c.notes))
    try:
        config_from_dict(c.out, source)
    except ConfigError as exc:
        raise ConvertError(f"the converted config is not valid for vidtune:\n{exc}") from None

    order = ["model", "adapter", "train", "memory", "tread", "cache", "logging", "validation", "ema", "crepa",
             "hub", "dataset"]
    data = {k: c.out[k] for k in order if k in c.out}
    header = [f"# Converted from SimpleTuner {source} by `vidtune convert`."]
    if c.notes:
        header += ["#", "# Not carried over (documented in docs/convert.md):"] + [f"#   {n}" for n in c.notes]
    if c.unmapped:
        header += ["#", "# UNMAPPED (review these):"] + [f"#   {u}" for u in c.unmapped]
    return "\n".join(header) + "\n\n" + tomli_w.dumps(data), c.unmapped, c.notes


def read_simpletuner(config_path: str | Path, backend_path: str | Path | None = None
                     ) -> tuple[dict, list | None, list[str]]:
    """Load config.json and the dataloader JSON (given, or the config's data_backend_config when
    that file exists relative to the cwd or the config). Returns (config, backends, messages)."""
    config_path = Path(config_path)
    cfg = _load_json(config_path)
    if not isinstance(cfg, dict):
        raise ConvertError(f"{config_path}: expected a JSON object of SimpleTuner options")
    msgs = []
    if backend_path is None:
        ref = _strip(cfg).get("data_backend_config")
        if ref:
            for cand in (Path(ref), config_path.parent / ref, config_path.parent / Path(ref).name):
                if cand.is_file():
                    backend_path = cand
                    msgs.append(f"dataloader: {cand} (from data_backend_config)")
                    break
            else:
                msgs.append(f"dataloader: {ref} not found; pass it as the second argument to convert the datasets")
    for key in ("lycoris_config", "--lycoris_config"):
        ref = cfg.get(key)
        if not isinstance(ref, str) or _strip(cfg).get("lora_type") != "lycoris":
            continue
        for cand in (Path(ref), config_path.parent / ref, config_path.parent / Path(ref).name):
            if cand.is_file():
                cfg[key] = _load_json(cand)  # the converter maps its contents
                msgs.append(f"lycoris: {cand} (from lycoris_config)")
                break
    backends = None
    if backend_path is not None:
        backends = _load_json(Path(backend_path))
        if not isinstance(backends, list):
            raise ConvertError(f"{backend_path}: expected a JSON list of dataset entries")
    return cfg, backends, msgs


def from_simpletuner(config_path: str | Path, backend_path: str | Path | None = None, overrides: list[str] = (),
                     *, write: bool = True, log=None):
    """``vidtune-train --from-simpletuner``: convert, report notes and unmapped options, write the
    TOML as ``<output_dir>/simpletuner.toml`` (``write``) and return (Config with the ``--set``
    overrides applied, path written or None)."""
    from .config import tomllib
    from .fsutil import atomic_write_bytes

    log = log or (lambda m: print(m, file=sys.stderr))
    try:
        cfg, backends, msgs = read_simpletuner(config_path, backend_path)
        text, unmapped, notes = convert_simpletuner(cfg, backends, source=str(config_path))
    except ConvertError as exc:
        raise ConfigError(f"--from-simpletuner: {exc}") from None
    for m in msgs:
        log(m)
    for n in notes:
        log(f"not carried over: {n}")
    for u in unmapped:
        log(f"unmapped: {u}")
    resolved = config_from_dict(tomllib.loads(text), f"{config_path} (converted)", overrides)
    if not write:
        return resolved, None
    path = atomic_write_bytes(Path(resolved.train.output_dir) / "simpletuner.toml", text.encode())
    log(f"converted {config_path} -> {path}")
    return resolved, path


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{path}: not valid JSON: {exc}") from None
