"""Loading diffusers-layout checkpoints into vidtune's own modules.

Sources, in the order they are tried:
- a local directory with ``config.json`` and one or sharded safetensors (plus its index), or a
  pipeline directory (``model_index.json``) whose ``transformer/`` subfolder is used;
- a single ``.safetensors`` file (config from ``config=``, a ``config.json`` beside it, or the
  file's ``config`` metadata);
- otherwise a hub id, fetched with ``huggingface_hub.snapshot_download`` (only the subfolder).
Weights are read shard by shard onto a meta-initialised model, so peak host memory is the model
plus one shard. Unknown or missing keys are errors that list them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from . import FAMILIES, family_of_class
from . import family as family_package

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"

class ModelLoadError(ValueError):
    """A checkpoint file that cannot be read (the message names it and the fix)."""


# Keys diffusers itself ignores when present in a checkpoint.
IGNORED_KEYS = ("norm_added_q",)


def _resolve_dir(path: str, subfolder: str | None) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        d = p / subfolder if subfolder else p
        if not (d / "config.json").exists() and (d / "transformer" / "config.json").exists():
            d = d / "transformer"  # a whole pipeline directory
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"{d}: no config.json (expected a diffusers model directory)")
        return d
    if "/" not in path or path.count("/") > 1 or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path}: no such file or directory, and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    sub = subfolder or "transformer"
    local = snapshot_download(repo_id=path, allow_patterns=[f"{sub}/*"])
    return Path(local) / sub


def _weight_files(d: Path) -> list[Path]:
    if (d / INDEX_NAME).exists():
        index = json.loads((d / INDEX_NAME).read_text())
        return [d / f for f in sorted(set(index["weight_map"].values()))]
    if (d / WEIGHTS_NAME).exists():
        return [d / WEIGHTS_NAME]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no .safetensors weights (expected {WEIGHTS_NAME} or {INDEX_NAME})")
    return files


def _keep_fp32(name: str, keep: tuple[str, ...]) -> bool:
    return any(part in keep for part in name.split("."))


def apply_dtype_policy(model: torch.nn.Module, torch_dtype: torch.dtype, keep_fp32) -> torch.nn.Module:
    """Cast parameters to ``torch_dtype`` except the fp32-kept ones (in place; works on fake tensors)."""
    for name, p in model.named_parameters():
        target = torch.float32 if _keep_fp32(name, keep_fp32) else torch_dtype
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)
    return model


def load_weights(model: torch.nn.Module, files: list[Path], torch_dtype, keep_fp32, device="cpu",
                 rename=None) -> None:
    """Assign tensors from ``files`` to a (meta) ``model``; error listing unknown/missing keys.
    ``rename`` maps a checkpoint key of another layout to the model's parameter name."""
    expected = dict(model.state_dict(keep_vars=True))
    seen, unknown = set(), []
    for f in files:
        shard = {}
        try:
            fh = safe_open(str(f), framework="pt", device=str(device))
        except Exception as exc:  # safetensors' own error type: a truncated or damaged file
            raise ModelLoadError(f"{f}: cannot read these weights ({exc}); the file is damaged or incomplete: "
                                 f"copy or download it again") from exc
        with fh:
            for name in fh.keys():
                key = rename(name) if rename is not None else name
                if key not in expected:
                    if not any(part in IGNORED_KEYS for part in key.split(".")):
                        unknown.append(name)
                    continue
                t = fh.get_tensor(name)
                if t.dim() == expected[key].dim() + 1 and t.shape[0] == 1 and t.shape[1:] == expected[key].shape:
                    t = t[0]  # some Sana Video exports store scale_shift_table as (1, 2, D)
                if t.shape != expected[key].shape:
                    raise ValueError(
                        f"{f}: {key} has shape {tuple(t.shape)}, the model expects {tuple(expected[key].shape)} "
                        f"(wrong config.json for these weights?)"
                    )
                if _keep_fp32(key, keep_fp32):
                    t = t.float()
                elif torch_dtype is not None and t.is_floating_point():
                    t = t.to(torch_dtype)
                shard[key] = t
        model.load_state_dict(shard, strict=False, assign=True)
        seen.update(shard)
    missing = sorted(set(expected) - seen)
    if unknown or missing:
        lines = []
        if unknown:
            lines.append(f"{len(unknown)} unknown key(s): " + ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else ""))
        if missing:
            lines.append(f"{len(missing)} missing key(s): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        raise KeyError(f"checkpoint {files[0].parent} does not match the model config:\n  " + "\n  ".join(lines))


def _single_file_config(path: Path, config) -> dict:
    if isinstance(config, dict):
        return config
    if config is not None:
        return json.loads(Path(config).read_text())
    beside = path.with_name("config.json")
    if beside.exists():
        return json.loads(beside.read_text())
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "config" in meta:
        return json.loads(meta["config"])
    raise ValueError(
        f"{path}: a single .safetensors file needs its model config: pass config=<config.json or dict>, "
        f"put a config.json beside it, or store it in the file's 'config' metadata"
    )


def from_pretrained(
    path: str | os.PathLike,
    *,
    family: str | None = None,
    subfolder: str | None = None,
    torch_dtype: torch.dtype | None = None,
    config: dict | str | None = None,
    device: str | torch.device = "cpu",
    **model_kwargs,
):
    """Build a vidtune model from a diffusers-layout checkpoint (dir, single file or hub id).

    ``family`` defaults to the one named by the config's ``_class_name``. ``torch_dtype`` casts the
    weights (norms, time embedding and modulation tables stay fp32, as in diffusers); None keeps
    the checkpoint's dtypes. Extra keyword arguments go to the model constructor
    (e.g. ``force_2_1_time_embedding=True``).
    """
    path = str(path)
    if path.endswith(".safetensors") and Path(path).is_file():
        cfg_dict, files = _single_file_config(Path(path), config), [Path(path)]
    else:
        d = _resolve_dir(path, subfolder)
        cfg_dict = config if isinstance(config, dict) else json.loads((Path(config) if config else d / "config.json").read_text())
        files = _weight_files(d)
    if family is None:
        cls_name = cfg_dict.get("_class_name")
        family = family_of_class(cls_name)
        if family is None:
            known = ", ".join(n for f in FAMILIES for n in family_package(f).CLASS_NAMES)
            raise ValueError(f"{path}: config _class_name={cls_name!r} is not a supported model class "
                             f"({known}); pass family= explicitly")
    fam = family_package(family)
    cfg = fam.CONFIG_CLASS.from_dict(cfg_dict)
    with torch.device("meta"):
        model = fam.MODEL_CLASS(cfg, **model_kwargs)
    load_weights(model, files, torch_dtype, fam.KEEP_FP32, device=device, rename=getattr(fam, "checkpoint_key", None))
    return model


def save_pretrained(model: torch.nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Save a model in the diffusers layout (``config.json`` + one safetensors file), each file
    atomically; ``from_pretrained`` and diffusers' ``from_pretrained`` read it back. ``state_dict``:
    the weights to write, when not ``model.state_dict()`` (a sharded model's, gathered)."""
    from safetensors.torch import save

    from ..fsutil import atomic_write_bytes

    out_dir = Path(out_dir)
    sd = {k: v.detach().cpu().contiguous() for k, v in (state_dict or model.state_dict()).items()}
    atomic_write_bytes(out_dir / WEIGHTS_NAME, save(sd, metadata={"format": "pt"}))
    atomic_write_bytes(out_dir / "config.json", json.dumps(model.config.to_dict(), indent=1).encode())
    return out_dir
