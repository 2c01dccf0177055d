"""Config schema: strict loading, overrides, validation, round trip, generated docs."""
import dataclasses
import typing
from pathlib import Path

import pytest

from vidtune.cli.train import main as cli_main
from vidtune.config import (Config, ConfigError, TreadRoute, config_from_dict, dump_config, load_config,
                            render_config_docs, resolve_routes)

REPO = Path(__file__).resolve().parents[2]

EXAMPLE = """
[model]
flavour = "t2v-480p-1.3b-2.1"
path = "/models/wan"

[train]
batch_size = 2
learning_rate = 5e-5

[memory.offload]
type = "block_level"
use_stream = true

[[tread.routes]]
selection_ratio = 0.1
start_layer = 2
end_layer = 8

[[tread.routes]]
selection_ratio = 0.25
start_layer = 9
end_layer = -2

[[dataset]]
id = "disney"
path = "/data/disney"
num_frames = 73
bucket_strategy = "resolution_frames"
"""


def write(tmp_path, text, name="config.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_example_load(tmp_path):
    cfg = load_config(write(tmp_path, EXAMPLE))
    assert cfg.train.batch_size == 2 and cfg.train.learning_rate == 5e-5
    assert cfg.memory.offload.type == "block_level" and cfg.memory.offload.use_stream
    assert [r.end_layer for r in cfg.tread.routes] == [8, -2]
    ds = cfg.dataset[0]
    assert ds.min_frames == 73  # default = num_frames, filled in the resolved config
    assert cfg.adapter.alpha == 16.0 and cfg.model.fps == 16
    assert load_config().model.resolved_path() == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, EXAMPLE))
    again = load_config(write(tmp_path, dump_config(cfg), "resolved.toml"))
    assert again == cfg
    assert load_config(write(tmp_path, dump_config(Config()), "d.toml")) == load_config()


def test_unknown_key_names_key_file_and_hint(tmp_path):
    p = write(tmp_path, "[model]\nflavor = 'x'\n[memory.offload]\nblock_per_group = 2\n[trian]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "unknown key 'model.flavor' (did you mean 'model.flavour'?)" in msg
    assert "'memory.offload.block_per_group' (did you mean 'memory.offload.blocks_per_group'?)" in msg
    assert "unknown key 'trian' (did you mean 'train'?)" in msg


def test_wrong_types_and_choices(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "[train]\nbatch_size = '2'\ntimestep_sampling = 'logitnorm'\n"
                                    "[memory]\ngradient_checkpointing = 1\n"))
    msg = str(e.value)
    assert "train.batch_size: expected int" in msg
    assert "did you mean 'logit_norm'" in msg
    assert "memory.gradient_checkpointing: expected bool" in msg


def test_dataset_required_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset\[0\]: missing required key 'path'"):
        load_config(write(tmp_path, "[[dataset]]\nid = 'a'\n"))


@pytest.mark.parametrize("toml, needle", [
    ("[[dataset]]\nid='a'\npath='p'\nnum_frames = 75\n", "Wan needs 4k+1 frames, got 75; use 73 or 77"),
    ("[[dataset]]\nid='a'\npath='p'\nframe_interval = 6\n", "multiple of 4"),
    ("[[dataset]]\nid='a'\npath='p'\n[[dataset]]\nid='a'\npath='q'\n", "duplicate id"),
    ("[validation]\nresolution = '830x480'\n", "multiples of 16, got '830x480'; use 816x480"),
    ("[validation]\nnum_frames = 80\n", "use 77 or 81"),
    ("[[tread.routes]]\nselection_ratio=0.1\nstart_layer=2\nend_layer=8\n"
     "[[tread.routes]]\nselection_ratio=0.2\nstart_layer=8\nend_layer=10\n", "sorted and non-overlapping"),
    ("[[tread.routes]]\nselection_ratio=1.5\nstart_layer=2\nend_layer=8\n", "selection_ratio: must be in [0, 1)"),
    ("[adapter]\ntype='full'\n[model]\nbase_precision='int8'\n", "cannot train int8"),
    ("[adapter]\ntype='full'\n[memory.offload]\ntype='block_level'\n", "streams frozen base weights"),
    ("[memory]\nmodel_cpu_offload=true\n[memory.offload]\ntype='block_level'\n", "mutually exclusive"),
    ("[model]\nflavour='t2v-1.3b'\n", "is not a wan flavour"),
])
def test_validation_messages(tmp_path, toml, needle):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, toml))
    assert needle in str(e.value)


def test_resolve_routes_guide_progressive_config():
    guide = [(0.1, 2, 8), (0.25, 9, 11), (0.35, 12, 15), (0.25, 16, 23), (0.1, 24, -2)]
    routes = [TreadRoute(r, s, e) for r, s, e in guide]
    assert resolve_routes(routes, 30)[-1] == (0.1, 24, 28)
    with pytest.raises(ConfigError, match="outside"):
        resolve_routes(routes, 20)  # 24..18 reversed on a 20-layer model
    with pytest.raises(ConfigError, match="non-overlapping"):
        resolve_routes([TreadRoute(0.1, 2, -5), TreadRoute(0.1, 20, 22)], 26)


def test_set_overrides(tmp_path):
    p = write(tmp_path, EXAMPLE)
    cfg = load_config(p, ["train.seed=7", "model.path=/other/dir", "dataset.disney.repeats=3",
                          "dataset.0.crop=true", "memory.chunked_ff.enabled=true", "train.betas=[0.8, 0.9]",
                          "tread.routes=[{selection_ratio=0.5, start_layer=1, end_layer=3}]"])
    assert cfg.train.seed == 7 and cfg.model.path == "/other/dir"
    assert cfg.dataset[0].repeats == 3 and cfg.dataset[0].crop
    assert cfg.memory.chunked_ff.enabled and cfg.train.betas == [0.8, 0.9]
    assert cfg.tread.routes == [TreadRoute(0.5, 1, 3)]
    with pytest.raises(ConfigError, match=r"'train.sed' \(did you mean 'train.seed'\?\) \[from --set\]"):
        load_config(p, ["train.sed=1"])
    with pytest.raises(ConfigError, match="no dataset with id or index 'disny'.*did you mean 'disney'"):
        load_config(p, ["dataset.disny.repeats=1"])


def test_every_field_documented_and_docs_up_to_date():
    def walk(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            tp = hints[f.name]
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
            if dataclasses.is_dataclass(inner):
                walk(inner)
    walk(Config)
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == render_config_docs(), "docs/config.md is stale: python -m vidtune.config > docs/config.md"


def test_cli_help_and_print_config(tmp_path, capsys):
    assert cli_main(["--help-config"]) == 0
    assert "## `[memory.offload]`" in capsys.readouterr().out
    p = write(tmp_path, EXAMPLE)
    assert cli_main([str(p), "--print-config", "--set", "train.seed=3"]) == 0
    out = capsys.readouterr().out
    assert config_from_dict(__import__("tomllib").loads(out)).train.seed == 3
    assert cli_main([str(p), "--set", "model.flavor=x"]) == 2
    assert "did you mean 'model.flavour'" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.datasets, "an example config should show a [[dataset]]"
