"""One build path: what the trainer trains is what the benchmarks and the planner measure.

For every shipped example config: the trainer's build (weights from a checkpoint) and the
bench's (random weights) give the same module tree, dtypes and trained set, real at full width
cut to two blocks; the trainer's and the planner's meta builds agree at full depth.
"""
import dataclasses
from pathlib import Path

import pytest
import torch

from vidtune.bench.timing import bench_model
from vidtune.build import (TrainingModel, adapter_dtype, apply_compile, architecture, build_from_config,
                           load_transformer)
from vidtune.config import CompileConfig, load_config, override
from vidtune.measure import probes as P
from vidtune.models import save_pretrained
from vidtune.train.trainer import training_model

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))


def build_inputs(example: Path):
    """Everything of an example that decides the model the build path makes (not where the
    weights come from, which expert, or the data)."""
    cfg = load_config(example)
    m = {k: v for k, v in dataclasses.asdict(cfg.model).items()
         if k not in ("flavour", "path", "transformer_path", "experts", "vae_path", "text_encoder_path", "fps")}
    a = {k: v for k, v in dataclasses.asdict(cfg.adapter).items() if k not in ("export_format", "init_from")}
    return repr((P.arch_key(architecture(cfg.model)), m, a, dataclasses.asdict(cfg.memory),
                 dataclasses.asdict(cfg.compile), adapter_dtype(cfg)))


# The full-width real builds cost up to a minute each (int8 14B blocks on CPU): one per distinct
# build, e.g. the 480p and 720p I2V examples build the same model.
def distinct_builds(examples: list[Path]) -> list[Path]:
    seen, out = set(), []
    for e in examples:
        if build_inputs(e) not in seen:
            seen.add(build_inputs(e))
            out.append(e)
    return out


BUILDS = distinct_builds(EXAMPLES)


def signature(model: torch.nn.Module):
    modules = [(n, type(m).__name__) for n, m in model.named_modules()]
    params = [(n, p.dtype, p.requires_grad) for n, p in model.named_parameters()]
    return modules, params


def test_examples_are_found():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("example", BUILDS, ids=lambda p: p.stem)
def test_trainer_and_bench_build_the_same_model(example, tmp_path):
    cfg = load_config(example, ['train.device="cpu"'])
    arch = dataclasses.replace(architecture(cfg.model), num_layers=2)
    ckpt = load_transformer(cfg.model, "meta", arch=arch).to_empty(device="cpu")  # the values do not matter
    with torch.no_grad():
        for p in ckpt.parameters():
            p.fill_(0.01)
    save_pretrained(ckpt, tmp_path / "model" / "transformer")
    del ckpt
    trainer_cfg = override(cfg, [f'model.path="{tmp_path / "model"}"', "model.transformer_path=''"])
    trained = training_model(trainer_cfg, "cpu")
    benched = bench_model(cfg, arch, "cpu")
    assert len(trained.model.blocks) == 2
    assert signature(trained.model) == signature(benched.model)
    assert list(trained.trainable) == list(benched.trainable) and trained.trainable
    assert (trained.offload is None) == (benched.offload is None) == (cfg.memory.offload.type == "none")
    if cfg.model.base_precision == "int8":  # the base really is int8 in both
        w = trained.model.blocks[0].attn1.to_q.base_layer.weight
        assert "Int8" in type(w).__name__ and type(w) is type(benched.model.blocks[0].attn1.to_q.base_layer.weight)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_trainer_and_planner_meta_builds_agree_at_full_depth(example):
    cfg = load_config(example)
    arch = architecture(cfg.model)
    trained = build_from_config(cfg, "cpu", init="meta")
    planned = P.build_meta_model(cfg.model, cfg.adapter, arch, adapter_dtype=adapter_dtype(cfg))
    assert len(trained.model.blocks) == arch.num_layers
    assert signature(trained.model) == signature(planned)
    assert all(p.device.type == "meta" for p in trained.model.parameters())
    assert trained.skipped == (["quantize"] if cfg.model.base_precision == "int8" else []) + (
        ["offload"] if cfg.memory.offload.type != "none" else [])
    # The probe's two blocks are the trainer's model cut to two blocks.
    probe = P.build_meta_model(cfg.model, cfg.adapter, arch, num_layers=2, adapter_dtype=adapter_dtype(cfg))
    cut = build_from_config(cfg, "cpu", init="meta", num_layers=2)
    assert signature(probe) == signature(cut.model)


def test_pretrained_build_loads_the_checkpoint(tiny_wan_dir):
    from vidtune.config import config_from_dict

    cfg = config_from_dict({"model": {"path": str(tiny_wan_dir), "dtype": "fp32"}, "train": {"device": "cpu"}})
    built = training_model(cfg, "cpu")
    assert isinstance(built, TrainingModel) and built.params and built.compiled == 0
    from safetensors.torch import load_file

    sd = load_file(str(tiny_wan_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    w = built.model.blocks[0].attn1.to_q.base_layer.weight
    assert torch.equal(w, sd["blocks.0.attn1.to_q.weight"])


def test_compile_is_off_by_default_on_cpu_and_on_when_asked():
    from vidtune.testing import tiny_wan_transformer

    m = tiny_wan_transformer()
    assert apply_compile(m, CompileConfig(), "cpu") == 0
    assert apply_compile(m, CompileConfig(enabled="on", backend="aot_eager"), "cpu") == len(m.blocks)
    assert apply_compile(m, CompileConfig(enabled="on", backend="aot_eager"), "cpu") == 0  # idempotent


def test_compile_auto_follows_the_measurements():
    """auto: off on CPU; on for a CUDA (NVIDIA) bf16 base without offload, the H200-measured case;
    eager for int8 bases and offload, not measured yet. on/off override everything."""
    from vidtune.build import compile_enabled

    auto = CompileConfig()
    assert not compile_enabled(auto, "cpu")
    assert compile_enabled(auto, "cuda") == (torch.version.hip is None)
    assert not compile_enabled(auto, "cuda", quantized=True)
    assert not compile_enabled(auto, "cuda", offloaded=True)
    assert compile_enabled(CompileConfig(enabled="on"), "cpu")
    assert not compile_enabled(CompileConfig(enabled="off"), "cuda")
