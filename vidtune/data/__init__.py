"""Data pipeline: discover -> buckets -> caches (VAE latents, text embeddings) -> loader.

The trainer calls ``prepare_data`` once and then iterates a ``CachedLoader``; a training step
touches nothing but cached tensors.
"""
from .buckets import Bucket, bucket_for, clip_frames, target_size
from .cache import CacheStore, file_digest, model_fingerprint, pad_prompt_embeds, settings_key
from .discover import DataError, MediaItem, SkipLog, discover_dataset
from .encode import Encoders
from .loader import Batch, CachedLoader
from .prepare import CacheEntry, PreparedData, check_dataset_sizes, prepare_data

__all__ = [
    "Bucket", "bucket_for", "clip_frames", "target_size",
    "CacheStore", "file_digest", "model_fingerprint", "pad_prompt_embeds", "settings_key",
    "DataError", "MediaItem", "SkipLog", "discover_dataset",
    "Encoders", "Batch", "CachedLoader",
    "CacheEntry", "PreparedData", "check_dataset_sizes", "prepare_data",
]
