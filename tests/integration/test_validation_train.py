"""vidtune-train with validation, EMA, every optimizer and LR schedule, plots and summary, wandb
offline, and --from-simpletuner: real CLI runs on a tiny random Wan and ffmpeg clips."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vidtune.cli.train import main as cli_main
from vidtune.testing import tiny_run_toml, write_captioned_clips
from vidtune.train.checkpoint import checkpoint_dirs
from vidtune.train.log import read_losses

if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg missing: apt-get install -y ffmpeg", allow_module_level=True)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "simpletuner"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = write_captioned_clips(tmp_path_factory.mktemp("clips"))
    (root / "broken.mp4").write_text("not a video")  # counted in summary.json
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def run(tmp_path, tiny_wan_dir, data_dir, cache_dir):
    """run(*overrides, out=..., extra=...) -> (rc, run_dir): vidtune-train in this process."""
    def go(*overrides, out="run", extra=""):
        out = tmp_path / out
        cfg = tmp_path / f"{out.name}.toml"
        cfg.write_text(tiny_run_toml(
            tiny_wan_dir, cache_dir, {"clips": data_dir}, out,
            "max_train_steps = 4\nlearning_rate = 1e-2\ncheckpoint_every = 2\nkeep_checkpoints = 0\n"
            "lr_warmup_steps = 1\nseed = 5",
            adapter='alpha = 2.0\ntarget_modules = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]',
            dataset_lines=extra))
        return cli_main([str(cfg)] + [a for o in overrides for a in ("--set", o)]), out
    return go


VALIDATION = ["validation.every=2", 'validation.prompts=["a red cat"]', 'validation.negative_prompt="the video"',
              "validation.guidance=3.0", "validation.steps=2", "validation.num_frames=5",
              'validation.resolution="32x32"', "validation.skip_layers=[1]"]
TREAD = "[[tread.routes]]\nselection_ratio = 0.5\nstart_layer = 0\nend_layer = 0\n"


def test_validation_with_ema_both_plots_summary(run, tmp_path):
    lib = tmp_path / "library.json"
    lib.write_text(json.dumps({"dog <b>": "the blue dog"}))
    rc, out = run(*VALIDATION, f'validation.prompt_library="{lib}"', 'validation.scheduler="euler"',
                  "ema.enabled=true", 'ema.validation="both"', 'ema.device="cpu"',
                  "train.max_train_steps=2", "logging.report_to=tensorboard", extra=TREAD)
    assert rc == 0
    names = {f"{n}{s}.{e}" for n in ("a_red_cat", "dog_b") for s in ("", "_ema") for e in ("mp4", "png")}
    for step in ("step_000000", "step_000002"):  # the baseline and step N; a sheet comparing all four
        assert {p.name for p in (out / "validation" / step).iterdir()} == names
        assert (out / "validation" / f"{step}.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(out / "logs"), size_guidance={"images": 0}).Reload()
    assert {"validation/a_red_cat", "validation/dog_b_ema"} <= set(ev.Tags()["images"])
    assert [e.step for e in ev.Images("validation/a_red_cat")] == [0, 2]

    # EMA: in the checkpoint, exported beside the live adapter, and not equal to the live weights.
    state = torch.load(checkpoint_dirs(out / "checkpoints")[-1] / "state.pt", weights_only=True)
    assert state["ema"]["optimization_step"] == 2
    live, ema = (load_file(d / "wan_lora.safetensors") for d in (out, out / "ema"))
    assert live.keys() == ema.keys() and any(not torch.equal(live[k], ema[k]) for k in live)

    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "lr.png", "grad_norm.png", "memory.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["samples_seen"] == 2 and summary["skipped_files"] == 1
    assert summary["skipped_steps"] == 0
    assert set(summary["seconds"]) == {"caching", "training", "validation", "checkpointing"}
    assert summary["seconds"]["validation"] > 0


def test_validation_ignores_tread_routes(run):
    # The baseline samples before any step: with and without TREAD routes it must be the same model.
    common = [*VALIDATION, "validation.every=100", "train.max_train_steps=1", "train.checkpoint_every=0"]
    rc1, a = run(*common, out="tread", extra=TREAD)
    rc2, b = run(*common, out="plain")
    assert rc1 == rc2 == 0
    png = "validation/step_000000/a_red_cat.png"
    assert (a / png).read_bytes() == (b / png).read_bytes()


# Every optimizer and LR schedule: 4 steps straight vs 2 steps + resume = the same losses, weights
# and EMA, bit for bit. The resumed run is the reference run with its last checkpoint removed.
CASES = [
    ("adamw", "constant", ["train.grad_clip_method=\"norm\""]),
    ("adamw_bf16", "cosine", []),
    ("lion", "linear", ["train.grad_clip_method=\"value\"", "train.max_grad_norm=0.01"]),
    ("lion_8bit", "polynomial", ["train.lr_power=2.0"]),
    ("adamw_8bit", "linear", ["train.max_grad_norm=0"]),
    ("paged_adamw_8bit", "cosine", ['ema.device="cpu"']),
    ("paged_lion_8bit", "constant", []),
    # bf16 adapter weights stepped through fp32 master copies (saved in the optimizer state)
    ("adamw", "cosine", ['adapter.dtype="bf16"']),
]


@pytest.mark.parametrize("optimizer, schedule, extra", CASES,
                         ids=[c[0] + ("-bf16-adapter" if 'adapter.dtype="bf16"' in c[2] else "") for c in CASES])
def test_optimizers_and_schedules_resume_bitwise(run, optimizer, schedule, extra):
    if "8bit" in optimizer:
        pytest.importorskip("bitsandbytes")
    if optimizer in ("adamw_bf16", "lion"):
        pytest.importorskip("optimi")
    settings = [f'train.optimizer="{optimizer}"', f'train.lr_scheduler="{schedule}"', "ema.enabled=true",
                "ema.update_interval=1", *extra]
    rc, out = run(*settings)
    assert rc == 0
    ckpts = checkpoint_dirs(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step-000002", "step-000004"]
    ref_rows = read_losses(out)
    ref_weights = load_file(ckpts[-1] / "weights.safetensors")
    ref_ema = torch.load(ckpts[-1] / "state.pt", weights_only=True)["ema"]["shadow_params"]
    if optimizer == "adamw_bf16" or 'adapter.dtype="bf16"' in extra:
        assert {v.dtype for v in ref_weights.values()} == {torch.bfloat16}
    if 'adapter.dtype="bf16"' in extra:
        masters = torch.load(ckpts[-1] / "state.pt", weights_only=True)["optimizer"]["masters"]
        assert {m.dtype for m in masters} == {torch.float32} and len(masters) == len(ref_weights)
    lrs = [r["lr"] for r in ref_rows]
    assert lrs[0] == 0.0 and lrs[1] == 1e-2  # one warmup step
    if schedule != "constant":
        assert lrs[3] < lrs[2] < lrs[1]

    shutil.rmtree(ckpts[-1])
    rc, _ = run(*settings, 'train.resume="latest"')
    assert rc == 0
    rows = read_losses(out)
    keys = ("step", "loss", "lr", "grad_norm", "skipped")
    assert [{k: r[k] for k in keys} for r in rows] == [{k: r[k] for k in keys} for r in ref_rows]
    final = checkpoint_dirs(out / "checkpoints")[-1]
    weights = load_file(final / "weights.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in ref_weights.items())
    ema = torch.load(final / "state.pt", weights_only=True)["ema"]["shadow_params"]
    assert all(torch.equal(a, b) for a, b in zip(ema, ref_ema))


def test_paged_optimizer_on_cpu_says_so(run, capsys):
    pytest.importorskip("bitsandbytes")
    rc, _ = run('train.optimizer="paged_adamw_8bit"', "train.max_train_steps=1")
    assert rc == 0 and "paging needs CUDA" in capsys.readouterr().out


def test_wandb_offline(run, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is optional: pip install wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rc, out = run('logging.report_to="wandb"', *VALIDATION, "train.max_train_steps=2")
    assert rc == 0 and wandb.run is None  # finished
    runs = list((out / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_from_simpletuner_trains(tmp_path, tiny_wan_dir, data_dir, cache_dir, capsys):
    src = FIXTURES / "wan"
    out = tmp_path / "st_run"
    ds = "dataset.disney-black-and-white"
    overrides = [f'model.path="{tiny_wan_dir}"', 'model.attention_backend="sdpa"', 'model.dtype="fp32"',
                 'model.text_encoder_dtype="fp32"', f'train.output_dir="{out}"', 'train.device="cpu"',
                 "train.max_train_steps=2", "train.batch_size=1", "train.lr_warmup_steps=0",
                 f'cache.dir="{cache_dir}"', 'logging.report_to="none"', "logging.progress_bar=false",
                 "tread.routes=[]", "validation.steps=1", "validation.num_frames=5", 'validation.resolution="32x32"',
                 "validation.skip_layers=[1]", 'validation.prompt_library=""', "validation.every=2",
                 f'{ds}.path="{data_dir}"', f"{ds}.num_frames=9", f"{ds}.min_frames=9", f"{ds}.resolution=32"]
    args = ["--from-simpletuner", str(src / "config.json"), "--backend", str(src / "multidatabackend.json")]
    args += [a for o in overrides for a in ("--set", o)]

    assert cli_main([*args, "--print-config"]) == 0
    cap = capsys.readouterr()
    assert 'optimizer = "lion"' in cap.out and "not carried over: " in cap.err and not out.exists()

    assert cli_main(args) == 0
    cap = capsys.readouterr()
    toml = out / "simpletuner.toml"
    assert toml.is_file() and "Converted from SimpleTuner" in toml.read_text()
    assert "not carried over: " in cap.err and f"-> {toml}" in cap.err
    assert len(read_losses(out)) == 2
    # The guide's settings arrive: Lion, EMA (ema_only, interval 2), value clipping.
    resolved = (out / "config.resolved.toml").read_text()
    assert 'grad_clip_method = "value"' in resolved and 'validation = "ema_only"' in resolved
    # the guide's Chinese prompt names its files by its words (under 48 characters)
    slug = "两只拟人化的猫咪身穿舒适的拳击装备_戴着鲜艳的手套_在聚光灯照射的舞台上激烈对战"
    step2 = out / "validation" / "step_000002"
    assert {p.name for p in step2.iterdir()} == {f"{slug}_ema.{e}" for e in ("mp4", "png")} | {"previews"}
    assert [p.name for p in (step2 / "previews").iterdir()] == [f"{slug}_ema_step001.png"]  # validation_preview_steps 1
    state = torch.load(checkpoint_dirs(out / "checkpoints")[-1] / "state.pt", weights_only=True)
    assert state["ema"]["optimization_step"] == 1  # ema_update_interval 2 over 2 steps
