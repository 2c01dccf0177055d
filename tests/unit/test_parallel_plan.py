"""``vidtune-train --plan --nproc N``: per-rank peaks of DDP, FSDP2 and sequence parallelism."""
from pathlib import Path

from vidtune.cli.train import main as cli_main
from vidtune.config import load_config
from vidtune.planner import plan, rank_peak

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "wan21_14b_lora_rtx4090.toml"
BF16 = ["--set", "memory.offload.type=\"none\"", "--set", "model.base_precision=\"bf16\"", "--set", "validation.every=0",
        "--set", "train.optimizer=\"adamw\""]


def test_one_rank_layout_is_the_one_gpu_plan():
    p = plan(load_config(EXAMPLE), "rtx4090", search=False)
    assert rank_peak(p.counters["parts"], "ddp", 1, 1) == p.phase("training step").peak


def test_nproc_plan_lists_layouts_and_the_smallest_that_fits(capsys):
    # 14B in bf16 without offload (adamw, no validation: what FSDP2 takes) at the example's
    # 832x480 x 81 frames: ~46 GiB per DDP rank, too much for a 4090; FSDP2 shards the weights and
    # a sequence group of 2 halves the activations, so 4 ranks fit and fewer do not.
    assert cli_main(["--plan", str(EXAMPLE), "--gpu", "rtx4090", "--nproc", "4", *BF16]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("  data = ")]
    assert len(rows) == 6  # ddp/fsdp x sequence 1, 2, 4 (40 heads)
    assert all("DOES NOT FIT" in r for r in rows if "ddp" in r)
    assert any("fits" in r for r in rows if "fsdp" in r)
    assert ("smallest setup that fits: 4 x rtx4090 (torchrun --nproc_per_node=4 with parallel.data = \"fsdp\", "
            "sequence = 2)") in out


def test_nproc_plan_refuses_fsdp_with_int8_and_offload(capsys):
    assert cli_main(["--plan", str(EXAMPLE), "--gpu", "rtx4090", "--nproc", "2"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  data = fsdp")]
    assert rows and all("refused: parallel.data = \"fsdp\" with model.base_precision = \"int8\"" in r for r in rows)
