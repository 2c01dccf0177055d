"""The ``vidtune`` command: a dispatcher over the tool subcommands.

    vidtune convert config.json [multidatabackend.json] [-o out.toml]   SimpleTuner -> TOML
    vidtune lora merge adapter.safetensors --base DIR -o DIR             fold a LoRA into the base
    vidtune lora convert in.safetensors -o out.safetensors --to diffusers|wan|musubi
"""
from __future__ import annotations

import sys

COMMANDS = {"convert": "SimpleTuner config.json (+ multidatabackend.json) -> vidtune TOML",
            "lora": "LoRA tools: merge into the base model, convert between key layouts"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "lora":
        from .adapters.tools import main as lora_main

        return lora_main(argv[1:])
    if argv and argv[0] == "convert":
        from .convert import main as convert_main

        return convert_main(argv)
    usage = "usage: vidtune {convert,lora} ...\n\n" + "\n".join(f"  {k:<8} {v}" for k, v in COMMANDS.items())
    asked = bool(argv) and argv[0] in ("-h", "--help")
    print(usage, file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2


if __name__ == "__main__":
    sys.exit(main())
