"""Chunked feed-forward == unchunked (output, every grad), with peft LoRA; and its peak memory."""
import weakref

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from vidtune_kernels import (ChunkedFeedForward, chunked_feed_forward, gelu_tanh, recomputed_when_saved,
                             resolve_chunk_size)


class TinyFF(nn.Module):
    """The Wan FFN shape: Linear(D -> ffn_dim) -> gelu_tanh -> Linear(ffn_dim -> D)."""

    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))


def _run(ff, x, chunk_size):
    """Output, input grad and the grads of every trainable parameter (by name)."""
    x = x.detach().requires_grad_()
    out = chunked_feed_forward(ff, x, chunk_size)
    names, params = zip(*[(n, p) for n, p in ff.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(out, (x, *params), torch.ones_like(out))
    return out, grads[0], dict(zip(names, grads[1:]))


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], msg=name)


@pytest.mark.parametrize("shape", [(1, 40, 16), (2, 20, 16)])
@pytest.mark.parametrize("chunk_size", [8, 13])  # divides N = 40 and does not
def test_chunked_equals_unchunked(shape, chunk_size):
    torch.manual_seed(0)
    ff = TinyFF(16, 48)
    x = torch.randn(shape)
    _assert_same(_run(ff, x, chunk_size), _run(ff, x, None))


@pytest.mark.parametrize("chunk_size", [None, 0, -1, 40, 1000])
def test_no_chunking_is_plain_call(chunk_size):
    ff = TinyFF(16, 48)
    x = torch.randn(2, 20, 16)
    torch.testing.assert_close(chunked_feed_forward(ff, x, chunk_size), ff(x), rtol=0, atol=0)


def test_no_grad_loops_without_checkpoint():
    ff = TinyFF(16, 48)
    x = torch.randn(1, 37, 16)
    with torch.no_grad():
        out = chunked_feed_forward(ff, x, 10)
    assert out.shape == x.shape and out.grad_fn is None
    torch.testing.assert_close(out, ff(x))


def test_peft_lora_composes():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"])
    ff = peft.inject_adapter_in_model(cfg, TinyFF(16, 48))
    for name, p in ff.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            nn.init.normal_(p)  # peft starts B at zero: make the adapter change the output
    x = torch.randn(1, 30, 16)
    got, want = _run(ff, x, 7), _run(ff, x, None)
    assert sorted(got[2]) == sorted(n for n, _ in ff.named_parameters() if "lora_" in n)
    _assert_same(got, want)


def test_nested_in_block_checkpoint():
    """The trainer checkpoints whole blocks; the chunk checkpoints nest inside that one."""
    torch.manual_seed(0)
    ff = TinyFF(16, 48)
    x = torch.randn(1, 40, 16)

    def block(h):
        return h + chunked_feed_forward(ff, h, 16)

    x1 = x.clone().requires_grad_()
    checkpoint(block, x1, use_reentrant=False).sum().backward()
    g_chunked, gw_chunked = x1.grad, ff.fc1.weight.grad.clone()
    ff.zero_grad()
    x2 = x.clone().requires_grad_()
    (x2 + ff(x2)).sum().backward()
    torch.testing.assert_close(g_chunked, x2.grad)
    torch.testing.assert_close(gw_chunked, ff.fc1.weight.grad)


def test_module_wraps_and_chunk_size_is_settable():
    ff = TinyFF(8, 24)
    mod = ChunkedFeedForward(ff, chunk_size=4)
    assert {n for n, _ in mod.named_parameters()} == {f"fn.{n}" for n, _ in ff.named_parameters()}
    x = torch.randn(2, 9, 8)
    torch.testing.assert_close(mod(x), ff(x))
    mod.chunk_size = None
    torch.testing.assert_close(mod(x), ff(x), rtol=0, atol=0)
    assert "chunk_size=None" in repr(mod)


def test_resolve_chunk_size_env_override(monkeypatch):
    monkeypatch.delenv("WAN_FEED_FORWARD_CHUNK_SIZE", raising=False)
    assert resolve_chunk_size(512) == 512
    assert resolve_chunk_size(None) is None
    assert resolve_chunk_size(0) is None
    monkeypatch.setenv("WAN_FEED_FORWARD_CHUNK_SIZE", "64")
    assert resolve_chunk_size(512) == 64
    assert resolve_chunk_size(None) == 64
    monkeypatch.setenv("WAN_FEED_FORWARD_CHUNK_SIZE", "0")
    assert resolve_chunk_size(512) is None
    monkeypatch.setenv("WAN_FEED_FORWARD_CHUNK_SIZE", "1k")
    with pytest.raises(ValueError, match="WAN_FEED_FORWARD_CHUNK_SIZE"):
        resolve_chunk_size(512)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages allocated under the mode (freed when their storage dies)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked = set()

    def _free(self, key, nbytes):
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # views and in-place results own no new memory
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in self._tracked:
                self._tracked.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, nbytes)
        return out


def _peak_fwd_bwd(ff, x, chunk_size):
    x = x.detach().requires_grad_()
    with LiveBytes() as mem:
        chunked_feed_forward(ff, x, chunk_size).sum().backward()
    return mem.peak


def test_peak_memory_drops_with_chunking():
    dim, ffn_dim, tokens = 32, 512, 4096
    ff = TinyFF(dim, ffn_dim)
    x = torch.randn(1, tokens, dim)
    intermediate = tokens * ffn_dim * 4  # one (N, ffn_dim) fp32 tensor
    whole = _peak_fwd_bwd(ff, x, None)
    chunked = _peak_fwd_bwd(ff, x, 512)
    assert whole >= 2 * intermediate  # fc1 output and gelu output are saved for backward
    # chunk of 512 tokens: the intermediates are 8x smaller, what is left is (N, dim)-sized
    assert chunked * 4 <= whole, (chunked, whole)


class RecomputedFF(TinyFF):
    """TinyFF whose activation fc2 saves is rebuilt in backward from fc1's output."""

    def forward(self, x):
        pre = self.fc1(x)
        h = gelu_tanh(pre)
        with recomputed_when_saved(h, lambda: gelu_tanh(pre)):
            return self.fc2(h)


def _kept_after_forward(ff, x):
    """Bytes allocated by ff's forward still alive after it: what backward keeps, and the output."""
    with LiveBytes() as mem:
        out = ff(x)
        kept = mem.live
    del out
    return kept


def test_recomputed_activation_same_numbers_less_kept():
    torch.manual_seed(0)
    plain, recomputed = TinyFF(24, 96), RecomputedFF(24, 96)
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 40, 24)
    want, got = _run(plain, x, None), _run(recomputed, x, None)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(got[2][n], want[2][n]) for n in want[2])  # bit for bit: the same gelu again
    xg = x.detach().requires_grad_()
    # fc2 no longer keeps the (80, 96) fp32 activation; gelu keeps its input as before.
    assert _kept_after_forward(plain, xg) - _kept_after_forward(recomputed, xg) == 80 * 96 * 4
    # Under checkpointing its hooks decide: the same numbers again.
    out = checkpoint(recomputed, xg, use_reentrant=False)
    torch.autograd.backward(out, torch.ones_like(out))
    assert torch.equal(xg.grad, want[1])
