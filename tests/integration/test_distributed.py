"""torch.distributed on real torchrun processes over gloo (2 CPU ranks, one 4-rank launch):
each parallel layout against one rank, fp32.

- the model: DDP, FSDP2 and Ulysses sequence parallelism (with TREAD routing), and the 2-D mesh
  (2-way data x 2-way sequence): forward output and every gradient within 1e-5 relative;
- the trainer: a 2-rank DDP run gives the losses of a 1-rank run with the same global batch, and
  checkpoints cross world sizes both ways (a SIGKILLed 2-rank run resumed on 1 rank, a 1-rank
  checkpoint resumed on 2) with the loss sequence unchanged; an FSDP2 full fine-tune checkpoints
  in DCP shards (one file per rank) that one process resumes with the same losses.
"""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from vidtune.cli.train import main as cli_main
from vidtune.testing import run_torchrun, torchrun_exe, write_captioned_clips
from vidtune.train.log import read_losses

sys.path.insert(0, str(Path(__file__).parent))
from test_train import write_config  # noqa: E402

if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg missing: apt-get install -y ffmpeg", allow_module_level=True)

HERE = Path(__file__).parent
REPO = HERE.parents[1]
# Identical numerics on any world size: the collectives reorder fp32 sums, nothing more.
TOL = 1e-5


def check_layouts(tmp_path, nproc: int, layouts: list[str]):
    rc, out, err = run_torchrun([str(HERE / "dist_model_check.py"), str(tmp_path), *layouts], nproc, timeout=300,
                                cwd=REPO)
    assert rc == 0, err[-3000:]
    for layout in layouts:
        for rank in range(nproc):
            got = json.loads((tmp_path / f"{layout.replace(':', '-')}-rank{rank}.json").read_text())
            assert got["grads"] > 100, got  # every parameter's gradient was compared
            assert got["error"] < TOL, f"{layout} rank {rank}: {got['worst']} off by {got['error']:.2e} relative"


def test_ddp_fsdp_and_sequence_parallel_match_one_rank(tmp_path):
    check_layouts(tmp_path, 2, ["ddp:2", "fsdp:1", "fsdp:2"])


def test_2d_mesh_data_x_sequence_on_4_ranks(tmp_path):
    check_layouts(tmp_path, 4, ["ddp:2"])


@pytest.fixture
def one_thread():
    """The 1-rank runs in this process use one thread, as each torchrun rank does (torchrun's
    default): on a loaded 2-core machine more threads only spin."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_losses(run_dir)}


def assert_same(got: dict[int, float], want: dict[int, float], steps):
    for s in steps:
        assert abs(got[s] - want[s]) <= TOL * abs(want[s]), f"step {s}: {got[s]} vs {want[s]} (one rank)"


def test_ddp_run_matches_one_rank_and_resumes_across_world_sizes(tmp_path, tiny_wan_dir, one_thread):
    data = write_captioned_clips(tmp_path / "clips")
    cache = tmp_path / "cache"

    def config(name: str) -> Path:
        return write_config(tmp_path / f"{name}.toml", tiny_wan_dir, data, cache, tmp_path / name, "repeats = 3\n")

    def torchrun(name: str, *sets: str):
        rc, out, err = run_torchrun(["-m", "vidtune.train", str(config(name)), "--set", "parallel.timeout_s=120",
                                     *(a for s in sets for a in ("--set", s))], 2, timeout=300, cwd=REPO)
        assert rc == 0, err[-3000:]
        return out

    # The reference: one rank, global batch 2 = 1 x 2 accumulation steps, 10 steps.
    one = ["train.max_train_steps=10", "train.gradient_accumulation_steps=2", "train.checkpoint_every=5",
           "train.keep_checkpoints=0"]
    assert cli_main([str(config("one")), *(a for s in one for a in ("--set", s))]) == 0
    want = losses(tmp_path / "one")

    # Two ranks, the same global batch = 1 x 2 ranks x 1, SIGKILLed (every rank) past the step-5
    # checkpoint; then one rank resumes from it with the global batch as 1 x 2 accumulation steps.
    out = sigkilled_torchrun(config("two"), tmp_path / "two", 7, "train.max_train_steps=100000", "train.checkpoint_every=5",
                             "train.keep_checkpoints=0", "parallel.timeout_s=120")
    assert "global batch 2 = 1 per rank x 2 x 1 accumulation steps" in out
    assert_same(losses(tmp_path / "two"), want, range(1, 6))
    step5 = tmp_path / "two" / "checkpoints" / "step-000005"
    resume = ["train.max_train_steps=10", "train.gradient_accumulation_steps=2", f"train.resume=\"{step5}\""]
    assert cli_main([str(config("two")), *(a for s in resume for a in ("--set", s))]) == 0
    assert_same(losses(tmp_path / "two"), want, range(6, 11))

    # The 1-rank run's step-5 checkpoint, resumed on two ranks.
    shutil.copytree(tmp_path / "one" / "checkpoints" / "step-000005", tmp_path / "back" / "checkpoints" / "step-000005")
    torchrun("back", "train.max_train_steps=10", "train.resume=\"latest\"")
    assert_same(losses(tmp_path / "back"), want, range(6, 11))


def test_fsdp_full_finetune_checkpoints_in_shards_one_rank_resumes(tmp_path, tiny_wan_dir, one_thread):
    data = write_captioned_clips(tmp_path / "clips")

    def config(name: str) -> Path:
        return write_config(tmp_path / f"{name}.toml", tiny_wan_dir, data, tmp_path / "cache", tmp_path / name,
                            "repeats = 3\n")

    def sets(values):
        return [a for v in values for a in ("--set", v)]

    full = ['adapter.type="full"', "train.learning_rate=1e-4", "train.checkpoint_every=3", "train.keep_checkpoints=0"]
    assert cli_main([str(config("one")), *sets(full + ["train.max_train_steps=6",
                                                        "train.gradient_accumulation_steps=2"])]) == 0
    want = losses(tmp_path / "one")

    # Two FSDP2 ranks (global batch 2 = 1 x 2 ranks) to step 3: the checkpoint is DCP shards.
    rc, _, err = run_torchrun(["-m", "vidtune.train", str(config("fsdp")),
                               *sets(full + ["train.max_train_steps=3", 'parallel.data="fsdp"', "parallel.timeout_s=120"])],
                              2, timeout=300, cwd=REPO)
    assert rc == 0, err[-3000:]
    assert_same(losses(tmp_path / "fsdp"), want, range(1, 4))
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["sharded"] and not (ckpt / "weights.safetensors").exists()
    shards = {n for n in meta["files"] if n.startswith("sharded/")}
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= shards  # one file per rank

    # Two FSDP2 ranks resume the shards, each reading its own; then one process (global batch as
    # 1 x 2 accumulation steps). Both continue with the same losses.
    shutil.copytree(ckpt, tmp_path / "again" / "checkpoints" / ckpt.name)
    rc, _, err = run_torchrun(["-m", "vidtune.train", str(config("again")),
                               *sets(full + ["train.max_train_steps=6", 'parallel.data="fsdp"', "parallel.timeout_s=120",
                                             'train.resume="latest"'])], 2, timeout=300, cwd=REPO)
    assert rc == 0, err[-3000:]
    assert_same(losses(tmp_path / "again"), want, range(4, 7))
    resume = full + ["train.max_train_steps=6", "train.gradient_accumulation_steps=2", 'train.resume="latest"']
    assert cli_main([str(config("fsdp")), *sets(resume)]) == 0
    assert_same(losses(tmp_path / "fsdp"), want, range(4, 7))


def sigkilled_torchrun(cfg: Path, run_dir: Path, rows: int, *sets: str) -> str:
    """A 2-rank launch of ``cfg``, SIGKILLed (the launcher and every rank at once) once
    ``run_dir/losses.jsonl`` has ``rows`` rows; returns its stdout."""
    import os
    import signal
    import subprocess
    import time

    losses_file = run_dir / "losses.jsonl"
    proc = subprocess.Popen([torchrun_exe(), "--standalone", "--nproc_per_node=2", "-m", "vidtune.train", str(cfg),
                             *(a for s in sets for a in ("--set", s))], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (losses_file.exists() and losses_file.read_text().count("\n") >= rows):
            assert proc.poll() is None and time.monotonic() < deadline, "the 2-rank run never got that far"
            time.sleep(0.05)
    finally:
        # torchrun starts each rank in a session of its own: kill the ranks, then the launcher.
        tree, todo = [], [proc.pid]
        while todo:
            kids = _children(todo.pop())
            tree += kids
            todo += kids
        for pid in [*reversed(tree), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate(timeout=60)
    return out


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def test_a_rank_killed_mid_run_stops_the_other_with_one_line(tmp_path, tiny_wan_dir):
    import os
    import signal
    import subprocess
    import time

    cfg = write_config(tmp_path / "kill.toml", tiny_wan_dir, write_captioned_clips(tmp_path / "clips"),
                       tmp_path / "cache", tmp_path / "kill", "repeats = 3\n")
    proc = subprocess.Popen([torchrun_exe(), "--standalone", "--nproc_per_node=2", "-m", "vidtune.train", str(cfg),
                             "--set", "train.max_train_steps=100000", "--set", "parallel.timeout_s=20"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        losses_file = tmp_path / "kill" / "losses.jsonl"
        deadline = time.monotonic() + 240
        while not (losses_file.exists() and losses_file.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the 2-rank run never trained"
            time.sleep(0.5)
        victim = next(p for w in _children(proc.pid) for p in [w, *_children(w)] if _rank_of(p) == 1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)
        waited = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    lost = [ln for ln in err.splitlines() if "lost the other ranks" in ln]
    assert lost and lost[0].startswith("error: rank 0"), err[-3000:]
    assert "parallel.timeout_s = 20 s" in lost[0] and 'train.resume = "latest"' in lost[0]
    assert waited < 20 + 60  # the configured timeout, plus the launcher's teardown
