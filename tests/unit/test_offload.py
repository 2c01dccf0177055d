"""Group offload: offloaded == resident (outputs and every trainable gradient), the schedule
itself (load sequence and bytes copied per step), and the resident-bytes bound."""
import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from vidtune.memory.checkpointing import apply_activation_checkpointing
from vidtune.memory.offload import OffloadConfig, apply_group_offload
from vidtune.memory.quant import QuantConfig, apply_quantization

D, N_BLOCKS = 64, 6
_probe = []  # resident weight bytes seen by each block forward (incl. recompute)


def resident_weight_bytes(model):
    """Bytes of distinct storages behind the frozen block weights, as forward reads them (the
    trainable adapter weights are never offloaded)."""
    seen = {}
    for p in model.blocks.parameters():
        if p.requires_grad:
            continue
        ts = [getattr(p, n) for n in p.__tensor_flatten__()[0]] if type(p) is not nn.Parameter else [p]
        for t in ts:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.to_q, self.to_k = nn.Linear(D, D), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.calls = 0

    def forward(self, h, ctx, temb, rope):
        self.calls += 1
        if self.probe is not None:
            _probe.append(resident_weight_bytes(self.probe))
        x = self.norm(h) * (1 + temb) + rope
        att = torch.softmax(self.to_q(x) @ self.to_k(ctx).transpose(1, 2) / D**0.5, -1) @ ctx
        x = h + att
        return x + self.down(F.gelu(self.up(x)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.blocks = nn.ModuleList([Block() for _ in range(N_BLOCKS)])

    def forward(self, x, ctx, temb, rope):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, ctx, temb, rope)
        return h


def tiny(dtype="fp32"):
    torch.manual_seed(0)
    m = Tiny()
    for b in m.blocks:
        b.probe = None
    m.requires_grad_(False)
    if dtype == "int8":
        apply_quantization(m, QuantConfig(base_precision="int8"))
    lc = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "up", "down"], init_lora_weights=False)
    m = inject_adapter_in_model(lc, m)
    m.inp.weight.requires_grad_(True)  # a trainable weight outside the blocks too
    return m


def inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*s, generator=g) for s in [(2, 5, D), (2, 3, D), (2, 1, D), (5, D)]]


def step(model):
    x, ctx, temb, rope = inputs()
    x.requires_grad_(True)
    y = model(x, ctx, temb, rope)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def expected_log(groups, step_index):
    fwd = [("fwd", g) for g in range(groups)]
    if step_index > 0:
        fwd = fwd[1:]  # group 0 is still resident from the previous backward
    return fwd + [("bwd", g) for g in range(groups - 2, -1, -1)]


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("backend", ["native", "python"])
@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_offloaded_equals_resident_and_schedule(tier, backend, ckpt, dtype, tmp_path):
    ref = tiny(dtype)
    model = copy.deepcopy(ref)
    if ckpt:
        apply_activation_checkpointing(ref.blocks)
    want = step(ref)
    total_weight_bytes = resident_weight_bytes(model)

    cfg = OffloadConfig(type="block_level", blocks_per_group=2, prefetch_depth=1, backend=backend,
                        to_disk_path=str(tmp_path / "spill") if tier == "disk" else None)
    off = apply_group_offload(model, cfg)
    if ckpt:
        apply_activation_checkpointing(model.blocks)
    assert off.streamer.backend == backend
    groups = len(off.groups)
    slot_bytes = off.streamer.slot_bytes
    assert slot_bytes == -(-max(off.group_bytes) // 4096) * 4096
    bound = (cfg.prefetch_depth + 1) * slot_bytes
    assert total_weight_bytes > bound  # a model that never evicts breaks the bound below

    for b in model.blocks:
        b.probe, b.calls = model, 0
    for i in range(2):
        off.reset_stats()
        _probe.clear()
        got = step(model)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        assert got[2].keys() == want[2].keys() and len(got[2]) == 1 + 2 * 4 * N_BLOCKS
        for k in want[2]:
            torch.testing.assert_close(got[2][k], want[2][k], rtol=0, atol=0, msg=k)

        # The schedule: forward order, then reverse order in backward (recompute included).
        assert off.load_log == expected_log(groups, i)
        st = off.stats()
        loaded = [g for _, g in off.load_log]
        assert st["bytes_copied"] == sum(off.group_bytes[g] for g in loaded)
        assert st["bytes_read_disk"] == (st["bytes_copied"] if tier == "disk" else 0)
        assert [g for p, g in off.enter_log if p == "bwd"] == list(range(groups - 1, -1, -1))
        # Resident bytes: the pool never holds more than prefetch_depth + 1 groups.
        assert st["peak_resident_bytes"] == bound
        assert max(_probe) <= bound and min(_probe) > 0
    # With checkpointing every block ran twice per step (forward + recompute through the wrapper).
    assert all(b.calls == (4 if ckpt else 2) for b in model.blocks)


def test_schedule_depth_and_sync_mode():
    for depth, use_stream, bpg in [(2, True, 1), (3, False, 2)]:
        model = tiny()
        off = apply_group_offload(model, OffloadConfig(type="block_level", blocks_per_group=bpg,
                                                       prefetch_depth=depth, use_stream=use_stream))
        d = depth if use_stream else 0
        assert off.streamer.num_slots == d + 1
        step(model)
        groups = len(off.groups)
        assert off.load_log == expected_log(groups, 0)
        # A prefetch is issued d groups ahead: group k+d is queued when group k is entered.
        first_bwd = off.load_log.index(("bwd", groups - 2))
        assert off.load_log[:d + 1] == [("fwd", g) for g in range(d + 1)]
        assert first_bwd == groups
        assert off.stats()["peak_resident_bytes"] == min(d + 1, groups) * off.streamer.slot_bytes


def test_frozen_base_never_written_back_and_lora_trains(tmp_path):
    model = tiny()
    off = apply_group_offload(model, OffloadConfig(type="block_level", blocks_per_group=3))
    before = [off.streamer.host_tensor(g).clone() for g in range(len(off.groups))]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    lora = model.blocks[0].to_q.lora_A.default.weight.detach().clone()
    for _ in range(2):
        step(model)
        x, ctx, temb, rope = inputs()
        model(x, ctx, temb, rope).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(lora, model.blocks[0].to_q.lora_A.default.weight)
    for g, b in enumerate(before):
        assert torch.equal(off.streamer.host_tensor(g), b)
    off.remove()
    assert model.blocks[0].to_q.base_layer.weight.shape == (D, D)


def test_no_grad_forward_and_remove_restore_resident():
    ref, model = tiny(), tiny()
    off = apply_group_offload(model, OffloadConfig(type="block_level", blocks_per_group=4, prefetch_depth=0))
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs()), ref(*inputs()), rtol=0, atol=0)
    off.remove()
    assert "forward" not in model.blocks[0].__dict__
    torch.testing.assert_close(step(model)[0], step(ref)[0], rtol=0, atol=0)


def test_refusals():
    full = Tiny()  # every weight trainable: a full fine-tune
    with pytest.raises(ValueError, match="full fine-tune"):
        apply_group_offload(full, OffloadConfig(type="block_level"))
    with pytest.raises(ValueError, match="mutually exclusive"):
        apply_group_offload(tiny(), OffloadConfig(type="block_level"), model_cpu_offload=True)
    m = tiny()
    apply_activation_checkpointing(m.blocks)
    with pytest.raises(ValueError, match="before activation checkpointing"):
        apply_group_offload(m, OffloadConfig(type="block_level"))
    with pytest.raises(ValueError, match="backend"):
        apply_group_offload(tiny(), OffloadConfig(type="block_level", backend="cuda"))
    assert apply_group_offload(tiny(), OffloadConfig()) is None


def test_wan_int8_lora_chunked_ff_offload_ckpt_equals_resident(tmp_path):
    from test_quant import inputs as wan_inputs, tiny_model

    base = tiny_model(num_layers=4).requires_grad_(False)
    apply_quantization(base, QuantConfig(base_precision="int8"))
    lc = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                    target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj", "net.2"])
    base = inject_adapter_in_model(lc, base)
    base.set_ff_chunk_size(7)
    model = copy.deepcopy(base)
    apply_activation_checkpointing(base.blocks)

    def run(m):
        x, t, ctx = wan_inputs()
        x.requires_grad_(True)
        y = m(x, t, ctx)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        g = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        m.zero_grad(set_to_none=True)
        return y.detach(), x.grad, g

    want = run(base)
    off = apply_group_offload(model, OffloadConfig(type="block_level", blocks_per_group=1,
                                                   to_disk_path=str(tmp_path)))
    apply_activation_checkpointing(model.blocks)
    got = run(model)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=0, atol=0, msg=k)
    assert off.load_log == expected_log(4, 0)
    assert "blocks.0.attn1.to_q.base_layer.weight" in dict(model.named_parameters())
