"""A run starts quietly: ``vidtune-train --print-config`` and ``--plan`` in fresh processes write
nothing to stderr, and outside the checkout the repository's ``kernels/`` folder is importable
only as ``vidtune_kernels`` (the editable install's finder maps no other name)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def vidtune_train(*args, cwd):
    script = Path(sys.executable).parent / "vidtune-train"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "vidtune.cli.train"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_print_config_and_plan_have_empty_stderr(tmp_path, tiny_wan_dir):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
[model]
path = "{tiny_wan_dir}"
[adapter]
target_modules = ["to_q", "to_k", "to_v", "to_out.0", "proj_out", "patch_embedding"]
[train]
output_dir = "{tmp_path / 'out'}"
[[dataset]]
id = "clips"
path = "{tmp_path / 'videos'}"
resolution = 32
num_frames = 9
""")
    shown = vidtune_train(str(cfg), "--print-config", cwd=tmp_path)
    assert shown.returncode == 0 and "[adapter]" in shown.stdout
    assert shown.stderr == ""
    planned = vidtune_train(str(cfg), "--plan", "--gpu", "rtx4090", cwd=tmp_path)
    assert planned.returncode == 0 and "verdict: FITS on rtx4090" in planned.stdout
    assert planned.stderr == ""


def test_kernels_importable_only_as_vidtune_kernels(tmp_path):
    probe = ("import importlib.util, vidtune_kernels; s = importlib.util.find_spec('kernels'); "
             "print(vidtune_kernels.__file__); print(s.origin if s else None)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    ours, found = out.stdout.split()
    assert Path(ours).parent == REPO / "kernels"
    assert found == "None" or not Path(found).is_relative_to(REPO)


def test_filters_drop_exactly_the_known_lines():
    import logging

    from vidtune.quiet import KNOWN

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append((record.name, record.getMessage()))
    lines = {  # each library's message as it logs it (the bitsandbytes one only on AVX512-BF16 CPUs)
        "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: No module "
                                         "named 'kernels'. Please make sure you already `pip install kernels`",
        "torchao": "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
                   "Could not load this library",
        "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                               "torch.compile as an opaque value type.",
        "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects. This may affect "
                                                          "loading checkpoints serialized with `torchao`",
    }
    assert set(lines) == set(KNOWN)
    for name, line in lines.items():
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            logger.warning(line)
            logger.warning("something else went wrong")  # the same logger's other messages pass
        finally:
            logger.removeHandler(handler)
    assert seen == [(name, "something else went wrong") for name in lines]
