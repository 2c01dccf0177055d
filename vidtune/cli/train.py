"""``vidtune-train``: config handling and data preparation, then the training loop.

    vidtune-train config.toml [--set section.key=value ...] [--print-config] [--prepare-only]
    vidtune-train --from-simpletuner config.json [--backend multidatabackend.json] [--set ...]
    vidtune-train --plan config.toml [--gpu rtx4090|a6000|mi300x|h100|cpu]
    vidtune-train --help-config
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import Config, ConfigError, dump_config, load_config, render_config_docs, save_resolved_config


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_budget(device):
    """The memory budget of the training device, for the planner: a known GPU class when the name
    matches one, else the device's own total memory; the CPU's is this machine's RAM."""
    from dataclasses import replace

    import torch

    from .bench import devices as D

    if device.type != "cuda":
        return D.device("cpu")
    props = torch.cuda.get_device_properties(device)
    known = next((d for d in D.DEVICES.values() if any(m in props.name for m in d.match)), D.DEVICES["rtx4090"])
    return replace(known, name="local", label=props.name, memory_bytes=props.total_memory)


def check_plan(cfg: Config, gpu: str | None = None, *, search: bool = True) -> tuple[bool, str]:
    """The memory planner's verdict for this run: (fits, report). ``gpu`` names a device class;
    default: the training device. ``search`` adds the option combinations that would fit."""
    from .memory.planner import plan

    if gpu:
        p = plan(cfg, gpu, search=search)
    else:
        dev = device_budget(resolve_device(cfg.train.device))
        p = plan(cfg, dev.name, device=dev, search=search)
    return p.fits, p.report()


def prepare(cfg: Config):
    """Discover the datasets and fill the caches (each component gets its own section); the
    validation prompts are encoded with the same text encoder before it is released."""
    from .data import prepare_data
    from .data.encode import Encoders

    encoders = Encoders(cfg.model, resolve_device(cfg.train.device), cfg.memory.offload_during_startup)
    prepared = prepare_data(
        cfg.datasets, cfg.cache, cfg.model,
        batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        encoders=encoders, release_encoders=False,
    )
    if cfg.validation.every > 0:
        from .train.validate import cache_validation_text

        cache_validation_text(cfg, prepared.store, encoders)
    encoders.release()
    return prepared


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
                   help="with --plan: rtx4090, a6000, mi300x, h100 or cpu (default: the training device)")
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
            from .convert import from_simpletuner

            if args.config:
                raise ConfigError(f"give a config file ({args.config}) or --from-simpletuner, not both")
            cfg, args.config = from_simpletuner(args.from_simpletuner, args.backend, args.overrides,
                                                write=not args.print_config)
        else:
            cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return 0
    if args.config is None:
        print("error: a config file is required (vidtune-train config.toml)", file=sys.stderr)
        return 2
    if args.plan:
        try:
            fits, report = check_plan(cfg, args.gpu)
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
    from .data import DataError

    save_resolved_config(cfg, Path(cfg.train.output_dir))
    try:
        prepared = prepare(cfg)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.prepare_only:
        return 0
    from .adapters import AdapterError
    from .train.trainer import TrainingStopped, train

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
