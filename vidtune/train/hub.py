"""Pushing a run's adapter to a hub repository (``[hub]``) with ``huggingface_hub``.

One commit per push: the exported adapter file(s) (or the full transformer folder), the resolved
config as ``vidtune_config.toml``, the newest validation contact sheets as ``images/<name>.png``
and a generated model card (``README.md``: base model, trigger words, settings, the sheets, how to
load it). ``push_every_checkpoint`` pushes each checkpoint's adapter under
``checkpoints/step-N/``. The endpoint is ``HF_ENDPOINT`` as set when the push runs (the hub by
default); the token is huggingface_hub's (``HF_TOKEN`` or ``hf auth login``). A push that fails
is reported in one line and never stops the run: the files stay in the run directory.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config import Config

CONFIG_NAME = "vidtune_config.toml"


def latest_sheets(run_dir: Path) -> list[Path]:
    """The contact sheets of the newest validation step (empty without validation)."""
    steps = sorted((Path(run_dir) / "validation").glob("step_*"))
    return sorted(steps[-1].glob("*.png")) if steps else []


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).expanduser().exists()


def model_card(cfg: Config, step: int, files: list[str], sheets: list[str], trigger: str) -> str:
    """The README.md of the pushed repo: YAML metadata, then what it is and how to load it."""
    m, a, t = cfg.model, cfg.adapter, cfg.train
    base = m.transformer_path or m.resolved_path()
    lines = ["---"]
    if _is_hub_id(base):
        lines.append(f"base_model: {base}")
    lines += ["library_name: diffusers", "pipeline_tag: text-to-video",
              f"tags: [vidtune, {m.family}, {'lora' if a.type != 'full' else 'full-finetune'}, text-to-video]"]
    if trigger:
        lines.append(f"instance_prompt: \"{trigger}\"")
    lines += ["---", "", f"# {cfg.hub.repo_id.split('/')[-1]}", "",
              f"A {a.type} of `{base}` ({m.family} / {m.flavour}) trained with vidtune for {step} steps.", ""]
    if trigger:
        lines += ["## Trigger words", "", f"Put `{trigger}` in the prompt.", ""]
    if sheets:
        lines += ["## Validation", ""] + [f"![{Path(s).stem}]({s})" for s in sheets] + [""]
    res = ", ".join(sorted({f"{d.resolution:g} ({d.resolution_type}) x {d.num_frames} frames" for d in cfg.datasets}))
    rows = [("adapter", f"{a.type}" + (f", rank {a.rank}, alpha {a.alpha:g}" if a.type != "full" else "")),
            ("steps", str(step)), ("batch", f"{t.batch_size} x {t.gradient_accumulation_steps} accumulation"),
            ("optimizer", f"{t.optimizer}, lr {t.learning_rate:g} ({t.lr_scheduler}, warmup {t.lr_warmup_steps})"),
            ("timesteps", t.timestep_sampling), ("precision", f"{m.dtype} weights, {m.base_precision} base"),
            ("data", res), ("TREAD routes", str(len(cfg.tread.routes))),
            ("CREPA", f"block {cfg.crepa.block_index}, weight {cfg.crepa.weight:g}" if cfg.crepa.enabled else "off")]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    lines += [f"The full config is `{CONFIG_NAME}`.", ""]
    lora = [f for f in files if f.endswith(".safetensors")]
    if a.type != "full" and lora:
        # the diffusers-layout file when there is one (written when diffusers cannot read the other)
        for_diffusers = next((f for f in lora if f.startswith("pytorch_lora_weights")), lora[0])
        for_comfy = next((f for f in lora if not f.startswith("pytorch_lora_weights")), None)
        pipe = ("SanaVideoPipeline" if m.family == "sana_video" else None if m.family == "wan_s2v"
                else "WanImageToVideoPipeline" if "i2v" in m.flavour else "WanPipeline")
        lines += ["## Use it", ""]
        if pipe:  # diffusers has no Wan S2V pipeline
            lines += ["```python", "import torch", f"from diffusers import {pipe}", "",
                      f"pipe = {pipe}.from_pretrained(\"{base}\", dtype=torch.bfloat16)",
                      f"pipe.load_lora_weights(\"{cfg.hub.repo_id}\", weight_name=\"{for_diffusers}\")", "```", ""]
        if for_comfy:
            lines += [f"ComfyUI: put `{for_comfy}` in `models/loras` and load it with LoraLoaderModelOnly.", ""]
    return "\n".join(lines)


def push(cfg: Config, run_dir: Path, files: list[Path], step: int, trigger: str, log=print,
         prefix: str = "", root: Path | None = None) -> str | None:
    """Upload ``files`` (files or folders, named by their path under ``root``, the run directory by
    default) with the resolved config in one commit under ``prefix`` of ``hub.repo_id``, plus the
    model card and newest contact sheets for a push of the final adapter (no prefix). Returns the
    commit URL, or None after logging why not."""
    try:
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
        repo = cfg.hub.repo_id
        api.create_repo(repo, private=cfg.hub.private, exist_ok=True)
        ops, names = [], []
        for f in map(Path, files):
            for p in sorted(f.rglob("*")) if f.is_dir() else [f]:
                if p.is_file():
                    name = p.relative_to(root or run_dir).as_posix()
                    names.append(name)
                    ops.append(CommitOperationAdd(prefix + name, str(p)))
        resolved = Path(run_dir) / "config.resolved.toml"
        if resolved.is_file():
            ops.append(CommitOperationAdd(prefix + CONFIG_NAME, str(resolved)))
        if not prefix:
            sheets = latest_sheets(run_dir)
            ops += [CommitOperationAdd(f"images/{s.name}", str(s)) for s in sheets]
            card = model_card(cfg, step, names, [f"images/{s.name}" for s in sheets], trigger)
            ops.append(CommitOperationAdd("README.md", card.encode()))
        info = api.create_commit(repo, operations=ops, commit_message=f"vidtune: {prefix or 'adapter '}step {step}")
        log(f"hub: pushed {len(ops)} file(s) to {repo} ({info.commit_url})")
        return info.commit_url
    except Exception as exc:  # a push never stops the run: the files are in the run directory
        why = " ".join(str(exc).split())
        log(f"warning: hub push to {cfg.hub.repo_id} failed ({type(exc).__name__}: {why}); the files stay in "
            f"{run_dir}; upload them later with `hf upload {cfg.hub.repo_id} {run_dir}`")
        return None
