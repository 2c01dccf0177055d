"""Cache store: atomic writes, compression, keys, prompt padding."""
import os

import pytest
import torch

from vidtune.data.cache import CacheEntryError, CacheStore, file_digest, model_fingerprint, pad_prompt_embeds, settings_key
from vidtune.fsutil import atomic_write, atomic_write_bytes


@pytest.mark.parametrize("compress", [False, True])
def test_store_round_trip(tmp_path, compress):
    store = CacheStore(tmp_path, compress)
    t = {"latents": torch.randn(16, 3, 4, 4, dtype=torch.bfloat16)}
    key = settings_key(a=1)
    assert not store.has("latents", key)
    path = store.save("latents", key, t, {"caption": "x"})
    assert path.name.endswith(".zlib") == compress
    assert torch.equal(store.load("latents", key)["latents"], t["latents"])
    # An entry written with the other compression setting is still found.
    assert CacheStore(tmp_path, not compress).has("latents", key)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"new partial")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_unreadable_entry_names_file_and_fix(tmp_path):
    store = CacheStore(tmp_path)
    key = settings_key(b=2)
    path = store.save("text", key, {"prompt_embeds": torch.zeros(2, 4)})
    path.write_bytes(b"garbage")
    with pytest.raises(CacheEntryError, match="is damaged .*the next run re-encodes it"):
        store.load("text", key)
    assert not path.exists()  # deleted: the next setup sees it missing and encodes it again


@pytest.mark.parametrize("compress", [False, True])
def test_damage_is_caught_cheaply_at_setup_or_by_the_digest_at_read(tmp_path, compress):
    store = CacheStore(tmp_path, compress)
    t = {"latents": torch.randn(16, 3, 4, 4), "cond": torch.randn(3, 8).to(torch.bfloat16)}
    keys = [settings_key(i=i) for i in range(3)]
    paths = [store.save("latents", k, t) for k in keys]
    assert all(store.intact("latents", k) for k in keys)
    # Truncated: the cheap check (header + size, or the zlib stream) finds it.
    paths[0].write_bytes(paths[0].read_bytes()[:-7])
    damaged = []
    assert not store.intact("latents", keys[0], damaged)
    assert damaged[0][0] == paths[0] and ("truncated" in damaged[0][1] or "Error" in damaged[0][1])
    assert not store.intact("latents", settings_key(i="absent"), damaged) and len(damaged) == 1
    # One flipped bit among the tensor bytes: the header is fine, the digest is not.
    if not compress:
        data = bytearray(paths[1].read_bytes())
        data[-5] ^= 0x10
        paths[1].write_bytes(bytes(data))
        assert store.intact("latents", keys[1])
        with pytest.raises(CacheEntryError, match="do not match their digest"):
            store.load("latents", keys[1])
        assert not paths[1].exists()
    # An entry without a digest (an older vidtune, or written by hand) is re-encoded too.
    from safetensors.torch import save_file

    if not compress:
        save_file(t, paths[2])
        assert not store.intact("latents", keys[2], damaged) and "no vidtune.digest" in damaged[-1][1]
    got = store.load("latents", keys[2]) if compress else None
    assert got is None or all(torch.equal(got[k], v) for k, v in t.items())


def test_tensors_digest_sees_every_bit_name_dtype_and_shape():
    from vidtune.integrity import tensors_digest

    t = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}
    d = tensors_digest(t)
    assert d == tensors_digest(dict(reversed(t.items())))
    flipped = t["a"].clone()
    flipped.view(torch.int32)[1, 2] ^= 1
    for other in ({**t, "a": flipped}, {**t, "a": t["a"].reshape(4, 3)}, {**t, "b": t["b"].float()},
                  {"a": t["a"], "c": t["b"]}):
        assert tensors_digest(other) != d


def test_keys_change_with_every_setting(tmp_path):
    base = dict(source="abc", width=32, height=32, frames=9, crop=False, vae="v1")
    keys = {settings_key(**base)}
    for k, v in [("source", "abd"), ("width", 48), ("frames", 13), ("crop", True), ("vae", "v2")]:
        keys.add(settings_key(**{**base, k: v}))
    assert len(keys) == 6
    assert settings_key(**base) == settings_key(**dict(reversed(base.items())))


def test_file_digest_and_fingerprint(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "w.safetensors").write_bytes(b"1234")
    f1 = model_fingerprint(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"a": 1}')
    assert model_fingerprint(tmp_path / "m") != f1
    (tmp_path / "a").write_bytes(b"hello")
    assert file_digest(tmp_path / "a") == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def test_pad_prompt_embeds():
    a, b = torch.randn(3, 8), torch.randn(5, 8)
    out = pad_prompt_embeds([a, b], 512)
    assert out.shape == (2, 512, 8)
    assert torch.equal(out[0, :3], a) and torch.equal(out[1, :5], b)
    assert out[0, 3:].abs().sum() == 0 and out[1, 5:].abs().sum() == 0


def test_source_index_reuses_facts_until_the_file_changes(tmp_path):
    from vidtune.data.cache import SourceIndex

    f = tmp_path / "clip.mp4"
    f.write_bytes(b"abc")
    index = SourceIndex(tmp_path / "sources.json")
    d = index.digest(f)
    index.put(f, "probe", {"width": 32})
    index.save()
    again = SourceIndex(tmp_path / "sources.json")
    assert again.get(f, "sha256") == d and again.get(f, "probe") == {"width": 32}
    f.write_bytes(b"abcd")  # new size (and mtime): every remembered fact is dropped
    assert again.get(f, "sha256") is None and again.get(f, "probe") is None
    assert again.digest(f) == file_digest(f) != d
    (tmp_path / "sources.json").write_text("{broken")
    assert SourceIndex(tmp_path / "sources.json").get(f, "sha256") is None
