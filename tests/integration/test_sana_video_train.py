"""vidtune-train end to end for Sana Video on a tiny random pipeline in the diffusers layout and
ffmpeg clips: a full fine-tune, text-to-video, with validation (the guide's default), and an
image-to-video LoRA with masked loss, TREAD and frame-chunked FFN; both exports load in diffusers."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from vidtune.adapters import DIFFUSERS_FILE
from vidtune.cli.train import main as cli_main
from vidtune.models import from_pretrained
from vidtune.testing import write_captioned_clips
from vidtune.train.log import loss_values

if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg missing: apt-get install -y ffmpeg", allow_module_level=True)

SHIFT_WARNING = "warning: train.timestep_sampling = 'shift' (train.flow_shift 3) is ignored"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sana_train")
    clips = write_captioned_clips(root / "clips")
    (root / "masks").mkdir()
    for i in range(2):
        m = Image.new("L", (32, 32), 0)
        m.paste(255, (0, 0, 32, 16))  # top half
        m.save(root / "masks" / f"clip{i}.png")
    return root


def _config(path: Path, model: Path, data: Path, out: Path, body: str) -> Path:
    path.write_text(f"""
[model]
family = "sana_video"
path = "{model}"
dtype = "fp32"
vae_dtype = "fp32"
text_encoder_dtype = "fp32"

[train]
output_dir = "{out}"
device = "cpu"
batch_size = 1
learning_rate = 1e-3
mixed_precision = "no"
checkpoint_every = 0
seed = 5
timestep_sampling = "shift"

[cache]
dir = "{data / 'cache'}"

[logging]
report_to = "none"
progress_bar = false
{body}

[[dataset]]
id = "clips"
path = "{data / 'clips'}"
resolution = 32
num_frames = 9
""")
    return path


def _inputs():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 300, dtype=torch.long)
    mask[:, 40:] = 0
    return dict(hidden_states=torch.randn(1, 16, 3, 4, 4, generator=g), timestep=torch.tensor([600.0]),
                encoder_hidden_states=torch.randn(1, 300, 32, generator=g), encoder_attention_mask=mask)


def test_full_finetune_t2v_with_validation(tiny_sana_dir, data, tmp_path, capsys):
    from diffusers import SanaVideoTransformer3DModel

    out = tmp_path / "full"
    cfg = _config(tmp_path / "full.toml", tiny_sana_dir, data, out, """
[adapter]
type = "full"

[validation]
every = 2
baseline = false
prompts = ["a red cat"]
negative_prompt = "blurry"
steps = 2
guidance = 3.0
num_frames = 9
resolution = "32x32"
""")
    assert cli_main([str(cfg), "--set", "train.max_train_steps=2"]) == 0
    text = capsys.readouterr().out
    assert text.count(SHIFT_WARNING) == 1 and "shift 8" in text  # the checkpoint's canonical schedule
    assert len(loss_values(out)) == 2
    assert sorted(p.name for p in (out / "validation" / "step_000002").iterdir()) == ["a_red_cat.mp4", "a_red_cat.png"]
    tuned = SanaVideoTransformer3DModel.from_pretrained(out / "transformer").eval()  # diffusers reads our export
    base = from_pretrained(tiny_sana_dir, torch_dtype=torch.float32)
    ours = from_pretrained(out / "transformer").eval()
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, ours.state_dict()[k])]
    assert len(changed) > len(base.state_dict()) // 2
    with torch.no_grad():
        theirs = tuned(**_inputs(), return_dict=False)[0]
        torch.testing.assert_close(ours(**_inputs()), theirs, rtol=1e-5, atol=1e-5)


def test_lora_i2v_masked_tread_chunked_exports_load_in_diffusers(tiny_sana_dir, data, tmp_path, capsys):
    from diffusers import SanaVideoPipeline

    out = tmp_path / "lora"
    cfg = _config(tmp_path / "lora.toml", tiny_sana_dir, data, out, f"""
[adapter]
type = "lora"
rank = 4
alpha = 2.0
target_modules = ["to_q", "to_k", "to_v", "to_out.0", "conv_temp"]

[memory]
gradient_checkpointing = true
chunked_ff = {{ enabled = true, chunk_size = 16 }}

[tread]
routes = [{{ selection_ratio = 0.5, start_layer = 0, end_layer = 0 }}]
""")
    rc = cli_main([str(cfg), "--set", 'model.flavour="i2v-2b-480p"', "--set", "train.max_train_steps=3",
                   "--set", f"dataset.clips.loss_mask_path={json.dumps(str(data / 'masks'))}"])
    assert rc == 0
    assert capsys.readouterr().out.count(SHIFT_WARNING) == 1
    losses = loss_values(out)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # the export is SanaVideoPipeline's LoRA format: its loader gives our model + adapter's output
    pipe = SanaVideoPipeline.from_pretrained(tiny_sana_dir, dtype=torch.float32)
    with torch.no_grad():
        before = pipe.transformer(**_inputs(), return_dict=False)[0]
    pipe.load_lora_weights(str(out / DIFFUSERS_FILE))
    from vidtune.adapters import apply_lora, load_lora_into
    from vidtune.config import AdapterConfig

    ours = from_pretrained(tiny_sana_dir, torch_dtype=torch.float32)
    apply_lora(ours, AdapterConfig(rank=4, alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                        "conv_temp"]))
    load_lora_into(ours, out / DIFFUSERS_FILE)
    with torch.no_grad():
        theirs = pipe.transformer(**_inputs(), return_dict=False)[0]
        mine = ours.eval()(**_inputs())
    assert (theirs - before).abs().max() > 1e-4  # the adapter changed the output
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
