"""Regenerate the Wan S2V golden tensors from the official Wan2.2 code (never committed here).

    git clone https://github.com/Wan-Video/Wan2.2 /tmp/Wan2.2      # or any checkout / bare clone
    .venv/bin/pip install einops                                   # the official code needs it
    .venv/bin/python scripts/s2v_official_golden.py --wan-repo /tmp/Wan2.2 --out tests/fixtures/wan_s2v

The committed goldens were made from commit 42bf4cfaa384bc21833865abc2f9e6c0e67233dc (the JSON of
each golden records the commit it came from). Only the files ``WanModel_S2V`` imports are exported
(``git show <rev>:<path>``) into a temporary package, so the heavy ``wan/__init__.py`` (decord,
librosa, the pipelines) is never imported. One change is made to the official code, the same one
the reference goldens (``../shared/reference/wan_s2v``) were made with: its flash-attention call
(CUDA only) is replaced by an fp32 ``scaled_dot_product_attention`` that honours ``k_lens``.
Everything runs on the CPU in fp32, every parameter re-randomised (zero-init would make the output
exactly 0).

Output per config, in the reference's format: ``<name>.json`` (model config in the official
form, the call, the source commit), ``<name>.weights.safetensors`` (official key names) and
``<name>.io.safetensors`` (inputs, batched, and ``out_keep_motion`` / ``out_drop_motion``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

FILES = ["wan/modules/model.py", "wan/modules/attention.py", "wan/modules/s2v/model_s2v.py",
         "wan/modules/s2v/audio_utils.py", "wan/modules/s2v/auxi_blocks.py", "wan/modules/s2v/motioner.py",
         "wan/modules/s2v/s2v_utils.py", "wan/distributed/sequence_parallel.py", "wan/distributed/ulysses.py",
         "wan/distributed/util.py"]

# Configs beyond the reference's config a: other head counts and sizes, non-square latents, a
# motion clip shorter than 19 latents, AdaIN off, add_last_motion off, batch 2. (zero_timestep off
# cannot run: the official block calls .item() on the int 0 the model passes it then.)
BASE = dict(cond_dim=16, num_audio_token=4, adain_mode="attn_norm", zero_init=True, enable_motioner=False,
            trainable_token_pos_emb=False, enable_tsm=False, enable_framepack=True, framepack_drop_mode="padd",
            model_type="s2v", patch_size=[1, 2, 2], in_dim=16, out_dim=16, freq_dim=64,
            window_size=[-1, -1], qk_norm=True, cross_attn_norm=True, eps=1e-6)
CONFIGS = {
    "wan_s2v_official_b": dict(
        model=dict(BASE, audio_dim=20, enable_adain=False, audio_inject_layers=[1], zero_timestep=True,
                   add_last_motion=False, text_len=12, dim=48, ffn_dim=96, text_dim=40, num_heads=3, num_layers=3),
        batch=1, frames=3, height=8, width=24, motion_latents=7, text=4, t=[321.0], seed=1),
    "wan_s2v_official_c": dict(
        model=dict(BASE, audio_dim=24, enable_adain=True, audio_inject_layers=[0, 1], zero_timestep=True,
                   add_last_motion=True, text_len=10, dim=32, ffn_dim=80, text_dim=32, num_heads=2, num_layers=2),
        batch=2, frames=2, height=16, width=8, motion_latents=19, text=6, t=[999.0, 1.5], seed=2),
}


def export(repo: str, rev: str, dest: Path) -> str:
    commit = subprocess.run(["git", "-C", repo, "rev-parse", rev], check=True, capture_output=True,
                            text=True).stdout.strip()
    for f in FILES:
        text = subprocess.run(["git", "-C", repo, "show", f"{commit}:{f}"], check=True, capture_output=True,
                              text=True).stdout
        out = dest / f
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    for pkg in ("wan", "wan/modules", "wan/modules/s2v", "wan/distributed"):
        (dest / pkg / "__init__.py").write_text("")
    return commit


def sdpa_attention(q, k, v, q_lens=None, k_lens=None, **_):
    """fp32 stand-in for the official flash_attention: (B, L, N, C), keys past k_lens masked."""
    mask = None
    if k_lens is not None:
        mask = torch.arange(k.shape[1])[None, :] < k_lens.to(torch.long)[:, None]
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).contiguous()


def official_model(config: dict):
    model_s2v = importlib.import_module("wan.modules.s2v.model_s2v")
    for mod in ("wan.modules.model", "wan.modules.s2v.model_s2v", "wan.modules.s2v.motioner"):
        importlib.import_module(mod).flash_attention = sdpa_attention
    return model_s2v.WanModel_S2V(**config).eval()


def run(model, inputs: dict, motion_frames, drop: bool) -> torch.Tensor:
    return torch.stack(model(
        list(inputs["x"]), t=inputs["t"], context=list(inputs["context"]), seq_len=None,
        ref_latents=list(inputs["ref_latents"]), motion_latents=list(inputs["motion_latents"]),
        cond_states=list(inputs["cond_states"]), audio_input=inputs["audio_input"], motion_frames=motion_frames,
        drop_motion_frames=drop))


def check_reference(stem: Path) -> None:
    """Run the harness on a reference golden (e.g. ../shared/reference/wan_s2v/wan_s2v_tiny_a) and
    print how far it lands from the reference outputs: the harness itself, checked."""
    from safetensors.torch import load_file

    meta = json.loads(stem.with_suffix(".json").read_text())
    model = official_model(meta["model_config"])
    model.load_state_dict(load_file(f"{stem}.weights.safetensors"))
    io = load_file(f"{stem}.io.safetensors")
    inputs = {k: (v[None] if k in ("x", "context") else v) for k, v in io.items()}
    with torch.no_grad():
        for drop, key in ((False, "out_keep_motion"), (True, "out_drop_motion")):
            out = run(model, inputs, meta["call"]["motion_frames"], drop)[0]
            print(f"{stem.name} {key}: max |official here - reference| = {(out - io[key]).abs().max().item():.3g}")


def make(name: str, spec: dict, commit: str, out_dir: Path) -> None:
    torch.manual_seed(spec["seed"])
    mc = spec["model"]
    model = official_model(mc)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    b, f, h, w = spec["batch"], spec["frames"], spec["height"], spec["width"]
    g = torch.Generator().manual_seed(spec["seed"] + 100)
    inputs = {
        "x": torch.randn(b, 16, f, h, w, generator=g),
        "t": torch.tensor(spec["t"]),
        "context": torch.randn(b, spec["text"], mc["text_dim"], generator=g),
        "ref_latents": torch.randn(b, 16, 1, h, w, generator=g),
        "motion_latents": torch.randn(b, 16, spec["motion_latents"], h, w, generator=g),
        "cond_states": torch.randn(b, mc["cond_dim"], f, h, w, generator=g),
        "audio_input": torch.randn(b, 25, mc["audio_dim"], 4 * f, generator=g),
    }
    call = {"motion_frames": [73, 19]}
    with torch.no_grad():
        outs = {key: run(model, inputs, call["motion_frames"], drop)
                for drop, key in ((False, "out_keep_motion"), (True, "out_drop_motion"))}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / f"{name}.weights.safetensors")
    save_file({**inputs, **outs}, out_dir / f"{name}.io.safetensors")
    meta = {"model_config": mc, "call": {**call, "seq_len": None, "note": "inputs are batched; drop_motion_frames "
                                         "False -> out_keep_motion, True -> out_drop_motion"},
            "key_layout": "official Wan2.2 WanModel_S2V state-dict keys", "dtype": "float32",
            "source": f"github.com/Wan-Video/Wan2.2@{commit}",
            "max_abs_output": max(float(v.abs().max()) for v in outs.values())}
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, max |out| {meta['max_abs_output']:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wan-repo", required=True, help="a Wan2.2 checkout or bare clone")
    ap.add_argument("--rev", default="HEAD", help="commit of the official code to run")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--only", nargs="*", default=sorted(CONFIGS), help="config names")
    ap.add_argument("--check", type=Path, nargs="*", default=[],
                    help="reference golden stems to reproduce first (path without .json)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        commit = export(args.wan_repo, args.rev, Path(tmp))
        sys.path.insert(0, tmp)
        for stem in args.check:
            check_reference(stem)
        for name in args.only:
            make(name, CONFIGS[name], commit, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
