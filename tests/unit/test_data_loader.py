"""CachedLoader: bucketed batches, repeats, weights, caption dropout, sharding, exact resume.

Entries are real cache files with random tensors; no model is needed to test the order logic.
"""
from collections import Counter
from pathlib import Path

import pytest
import torch

from vidtune.data import Bucket, CachedLoader, CacheStore, DataError, SkipLog
from vidtune.data.cache import settings_key
from vidtune.data.prepare import LATENTS, TEXT, CacheEntry, PreparedData


def make_data(tmp_path, sizes, repeats=None, weights=None, buckets=(Bucket(32, 32, 9), Bucket(48, 32, 9))):
    store = CacheStore(tmp_path)
    null = settings_key(text="")
    store.save(TEXT, null, {"prompt_embeds": torch.zeros(1, 8)})
    entries = []
    for ds, n in sizes.items():
        for i in range(n):
            b = buckets[i % len(buckets)]
            lk, tk = settings_key(ds=ds, i=i), settings_key(ds=ds, i=i, t=1)
            store.save(LATENTS, lk, {"latents": torch.full((16, 3, b.height // 8, b.width // 8), float(i))})
            store.save(TEXT, tk, {"prompt_embeds": torch.full((2 + i % 3, 8), float(i + 1))})
            entries.append(CacheEntry(ds, Path(f"{ds}/{i}.mp4"), f"{ds} caption {i}", b, lk, tk))
    return PreparedData(entries, store, null, repeats or {d: 0 for d in sizes},
                        weights or {d: 1.0 for d in sizes}, SkipLog())


def sig(batch):
    return (tuple(batch.sources), tuple(batch.captions))


def test_batches_never_mix_buckets_and_pad_embeds(tmp_path):
    loader = CachedLoader(make_data(tmp_path, {"a": 8}), batch_size=2, seed=0)
    for _ in range(12):
        b = next(loader)
        assert b.latents.shape[0] == 2 and len({tuple(x.shape) for x in b.latents}) == 1
        assert b.prompt_embeds.shape == (2, 512, 8)
        for row, n in zip(b.prompt_embeds, b.prompt_lengths):
            assert row[:n].abs().min() > 0 and row[n:].abs().sum() == 0


def test_epoch_sees_each_sample_one_plus_repeats_times(tmp_path):
    loader = CachedLoader(make_data(tmp_path, {"a": 6}, repeats={"a": 2}), batch_size=3, seed=1)
    assert loader.batches_per_epoch["a"] == 6
    seen = Counter(s for _ in range(6) for s in next(loader).sources)
    assert set(seen.values()) == {3} and len(seen) == 6
    assert loader.epoch("a") == 1


def test_seeded_order(tmp_path):
    data = make_data(tmp_path, {"a": 8})
    run = lambda seed: [sig(next(it)) for it in [CachedLoader(data, 2, seed=seed)] for _ in range(8)]
    assert run(0) == run(0)
    assert run(0) != run(1)


def test_resume_is_exact(tmp_path):
    data = make_data(tmp_path, {"a": 7, "b": 5}, repeats={"a": 1, "b": 0}, weights={"a": 1.0, "b": 3.0})
    ref = CachedLoader(data, 2, seed=3, caption_dropout=0.3)
    full = [sig(next(ref)) for _ in range(25)]
    first = CachedLoader(data, 2, seed=3, caption_dropout=0.3)
    for _ in range(11):
        next(first)
    state = first.state_dict()
    resumed = CachedLoader(data, 2, seed=3, caption_dropout=0.3)
    resumed.load_state_dict(state)
    assert [sig(next(resumed)) for _ in range(14)] == full[11:]
    assert resumed.step == 25
    with pytest.raises(ValueError, match="cannot be resumed exactly"):
        CachedLoader(data, 2, seed=4).load_state_dict(state)


def test_weights_bias_dataset_choice(tmp_path):
    data = make_data(tmp_path, {"a": 8, "b": 8}, weights={"a": 1.0, "b": 4.0})
    loader = CachedLoader(data, 2, seed=0)
    counts = Counter(next(loader).dataset_ids[0] for _ in range(400))
    assert 0.72 < counts["b"] / 400 < 0.88


def test_caption_dropout_uses_empty_caption(tmp_path):
    loader = CachedLoader(make_data(tmp_path, {"a": 8}), 2, seed=0, caption_dropout=0.5)
    batches = [next(loader) for _ in range(50)]
    dropped = sum(int(b.dropped.sum()) for b in batches)
    assert 30 < dropped < 70
    for b in batches:
        for cap, d, row in zip(b.captions, b.dropped, b.prompt_embeds):
            assert (cap == "") == bool(d)
            if d:
                assert row.abs().sum() == 0  # the null caption's cached embedding (zeros here)


def test_ranks_get_disjoint_batches(tmp_path):
    data = make_data(tmp_path, {"a": 8})
    single = CachedLoader(data, 2, seed=0)
    stream = [sig(next(single)) for _ in range(8)]
    r0, r1 = CachedLoader(data, 2, seed=0, world_size=2, rank=0), CachedLoader(data, 2, seed=0, world_size=2, rank=1)
    assert [sig(next(r0)) for _ in range(4)] == stream[0::2]
    assert [sig(next(r1)) for _ in range(4)] == stream[1::2]


def test_too_small_dataset_error(tmp_path):
    data = make_data(tmp_path, {"tiny": 2}, buckets=(Bucket(32, 32, 9),))
    with pytest.raises(DataError, match="no samples detected in dataset 'tiny'.*raise repeats"):
        CachedLoader(data, batch_size=2, gradient_accumulation_steps=2)
    data.repeats["tiny"] = 1
    CachedLoader(data, batch_size=2, gradient_accumulation_steps=2)


def test_conditioning_cached_beside_latents_reaches_the_batch(tmp_path):
    store = CacheStore(tmp_path)
    null = settings_key(text="")
    store.save(TEXT, null, {"prompt_embeds": torch.zeros(1, 8)})
    entries = []
    for i in range(2):
        lk = settings_key(i=i)
        store.save(LATENTS, lk, {"latents": torch.full((4, 1, 2, 2), float(i)),
                                 "condition": torch.full((5, 1, 2, 2), float(10 + i))})
        entries.append(CacheEntry("a", Path(f"{i}.mp4"), "", Bucket(16, 16, 1), lk, null))
    b = next(CachedLoader(PreparedData(entries, store, null, {"a": 0}, {"a": 1.0}, SkipLog()), 2, seed=0))
    assert set(b.cond) == {"condition"} and b.cond["condition"].shape == (2, 5, 1, 2, 2)
    for lat, cond in zip(b.latents, b.cond["condition"]):  # each sample's own conditioning
        assert cond[0, 0, 0, 0] == lat[0, 0, 0, 0] + 10
    moved = b.to("cpu", torch.float64)
    assert moved.cond["condition"].dtype == torch.float64 and moved.prompt_lengths.dtype == torch.int64
