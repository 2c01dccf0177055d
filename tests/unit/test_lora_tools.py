"""Adapter files on tiny random Wan transformers saved in the diffusers layout: the default
(original Wan) layout against ComfyUI's key rule and diffusers' loader, ``vidtune lora merge`` and
``convert`` on every module an adapter trains (the quickstart's set, with the Conv3d patch
embedding) and on LoKr, and the config-time checks."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vidtune.adapters import apply_lora, diffusers_reads, export_lora, load_lora_into, read_file
from vidtune.cli import main as vidtune_main
from vidtune.cli.train import main as train_main
from vidtune.config import AdapterConfig, load_config
from vidtune.models import from_pretrained
from vidtune.testing import (comfyui_lora_keys, comfyui_merged, original_weight_keys, tiny_transformer_config)

REPO = Path(__file__).resolve().parents[2]
# The quickstart's own adapter: attention, FF, the output projection and the Conv3d patch embedding.
DEMO_TARGETS = load_config(REPO / "examples" / "quickstart.toml").adapter.target_modules
LORA = AdapterConfig(rank=4, alpha=2.0, target_modules=DEMO_TARGETS + ["time_proj", "linear_1", "linear_2"])
# w2 factored (rank 4 < 16 / 2), w1 full; and both factored.
LOKR = AdapterConfig(type="lokr", rank=4, alpha=3.0, lokr_decompose_factor=4,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_out"])
LOKR_BOTH = AdapterConfig(type="lokr", rank=2, alpha=1.0, lokr_decompose_factor=8, lokr_decompose_both=True,
                          target_modules=["to_q", "to_out.0", "net.2"])
# dim 64 and ffn 128: big enough for LoKr's factored forms.
ARCH = {**tiny_transformer_config(), "num_attention_heads": 4, "attention_head_dim": 16, "ffn_dim": 128}


def save_base(path, **config):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    WanTransformer3DModel(**{**ARCH, **config}).save_pretrained(path)
    return path


def adapted(base_dir, adapter: AdapterConfig, seed: int = 1):
    """Our model from ``base_dir`` with a random (non-zero) adapter, in eval mode."""
    torch.manual_seed(seed)
    model = from_pretrained(base_dir, torch_dtype=torch.float32)
    apply_lora(model, adapter)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n or ".lokr_" in n:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "transformer")


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """name -> (model, {layout: file}) for the quickstart-style LoRA and two LoKr."""
    d = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, cfg in (("lora", LORA), ("lokr", LOKR), ("lokr_both", LOKR_BOTH)):
        model = adapted(base_dir, cfg)
        layouts = ("diffusers", "wan") if cfg.type == "lora" else ("wan",)
        out[name] = model, {lay: export_lora(model, d / f"{name}_{lay}.safetensors", cfg, lay, {}, torch.float32)
                            for lay in layouts}
    return out


def _inputs(channels=16, text_dim=32):
    g = torch.Generator().manual_seed(0)
    # 512 text tokens: diffusers' I2V attention takes what precedes the last 512 as image tokens.
    return (torch.randn(1, channels, 3, 4, 4, generator=g), torch.tensor([600.0]),
            torch.randn(1, 512, text_dim, generator=g))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def diffusers_with(transformer_dir, lora_file):
    from diffusers import WanPipeline, WanTransformer3DModel

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                       transformer=WanTransformer3DModel.from_pretrained(transformer_dir))
    pipe.load_lora_weights(str(lora_file))
    return pipe.transformer.eval()


def test_default_layout_is_comfyui_keys(trained, base_dir):
    comfy = comfyui_lora_keys(original_weight_keys(from_pretrained(base_dir)))
    for _, files in trained.values():
        keys = set(load_file(files["wan"]))
        assert keys <= comfy, sorted(keys - comfy)[:5]
    # Every module outside the blocks carries its scale baked in (diffusers raises on their alpha).
    lora_keys = set(load_file(trained["lora"][1]["wan"]))
    assert "diffusion_model.patch_embedding.lora_down.weight" in lora_keys
    assert "diffusion_model.head.head.lora_up.weight" in lora_keys
    assert not {k for k in lora_keys if k.endswith(".alpha") and ".blocks." not in k}
    assert "diffusion_model.blocks.1.ffn.2.alpha" in lora_keys
    lokr_keys = set(load_file(trained["lokr"][1]["wan"]))
    assert {"diffusion_model.blocks.0.self_attn.q.lokr_w1", "diffusion_model.blocks.0.self_attn.q.lokr_w2_a",
            "diffusion_model.blocks.0.self_attn.q.alpha"} <= lokr_keys
    assert "diffusion_model.blocks.0.cross_attn.o.lokr_w1_a" in set(load_file(trained["lokr_both"][1]["wan"]))


@pytest.mark.parametrize("name", ["lora", "lokr", "lokr_both"])
def test_comfyui_rules_give_our_adapted_model(trained, base_dir, name):
    # The file read by ComfyUI's formulas (alpha / rank, LoKr's alpha / dim) is the adapter we trained.
    model, files = trained[name]
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, t, ctx)
        base = from_pretrained(base_dir).eval()
        assert rel(base(x, t, ctx), ref) > 1e-2  # the adapter matters
        got = comfyui_merged(base, load_file(files["wan"]))(x, t, ctx)
    assert rel(got, ref) < 1e-5


def test_wan_file_loads_in_diffusers(base_dir, tmp_path):
    # Block linears, the head, the time/text embedders: one original-layout file for diffusers too.
    cfg = AdapterConfig(rank=4, alpha=2.0, target_modules=[t for t in LORA.target_modules if t != "patch_embedding"])
    model = adapted(base_dir, cfg)
    f = export_lora(model, tmp_path / "wan.safetensors", cfg, "wan", {}, torch.float32)
    assert diffusers_reads(load_file(f)) is None
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert rel(diffusers_with(base_dir, f)(x, t, ctx, return_dict=False)[0], model(x, t, ctx)) <= 1e-5


def test_patch_embedding_needs_the_diffusers_file(trained, base_dir):
    model, files = trained["lora"]
    assert "patch_embedding" in diffusers_reads(load_file(files["wan"]))
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert rel(diffusers_with(base_dir, files["diffusers"])(x, t, ctx, return_dict=False)[0],
                   model(x, t, ctx)) <= 1e-5


def test_i2v_image_projection_and_image_kv(tmp_path):
    # Wan 2.1 I2V: the image projection (img_emb.proj.1/3) and the image K/V of cross-attention.
    base = save_base(tmp_path / "i2v", image_dim=24, added_kv_proj_dim=64, in_channels=36)
    cfg = AdapterConfig(rank=4, alpha=8.0, target_modules=["add_k_proj", "add_v_proj", "to_q", "net.0.proj", "net.2"])
    model = adapted(base, cfg)
    f = export_lora(model, tmp_path / "wan.safetensors", cfg, "wan", {}, torch.float32)
    keys = set(load_file(f))
    assert {"diffusion_model.img_emb.proj.1.lora_up.weight", "diffusion_model.blocks.1.cross_attn.k_img.alpha"} <= keys
    assert keys <= comfyui_lora_keys(original_weight_keys(from_pretrained(base)))
    x, t, ctx = _inputs(36)
    img = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x, t, ctx, encoder_hidden_states_image=img)
        theirs = diffusers_with(base, f)(x, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0]
    assert rel(theirs, ref) <= 1e-5
    out = tmp_path / "merged"
    assert vidtune_main(["lora", "merge", str(f), "--base", str(base), "-o", str(out)]) == 0
    with torch.no_grad():
        assert rel(from_pretrained(out).eval()(x, t, ctx, encoder_hidden_states_image=img), ref) < 1e-5


@pytest.mark.parametrize("name, layout", [("lora", "wan"), ("lora", "diffusers"), ("lora", "musubi"),
                                          ("lokr", "wan"), ("lokr_both", "musubi")])
def test_merge_equals_base_plus_adapter(trained, base_dir, tmp_path, name, layout):
    from diffusers import WanTransformer3DModel

    model, files = trained[name]
    src = files.get(layout) or convert(files["wan"], tmp_path / f"{layout}.safetensors", layout)
    out = tmp_path / "merged"
    assert vidtune_main(["lora", "merge", str(src), "--base", str(base_dir), "-o", str(out)]) == 0
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, t, ctx)
        ours = from_pretrained(out).eval()(x, t, ctx)
        theirs = WanTransformer3DModel.from_pretrained(out).eval()(x, t, ctx, return_dict=False)[0]
    for got in (ours, theirs):
        assert rel(got, ref) < 1e-5


def convert(src, dst, to):
    assert vidtune_main(["lora", "convert", str(src), "-o", str(dst), "--to", to]) == 0
    return dst


def same_file(a, b):
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_convert_round_trips_exactly(trained, tmp_path):
    _, files = trained["lora"]
    # diffusers -> wan -> musubi -> diffusers and wan -> diffusers -> musubi -> wan: same tensors.
    wan = convert(files["diffusers"], tmp_path / "wan.safetensors", "wan")
    musubi = convert(wan, tmp_path / "musubi.safetensors", "musubi")
    assert same_file(files["diffusers"], convert(musubi, tmp_path / "back.safetensors", "diffusers"))
    with safe_open(str(musubi), "pt") as f:
        keys = set(f.keys())
    assert {"lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_1_ffn_2.alpha",
            "lora_unet_patch_embedding.lora_up.weight", "lora_unet_head_head.lora_down.weight"} <= keys
    _, mods, _ = read_file(files["diffusers"])
    assert {m.alpha for m in mods.values()} == {4.0}  # our diffusers export bakes alpha/r into B: alpha = r
    mid = convert(files["wan"], tmp_path / "mid.safetensors", "diffusers")
    again = convert(convert(mid, tmp_path / "m2.safetensors", "musubi"), tmp_path / "wan2.safetensors", "wan")
    assert same_file(files["wan"], again)
    with safe_open(str(mid), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 2.0  # the blocks' alpha rides along
    # LoKr: wan <-> musubi exactly; diffusers cannot hold it.
    _, lokr = trained["lokr_both"]
    m = convert(lokr["wan"], tmp_path / "lokr_musubi.safetensors", "musubi")
    assert same_file(lokr["wan"], convert(m, tmp_path / "lokr_wan.safetensors", "wan"))


@pytest.mark.parametrize("name", ["lora", "lokr"])
def test_every_layout_means_the_same_adapter(trained, base_dir, tmp_path, name):
    # Starting a run from any layout (init_from) reproduces the adapter in our model.
    model, files = trained[name]
    cfg = LORA if name == "lora" else LOKR
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, t, ctx)
    for layout in ("wan", "musubi", "diffusers") if name == "lora" else ("wan", "musubi"):
        f = files.get(layout) or convert(files["wan"], tmp_path / f"{layout}.safetensors", layout)
        fresh = from_pretrained(base_dir, torch_dtype=torch.float32)
        apply_lora(fresh, cfg)
        assert load_lora_into(fresh, f) == len(read_file(f)[1])
        with torch.no_grad():
            assert rel(fresh.eval()(x, t, ctx), ref) < 1e-6, layout


def test_bad_inputs(tmp_path, trained, base_dir, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\0" * 64)
    assert vidtune_main(["lora", "convert", str(junk), "-o", str(tmp_path / "x"), "--to", "wan"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert vidtune_main([]) == 2 and "usage: vidtune" in capsys.readouterr().err
    lokr = trained["lokr"][1]["wan"]
    assert vidtune_main(["lora", "convert", str(lokr), "-o", str(tmp_path / "d"), "--to", "diffusers"]) == 2
    assert "reads no LoKr" in capsys.readouterr().err
    # An adapter for another model: the merge names the module and the shapes.
    other = save_base(tmp_path / "other", num_attention_heads=2)
    assert vidtune_main(["lora", "merge", str(trained["lora"][1]["wan"]), "--base", str(other),
                         "-o", str(tmp_path / "m")]) == 2
    assert "not one for a weight of shape" in capsys.readouterr().err


@pytest.mark.parametrize("sets, needle", [
    (['adapter.type="lokr"', f"adapter.target_modules={json.dumps(DEMO_TARGETS)}"], "Conv3d patch embedding"),
    (['adapter.type="lokr"', 'adapter.export_format="diffusers"'], "reads no LoKr"),
    (['adapter.target_modules=["to_qq"]'], "names no module"),
    (['adapter.target_modules=["ffn"]'], "names no module"),
])
def test_adapter_checked_at_config_time(sets, needle, capsys):
    # Refused by --print-config already: before any model, cache or plan.
    assert train_main([str(REPO / "examples" / "quickstart.toml"), "--print-config",
                       *[a for s in sets for a in ("--set", s)]]) == 2
    assert needle in capsys.readouterr().err


def test_adapter_section_accepts_what_exports():
    from vidtune.adapters import check_adapter

    ok = AdapterConfig(target_modules=DEMO_TARGETS + ["blocks.3.attn1.to_q", "add_k_proj", "linear_2", "time_proj"])
    assert check_adapter(ok, "wan") == []
    assert check_adapter(AdapterConfig(type="lokr", export_format="wan"), "wan") == []
    assert "no original key layout" in check_adapter(AdapterConfig(export_format="wan"), "sana_video")[0]
    assert check_adapter(AdapterConfig(), "sana_video") == []  # auto: diffusers for it


def test_s2v_audio_injector_exports_under_official_names(tmp_path):
    """Wan S2V: ``auto`` writes the original (ComfyUI) layout too. The audio injector's attention,
    which the default targets adapt, goes under WanModel_S2V's official names
    (``models.wan_s2v.keys.official_module``, which S2V's checkpoint loader maps back to our
    modules); ComfyUI's rules, our loader and the other layouts all give the adapter we trained."""
    from vidtune.adapters import check_adapter, export_layouts, write_file
    from vidtune.adapters.export import export_adapter_files
    from vidtune.models.wan_s2v import checkpoint_key
    from vidtune.testing import tiny_wan_s2v_inputs, tiny_wan_s2v_transformer

    cfg = AdapterConfig(rank=4, alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "net.2", "proj_out"])
    assert export_layouts(cfg, "wan_s2v") == ["wan"]
    model = tiny_wan_s2v_transformer()
    apply_lora(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.3)
    model.eval()
    f = export_lora(model, tmp_path / "wan.safetensors", cfg, "wan", {"family": "wan_s2v"}, torch.float32)
    tensors = load_file(f)
    injector = {f"diffusion_model.audio_injector.injector.{i}.{p}.lora_down.weight" for i in (0, 1) for p in "qkvo"}
    assert injector <= set(tensors)
    # Every module under an official name that S2V's checkpoint loader maps back to the one we trained.
    ours = {n for n, _ in model.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0", ".net.2"))
            or n == "proj_out"}
    named = {k[len("diffusion_model."):].rsplit(".lora_", 1)[0] for k in tensors if k.endswith("lora_down.weight")}
    assert {checkpoint_key(f"{o}.weight").removesuffix(".weight") for o in named} == ours

    args, kw = tiny_wan_s2v_inputs(b=1)
    with torch.no_grad():
        ref = model(*args, **kw)
        base = tiny_wan_s2v_transformer().eval()
        assert rel(base(*args, **kw), ref) > 1e-2  # the adapter (the injector's part too) matters
        assert rel(comfyui_merged(base, tensors)(*args, **kw), ref) < 1e-5
    # Read back from every layout (the family from the file's metadata) into a fresh adapter.
    _, mods, _ = read_file(f)
    for layout in ("wan", "musubi", "diffusers"):
        g = write_file(mods if layout != "diffusers" else {n: m.baked() for n, m in mods.items()},
                       tmp_path / f"{layout}.safetensors", layout, {"vidtune.family": "wan_s2v"}, "wan_s2v")
        fresh = tiny_wan_s2v_transformer()
        apply_lora(fresh, cfg)
        assert load_lora_into(fresh, g) == len(mods)
        with torch.no_grad():
            assert rel(fresh.eval()(*args, **kw), ref) < 1e-5, layout

    # A run writes wan_lora.safetensors, and the diffusers file beside it: diffusers' Wan converter
    # knows no audio injector.
    run_cfg = load_config(REPO / "examples" / "wan22_s2v_14b_lora_rtx4090.toml",
                          ['adapter.export_format="auto"', 'model.dtype="fp32"'])
    logs = []
    files = export_adapter_files(run_cfg, model, tmp_path / "run", 1, logs.append)
    assert [p.name for p in files] == ["wan_lora.safetensors", "pytorch_lora_weights.safetensors"]
    assert "its converter has no key for audio_injector.injector.0.to_q" in logs[0]
    assert safe_open(files[0], "pt").metadata()["vidtune.family"] == "wan_s2v"

    # Targets: the injector by index (checked as injector 0), Wan has none.
    by_index = AdapterConfig(target_modules=["audio_injector.injector.1.to_q", "blocks.2.attn1.to_k"])
    assert check_adapter(by_index, "wan_s2v") == []
    assert "names no module" in check_adapter(by_index, "wan")[0]
