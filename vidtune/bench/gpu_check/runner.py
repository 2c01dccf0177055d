"""Orchestration of the GPU check; standard library only, so it runs before anything is installed.

- ``install_wheels``: the wheels ``benchmarks/gpu_wheels.sh`` fetched go into a private target
  directory, each only where the machine lacks that package or has an older one; never torch,
  triton or NVIDIA libraries (the machine's own are what is being checked).
- ``hide_modules``: packages the check must not need are made unimportable (bitsandbytes,
  torchcodec, matplotlib, tensorboard, wandb, torch-optimi), so the CPU dry run fails as the bare
  GPU image would if a part started to need one.
- Each part runs in its own process with its own time box: a spawned interpreter on a GPU (the
  parent never imports torch, so a crash or a hung kernel costs one part), or, for the CPU dry
  run, a fork of a parent that imported torch, peft and diffusers once. A part writes its rows to
  ``DIR/parts/<part>.json`` as it goes, so a killed part keeps what it measured.
- ``DIR/gpu_check.json`` (everything) and ``DIR/gpu_check.md`` (the tables) at the end.
"""
from __future__ import annotations

import datetime as _dt
import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from vidtune.bench.gpu_check import BUDGET_S, DRY_RUN_BUDGET_S, PARTS
from vidtune.fsutil import atomic_write_bytes

REPO = Path(__file__).resolve().parents[3]
WHEELS = REPO / "benchmarks" / "wheels"
# The image's own torch and triton are what the check measures: never shadow them.
NEVER_INSTALL = re.compile(r"^(torch|triton|pytorch[-_]triton|nvidia[-_].+)$", re.IGNORECASE)
# Not on the GPU image and not shipped: the check must run without them (module -> distribution).
HIDDEN = {"bitsandbytes": "bitsandbytes", "torchcodec": "torchcodec", "matplotlib": "matplotlib",
          "tensorboard": "tensorboard", "wandb": "wandb", "optimi": "torch-optimi"}
# Preloaded once by the dry run's forking parent (the slow imports every part would repeat).
PRELOAD = ("torch", "vidtune_kernels", "peft", "diffusers")


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


# ---------------------------------------------------------------------------------------------
# what the parts may import

class _Hider(importlib.abc.MetaPathFinder):
    """Wraps the path finder: hidden top-level packages are neither importable nor installed."""

    def __init__(self, inner, modules, dists):
        self.inner, self.modules, self.dists = inner, set(modules), {_norm(d) for d in dists}

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.modules:
            return None
        return self.inner.find_spec(fullname, path, target)

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        return (d for d in self.inner.find_distributions(context) if _norm(d.metadata["Name"] or "") not in self.dists)

    def invalidate_caches(self):
        self.inner.invalidate_caches()


def hide_modules(hidden: dict = HIDDEN) -> None:
    for name in hidden:
        if name in sys.modules:
            raise RuntimeError(f"{name} was imported before the GPU check could hide it")
    sys.meta_path[:] = [_Hider(f, hidden, hidden.values()) if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]


def _version_key(v: str):
    try:
        from packaging.version import Version

        return Version(v)
    except Exception:  # no packaging, or not PEP 440: compare the leading numbers
        return tuple(int(x) for x in re.findall(r"\d+", v)[:4])


def install_wheels(wheels_dir: Path, site: Path) -> list[dict]:
    """Unpack each wheel of ``wheels_dir`` into ``site`` unless this interpreter already has the
    package at the same or a newer version. Returns what was used, per wheel."""
    used = []
    for whl in sorted(Path(wheels_dir).glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        if NEVER_INSTALL.match(name):
            raise SystemExit(f"{whl}: the GPU check never installs {name}; it checks the machine's own torch "
                             f"and triton. Delete the file (benchmarks/gpu_wheels.sh never fetches it).")
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is not None and _version_key(have) >= _version_key(version):
            used.append(dict(name=name, version=version, used=f"machine's {have}"))
            continue
        marker = site / f".{name}-{version}.unpacked"
        if not marker.exists():
            site.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(whl) as z:  # a wheel is a zip of site-packages content
                z.extractall(site)
            for sub in ("purelib", "platlib"):  # <name>-<version>.data/<sub>/ belongs in site-packages too
                data = site / f"{name}-{version}.data" / sub
                if data.is_dir():
                    shutil.copytree(data, site, dirs_exist_ok=True)
            marker.touch()
        used.append(dict(name=name, version=version, used="wheel" + (f" (machine has {have})" if have else "")))
    return used


def import_paths(out: Path, site: Path) -> list[str]:
    """sys.path entries that make this checkout importable without ``pip install``: the wheels'
    site, the repository (``vidtune``) and a folder whose ``vidtune_kernels`` links to kernels/."""
    shim = out / ".env" / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "vidtune_kernels"
    if not link.is_symlink():
        link.symlink_to(REPO / "kernels", target_is_directory=True)
    return [str(p) for p in (site, shim, REPO)]


def use_paths(paths: list[str]) -> None:
    for p in reversed(paths):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)


# ---------------------------------------------------------------------------------------------
# running the parts

def _part_file(out: Path, name: str) -> Path:
    return out / "parts" / f"{name}.json"


def child(part: str, out: Path, device: str, size: str) -> int:
    """Run one part in this process (a spawned or forked child); 0 when it ran to the end."""
    from vidtune.bench.gpu_check.common import run_part

    return run_part(part, dict((n, f) for n, f, _ in PARTS)[part], _part_file(out, part), device, size)


def _spawn(name, out, device, size, env, timeout) -> tuple[str, int | None]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--child", name, "--out", str(out),
           "--device", device, "--size", size]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # own group: compile workers die with it
    try:
        return ("done", proc.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return ("timeout", None)


def _fork(name, out, device, size, timeout) -> tuple[str, int | None]:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(name, out, device, size)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return ("done", os.waitstatus_to_exitcode(status))
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return ("timeout", None)
        time.sleep(0.1)


def _status(how: str, rc: int | None, res: dict | None, box: float) -> tuple[str, str]:
    if how == "timeout":
        return "timeout", f"stopped at its {box:.0f} s time box"
    if res is None:
        return "error", f"exited {rc} before writing a result"
    if res.get("error"):
        return "error", res["error"]
    if rc != 0:
        return "error", f"exited {rc}"
    if not res.get("rows"):
        return "error", "wrote no rows"
    if any(r["ok"] is False for r in res["rows"]):
        return "failed", ", ".join(r["case"] for r in res["rows"] if r["ok"] is False)
    return "ok", ""


def _git() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown (no git)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def run(args) -> dict:
    out = Path(args.out).resolve()
    (out / "parts").mkdir(parents=True, exist_ok=True)
    t_start, started = time.monotonic(), _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    wheels = install_wheels(Path(args.wheels), out / ".env" / "site") if Path(args.wheels).is_dir() else []
    paths = import_paths(out, out / ".env" / "site")
    names = [n for n, _, _ in PARTS] if not args.parts else args.parts.split(",")
    unknown = set(names) - {n for n, _, _ in PARTS}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(n for n, _, _ in PARTS)}")
    device = "cpu" if args.dry_run else args.device
    size = "toy" if args.dry_run else "full"
    isolate = args.isolate or ("fork" if args.dry_run else "spawn")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("TRITON_INTERPRET", None)  # on a GPU the real kernels are what is checked
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"  # triton kernels on CPU tensors run in the interpreter
        env["VIDTUNE_GPU_CHECK_BUILD_NATIVE"] = "1" if args.build_native else "0"
        os.environ.update(TRITON_INTERPRET="1", VIDTUNE_GPU_CHECK_BUILD_NATIVE=env["VIDTUNE_GPU_CHECK_BUILD_NATIVE"])
    if isolate == "fork":
        use_paths(paths)
        hide_modules()
        for mod in PRELOAD:  # best effort: a part that needs a module that fails reports it itself
            try:
                __import__(mod)
            except Exception as e:
                print(f"gpu_check: preloading {mod} failed ({type(e).__name__}: {e})", flush=True)
    budget = args.budget or (DRY_RUN_BUDGET_S if args.dry_run else BUDGET_S)
    budget_end = t_start + budget
    parts = {}
    for name in names:
        box = dict((n, b) for n, _, b in PARTS)[name] * args.box_scale * (4 if args.dry_run else 1)
        timeout = min(box, budget_end - time.monotonic())
        if timeout <= 1:
            parts[name] = dict(status="skipped", seconds=0.0, error="the time budget was spent", rows=[])
            continue
        _part_file(out, name).unlink(missing_ok=True)
        print(f"\n=== gpu_check part {name} (time box {timeout:.0f} s) ===", flush=True)
        t0 = time.monotonic()
        if isolate == "fork":
            how, rc = _fork(name, out, device, size, timeout)
        else:
            how, rc = _spawn(name, out, device, size, env, timeout)
        res = json.loads(_part_file(out, name).read_text()) if _part_file(out, name).exists() else None
        status, error = _status(how, rc, res, timeout)
        parts[name] = dict(status=status, seconds=time.monotonic() - t0, error=error,
                           rows=(res or {}).get("rows", []), env=(res or {}).get("env", {}))
    envs = [p.pop("env") for p in parts.values() if "env" in p]
    report = dict(
        started=started, git=_git(),
        command=" ".join(["python", "benchmarks/gpu_check.py", *args.argv]), dry_run=args.dry_run,
        budget_s=budget, total_s=time.monotonic() - t_start, isolate=isolate,
        env=next((e for e in envs if e), {}), wheels=wheels, parts=parts)
    atomic_write_bytes(out / "gpu_check.json", json.dumps(report, indent=1, default=str).encode())
    md = render(report)
    atomic_write_bytes(out / "gpu_check.md", md.encode())
    return report


# ---------------------------------------------------------------------------------------------
# the report

def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def result_name(env: dict) -> str:
    """benchmarks/results/<gpu>-<date>.json, the name a measured run is committed under."""
    gpu = re.sub(r"[^a-z0-9]+", "-", (env.get("gpu") or "cpu").lower().replace("nvidia", "")).strip("-")
    return f"{gpu}-{_dt.date.today().isoformat()}.json"


def render(report: dict) -> str:
    env = report["env"]
    title = env.get("gpu") or "CPU dry run (toy sizes: the parts' setup, not GPU numbers)"
    keys = ("torch", "triton", "cuda", "driver", "capability", "gpu_memory_gib", "python", "diffusers", "peft",
            "transformers", "torchao")
    lines = [f"# vidtune GPU check: {title}", "",
             " · ".join(f"{k} {_cell(env[k])}" for k in keys if env.get(k) is not None),
             f"git {report['git']} · {report['started']} · {report['total_s']:.0f} s of a {report['budget_s']:.0f} s "
             f"budget · `{report['command']}`"]
    for name, p in report["parts"].items():
        lines += ["", f"## {name}: {p['status']} ({p['seconds']:.0f} s)" + (f" — {p['error']}" if p["error"] else "")]
        if not p["rows"]:
            continue
        cols = []
        for r in p["rows"]:
            cols += [k for k in r["values"] if k not in cols and k != "detail"]
        lines += ["", "| case | ok | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        for r in p["rows"]:
            ok = {True: "yes", False: "**NO**", None: ""}[r["ok"]]
            lines.append(f"| {r['case']} | {ok} | " + " | ".join(_cell(r["values"].get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"
