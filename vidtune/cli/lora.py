"""``vidtune lora merge`` and ``vidtune lora convert``: adapter files (LoRA or LoKr) without a
training run.

    vidtune lora merge adapter.safetensors --base DIR -o DIR [--scale 1.0]
    vidtune lora convert in.safetensors -o out.safetensors --to diffusers|wan|musubi
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from ..adapters.tools import LAYOUTS

    p = argparse.ArgumentParser(prog="vidtune lora", description="LoRA / LoKr adapter tools")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="fold a LoRA or LoKr into the base transformer; save a diffusers transformer dir")
    m.add_argument("adapter", help="adapter .safetensors (diffusers, wan or musubi layout; LoRA or LoKr)")
    m.add_argument("--base", required=True, help="pipeline dir, transformer dir or hub id of the base model")
    m.add_argument("-o", "--output", required=True, help="directory to write (config.json + safetensors)")
    m.add_argument("--scale", type=float, default=1.0, help="multiplier on the adapter's delta (default 1)")
    c = sub.add_parser("convert", help="convert an adapter between the diffusers, wan and musubi layouts "
                                       "(LoKr: wan and musubi)")
    c.add_argument("input", help="adapter .safetensors")
    c.add_argument("-o", "--output", required=True, help=".safetensors to write")
    c.add_argument("--to", required=True, choices=LAYOUTS, help="target layout")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..adapters import AdapterError
    from ..adapters.tools import convert_lora, merge_lora

    args = build_parser().parse_args(argv)
    try:
        if args.command == "merge":
            merge_lora(args.adapter, args.base, args.output, args.scale)
        else:
            convert_lora(args.input, args.output, args.to)
    except (AdapterError, OSError) as exc:
        print(f"vidtune lora {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
