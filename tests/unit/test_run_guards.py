"""The reusable guards under the trainer: the run-directory lock (real processes, torchrun ranks),
debris removal, umask-honouring atomic writes, a full disk, verified checkpoints with fallback,
the model-source preflight and the torchcodec/torch pairing check."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vidtune.config import ConfigError, ModelConfig
from vidtune.fsutil import (DirectoryLocked, DirLock, DiskFullError, atomic_dir, atomic_write_bytes, remove_debris,
                            run_dir_lock)
from vidtune.train.checkpoint import CheckpointError, checkpoint_dirs, resume_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
ROOT = os.geteuid() == 0


def hold_lock(directory: Path) -> subprocess.Popen:
    """Another process that owns ``directory`` until killed."""
    code = f"import time; from vidtune.fsutil import DirLock; DirLock({str(directory)!r}); print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_second_owner_and_dies_with_its_holder(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(DirectoryLocked, match=rf"in use by another run \(pid {holder.pid} on host {os.uname().nodename}"):
            DirLock(tmp_path / "run")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_dir_lock(tmp_path / "run") as lock:  # the kernel dropped the dead holder's lock
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    DirLock(tmp_path / "run").release()  # and the block released ours


def test_torchrun_ranks_share_the_lock_rank0_holds_it(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import os, time, torch.distributed as dist
        from vidtune.fsutil import DirLock, DirectoryLocked, run_dir_lock
        dist.init_process_group("gloo")
        with run_dir_lock({str(tmp_path / "run")!r}) as lock:
            print(f"rank {{dist.get_rank()}} holds {{lock is not None}}", flush=True)
            dist.barrier()
            if dist.get_rank() == 1:  # another run's rank 0 is refused
                try:
                    DirLock({str(tmp_path / "run")!r})
                except DirectoryLocked as exc:
                    print("refused:", exc, flush=True)
            dist.barrier()
        dist.destroy_process_group()
    """))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", str(script)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    finally:  # a hung rank must not outlive the test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "rank 0 holds True" in out and "rank 1 holds False" in out
    assert "refused:" in out and "in use by another run" in out


def test_debris_is_only_our_temp_names(tmp_path):
    keep = [tmp_path / ".hidden", tmp_path / "notes.tmp", tmp_path / "checkpoints" / "step-000001" / "meta.json"]
    debris = [tmp_path / ".summary.k2j_9x0a.tmp.json", tmp_path / "plots" / ".loss.abcdefgh.tmp.png"]
    for f in keep + debris:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    (tmp_path / "checkpoints" / ".tmp-step-000002-q1w2e3r4").mkdir()
    removed = remove_debris(tmp_path)
    assert sorted(removed) == sorted(debris + [tmp_path / "checkpoints" / ".tmp-step-000002-q1w2e3r4"])
    assert all(f.exists() for f in keep)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_published_files_honour_the_umask(tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "summary.json", b"{}")
        with atomic_dir(tmp_path / "step-000001") as d:
            save_file({"w": torch.ones(2)}, d / "weights.safetensors")  # safetensors creates 0600 itself
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "step-000001" / "weights.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "step-000001").stat().st_mode & 0o777 == dir_mode


@pytest.mark.skipif(not ROOT, reason="mounting a tmpfs needs root")
def test_disk_full_names_directory_and_bytes(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(DiskFullError, match=rf"disk full in {small} \(.* free; this write needs about 64.0 KiB\)"):
            atomic_write_bytes(small / "entry.safetensors", b"\0" * 65536)
        state = {"optimizer": {"exp_avg": torch.zeros(16384)}}
        with pytest.raises(DiskFullError, match=rf"disk full in {small / 'ck'} .*needs about 64.0 KiB"):
            save_checkpoint(small / "ck", 1, {"w": torch.zeros(4)}, state, {})
        assert list(small.rglob("*")) == [small / "ck"]  # no temp file or directory left
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


def test_checkpoints_are_verified_and_resume_falls_back(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save_checkpoint(root, step, {"w": torch.full((8,), float(step))}, {"step": torch.tensor(step)}, {"adapter": "lora"})
    (root / "step-000004" / "state.pt").write_bytes((root / "step-000004" / "state.pt").read_bytes()[:-10])
    data = bytearray((root / "step-000003" / "weights.safetensors").read_bytes())
    data[-3] ^= 1
    (root / "step-000003" / "weights.safetensors").write_bytes(bytes(data))
    (root / "step-000002" / "meta.json").write_text("{torn")
    with pytest.raises(CheckpointError, match="weights.safetensors does not match its digest"):
        resume_checkpoint(root, str(root / "step-000003"))
    said = []
    path, weights, state, meta = resume_checkpoint(root, "latest", said.append)
    assert path.name == "step-000001" and torch.equal(weights["w"], torch.ones(8)) and meta["step"] == 1
    assert [s.startswith(f"resume: skipping {root / f'step-00000{i}'}: ") for s, i in zip(said, (4, 3, 2))] == [True] * 3
    assert "state.pt has" in said[0] and "(truncated)" in said[0] and "meta.json is unreadable" in said[2]
    assert [d.name for d in checkpoint_dirs(root)] == ["step-000001"]  # the damaged ones moved aside
    shutil.rmtree(root / "step-000001")
    for d in root.iterdir():
        d.rename(root / d.name.removesuffix(".damaged"))
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        resume_checkpoint(root, "latest", said.append)


def test_model_sources_are_checked_before_anything_runs(tmp_path, tiny_wan_dir):
    from vidtune.train.preflight import check_model_sources

    def check(**kw):
        check_model_sources(ModelConfig(**kw))

    check(path=str(tiny_wan_dir))
    check(path="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")  # a plausible hub id: fetched later, not here
    check(path=str(tiny_wan_dir), transformer_path=str(tiny_wan_dir / "transformer"))
    for kw, needle in [
        (dict(path="/no/such/model"), "model.path = '/no/such/model': no such directory, and not a hub id"),
        (dict(path="a/b/c"), "not a hub id"),
        (dict(path=str(tiny_wan_dir / "vae")), "describes a AutoencoderKLWan, not a transformer"),
        (dict(path=str(tiny_wan_dir), vae_path=str(tmp_path)), "model.vae_path ="),
        (dict(path=str(tiny_wan_dir), transformer_path=str(tiny_wan_dir / "model_index.json")), "is a file"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            check(**kw)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_wan_dir, broken)
    (broken / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"text_encoder/config.json is unreadable"):
        check(path=str(broken))
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ConfigError, match="has no .safetensors weights"):
        check(path=str(broken))


def test_torchcodec_mismatch_names_both_versions_and_the_fix():
    from vidtune.data.video import decoder_mismatch_message, torchcodec_for_torch, torchcodec_pair

    # What torchcodec 0.17 beside torch 2.13 raises at import (reproduced with the real wheels).
    err = "Could not load this library: /venv/torchcodec/libtorchcodec_image.so"
    msg = decoder_mismatch_message("2.13.0+cu128", "0.17.0", err)
    assert msg.startswith("torchcodec 0.17.0 cannot load beside torch 2.13.0+cu128 (Could not load this library")
    assert "built for torch 2.17" in msg and 'pip install "torchcodec==0.13.*"' in msg
    assert 'pip install "torchcodec==0.7.*"' in decoder_mismatch_message("2.8.0", "0.9.0", "undefined symbol")
    assert "not installed" in decoder_mismatch_message("2.13.0", None, "No module named 'torchcodec'")
    assert [torchcodec_for_torch(v) for v in ("2.13.1", "2.10.0", "2.9.0", "2.7.1", "1.13.0")] == \
        ["0.13", "0.10", "0.9", "0.5", None]
    assert [torchcodec_pair(v) for v in ("0.17.0", "0.8.1", "0.0.3")] == ["2.17", "2.9", None]


def test_the_installed_pair_loads():
    from importlib.metadata import version

    from vidtune.data.video import _video_decoder_class, torchcodec_for_torch

    assert _video_decoder_class().__name__ == "VideoDecoder"
    assert version("torchcodec").startswith(torchcodec_for_torch(torch.__version__) + ".")

