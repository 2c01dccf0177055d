"""``vidtune-train``: config handling and data preparation, then the training loop.

    vidtune-train config.toml [--set section.key=value ...] [--print-config] [--prepare-only]
    vidtune-train --from-simpletuner config.json [--backend multidatabackend.json] [--set ...]
    vidtune-train --plan config.toml [--gpu CLASS] [--gpu-memory 24GiB] [--nproc N]
    vidtune-train --help-config
    torchrun --nproc_per_node=N [--nnodes=M --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT] -m vidtune.train config.toml

Every fault ends in one line on stderr naming the path or key and the fix (``--debug`` shows the
traceback instead): exit 2 for what the user must change before starting (config, data, model
sources), 1 for what stopped a run (diverged, disk full, another run holds the directory).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import sys
import types
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
    p.add_argument("--nproc", type=int, metavar="N",
                   help="with --plan: the per-rank peak of each layout of N GPUs (DDP, FSDP2, sequence parallel) "
                        "and the smallest setup that fits")
    p.add_argument("--prepare-only", action="store_true",
                   help="discover the data and fill the latent/text caches, then exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    return p


def _setting_for(path, cfg) -> str:
    """The config key whose directory holds ``path`` (for errors about files we write)."""
    if cfg is not None and path:
        p = Path(path).resolve()
        for key, where in (("train.output_dir", cfg.train.output_dir), ("cache.dir", cfg.cache.dir),
                           ("logging.log_dir", cfg.logging.log_dir),
                           ("memory.offload.to_disk_path", cfg.memory.offload.to_disk_path)):
            if where and p.is_relative_to(Path(where).resolve()):
                return key
    return "the setting that names it"


def one_line(exc: BaseException, cfg=None) -> str:
    """An error as one line: what the message says (ours name the path and the fix), else the
    exception type and its text, with the way to the traceback."""
    from ..fsutil import DiskFullError, is_disk_full

    if isinstance(exc, DiskFullError):
        text = f"{exc} (set by {_setting_for(exc.directory, cfg)})"
    elif is_disk_full(exc):
        text = f"disk full: {exc}; free space, or move {_setting_for(getattr(exc, 'filename', None), cfg)} elsewhere"
    elif isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno == errno.EROFS):
        what = "permission denied" if isinstance(exc, PermissionError) else "read-only file system"
        text = (f"{what}: {exc.filename or exc}: make it writable by this user, or point "
                f"{_setting_for(exc.filename, cfg)} at a directory that is")
    elif isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror or exc}"
    elif isinstance(exc, (ValueError, RuntimeError)) and type(exc).__module__.startswith("vidtune"):
        text = str(exc)  # our own errors say what to do
    else:
        text = f"{type(exc).__name__}: {exc} (vidtune-train --debug shows the traceback)"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.help_config:
        sys.stdout.write(render_config_docs())
        return 0
    run = types.SimpleNamespace(cfg=None)  # the config, once loaded: errors name the setting behind a path
    with contextlib.ExitStack() as held:  # the run directory's lock, released on the way out
        try:
            return _main(args, held, run)
        except KeyboardInterrupt:
            if args.debug:
                raise
            print("error: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            if args.debug:
                raise
            print(f"error: {one_line(exc, run.cfg)}", file=sys.stderr)
            return 2 if isinstance(exc, ConfigError) else 1


def _main(args, held: contextlib.ExitStack, run: types.SimpleNamespace) -> int:
    try:
        if args.from_simpletuner:
            from ..convert import from_simpletuner

            if args.config:
                raise ConfigError(f"give a config file ({args.config}) or --from-simpletuner, not both")
            # Converted again, written and reported once the run directory is ours (below).
            later = not (args.print_config or args.plan)
            cfg, _ = from_simpletuner(args.from_simpletuner, args.backend, args.overrides, write=False,
                                      log=(lambda m: None) if later else None)
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
    run.cfg = cfg
    if args.config is None and not args.from_simpletuner:
        print("error: a config file is required (vidtune-train config.toml)", file=sys.stderr)
        return 2
    from ..fsutil import remove_debris, run_dir_lock
    from ..planner import check_plan, plan_parallel
    from ..runtime import resolve_device
    from ..train.preflight import check_model_sources

    check_model_sources(cfg.model)

    if args.plan:
        try:
            memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
            fits, report = (plan_parallel(cfg, args.gpu, args.nproc, memory=memory) if args.nproc
                            else check_plan(cfg, args.gpu, memory=memory))
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
                  f"{args.config or '--from-simpletuner ' + args.from_simpletuner}` lists the option combinations "
                  f"that fit; memory.plan_check = \"off\" starts it anyway", file=sys.stderr)
            return 2
    from ..adapters import AdapterError
    from ..data import DataError
    from ..distributed import check_same_config, check_shared_dir, init_parallel, parallel_problems, shutdown, world_size
    from ..train.trainer import TrainingStopped, prepare, train

    par = None
    if world_size() > 1:  # under torchrun: every rank checks the same config, so all stop together
        problems = parallel_problems(cfg)
        if problems:
            raise ConfigError(problems[0])
        par = init_parallel(cfg.parallel, cfg.train.device)
        held.callback(shutdown)
        check_same_config(par, dump_config(cfg))
    main_rank = par is None or par.is_main
    log = print if main_rank else (lambda *_: None)
    # One owner per run directory, before anything is written to it; only then is what a killed
    # run left half-written safe to delete. Under torchrun rank 0 owns it for all the ranks.
    run_dir = Path(cfg.train.output_dir)
    held.enter_context(run_dir_lock(run_dir))
    if main_rank:
        debris = remove_debris(run_dir)
        if debris:
            print(f"removed {len(debris)} partial file(s) a killed run left in {run_dir}")
        if args.from_simpletuner:
            _, args.config = from_simpletuner(args.from_simpletuner, args.backend, args.overrides)
        save_resolved_config(cfg, run_dir)
    if par is not None:
        check_shared_dir(par, run_dir, "train.output_dir", "config.resolved.toml")
    try:
        prepared = prepare(cfg, log, par)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.prepare_only:
        return 0

    try:
        if par is not None:
            check_shared_dir(par, cfg.cache.dir, "cache.dir", "sources.json")
        return train(cfg, prepared, log, par)
    except (ConfigError, AdapterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1



if __name__ == "__main__":
    sys.exit(main())
