"""The evaluation loss ([eval]) end to end: fixed held-out samples, timesteps and noise give the
same number for the same weights, held-out files never reach the training loader, a resumed run
logs exactly the evaluations of an uninterrupted one, and evaluating changes no training draw."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from vidtune.cli.train import main as cli_main
from vidtune.config import load_config
from vidtune.data import CachedLoader
from vidtune.testing import DEMO_CLIPS, make_test_video, tiny_run_toml
from vidtune.train.evaluate import read_eval
from vidtune.train.log import read_losses
from vidtune.train.trainer import Run, prepare

if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg missing: apt-get install -y ffmpeg", allow_module_level=True)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Four captioned training clips and one more in its own folder (an eval.dataset)."""
    root = tmp_path_factory.mktemp("eval_clips")
    for i, (pattern, caption) in enumerate(DEMO_CLIPS):
        make_test_video(root / "train" / f"clip{i}.mp4", 32, 32, frames=9, pattern=pattern)
        (root / "train" / f"clip{i}.txt").write_text(caption)
    make_test_video(root / "held" / "held.mp4", 32, 32, frames=9, pattern="testsrc")
    (root / "held" / "held.txt").write_text("a held out cat")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_cache")


def config(tmp_path, model, clips, cache, name="run", held_dataset=False) -> Path:
    datasets = {"clips": clips / "train", **({"held": clips / "held"} if held_dataset else {})}
    path = tmp_path / f"{name}.toml"
    path.write_text(tiny_run_toml(model, cache, datasets, tmp_path / name,
                                  "max_train_steps = 4\nlearning_rate = 1e-2\ncheckpoint_every = 0\nseed = 5", """
[eval]
every = 1
split_fraction = 0.25
timesteps = [200.0, 800.0]
max_samples = 2
"""))
    return path


def test_same_weights_same_number_and_held_out_never_trained(tmp_path, tiny_wan_dir, clips, cache):
    cfg = load_config(config(tmp_path, tiny_wan_dir, clips, cache))
    prepared = prepare(cfg, log=lambda *_: None)
    held = {str(e.source) for e in prepared.held_out}
    assert len(held) == 1 and len(prepared.entries) == 3  # round(0.25 * 4) files held out
    assert held.isdisjoint(str(e.source) for e in prepared.entries)
    # Whatever the loader draws (many epochs, any seed) is a training file.
    loader = CachedLoader(prepared, 1, seed=1)
    drawn = {s for _ in range(12) for s in next(loader).sources}
    assert drawn and drawn.isdisjoint(held)

    run = Run(cfg, prepared, log=lambda *_: None)
    first = run.evaluator.loss(run.model)
    torch.randn(100)  # the global RNG, the training generators and the mode must not matter
    torch.randn(7, generator=run.flow_gen)
    run.model.train()
    again = run.evaluator.loss(run.model)
    assert first == again and set(first) == {"loss", "t200", "t800"}
    assert first["loss"] == pytest.approx((first["t200"] + first["t800"]) / 2)
    assert run.model.training  # evaluation restores the mode it found
    run.train_step()
    assert run.evaluator.loss(run.model)["loss"] != first["loss"]  # the weights moved, and it shows


def test_eval_is_stable_across_resume_and_logged(tmp_path, tiny_wan_dir, clips, cache, capsys):
    whole = config(tmp_path, tiny_wan_dir, clips, cache, "whole")
    assert cli_main([str(whole), "--set", "ema.enabled=true"]) == 0
    rows = read_eval(tmp_path / "whole")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # before the first step, then every step
    assert all("ema_loss" in r for r in rows)
    assert (tmp_path / "whole" / "plots" / "eval_loss.png").stat().st_size > 0
    assert "eval loss: step 0" in capsys.readouterr().out

    # Killed after step 2 with eval rows past its checkpoint: the resume drops them, then logs the same.
    parts = config(tmp_path, tiny_wan_dir, clips, cache, "parts")
    assert cli_main([str(parts), "--set", "ema.enabled=true", "--set", "train.max_train_steps=2",
                     "--set", "train.checkpoint_every=2"]) == 0
    with open(tmp_path / "parts" / "eval.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    assert cli_main([str(parts), "--set", "ema.enabled=true", "--set", 'train.resume="latest"']) == 0
    assert read_eval(tmp_path / "parts") == rows  # bit for bit: json floats round-trip exactly


def test_eval_dataset_is_never_trained_and_changes_no_training_draw(tmp_path, tiny_wan_dir, clips, cache):
    plain = config(tmp_path, tiny_wan_dir, clips, cache, "plain")
    assert cli_main([str(plain), "--set", "eval.every=0"]) == 0
    held = config(tmp_path, tiny_wan_dir, clips, cache, "held", held_dataset=True)
    cfg = load_config(held, ['eval.dataset="held"'])
    prepared = prepare(cfg, log=lambda *_: None)
    assert [e.dataset_id for e in prepared.held_out] == ["held"]
    assert {e.dataset_id for e in prepared.entries} == {"clips"} and len(prepared.entries) == 4
    assert cli_main([str(held), "--set", 'eval.dataset="held"', "--set", "eval.every=2"]) == 0
    assert [r["step"] for r in read_eval(tmp_path / "held")] == [0, 2, 4]
    # The same training losses, bit for bit, as the run without evaluation.
    assert [r["loss"] for r in read_losses(tmp_path / "held")] == [r["loss"] for r in read_losses(tmp_path / "plain")]


def test_eval_config_errors(tmp_path, tiny_wan_dir, clips, cache, capsys):
    path = config(tmp_path, tiny_wan_dir, clips, cache)
    assert cli_main([str(path), "--set", "eval.split_fraction=0"]) != 0
    assert "eval.every > 0 needs eval.dataset" in capsys.readouterr().err
    assert cli_main([str(path), "--set", 'eval.dataset="nope"']) != 0
    assert "eval.dataset: no enabled [[dataset]] with id 'nope'" in capsys.readouterr().err
