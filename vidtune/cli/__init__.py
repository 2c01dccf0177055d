"""Commands. One module per command, each with ``main(argv)``; the only place with ``main``.

    vidtune-train  (vidtune.cli.train)   config -> caches -> training run; --plan, --print-config
    vidtune-bench  (vidtune.cli.bench)   benchmark suites
    vidtune-demo   (vidtune.cli.demo)    the model demo: parity with diffusers, TREAD, fused path
    vidtune-extract-audio (vidtune.cli.extract_audio)  16 kHz mono WAV per video for S2V datasets
    vidtune        (this module)         a dispatcher: vidtune {train,convert,lora,bench,demo,extract-audio} ...
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("train", "train from a TOML config (same as vidtune-train)"),
    "convert": ("convert", "SimpleTuner config.json (+ multidatabackend.json) -> vidtune TOML"),
    "lora": ("lora", "LoRA tools: merge into the base model, convert between key layouts"),
    "bench": ("bench", "benchmark suites (same as vidtune-bench)"),
    "demo": ("demo", "the model demo on CPU (same as vidtune-demo)"),
    "extract-audio": ("extract_audio", "16 kHz mono WAV per video, matched by stem (S2V audio datasets)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(f"{__name__}.{COMMANDS[argv[0]][0]}")
        return module.main(argv[1:])
    usage = "usage: vidtune {" + ",".join(COMMANDS) + "} ...\n\n" + "\n".join(
        f"  {k:<14} {v[1]}" for k, v in COMMANDS.items())
    asked = bool(argv) and argv[0] in ("-h", "--help")
    print(usage, file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2
