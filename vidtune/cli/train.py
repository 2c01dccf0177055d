"""``vidtune-train``: config handling and data preparation, then the training loop.

    vidtune-train config.toml [--set section.key=value ...] [--print-config] [--prepare-only]
    vidtune-train --from-simpletuner config.json [--backend multidatabackend.json] [--set ...]
    vidtune-train --plan config.toml [--gpu CLASS] [--gpu-memory 24GiB]
    vidtune-train --help-config
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..adapters.names import check_adapter
from ..config import ConfigError, dump_config, load_config, render_config_docs, save_resolved_config
from ..measure.devices import names as device_names
from ..measure.devices import parse_memory


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidtune-train", description="Train Wan video diffusion adapters.")
    p.add_argument("config", nargs="?", help="TOML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (value read as TOML); repeatable")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--from-simpletuner", metavar="CONFIG_JSON",
                   help="convert a SimpleTuner config.json, write the TOML to the run directory, train with it")
    p.add_argument("--backend", metavar="DATALOADER_JSON",
                   help="with --from-simpletuner: its multidatabackend.json (default: the config's data_backend_config)")
    p.add_argument("--help-config", action="store_true", help="print every config section and key and exit")
    p.add_argument("--plan", action="store_true",
                   help="print the predicted peak memory per phase and the fit verdict, then exit (1 if it does not fit)")
    p.add_argument("--gpu", metavar="CLASS",
                   help="with --plan: a GPU class (" + ", ".join(device_names()) + "; default: the training device)")
    p.add_argument("--gpu-memory", metavar="SIZE",
                   help="with --plan: the memory of a GPU no class lists (e.g. 24GiB, 48GB), or another size for --gpu")
    p.add_argument("--prepare-only", action="store_true",
                   help="discover the data and fill the latent/text caches, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.help_config:
        sys.stdout.write(render_config_docs())
        return 0
    try:
        if args.from_simpletuner:
            from ..convert import from_simpletuner

            if args.config:
                raise ConfigError(f"give a config file ({args.config}) or --from-simpletuner, not both")
            cfg, args.config = from_simpletuner(args.from_simpletuner, args.backend, args.overrides,
                                                write=not args.print_config)
        else:
            cfg = load_config(args.config, args.overrides)
        # Targets and export layouts against the model family: before any model, cache or plan.
        problems = check_adapter(cfg.adapter, cfg.model.family)
        if problems:
            raise ConfigError(f"{args.config or '<defaults>'}: invalid config:\n  " + "\n  ".join(problems))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return 0
    if args.config is None:
        print("error: a config file is required (vidtune-train config.toml)", file=sys.stderr)
        return 2
    from ..planner import check_plan
    from ..runtime import resolve_device

    if args.plan:
        try:
            memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
            fits, report = check_plan(cfg, args.gpu, memory=memory)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(report)
        return 0 if fits else 1
    check = cfg.memory.plan_check
    if check == "on" or (check == "auto" and resolve_device(cfg.train.device).type == "cuda"):
        try:
            # Before caching: a run that cannot fit never starts. The option search (slower) is --plan's.
            fits, report = check_plan(cfg, search=False)
        except ValueError as exc:
            print(f"error: memory plan: {exc}", file=sys.stderr)
            return 2
        if not fits:
            print(report, file=sys.stderr)
            print(f"error: this run does not fit the device's memory (plan above). `vidtune-train --plan "
                  f"{args.config}` lists the option combinations that fit; memory.plan_check = \"off\" "
                  f"starts it anyway", file=sys.stderr)
            return 2
    from ..adapters import AdapterError
    from ..data import DataError
    from ..train.trainer import TrainingStopped, prepare, train

    save_resolved_config(cfg, Path(cfg.train.output_dir))
    try:
        prepared = prepare(cfg)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.prepare_only:
        return 0

    try:
        return train(cfg, prepared)
    except (ConfigError, AdapterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1



if __name__ == "__main__":
    sys.exit(main())
