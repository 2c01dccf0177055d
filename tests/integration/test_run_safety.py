"""Never lose a run, through vidtune-train on real files: two runs on one directory (real
processes), a resume that takes the new learning rate after the NaN stop, damaged cache entries
and checkpoints, weights that diverged, a full disk (small tmpfs, as root), unwritable and
missing directories. Every fault must end in one line on stderr naming the path and the fix."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from vidtune.cli.train import main as cli_main
from vidtune.config import ConfigError
from vidtune.train.checkpoint import checkpoint_dirs
from vidtune.train.log import LOSSES, loss_values, read_losses

from test_train import WAN_FILE, no_partial_files, spawn, wait_for_steps, write_config  # noqa: I001

ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from vidtune.testing import write_captioned_clips

    return write_captioned_clips(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cli(tmp_path, tiny_wan_dir, clips, shared_cache):
    """cli(*overrides, out=..., cache=...) -> (rc, run_dir): vidtune-train in this process, on two
    captioned clips, with the module's cache unless told otherwise."""
    def go(*overrides, out="run", cache=None):
        out = out if isinstance(out, Path) else tmp_path / out
        cfg = write_config(tmp_path / f"{out.name}.toml", tiny_wan_dir, clips, cache or shared_cache, out)
        rc = cli_main([str(cfg)] + [a for o in overrides for a in ("--set", o)])
        return rc, out
    go.data = clips
    return go


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# -- 1. one owner per run directory -------------------------------------------------------------------

def test_two_runs_on_one_directory(tmp_path, tiny_wan_dir, cli, shared_cache):
    out = tmp_path / "shared_run"
    cfg = write_config(tmp_path / "shared.toml", tiny_wan_dir, cli.data, shared_cache, out)
    settings = ["train.max_train_steps=100000", "train.checkpoint_every=2", "train.keep_checkpoints=1"]
    procs = [spawn(cfg, *settings) for _ in range(2)]  # started together
    try:
        deadline = time.time() + 180
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        text = loser.stdout.read()
        assert loser.returncode == 1, text
        line = one_error_line(text)
        assert f"in use by another run (pid {winner.pid} on host " in line and str(out) in line
        # The winner was never disturbed: it trains, checkpoints, and stops cleanly on SIGTERM.
        wait_for_steps(winner, out, 3)
        winner.send_signal(signal.SIGTERM)
        rest, _ = winner.communicate(timeout=120)
        assert winner.returncode == 128 + signal.SIGTERM, rest
    finally:  # a run of 100,000 steps must not outlive a failed test
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    steps = [r["step"] for r in read_losses(out)]
    assert steps == list(range(1, len(steps) + 1))
    assert json.loads((checkpoint_dirs(out / "checkpoints")[-1] / "meta.json").read_text())["step"] == steps[-1]
    no_partial_files(out)
    # The kernel released the lock with the process: the next run resumes.
    rc = cli_main([str(cfg), "--set", f"train.max_train_steps={steps[-1] + 1}", "--set", 'train.resume="latest"'])
    assert rc == 0 and len(read_losses(out)) == steps[-1] + 1


# -- 2. resume: state from the checkpoint, settings from the config; the NaN advice works -------------

def test_resume_takes_the_new_learning_rate_after_the_nan_stop(cli, capsys):
    from diffusers.optimization import get_scheduler

    rc, out = cli("train.max_train_steps=3", "train.checkpoint_every=3")
    assert rc == 0
    # Resumed with a learning rate that diverges: skipped steps, then the stop and its advice.
    rc, _ = cli("train.max_train_steps=9", "train.checkpoint_every=3", "train.learning_rate=1e30",
                "train.max_grad_norm=0", "train.max_consecutive_nonfinite=2", 'train.resume="latest"')
    cap = capsys.readouterr()
    assert rc == 1 and "resume: train.learning_rate 1e+30 (checkpoint had 0.01)" in cap.out
    line = one_error_line(cap.err)
    assert "2 non-finite steps in a row" in line and "Lower train.learning_rate" in line
    assert "step-000003" in line
    rows = read_losses(out)
    assert [r["skipped"] for r in rows] == [False] * 4 + [True, True]
    assert rows[-1]["loss"] is None  # plain JSON: null where the loss was not finite
    assert [d.name for d in checkpoint_dirs(out / "checkpoints")] == ["step-000003"]  # none after a skipped step

    # The advice, followed: a lower rate and a new schedule, both used from the first resumed step.
    with umask(0o022):
        rc, _ = cli("train.max_train_steps=9", "train.checkpoint_every=3", "train.learning_rate=1e-3",
                    'train.lr_scheduler="cosine"', 'train.resume="latest"')
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "resume: train.learning_rate 0.001 (checkpoint had 0.01)" in cap.out
    assert "resume: train.lr_scheduler cosine (checkpoint had constant)" in cap.out
    rows = read_losses(out)
    assert [r["step"] for r in rows] == list(range(1, 10)) and not any(r["skipped"] for r in rows)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=9)
    expected = []
    for _ in range(9):
        expected.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert [r["lr"] for r in rows[3:]] == expected[3:]
    # losses.jsonl holds JSON numbers that read back to the exact floats.
    raw = [json.loads(line) for line in (out / LOSSES).read_text().splitlines()]
    assert all(isinstance(r["loss"], float) for r in raw) and loss_values(out) == [r["loss"] for r in raw]
    # Outputs honour the umask (022: readable by all), checkpoints included.
    for f in [out / WAN_FILE, out / "summary.json", out / LOSSES, out / "plots" / "loss.png",
              *(checkpoint_dirs(out / "checkpoints")[-1]).iterdir()]:
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert checkpoint_dirs(out / "checkpoints")[-1].stat().st_mode & 0o777 == 0o755


# -- 3. no checkpoint or export of a broken state --------------------------------------------------------

def test_never_stop_still_refuses_to_export_diverged_weights(cli, capsys):
    rc, out = cli("train.max_train_steps=5", "train.checkpoint_every=2", "train.learning_rate=1e30",
                  "train.max_grad_norm=0", "train.max_consecutive_nonfinite=0")
    cap = capsys.readouterr()
    assert rc == 1
    line = one_error_line(cap.err)
    assert "not exporting the weights of step 5" in line and "grew" in line and "since the start" in line
    assert not (out / WAN_FILE).exists() and not checkpoint_dirs(out / "checkpoints")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 4 and "4 of 5 steps were skipped" in summary["warning"]
    assert "warning: 4 of 5 steps were skipped" in cap.out


# -- 4. verified artefacts -------------------------------------------------------------------------------

def flip_bit(path: Path, offset: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x08
    path.write_bytes(bytes(data))


def test_damaged_cache_entries_are_reencoded_or_skipped(cli, tmp_path, shared_cache, capsys):
    rc, _ = cli("train.max_train_steps=1", out="warm")
    assert rc == 0
    cache = shutil.copytree(shared_cache, tmp_path / "cache")
    entries = sorted((cache / "latents").rglob("*.safetensors"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:-40])  # truncated: setup's header/size check sees it
    flip_bit(entries[1])  # one bit inside the data: only the digest sees it, at the first read
    capsys.readouterr()
    rc, out = cli("train.max_train_steps=6", "train.max_consecutive_nonfinite=0", "train.checkpoint_every=2",
                  "train.keep_checkpoints=0", cache=cache)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"cache: 1 damaged entry, re-encoding: {entries[0]} (" in cap.out and "truncated" in cap.out
    assert f"cache entry {entries[1]} is damaged (its tensors do not match their digest)" in cap.out
    assert not entries[1].exists()  # deleted, so that the next setup encodes it again
    rows = read_losses(out)
    skipped = {r["step"] for r in rows if r["skipped"]}
    assert all(r["loss"] is None for r in rows if r["skipped"])
    # A checkpoint due after a skipped step waits for the next good one.
    assert any(s % 2 == 0 for s in skipped)
    expected, due = [], False
    for s in range(1, 7):
        due = due or s % 2 == 0
        if due and s not in skipped:
            expected.append(s)
            due = False
    assert [int(d.name.removeprefix("step-")) for d in checkpoint_dirs(out / "checkpoints")] == expected
    rc, out = cli("train.max_train_steps=4", out="again", cache=cache)
    cap = capsys.readouterr()
    assert rc == 0 and "latents reused 1, latents encoded 1" in cap.out
    assert not any(r["skipped"] for r in read_losses(out))


def test_damaged_checkpoints_fall_back_to_the_newest_intact(cli, capsys):
    rc, out = cli("train.max_train_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3")
    assert rc == 0
    ck = out / "checkpoints"
    (ck / "step-000003" / "state.pt").write_bytes((ck / "step-000003" / "state.pt").read_bytes()[:-64])
    flip_bit(ck / "step-000002" / "weights.safetensors")
    capsys.readouterr()
    # Named explicitly, a damaged checkpoint is an error that says what is wrong.
    rc, _ = cli("train.max_train_steps=4", f'train.resume="{ck / "step-000002"}"')
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "weights.safetensors does not match its digest" in line and '"latest"' in line
    # "latest" skips both, says why, and continues from step 1 exactly.
    reference = loss_values(out)
    rc, _ = cli("train.max_train_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=3",
                'train.resume="latest"')
    text = capsys.readouterr().out
    assert rc == 0
    assert "state.pt has" in text and "(truncated)" in text and "does not match its digest" in text
    assert f"resumed from {ck / 'step-000001'} at step 1" in text
    assert loss_values(out)[:3] == reference  # steps 2 and 3 again, bit for bit
    assert sorted(d.name for d in ck.iterdir()) == ["step-000002", "step-000002.damaged", "step-000003",
                                                     "step-000003.damaged", "step-000004"]


# -- 5. one-line errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("path, needle", [
    ("/nonexistent/model", "no such directory, and not a hub id"),
    ("not a hub id", "no such directory, and not a hub id"),
])
def test_missing_model_directory_is_one_line_before_anything_is_written(cli, tmp_path, capsys, path, needle):
    rc, out = cli(f'model.path="{path}"', cache=tmp_path / "fresh")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"model.path = {path!r}: {needle}" in line
    assert not out.exists() and not (tmp_path / "fresh").exists()


def test_malformed_model_directory_and_debug_traceback(cli, tmp_path, tiny_wan_dir, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_wan_dir, broken)
    shutil.rmtree(broken / "transformer")
    rc, out = cli(f'model.path="{broken}"', cache=tmp_path / "fresh")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "no transformer/ with a config.json" in line and str(broken) in line
    assert not out.exists() and not (tmp_path / "fresh").exists()  # found before caching
    with pytest.raises(ConfigError, match="no transformer/"):
        cli_main([str(tmp_path / "run.toml"), "--debug", "--set", f'model.path="{broken}"'])


def test_empty_and_unusable_datasets_print_the_summary_first(cli, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.mp4").write_text("not a video")
    (bad / "a.txt").write_text("a cat")
    rc, _ = cli(f'dataset.clips.path="{bad}"')
    cap = capsys.readouterr()
    assert rc == 2
    assert "dataset 'clips': 1 files found, 0 used, 1 skipped" in cap.out and "1 x unreadable: a.mp4" in cap.out
    assert "no usable files: all 1 file(s)" in one_error_line(cap.err)
    rc, _ = cli("train.batch_size=3")
    assert rc == 2 and "too few for the batch: 2 usable file(s)" in one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(not ROOT, reason="mounting a tmpfs needs root")
def test_disk_full_while_caching_and_checkpointing(cli, tmp_path, capsys):
    with tmpfs(tmp_path / "small", "8k") as small:
        rc, out = cli(cache=small / "cache", out="run_a")
        line = one_error_line(capsys.readouterr().err)
        assert rc == 1 and f"disk full in {small / 'cache'}" in line and "this write needs about" in line
        assert "(set by cache.dir)" in line
        assert not [p for p in small.rglob("*") if ".tmp" in p.name]
    with tmpfs(tmp_path / "out", "32k") as small:
        rc, out = cli("train.checkpoint_every=1", out=small / "run")
        line = one_error_line(capsys.readouterr().err)
        assert rc == 1 and f"disk full in {out / 'checkpoints'}" in line and "(set by train.output_dir)" in line
        assert not checkpoint_dirs(out / "checkpoints")
        no_partial_files(out)


def test_unwritable_output_directory(cli, tmp_path, capsys):
    if ROOT:  # root writes through permissions: a read-only mount is what stops it
        ctx = tmpfs(tmp_path / "locked", "64k", readonly=True)
    else:
        (tmp_path / "locked").mkdir()
        (tmp_path / "locked").chmod(0o500)
        ctx = contextlib.nullcontext(tmp_path / "locked")
    with ctx as locked:
        rc, _ = cli(out=locked / "run")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and str(locked / "run") in line and "point train.output_dir at a directory" in line
    assert ("permission denied" if not ROOT else "read-only file system") in line
