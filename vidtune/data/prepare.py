"""Discover -> bucket -> size check -> cache text embeddings and latents (and, for Wan S2V, audio
features). Runs once per run.

``prepare_data`` is the single call the trainer makes before its loop; it returns the cache
entries the ``CachedLoader`` draws batches from. A second run with the same data and settings
finds every entry and loads no encoder at all.
"""
from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..config import CacheConfig, DatasetConfig, ModelConfig
from ..models import family
from . import s2v
from .buckets import Bucket
from .cache import CacheStore, SourceIndex, settings_key
from .conditioning import clip_condition, condition_settings, dataset_i2v, encode_condition
from .discover import IMAGE_EXTS, VIDEO_EXTS, DataError, MediaItem, SkipLog, _short, discover_dataset
from .encode import Encoders
from .video import DecoderUnavailable, load_image, load_mask, load_video_clip

LATENTS, TEXT = "latents", "text"


@dataclass(frozen=True)
class CacheEntry:
    """One trainable sample: where its latents and caption embedding are cached."""
    dataset_id: str
    source: Path
    caption: str
    bucket: Bucket  # pixel-space (width, height, frames)
    latent_key: str
    text_key: str
    # Other cache entries whose tensors join the batch's conditioning: ((kind, key), ...).
    cond_keys: tuple = ()


@dataclass
class PreparedData:
    entries: list[CacheEntry]
    store: CacheStore
    null_text_key: str  # the empty caption, for caption dropout
    repeats: dict[str, int]
    weights: dict[str, float]
    skips: SkipLog
    stats: dict[str, int] = field(default_factory=dict)  # encoded / reused counts
    seconds: float = 0.0  # discovery + caching time
    text_keys: dict[str, str] = field(default_factory=dict)  # extra text (validation prompts) -> cache key
    negative_keys: dict[str, str] = field(default_factory=dict)  # negative prompt -> cache key
    # Image-to-video validation samples: (name, caption, caption's text key, key of their
    # conditioning in the latent cache).
    validation: list[tuple[str, str, str, str]] = field(default_factory=list)
    held_out: list[CacheEntry] = field(default_factory=list)  # evaluation samples, never trained on

    def summary(self) -> str:
        used = Counter(e.dataset_id for e in self.entries)
        lines = [self.skips.summary(dict(used))]
        buckets = defaultdict(Counter)
        for e in self.entries:
            buckets[e.dataset_id][e.bucket.name()] += 1
        for ds, b in sorted(buckets.items()):
            lines.append(f"  buckets {ds!r}: " + ", ".join(f"{k} x{n}" for k, n in sorted(b.items())))
        if self.stats:
            lines.append("  cache: " + ", ".join(f"{k} {v}" for k, v in self.stats.items()))
        return "\n".join(lines)


def usable_samples(buckets: list[Bucket], repeats: int, batch_size: int) -> int:
    """Samples per epoch that fill whole batches (a batch never mixes buckets)."""
    per_bucket = Counter(buckets)
    return sum((n * (1 + repeats)) // batch_size * batch_size for n in per_bucket.values())


def dataset_size_problem(ds: DatasetConfig, buckets: list[Bucket], found: int, batch_size: int,
                         grad_accum: int) -> str | None:
    """Why ``ds`` cannot fill one optimizer step, or None: no media files, no usable file among
    them, or too few samples for the batch."""
    need = batch_size * grad_accum
    have = usable_samples(buckets, ds.repeats, batch_size)
    if have >= need:
        return None
    head = f"no samples detected in dataset {ds.id!r}"
    if not found:
        exts = ", ".join(sorted(VIDEO_EXTS if ds.type == "video" else IMAGE_EXTS))
        return f"{head}: no {ds.type} files ({exts}) under {ds.path}; fix [[dataset]] path or type"
    if not buckets:
        return (f"{head}: no usable files: all {found} file(s) under {ds.path} were skipped (reasons in the "
                f"data summary above); fix or replace them")
    return (f"{head}: too few for the batch: {len(buckets)} usable file(s) x (1 + repeats={ds.repeats}) fill "
            f"{have} sample(s) of whole batches, fewer than batch_size x gradient_accumulation_steps = {need}. "
            f"Raise repeats for this dataset (e.g. repeats = {_repeats_needed(buckets, batch_size, need)}), "
            f"add files, or lower the batch size.")


def check_dataset_sizes(datasets: list[DatasetConfig], buckets: dict[str, list[Bucket]], skips: SkipLog,
                        batch_size: int, grad_accum: int, log: Callable[[str], None]) -> None:
    """Raise ``DataError`` if a dataset cannot fill one optimizer step, after printing the data
    summary (why files were skipped) that explains it."""
    problems = [p for ds in datasets if (p := dataset_size_problem(
        ds, buckets[ds.id], skips.found[ds.id], batch_size, grad_accum))]
    if problems:
        log(skips.summary({d: len(b) for d, b in buckets.items()}))
        raise DataError("; ".join(problems))


def _repeats_needed(buckets: list[Bucket], batch_size: int, need: int) -> int:
    for r in range(0, 10_000):
        if usable_samples(buckets, r, batch_size) >= need:
            return r
    return 10_000


def latent_settings(item: MediaItem, ds: DatasetConfig, digest: str, fps: int, encoders: Encoders,
                    extras: dict | None = None) -> dict:
    """``extras``: what else the entry holds and depends on (image latents, a loss mask's digest);
    absent for plain latents, so their keys never change."""
    window = {"start": item.start} if item.start else {}  # S2V windows after a video's first frame
    return dict(kind=item.kind, source=digest, width=item.bucket.width, height=item.bucket.height,
                frames=item.bucket.frames, fps=fps if item.kind == "video" else None, crop=ds.crop,
                crop_style=ds.crop_style if ds.crop else None, vae=encoders.vae_fingerprint,
                vae_dtype=encoders.model.vae_dtype, **window, **(extras or {}))


def text_settings(caption: str, encoders: Encoders, negative: bool = False) -> dict:
    return dict(kind="text", text=caption, text_encoder=encoders.text_fingerprint,
                dtype=encoders.model.text_encoder_dtype, **encoders.text_form(negative))


def wants_image_latents(model: ModelConfig) -> bool:
    """I2V flavours of Sana Video condition on the first frame's latents, cached beside the clip's
    (SanaImageToVideoPipeline encodes the image alone; the Wan VAE is causal, so this equals the
    clip's first latent frame)."""
    return model.family == "sana_video" and family(model.family).is_i2v(model.flavour)


def loss_mask_file(item: MediaItem, ds: DatasetConfig) -> Path | None:
    """The loss-mask image of ``item``: the file of the same stem in ``ds.loss_mask_path``."""
    root = Path(ds.loss_mask_path).expanduser()
    for ext in sorted(IMAGE_EXTS):
        for cand in (root / f"{item.path.stem}{ext}", root / f"{item.path.stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def latent_loss_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (1, H, W) in [0, 1] -> the loss weight of each latent cell (1, 1, h, w): the
    mean over the cell's pixels (so a cell half inside the mask weighs 0.5)."""
    return torch.nn.functional.adaptive_avg_pool2d(mask[None], latent_hw)[0][None]


def _encode_text(store, encoders, texts, keys, batch_size, damaged, negative=False, share=None) -> int:
    """Encode the texts whose cache entries are missing or damaged; under torchrun the ranks split them."""
    missing = [t for t in texts if not store.intact(TEXT, keys[t], damaged)]
    rank, world = (share.rank, share.world) if share is not None else (0, 1)
    if share is not None:  # rank 0 decides (a faster rank's writes must not change another's list)
        missing = share.broadcast_object(missing, "the text cache check")
    mine = missing[rank::world]
    for s in range(0, len(mine), batch_size):
        chunk = mine[s:s + batch_size]
        for text, entry in zip(chunk, encoders.text_entries(chunk, negative=negative)):
            store.save(TEXT, keys[text], entry, {"caption": text})
    return len(missing)


def prepare_data(
    datasets: list[DatasetConfig],
    cache: CacheConfig,
    model: ModelConfig,
    *,
    batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    device: str | torch.device = "cpu",
    offload_during_startup: bool = False,
    log: Callable[[str], None] = print,
    encoders: Encoders | None = None,
    release_encoders: bool = True,
    extra_texts: Sequence[str] = (),
    negative_texts: Sequence[str] = (),
    inputs=None,
    validation: tuple[DatasetConfig, int, int, int] | None = None,
    share=None,
) -> PreparedData:
    """Find every sample, fill the caches, print the data summary; return the cache entries.

    ``extra_texts`` (validation prompts, the negative prompt) are encoded with the captions, so
    the text encoder loads once per run; their cache keys are in ``PreparedData.text_keys``.
    ``negative_texts`` are encoded as negative prompts (Sana Video: without the instruction
    prefix), keys in ``PreparedData.negative_keys``.

    ``inputs`` (``vidtune.models.wan.WanInputs``; None: text-to-video) says what the model is
    conditioned on: image-to-video datasets get their conditioning cached in each latent entry
    (``vidtune.data.conditioning``) and buckets follow its pixel stride. ``validation`` = (image
    dataset, width, height, frames): the conditioning of its images for image-to-video validation
    (``PreparedData.validation``), their captions encoded with the others.

    ``share`` (a ``vidtune.distributed.Parallel``, under torchrun): the ranks split the entries to
    encode, rank 0's list of what is missing deciding for all; each entry is written (atomically)
    by one rank, and every rank waits for all before it reads any.

    ``encoders`` defaults to ``Encoders(model, device, offload_during_startup)``; with
    ``release_encoders`` they are freed once the caches are full (the training loop needs no
    encoder). Raises ``DataError`` for a missing dataset directory or a dataset too small for one
    optimizer step ("no samples detected in dataset ..."); bad files are skipped and counted.
    """
    t0 = time.perf_counter()
    datasets = [d for d in datasets if not d.disabled]
    if not datasets:
        raise DataError("no [[dataset]] configured: add at least one [[dataset]] with id and path")
    fps = model.resolved_fps()
    encoders = encoders or Encoders(model, device, offload_during_startup)
    store = CacheStore(cache.dir, cache.compress)
    skips = SkipLog()
    index = SourceIndex(Path(cache.dir) / "sources.json")

    side = inputs.side_multiple if inputs is not None else 16
    modes = {ds.id: dataset_i2v(ds, inputs) for ds in datasets}
    found: dict[str, list[MediaItem]] = {}
    for ds in datasets:
        found[ds.id] = discover_dataset(ds, fps, skips, index, side)
        if model.family == "wan_s2v":  # audio source and training window of each video
            found[ds.id] = s2v.plan(found[ds.id], ds, fps, skips, index)
    check_dataset_sizes(datasets, {d: [i.bucket for i in items] for d, items in found.items()}, skips,
                        batch_size, gradient_accumulation_steps, log)

    by_id = {d.id: d for d in datasets}
    items = [i for ds in datasets for i in found[ds.id]]
    stats = Counter()
    failed: set[str] = set()  # latent keys that failed to decode, paths without their loss mask
    rank, world = (share.rank, share.world) if share is not None else (0, 1)

    # Text first: cheap, and the empty caption (caption dropout) is always needed.
    val_items = discover_dataset(validation[0], fps, skips, index, side) if validation else []
    captions = sorted({i.caption for i in items + val_items} | {""} | set(extra_texts))
    text_keys = {c: settings_key(**text_settings(c, encoders)) for c in captions}
    negatives = sorted(set(negative_texts))
    negative_keys = {t: settings_key(**text_settings(t, encoders, negative=True)) for t in negatives}
    damaged: list[tuple[Path, str]] = []  # entries that fail the cheap check: re-encoded
    encoded = _encode_text(store, encoders, captions, text_keys, cache.text_batch_size, damaged, share=share)
    encoded += _encode_text(store, encoders, negatives, negative_keys, cache.text_batch_size, damaged, negative=True,
                            share=share)
    stats["text reused"] = len(captions) + len(negatives) - encoded
    stats["text encoded"] = encoded

    # Loss masks: a clip whose dataset asks for masks and has none is skipped.
    masks: dict[Path, Path] = {}
    for item in list(items):
        ds = by_id[item.dataset_id]
        if ds.loss_mask_path:
            mask = loss_mask_file(item, ds)
            if mask is None:
                skips.add(item.dataset_id, item.path, f"no loss mask: no {item.path.stem}.* in {ds.loss_mask_path}")
                items.remove(item)
                failed.add(str(item.path))  # re-check the dataset's size below
            else:
                masks[item.path] = mask
    image_latents = wants_image_latents(model)

    # Latents: hash sources, then encode the misses bucket by bucket in vae_batch_size batches,
    # decoding the next batch on a worker thread while the VAE runs.
    def digest_of(item):
        try:
            return index.digest(item.path)
        except OSError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib drops the GIL
        digests = list(pool.map(digest_of, items))
    keyed: list[tuple[MediaItem, str, str]] = []  # (item, latent key, content digest)
    for item, digest in zip(items, digests):
        if isinstance(digest, OSError):
            skips.add(item.dataset_id, item.path, f"unreadable: {_short(digest)}")
            continue
        extras = {"image_latents": True} if image_latents else {}
        if item.path in masks:
            extras["loss_mask"] = index.digest(masks[item.path])
        settings = latent_settings(item, by_id[item.dataset_id], digest, fps, encoders, extras)
        if modes[item.dataset_id]:
            settings.update(condition_settings(modes[item.dataset_id], inputs, _image_fingerprint(encoders, inputs)))
        keyed.append((item, settings_key(**settings), digest))
    if rank == 0:
        index.save()
    todo = [(i, k, d) for i, k, d in keyed if not store.intact(LATENTS, k, damaged)]
    if share is not None:
        keys = set(share.broadcast_object([k for _, k, _ in todo], "the latent cache check"))
        todo = [e for e in keyed if e[1] in keys]
    if damaged:
        stats["damaged, re-encoded"] = len(damaged)
        log(f"cache: {len(damaged)} damaged entr{'y' if len(damaged) == 1 else 'ies'}, re-encoding: "
            + ", ".join(f"{p} ({why})" for p, why in damaged[:3]) + (", ..." if len(damaged) > 3 else ""))
    stats["latents reused"] = len(keyed) - len(todo)
    share_of = len(todo)
    todo = todo[rank::world]
    lost: list[tuple[str, Path, str, str]] = []  # decode failures: (dataset, path, reason, key)
    groups = defaultdict(list)
    for entry in todo:
        groups[entry[0].bucket].append(entry)
    batches = [g[s:s + cache.vae_batch_size] for g in groups.values()
               for s in range(0, len(g), cache.vae_batch_size)]
    if batches:
        log(f"Encoding {share_of} clip(s) with the VAE in {len(batches)} batch(es)"
            + (f" on this rank, {world} ranks sharing them..." if world > 1 else "..."))

    def decode(batch):
        out = []
        for item, key, digest in batch:
            ds = by_id[item.dataset_id]
            b = item.bucket
            try:
                if item.kind == "video":
                    px = load_video_clip(item.path, b.frames, fps, b.width, b.height, ds.crop, ds.crop_style, digest,
                                         item.start)
                else:
                    px = load_image(item.path, b.width, b.height, ds.crop, ds.crop_style, digest)
                mask = None
                if item.path in masks:
                    mask = load_mask(masks[item.path], item.width, item.height, b.width, b.height, ds.crop,
                                     ds.crop_style, digest)
            except DecoderUnavailable:
                raise
            except Exception as exc:  # a file that probes fine but fails mid-decode is skipped
                lost.append((item.dataset_id, item.path, f"decode failed: {_short(exc)}", key))
                continue
            out.append((key, px, mask, modes[item.dataset_id]))
        return out

    encoded = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(decode, batches[0]) if batches else None
        for n in tqdm(range(len(batches)), desc="VAE cache", unit="batch", disable=None):
            decoded = pending.result()
            pending = pool.submit(decode, batches[n + 1]) if n + 1 < len(batches) else None
            if not decoded:
                continue
            pixels = torch.stack([px for _, px, _, _ in decoded])
            latents = encoders.encode_video(pixels)
            firsts = encoders.encode_video(pixels[:, :, :1]) if image_latents else [None] * len(decoded)
            conds = [{} for _ in decoded]
            for mode in {m for _, _, _, m in decoded if m}:  # one batch may hold clips of several datasets
                rows = [i for i, (_, _, _, m) in enumerate(decoded) if m == mode]
                made = clip_condition(encoders, pixels[rows], mode, inputs)
                for j, i in enumerate(rows):
                    conds[i] = {k: v[j] for k, v in made.items()}
            for (key, _, mask, _), lat, first, extra in zip(decoded, latents, firsts, conds):
                entry = {"latents": lat, **extra}
                if first is not None:
                    entry["image_latents"] = first
                if mask is not None:
                    entry["loss_mask"] = latent_loss_mask(mask, lat.shape[-2:])
                store.save(LATENTS, key, entry)
                encoded += 1
    if share is not None:  # every rank learns what the others encoded or lost, once all have written
        done = share.gather_objects((encoded, lost), "the shared caching")
        encoded, lost = sum(n for n, _ in done), [x for _, fails in done for x in fails]
    for dataset_id, path, reason, key in lost:
        skips.add(dataset_id, path, reason)
        failed.add(key)
    stats["latents encoded"] = encoded
    val = _validation_conditions(val_items, validation, index, inputs, encoders, store, skips) if validation else []
    cond: dict[str, tuple] = {}
    if model.family == "wan_s2v":
        cond, counts = s2v.cache_audio([e for e in keyed if e[1] not in failed], store, encoders, index, fps, model,
                                       skips, failed, log)
        stats.update(counts)
    if release_encoders:
        encoders.release()

    entries = [CacheEntry(i.dataset_id, i.path, i.caption, i.bucket, k, text_keys[i.caption], cond.get(k, ()))
               for i, k, _ in keyed if k not in failed]
    prepared = PreparedData(entries, store, text_keys[""], {d.id: d.repeats for d in datasets},
                            {d.id: d.weight for d in datasets}, skips, dict(stats), time.perf_counter() - t0,
                            {t: text_keys[t] for t in extra_texts}, negative_keys,
                            [(name, caption, text_keys[caption], key) for name, caption, key in val])
    log(prepared.summary())
    if failed:  # decode failures and missing masks may have shrunk a dataset below one optimizer step
        check_dataset_sizes(datasets, {d.id: [e.bucket for e in entries if e.dataset_id == d.id] for d in datasets},
                            skips, batch_size, gradient_accumulation_steps, lambda _: None)
    return prepared


def _image_fingerprint(encoders: Encoders, inputs) -> str | None:
    return encoders.image_fingerprint if inputs.image_encoder else None


def _validation_conditions(items: list[MediaItem], validation, index: SourceIndex, inputs, encoders: Encoders,
                           store: CacheStore, skips: SkipLog) -> list[tuple[str, str, str]]:
    """(name, caption, latent-cache key) of each validation image's conditioning at the
    validation size, encoded when missing."""
    ds, width, height, frames = validation
    if getattr(inputs, "i2v", None) is None:
        raise DataError(f"validation.dataset = {ds.id!r}: first frames from an image dataset condition "
                        f"image-to-video models only; this one is text-to-video (unset validation.dataset)")
    if not items:
        raise DataError(f"validation.dataset = {ds.id!r}: no usable image with a caption in {ds.path}")
    out = []
    for item in items:
        digest = index.digest(item.path)
        key = settings_key(kind="i2v_validation", source=digest, width=width, height=height, frames=frames,
                           crop=ds.crop, crop_style=ds.crop_style if ds.crop else None,
                           vae=encoders.vae_fingerprint, vae_dtype=encoders.model.vae_dtype,
                           **condition_settings("first", inputs, _image_fingerprint(encoders, inputs)))
        if not store.intact(LATENTS, key):
            try:
                px = load_image(item.path, width, height, ds.crop, ds.crop_style, digest)
            except Exception as exc:  # an unreadable validation image is skipped like a training file
                skips.add(item.dataset_id, item.path, f"decode failed: {_short(exc)}")
                continue
            cond = encode_condition(encoders, px[:, 0][None], None, frames, inputs)
            store.save(LATENTS, key, {k: v[0] for k, v in cond.items()})
        out.append((item.path.stem, item.caption, key))
    index.save()
    return out
