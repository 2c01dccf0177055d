"""Group offload on CPU: step time with the disk tier vs fully resident weights.

    python benchmarks/offload_bench.py [--blocks 8 --dim 512 --tokens 512 --steps 3]

Fixed thread split so the numbers mean something on a small machine: torch uses 1 intra-op
thread (the "compute stream"), the streamer 1 I/O worker. The config is chosen so compute per
group exceeds its read time, which is when prefetch can hide the I/O. Reported:
  step         median fwd+bwd step time (frozen base, input grad, LoRA-style); both modes in one
               process with their steps interleaved, so background load hits both alike
  I/O per step the bytes one step reads from disk at the speed of a serial read of every group
  overlap      share of that I/O hidden behind compute: 1 - (t_disk - t_resident) / io_per_step
  peak RSS     ru_maxrss of a separate process per mode
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h, ctx, temb, rope):
        q, k, v = self.qkv(h).chunk(3, -1)
        h = h + self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        return h + self.down(torch.nn.functional.gelu(self.up(h)))


class Model(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x, None, None, None)
        return x


def build(a, mode, tmpdir):
    torch.manual_seed(0)
    model = Model(a.blocks, a.dim).requires_grad_(False)
    off = None
    if mode == "disk":
        from vidtune.memory.offload import OffloadConfig, apply_group_offload

        off = apply_group_offload(model, OffloadConfig(type="block_level", blocks_per_group=a.blocks_per_group,
                                                       prefetch_depth=1, to_disk_path=tmpdir,
                                                       backend="native", num_workers=1))
    return model, off


def step(model, x) -> float:
    xx = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    model(xx).square().mean().backward()
    return time.perf_counter() - t0


def run_mode(a) -> dict:
    """One mode, a few steps: its peak RSS (a process of its own)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=a.disk_dir) as tmp:
        model, _ = build(a, a.mode, tmp)
        x = torch.randn(1, a.tokens, a.dim)
        for _ in range(2):
            step(model, x)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def timed(a) -> dict:
    """Both modes in one process, steps interleaved, so machine load hits both alike."""
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(dir=a.disk_dir)
    res_model, _ = build(a, "resident", None)
    disk_model, off = build(a, "disk", tmp.name)
    x = torch.randn(1, a.tokens, a.dim)
    step(res_model, x), step(disk_model, x)  # warm-up
    t_res, t_disk, disk_bytes = [], [], []
    for _ in range(a.steps):
        t_res.append(step(res_model, x))
        off.reset_stats()
        t_disk.append(step(disk_model, x))
        disk_bytes.append(off.stats()["bytes_read_disk"])
    # Raw read speed: every group once, nothing else running.
    s = off.streamer
    for g in list(off._resident):
        off._unbind(g)
        s.evict(g)
        off._resident.remove(g)
    off._cur = None
    t0 = time.perf_counter()
    for g in range(len(off.groups)):
        s.load(g)
        s.wait(g)
        s.evict(g)
    io_all = time.perf_counter() - t0
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    io_step = med(disk_bytes) / sum(off.group_bytes) * io_all
    return dict(res_s=med(t_res), disk_s=med(t_disk), io_step_s=io_step, io_all_s=io_all,
                mib_step=med(disk_bytes) / 2**20, direct_io=s.uses_direct_io(0),
                group_mb=max(off.group_bytes) / 2**20, groups=len(off.groups))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--blocks-per-group", type=int, default=1)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--disk-dir", default=None, help="where the disk tier writes (default: system temp)")
    p.add_argument("--mode", choices=["resident", "disk"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        print(json.dumps(run_mode(a)))
        return
    rss = {}
    for mode in ("resident", "disk"):
        r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode],
                           capture_output=True, text=True, check=True)
        rss[mode] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    t = timed(a)
    hidden = 1 - max(t["disk_s"] - t["res_s"], 0.0) / t["io_step_s"]
    print(f"config: {a.blocks} blocks x dim {a.dim}, {a.tokens} tokens, fp32, {a.blocks_per_group} block/group, "
          f"prefetch_depth 1; torch threads 1, I/O workers 1; O_DIRECT={t['direct_io']}")
    print(f"group size             {t['group_mb']:.1f} MiB x {t['groups']} groups; read per step {t['mib_step']:.0f} MiB")
    print(f"step resident          {t['res_s'] * 1e3:8.1f} ms   peak RSS {rss['resident']:7.1f} MiB")
    print(f"step disk tier         {t['disk_s'] * 1e3:8.1f} ms   peak RSS {rss['disk']:7.1f} MiB")
    print(f"I/O per step (serial)  {t['io_step_s'] * 1e3:8.1f} ms   (compute exceeds I/O: {t['res_s'] > t['io_step_s']})")
    print(f"slowdown               {t['disk_s'] / t['res_s']:8.3f}x")
    print(f"overlap ratio          {hidden:8.3f}   (share of the step's I/O hidden behind compute; <0: overhead beyond I/O)")


if __name__ == "__main__":
    main()
