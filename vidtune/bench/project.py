"""GPU projections: a per-op roofline over the probed step, plus offload transfers.

Each op of the probed head, blocks and tail costs max(FLOPs / peak FLOP/s, bytes read+written /
memory bandwidth) at the device's spec-sheet peaks (bf16 tensor peak for 16-bit ops, fp32 peak
otherwise). That is a lower bound on time: real kernels reach a fraction of peak, and launch
overheads are ignored. Offload adds each group's copy at the host-link bandwidth, overlapped with
the previous group's compute when ``use_stream`` is on (the streamer's one-group prefetch), in
series when it is off. Every number from here is a projection, never a measurement.
"""
from __future__ import annotations

from vidtune.measure.mfu import mfu, model_flops, recompute_flops


def roofline_s(calls, dev) -> float:
    return sum(max(f / dev.peak_flops(es), b / dev.mem_bw) for _, f, b, es in calls)


def project_step(plan, dev) -> dict:
    sim, cfg, c = plan.sim, plan.config, plan.counters
    head = roofline_s(sim["calls"]["head"], dev)
    tail = roofline_s(sim["calls"]["tail"], dev) + roofline_s(sim["calls"]["head_bwd"], dev)
    fwd = [roofline_s(fc, dev) for _, fc, _, _ in sim["block_calls"]]
    bwd = [roofline_s(bc, dev) for _, _, bc, _ in sim["block_calls"]]
    groups = c["group_bytes"]
    transfer = exposed = 0.0
    if groups:
        bpg = cfg.memory.offload.blocks_per_group
        n = len(groups)
        gf = [sum(fwd[i * bpg:(i + 1) * bpg]) for i in range(n)]
        gb = [sum(bwd[i * bpg:(i + 1) * bpg]) for i in range(n)]
        t = [g / dev.host_link_bw for g in groups]
        transfer = sum(t) + sum(t[:-1])  # forward loads all groups, backward all but the last one
        if cfg.memory.offload.use_stream:
            fwd_s = t[0] + sum(max(gf[g], t[g + 1] if g + 1 < n else 0.0) for g in range(n))
            bwd_s = sum(max(gb[g], t[g - 1] if g > 0 else 0.0) for g in range(n))
        else:
            fwd_s = sum(gf) + sum(t)
            bwd_s = sum(gb) + sum(t[:-1])
        blocks_s = fwd_s + bwd_s
        exposed = blocks_s - sum(fwd) - sum(bwd)
    else:
        blocks_s = sum(fwd) + sum(bwd)
    trainable = sum(p for p in [c["trainable_params"]])
    opt_s = trainable * 4 * 7 / dev.mem_bw  # AdamW reads p, g, m, v and writes p, m, v (fp32 bound)
    step = head + blocks_s + tail + opt_s
    flops = model_flops(c["fwd_flops"], c["bwd_flops"], recompute_flops(sim))
    return dict(step_time_s=step, tokens_per_s=c["tokens"] * cfg.train.batch_size / step,
                mfu=mfu(flops, step, dev.bf16_flops), compute_s=head + sum(fwd) + sum(bwd) + tail,
                offload_transfer_s=transfer, offload_exposed_s=exposed, optimizer_s=opt_s)
