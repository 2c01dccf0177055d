"""vidtune-train end to end on real files: ffmpeg clips, a tiny random Wan saved in the diffusers
layout, real safetensors checkpoints and LoRA files, real signals on real subprocesses."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vidtune.adapters import DIFFUSERS_FILE, WAN_FILE, WAN_LOKR_FILE, apply_lora, load_lora_into
from vidtune.cli.train import main as cli_main
from vidtune.config import AdapterConfig, load_config
from vidtune.integrity import dumps_verified
from vidtune.models import from_pretrained
from vidtune.testing import check_loaders, tiny_run_toml, write_captioned_clips
from vidtune.train.checkpoint import checkpoint_dirs
from vidtune.train.log import loss_values, read_losses

if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg missing: apt-get install -y ffmpeg", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
ALL_LINEAR = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]
DEMO_TARGETS = load_config(REPO / "examples" / "quickstart.toml").adapter.target_modules


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = write_captioned_clips(tmp_path_factory.mktemp("clips"))
    (root / "empty.mp4").write_bytes(b"")  # bad files: skipped and counted, never a crash
    (root / "notavideo.mp4").write_text("this is not a video")
    good = (root / "clip0.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def write_config(path: Path, model: Path, data: Path, cache: Path, out: Path, extra: str = "") -> Path:
    """The tiny LoRA run these tests share (``extra``: more lines of its one [[dataset]])."""
    path.write_text(tiny_run_toml(model, cache, {"clips": data}, out,
                                  "max_train_steps = 3\nlearning_rate = 1e-2\ncheckpoint_every = 0\nseed = 3",
                                  adapter=f"alpha = 2.0\ntarget_modules = {json.dumps(ALL_LINEAR)}",
                                  dataset_lines=f'caption_prefix = "sks"\n{extra}'))
    return path


@pytest.fixture
def run(tmp_path, tiny_wan_dir, data_dir, cache_dir):
    """run(*overrides, out=...) -> (rc, run_dir): vidtune-train in this process."""
    def go(*overrides, out="run", extra=""):
        out = tmp_path / out
        cfg = write_config(tmp_path / f"{out.name}.toml", tiny_wan_dir, data_dir, cache_dir, out, extra)
        rc = cli_main([str(cfg)] + [a for o in overrides for a in ("--set", o)])
        return rc, out
    return go


def no_partial_files(run_dir: Path):
    left = [p for p in run_dir.rglob("*") if p.name.startswith(".") and (".tmp" in p.name or p.name.startswith(".tmp"))]
    assert not left, f"partial files left behind: {left}"


def our_model_with_lora(model_dir, adapter: AdapterConfig, lora_file):
    model = from_pretrained(model_dir, torch_dtype=torch.float32)
    apply_lora(model, adapter)
    load_lora_into(model, lora_file)
    return model.eval()


def test_lora_run_exports_load_in_diffusers(run, tiny_wan_dir, capsys):
    from diffusers import WanPipeline

    rc, out = run("adapter.export_format=both", "logging.report_to=tensorboard", "train.lr_scheduler=cosine",
                  "train.lr_warmup_steps=1", "train.gradient_accumulation_steps=2")
    assert rc == 0
    text = capsys.readouterr().out
    assert "5 files found, 2 used, 3 skipped" in text
    assert len(loss_values(out)) == 3 and list(out.glob("logs/events.out.tfevents.*"))
    no_partial_files(out)

    # Trained as rank 4 / alpha 2 on attn1, attn2 and FF: every A and B is non-zero.
    weights = load_file(checkpoint_dirs(out / "checkpoints")[-1] / "weights.safetensors")
    assert len(weights) == 2 * 2 * 10  # 2 blocks x (8 attention + 2 FF) Linears x (A, B)
    assert all(w.abs().sum() > 0 for w in weights.values())
    with safe_open(out / DIFFUSERS_FILE, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert "transformer.blocks.0.attn2.to_k.lora_A.weight" in keys and "transformer.blocks.1.ffn.net.2.lora_B.weight" in keys
    assert meta["vidtune.rank"] == "4" and meta["vidtune.alpha"] == "2.0" and meta["vidtune.trigger_word"] == "sks"
    assert meta["vidtune.base_model"] == str(tiny_wan_dir)
    with safe_open(out / WAN_FILE, "pt") as f:
        wkeys = set(f.keys())
        assert float(f.get_tensor("diffusion_model.blocks.0.self_attn.q.alpha")) == 2.0
    assert "diffusion_model.blocks.1.cross_attn.o.lora_up.weight" in wkeys and "diffusion_model.blocks.0.ffn.0.lora_down.weight" in wkeys

    # Our model with the trained adapter (fp32, exact weights from the checkpoint)...
    adapter = AdapterConfig(rank=4, alpha=2.0, target_modules=ALL_LINEAR)
    ours = from_pretrained(tiny_wan_dir, torch_dtype=torch.float32)
    apply_lora(ours, adapter)
    assert not ours.load_state_dict(weights, strict=False).unexpected_keys
    ours.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 4, 4, generator=g)
    t = torch.tensor([700.0])
    ctx = torch.randn(1, 512, 32, generator=g)
    with torch.no_grad():
        ref = ours(x, t, ctx)
        base = from_pretrained(tiny_wan_dir, torch_dtype=torch.float32).eval()(x, t, ctx)
    assert (ref - base).abs().max() > 1e-3  # the adapter changes the output
    # ...equals diffusers' WanPipeline after load_lora_weights, for both layouts.
    for name in (DIFFUSERS_FILE, WAN_FILE):
        pipe = WanPipeline.from_pretrained(tiny_wan_dir)
        pipe.load_lora_weights(str(out / name))
        with torch.no_grad():
            theirs = pipe.transformer(x, t, ctx, return_dict=False)[0]
        torch.testing.assert_close(theirs, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=name)
        # and starting a run from the file (init_from) reproduces the adapter in our model
        with torch.no_grad():
            again = our_model_with_lora(tiny_wan_dir, adapter, out / name)(x, t, ctx)
        torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-6)

    # init_from through the CLI: a second run starts from the exported adapter.
    rc, out2 = run("adapter.init_from=" + json.dumps(str(out / WAN_FILE)), "train.max_train_steps=1", out="run2")
    assert rc == 0 and "started from" in capsys.readouterr().out


def test_quickstart_adapter_exports_for_both_loaders(run, capsys):
    # The quickstart's modules by default: one ComfyUI file; its Conv3d patch embedding is not in
    # diffusers' converter, so a diffusers file goes beside it, said in one line.
    rc, out = run(f"adapter.target_modules={json.dumps(DEMO_TARGETS)}", "train.max_train_steps=2")
    assert rc == 0
    text = capsys.readouterr().out
    assert f"{WAN_FILE} is for ComfyUI; diffusers cannot read it (its converter has no key for patch_embedding)" in text
    assert check_loaders(out)
    with safe_open(out / WAN_FILE, "pt") as f:
        meta = f.metadata()
    assert meta["vidtune.flavour"] == "custom" and json.loads(meta["vidtune.model_config"])["num_layers"] == 2


def test_lokr_trains_resumes_bitwise_and_merges(run, tiny_wan_dir, tmp_path):
    from vidtune.cli import main as vidtune_main

    lokr = ['adapter.type="lokr"', "adapter.rank=1", "adapter.lokr_decompose_factor=4", "train.max_train_steps=4",
            "train.checkpoint_every=2", "adapter.dropout=0.2"]
    rc, out = run(*lokr)
    assert rc == 0
    ckpts = checkpoint_dirs(out / "checkpoints")
    ref_losses, ref_weights = loss_values(out), load_file(ckpts[-1] / "weights.safetensors")
    assert any(".lokr_w2_a." in k for k in ref_weights) and all(".lokr_" in k for k in ref_weights)
    shutil.rmtree(ckpts[-1])
    rc, _ = run(*lokr, 'train.resume="latest"')
    assert rc == 0
    assert [float.hex(v) for v in loss_values(out)] == [float.hex(v) for v in ref_losses]
    weights = load_file(checkpoint_dirs(out / "checkpoints")[-1] / "weights.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in ref_weights.items())
    # The LyCORIS-layout export, merged by `vidtune lora merge`, is the model we trained.
    exported = out / WAN_LOKR_FILE
    assert "diffusion_model.blocks.0.self_attn.q.lokr_w2_b" in load_file(exported)
    assert vidtune_main(["lora", "merge", str(exported), "--base", str(tiny_wan_dir), "-o", str(tmp_path / "m")]) == 0
    ours = from_pretrained(tiny_wan_dir, torch_dtype=torch.float32)
    apply_lora(ours, AdapterConfig(type="lokr", rank=1, alpha=2.0, lokr_decompose_factor=4, target_modules=ALL_LINEAR))
    assert not ours.load_state_dict(weights, strict=False).unexpected_keys
    x, t, ctx = torch.randn(1, 16, 3, 4, 4), torch.tensor([300.0]), torch.randn(1, 512, 32)
    with torch.no_grad():
        ref = ours.eval()(x, t, ctx)
        merged = from_pretrained(tmp_path / "m").eval()(x, t, ctx)
    torch.testing.assert_close(merged, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_full_finetune_writes_loadable_transformer(run, tiny_wan_dir):
    rc, out = run('adapter.type="full"', "train.max_train_steps=2", "memory.chunked_ff.enabled=true",
                  "memory.chunked_ff.chunk_size=7")
    assert rc == 0
    tuned = from_pretrained(out / "transformer", torch_dtype=torch.float32).state_dict()
    base = from_pretrained(tiny_wan_dir, torch_dtype=torch.float32).state_dict()
    assert tuned.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(changed) > len(base) // 2
    no_partial_files(out)


def test_int8_base_with_offload_trains_lora(run):
    # The 24 GB recipe's stack on CPU: int8 base -> peft LoRA -> block offload -> checkpointing.
    rc, out = run('model.base_precision="int8"', 'model.quantize_via="cpu"', 'memory.offload.type="block_level"',
                  'memory.offload.backend="python"', "train.max_train_steps=2", "train.checkpoint_every=1")
    assert rc == 0
    w1, w2 = (load_file(c / "weights.safetensors") for c in checkpoint_dirs(out / "checkpoints")[-2:])
    assert all(torch.isfinite(v).all() for v in w2.values())
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_adamw_8bit_steps(run):
    pytest.importorskip("bitsandbytes")
    rc, out = run('train.optimizer="adamw_8bit"', "train.max_train_steps=2", "train.checkpoint_every=1")
    assert rc == 0
    ckpts = checkpoint_dirs(out / "checkpoints")
    state = torch.load(ckpts[-1] / "state.pt", weights_only=True)["optimizer"]["state"]
    assert {v["__bnb_optimizer_quant_state__"]["state1"].dtype for v in state.values()} == {torch.uint8}
    w1, w2 = (load_file(c / "weights.safetensors") for c in ckpts[-2:])
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_nonfinite_steps_skipped_then_stop(run, capsys):
    # A learning rate this large makes the weights overflow after one step: every later loss is NaN.
    rc, out = run("train.learning_rate=1e30", "train.max_grad_norm=0", "train.max_train_steps=10",
                  "train.max_consecutive_nonfinite=2")
    err = capsys.readouterr().err
    assert rc == 1 and "2 non-finite steps in a row" in err and "train.learning_rate" in err
    rows = read_losses(out)
    assert [r["skipped"] for r in rows] == [False, True, True]


def test_corrupt_cache_entry_is_skipped(run, tmp_path, cache_dir, capsys):
    # One sample's cached latents hold NaN: its steps are skipped and counted, the others train.
    cache = tmp_path / "cache_copy"
    shutil.copytree(cache_dir, cache)
    latents = sorted((cache / "latents").rglob("*.safetensors"))
    assert len(latents) == 2
    t = load_file(latents[0])
    # Intact on disk (its digest matches), NaN inside: what a bad encode would have stored.
    latents[0].write_bytes(dumps_verified({k: torch.full_like(v, float("nan")) for k, v in t.items()}))
    rc, out = run(f'cache.dir="{cache}"', "train.max_train_steps=8", "train.max_consecutive_nonfinite=0")
    assert rc == 0
    skipped = [r["skipped"] for r in read_losses(out)]
    assert 0 < sum(skipped) < 8
    assert "step skipped" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, needle", [
    (["adapter.target_modules=[\"to_qq\"]"], "adapter.target_modules"),
    (['adapter.init_from="/nonexistent/lora.safetensors"'], "is not a file"),
    (['train.resume="/nonexistent/step-000001"'], "not a complete checkpoint"),
    (['train.optimizer="adamw"', "train.lr_schedulr=\"cosine\""], "did you mean 'train.lr_scheduler'"),
])
def test_bad_configs_fail_clearly(run, capsys, overrides, needle):
    rc, out = run(*overrides)
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not (out / WAN_FILE).exists() and not (out / "checkpoints").exists()


def test_bad_adapter_files_fail_clearly(run, tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    rc, _ = run(f'adapter.init_from="{garbage}"')
    err = capsys.readouterr().err
    assert rc == 2 and "cannot read" in err and str(garbage) in err
    rank8 = tmp_path / "rank8.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(8, 16),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(16, 8)}, rank8)
    rc, _ = run(f'adapter.init_from="{rank8}"')
    assert rc == 2 and "set adapter.rank = 8" in capsys.readouterr().err
    other = tmp_path / "proj.safetensors"
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(4, 16),
               "transformer.proj_out.lora_B.weight": torch.zeros(64, 4)}, other)
    rc, _ = run(f'adapter.init_from="{other}"')
    assert rc == 2 and "add their suffixes to adapter.target_modules" in capsys.readouterr().err


# -- real processes: SIGKILL mid-run + resume is bitwise; SIGTERM writes a checkpoint ------------

RESUME_SETTINGS = ["train.max_train_steps=16", "train.checkpoint_every=3", "train.keep_checkpoints=2",
                   "train.caption_dropout=0.3", "adapter.dropout=0.1", "train.gradient_accumulation_steps=2",
                   "train.lr_scheduler=cosine", "train.lr_warmup_steps=3", 'train.timestep_sampling="shift"']
TREAD = "[[tread.routes]]\nselection_ratio = 0.5\nstart_layer = 0\nend_layer = 0\n"


def spawn(cfg_path: Path, *overrides):
    args = [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vidtune.cli.train", str(cfg_path), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(proc, run_dir: Path, n: int, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(read_losses(run_dir)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.01)
    raise AssertionError("timed out waiting for training steps")


def test_sigkill_resume_is_bitwise(run, tmp_path, tiny_wan_dir, data_dir, cache_dir):
    rc, ref_dir = run(*RESUME_SETTINGS, out="ref", extra=TREAD)
    assert rc == 0
    reference = loss_values(ref_dir)
    assert len(reference) == 16

    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.toml", tiny_wan_dir, data_dir, cache_dir, out, TREAD)
    proc = spawn(cfg, *RESUME_SETTINGS)
    wait_for_steps(proc, out, 5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(read_losses(out))
    assert 5 <= killed_at < 16, "the run finished before it was killed; make it longer"

    rc = cli_main([str(cfg), *[a for o in RESUME_SETTINGS + ['train.resume="latest"'] for a in ("--set", o)]])
    assert rc == 0
    resumed = loss_values(out)
    assert [float.hex(v) for v in resumed] == [float.hex(v) for v in reference]
    assert len(checkpoint_dirs(out / "checkpoints")) == 2  # keep_checkpoints
    no_partial_files(out)
    for name in (WAN_FILE,):
        assert load_file(out / name).keys() == load_file(ref_dir / name).keys()
        assert all(torch.equal(load_file(out / name)[k], v) for k, v in load_file(ref_dir / name).items())


def test_sigterm_writes_checkpoint(tmp_path, tiny_wan_dir, data_dir, cache_dir):
    out = tmp_path / "term"
    cfg = write_config(tmp_path / "term.toml", tiny_wan_dir, data_dir, cache_dir, out)
    proc = spawn(cfg, "train.max_train_steps=100000", "train.checkpoint_every=0")
    wait_for_steps(proc, out, 3)
    os.kill(proc.pid, signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "SIGTERM: stopped at step" in text
    ckpts = checkpoint_dirs(out / "checkpoints")
    assert len(ckpts) == 1
    meta = json.loads((ckpts[0] / "meta.json").read_text())
    assert meta["step"] == len(read_losses(out)) >= 3
    no_partial_files(out)


def test_plan_flag_and_refusal_before_caching(tmp_path, tiny_wan_dir, data_dir, capsys):
    cfg = write_config(tmp_path / "p.toml", tiny_wan_dir, data_dir, tmp_path / "cache", tmp_path / "out")
    assert cli_main([str(cfg), "--plan", "--gpu", "rtx4090"]) == 0
    assert "verdict: FITS on rtx4090" in capsys.readouterr().out
    # A batch of 200,000 clips does not fit this machine's RAM: refused before caching, with the
    # plan in the message, and nothing written.
    rc = cli_main([str(cfg), "--set", "memory.plan_check=\"on\"", "--set", "train.batch_size=200000"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit" in err and "DOES NOT FIT" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_inductor_compiled_run_matches_eager(run):
    """One end-to-end case with inductor (a cold compile costs ~30 s here): LoRA, checkpointing and
    a TREAD route, compiled block by block, train to the eager run's losses."""
    settings = ["memory.gradient_checkpointing=true", "train.max_train_steps=3"]
    rc, eager = run(*settings, out="eager", extra=TREAD)
    assert rc == 0
    rc, compiled = run(*settings, 'compile.enabled="on"', out="compiled", extra=TREAD)
    assert rc == 0
    a, b = loss_values(eager), loss_values(compiled)
    assert len(a) == len(b) == 3
    assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)
    assert a != [0.0] * 3


def test_mfu_in_the_progress_line_and_logs_is_counted_flops_over_time_and_peak(run, capsys):
    """The logged MFU is the counters' FLOPs of a real step of the same model / step time / the
    measured fp32 GEMM peak (``measure.mfu``'s definition), computed here independently."""
    import re

    from vidtune.build import build_from_config
    from vidtune.config import load_config
    from vidtune.measure.counters import count_train_step
    from vidtune.measure.devices import measure_cpu_fp32_flops

    rc, out = run("train.max_train_steps=2", "logging.progress_bar=false")
    assert rc == 0
    assert len(re.findall(r"tok/s MFU \d+\.\d+% mem", capsys.readouterr().out)) == 2
    # Model FLOPs: a real step of the run's model without checkpointing, which would repeat forwards.
    cfg = load_config(out / "config.resolved.toml", ["memory.gradient_checkpointing=false"])
    model = build_from_config(cfg, "cpu", init="random").model
    c = model.config
    x = torch.randn(1, c.in_channels, 3, 4, 4)  # the 32x32, 9-frame clips' latents
    counted = count_train_step(model, lambda: ((x, torch.tensor([500.0]), torch.randn(1, 512, c.text_dim)), {}))
    peak = measure_cpu_fp32_flops()
    for r in read_losses(out):
        assert r["flops"] == counted.flops
        assert r["mfu"] == pytest.approx(counted.flops / r["step_s"] / peak, rel=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mfu"]["peak_flops"] == peak
