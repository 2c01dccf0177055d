"""``vidtune convert``: SimpleTuner config.json (+ multidatabackend.json) -> vidtune TOML.

    vidtune convert config.json [multidatabackend.json] [-o run.toml] [--strict]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidtune convert",
                                description="SimpleTuner config.json [+ multidatabackend.json] -> vidtune TOML")
    p.add_argument("config", help="SimpleTuner config.json")
    p.add_argument("backend", nargs="?", help="SimpleTuner multidatabackend.json (dataloader config)")
    p.add_argument("-o", "--output", help="TOML file to write (default: stdout)")
    p.add_argument("--strict", action="store_true", help="exit with status 2 when any option is unmapped")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..convert import ConvertError, convert_simpletuner, read_simpletuner
    from ..fsutil import atomic_write_bytes

    args = build_parser().parse_args(argv)
    try:
        cfg, backends, msgs = read_simpletuner(args.config, args.backend)
        text, unmapped, notes = convert_simpletuner(cfg, backends, source=str(args.config))
    except ConvertError as exc:
        print(f"vidtune convert: {exc}", file=sys.stderr)
        return 1
    for m in msgs:
        print(m, file=sys.stderr)
    if args.output:
        atomic_write_bytes(Path(args.output), text.encode())
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if notes:
        print(f"{len(notes)} option(s) not carried over by design (see the file header and docs/convert.md)",
              file=sys.stderr)
    for u in unmapped:
        print(f"unmapped: {u}", file=sys.stderr)
    return 2 if unmapped and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
