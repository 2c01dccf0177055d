"""vidtune lora merge / convert on a tiny random Wan transformer saved in the diffusers layout."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vidtune.adapters import apply_lora, export_lora, load_lora_into
from vidtune.adapters.tools import read_modules
from vidtune.config import AdapterConfig
from vidtune.models import from_pretrained
from vidtune.testing import tiny_transformer_config
from vidtune.cli import main as vidtune_main

ADAPTER = AdapterConfig(rank=4, alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("base") / "transformer"
    WanTransformer3DModel(**tiny_transformer_config()).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """A model with a random (non-zero) LoRA and that LoRA exported in the diffusers and wan layouts."""
    torch.manual_seed(1)
    model = from_pretrained(base_dir, torch_dtype=torch.float32)
    apply_lora(model, ADAPTER)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.3)
    d = tmp_path_factory.mktemp("lora")
    files = {layout: export_lora(model, d / f"{layout}.safetensors", ADAPTER, layout, {}, torch.float32)
             for layout in ("diffusers", "wan")}
    return model.eval(), files


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 3, 4, 4, generator=g), torch.tensor([600.0]), torch.randn(1, 12, 32, generator=g)


@pytest.mark.parametrize("layout", ["diffusers", "wan"])
def test_merge_equals_base_plus_adapter(trained, base_dir, tmp_path, layout):
    from diffusers import WanTransformer3DModel

    model, files = trained
    out = tmp_path / "merged"
    assert vidtune_main(["lora", "merge", str(files[layout]), "--base", str(base_dir), "-o", str(out)]) == 0
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, t, ctx)
        ours = from_pretrained(out).eval()(x, t, ctx)
        theirs = WanTransformer3DModel.from_pretrained(out).eval()(x, t, ctx, return_dict=False)[0]
        base = from_pretrained(base_dir).eval()(x, t, ctx)
    assert ((ref - base).norm() / ref.norm()) > 1e-2  # the adapter matters
    for got in (ours, theirs):
        assert ((got - ref).norm() / ref.norm()) < 1e-5


def convert(src, dst, to):
    assert vidtune_main(["lora", "convert", str(src), "-o", str(dst), "--to", to]) == 0
    return dst


def test_convert_round_trips_exactly(trained, tmp_path):
    _, files = trained
    src = files["diffusers"]
    wan = convert(src, tmp_path / "wan.safetensors", "wan")
    musubi = convert(wan, tmp_path / "musubi.safetensors", "musubi")
    back = convert(musubi, tmp_path / "back.safetensors", "diffusers")
    with safe_open(str(musubi), "pt") as f:
        keys = set(f.keys())
    assert {"lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_1_ffn_2.alpha",
            "lora_unet_blocks_0_cross_attn_o.lora_up.weight"} <= keys
    # diffusers -> wan -> musubi -> diffusers gives back the same tensors and dtypes.
    a, b = load_file(src), load_file(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    _, mods, _ = read_modules(back)
    assert {float(m[2]) for m in mods.values()} == {4.0}  # our export bakes alpha/r into B: alpha = r

    # wan (alpha 2, rank 4) -> diffusers -> musubi -> wan: alpha rides in the metadata and comes back.
    mid = convert(files["wan"], tmp_path / "mid.safetensors", "diffusers")
    again = convert(convert(mid, tmp_path / "m2.safetensors", "musubi"), tmp_path / "wan2.safetensors", "wan")
    a, b = load_file(files["wan"]), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(mid), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 2.0


def test_converted_files_mean_the_same_adapter(trained, base_dir, tmp_path):
    # Every layout gives the same weight deltas when loaded (diffusers' converters read them).
    model, files = trained
    mid = convert(files["wan"], tmp_path / "d.safetensors", "diffusers")
    musubi = convert(files["wan"], tmp_path / "m.safetensors", "musubi")
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, t, ctx)
        for f in (mid, musubi):
            fresh = from_pretrained(base_dir, torch_dtype=torch.float32)
            apply_lora(fresh, ADAPTER)
            load_lora_into(fresh, f)
            got = fresh.eval()(x, t, ctx)
            assert ((got - ref).norm() / ref.norm()) < 1e-6, f.name


def test_bad_inputs(tmp_path, trained, capsys):
    _, files = trained
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\0" * 64)
    assert vidtune_main(["lora", "convert", str(junk), "-o", str(tmp_path / "x"), "--to", "wan"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert vidtune_main([]) == 2 and "usage: vidtune" in capsys.readouterr().err
