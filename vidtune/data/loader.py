"""Batches of cached tensors for the training loop, in a seeded, exactly resumable order.

Order: each dataset has its own epochs. An epoch lists every entry (1 + repeats) times, groups
them by bucket (one tensor shape), shuffles within buckets, cuts whole batches (the remainder
waits for the next epoch's shuffle), and shuffles the batch order. The epoch plan is a pure
function of (seed, dataset, epoch), so it is never stored. Each step picks the dataset with
probability weight x batches-per-epoch (weight 1 everywhere = plain concatenation), using the
loader's own generator, which also draws caption dropout. ``state_dict`` holds that generator's
state and each dataset's (epoch, position): ``load_state_dict`` resumes on the exact next batch.

With ``world_size`` ranks every rank runs the same plan and takes batch ``step * world_size +
rank``, so ranks see different batches without talking to each other. ``index`` is the place of
the last batch in that shared order: the same at any world size, it seeds the per-batch random
draws of the trainer. The state holds the plan's position, not the rank's, so a run resumes at
another world size when its per-rank batch size is the same (the accumulation steps may differ).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..runtime import seed_for
from .cache import TEXT_MAX_LENGTH, CacheStore, pad_prompt_embeds
from .discover import DataError
from .prepare import LATENTS, TEXT, CacheEntry, PreparedData


@dataclass
class Batch:
    latents: torch.Tensor        # (B, z, F', H', W') normalised VAE latents
    prompt_embeds: torch.Tensor  # (B, 512, D), zero after each prompt's length
    prompt_lengths: torch.Tensor  # (B,) true token counts (0 rows are never produced: eos counts)
    captions: list[str]          # "" where caption dropout applied
    dropped: torch.Tensor        # (B,) bool, caption dropout applied
    dataset_ids: list[str]
    sources: list[str]
    # Conditioning cached beside the latents (every other tensor of a latent cache entry, stacked
    # per key): what a family's training forward needs besides latents and text.
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    # (B, max_length) 1 = token, 0 = padding, for text caches that store the pipeline's mask (Sana Video)
    prompt_mask: torch.Tensor | None = None

    def to(self, device, dtype: torch.dtype | None = None) -> "Batch":
        """Move to ``device``; floating tensors (latents, text, conditioning) also to ``dtype``."""
        def move(t):
            if dtype is not None and t.is_floating_point():
                return t.to(device, dtype, non_blocking=True)
            return t.to(device, non_blocking=True)
        return Batch(move(self.latents), move(self.prompt_embeds), self.prompt_lengths.to(device),
                     self.captions, self.dropped.to(device), self.dataset_ids, self.sources,
                     {k: move(v) for k, v in self.cond.items()},
                     None if self.prompt_mask is None else self.prompt_mask.to(device))


class CachedLoader:
    """Infinite iterator of ``Batch`` over ``PreparedData`` entries."""

    def __init__(self, data: PreparedData, batch_size: int, *, seed: int = 0,
                 caption_dropout: float = 0.0, gradient_accumulation_steps: int = 1,
                 rank: int = 0, world_size: int = 1, text_max_length: int = TEXT_MAX_LENGTH):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.store: CacheStore = data.store
        self.batch_size = batch_size
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.rank, self.world_size = rank, world_size
        self.text_max_length = text_max_length
        self.null_text_key = data.null_text_key
        self.dataset_ids = sorted({e.dataset_id for e in data.entries} | set(data.repeats))
        self.entries = {d: [e for e in data.entries if e.dataset_id == d] for d in self.dataset_ids}
        self.repeats = {d: data.repeats.get(d, 0) for d in self.dataset_ids}
        need = batch_size * gradient_accumulation_steps
        self.batches_per_epoch = {}
        for d in self.dataset_ids:
            n = len(self._plan(d, 0)) if self.entries[d] else 0
            if n * batch_size < need:
                raise DataError(
                    f"no samples detected in dataset {d!r}: {len(self.entries[d])} cached sample(s) "
                    f"x (1 + repeats={self.repeats[d]}) give {n} whole batch(es) of {batch_size}, fewer "
                    f"than batch_size x gradient_accumulation_steps = {need}; raise repeats")
            self.batches_per_epoch[d] = n
        w = torch.tensor([data.weights.get(d, 1.0) * self.batches_per_epoch[d] for d in self.dataset_ids],
                         dtype=torch.float64)
        self.probs = w / w.sum()
        self._generator = torch.Generator().manual_seed(seed_for(seed, "loader"))
        self._pos = {d: [0, 0] for d in self.dataset_ids}  # dataset -> [epoch, batch index]
        self._plans: dict[str, tuple[int, list[list[int]]]] = {}
        self.step = 0  # batches yielded on this rank
        self.consumed = 0  # batches of the shared plan taken by all ranks together
        self.index = -1  # place of the last batch yielded in the shared plan

    # -- plan ----------------------------------------------------------------------------------
    def _plan(self, d: str, epoch: int) -> list[list[int]]:
        """Batches (lists of entry indices) of dataset ``d``'s epoch ``epoch``."""
        g = torch.Generator().manual_seed(seed_for(self.seed, d, epoch))
        groups: dict = {}
        for i, e in enumerate(self.entries[d]):
            groups.setdefault(e.bucket, []).extend([i] * (1 + self.repeats[d]))
        batches = []
        for bucket in sorted(groups):
            idx = groups[bucket]
            order = torch.randperm(len(idx), generator=g).tolist()
            shuffled = [idx[j] for j in order]
            batches += [shuffled[s:s + self.batch_size]
                        for s in range(0, len(shuffled) - self.batch_size + 1, self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[j] for j in order]

    def _next_indices(self) -> tuple[str, list[int]]:
        d = self.dataset_ids[int(torch.multinomial(self.probs, 1, generator=self._generator))]
        epoch, pos = self._pos[d]
        if self._plans.get(d, (None,))[0] != epoch:
            self._plans[d] = (epoch, self._plan(d, epoch))
        plan = self._plans[d][1]
        chosen = plan[pos]
        self._pos[d] = [epoch + 1, 0] if pos + 1 == len(plan) else [epoch, pos + 1]
        return d, chosen

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        mine = None
        for r in range(self.world_size):  # every rank advances the shared plan identically
            d, idx = self._next_indices()
            drop = torch.rand(len(idx), generator=self._generator) < self.caption_dropout
            if r == self.rank:
                mine = (d, idx, drop)
        self.step += 1
        self.index = self.consumed + self.rank
        self.consumed += self.world_size
        d, idx, drop = mine
        return self._load([self.entries[d][i] for i in idx], drop)

    def batch_of(self, entries: list[CacheEntry]) -> Batch:
        """The Batch of ``entries`` with their own captions (no dropout): evaluation."""
        return self._load(entries, torch.zeros(len(entries), dtype=torch.bool))

    def _load(self, entries: list[CacheEntry], drop: torch.Tensor) -> Batch:
        loaded = [{**self.store.load(LATENTS, e.latent_key),
                   **{k: v for kind, key in e.cond_keys for k, v in self.store.load(kind, key).items()}}
                  for e in entries]
        latents = torch.stack([x["latents"] for x in loaded])
        cond = {k: torch.stack([x[k] for x in loaded]) for k in loaded[0] if k != "latents"}
        texts = [self.store.load(TEXT, self.null_text_key if dr else e.text_key)
                 for e, dr in zip(entries, drop.tolist())]
        embeds = [t["prompt_embeds"] for t in texts]
        mask = None
        if "prompt_attention_mask" in texts[0]:
            mask = pad_prompt_embeds([t["prompt_attention_mask"][:, None] for t in texts], self.text_max_length)[..., 0]
        return Batch(
            latents=latents,
            prompt_embeds=pad_prompt_embeds(embeds, self.text_max_length),
            prompt_lengths=(mask.sum(1) if mask is not None else
                            torch.tensor([min(x.shape[0], self.text_max_length) for x in embeds])),
            captions=["" if dr else e.caption for e, dr in zip(entries, drop.tolist())],
            dropped=drop,
            dataset_ids=[e.dataset_id for e in entries],
            sources=[str(e.source) for e in entries],
            cond=cond,
            prompt_mask=mask,
        )

    # -- resume --------------------------------------------------------------------------------
    def epoch(self, dataset_id: str) -> int:
        """Completed epochs of a dataset."""
        return self._pos[dataset_id][0]

    def state_dict(self) -> dict:
        return {"version": 1, "seed": self.seed, "step": self.step, "world_size": self.world_size,
                "consumed": self.consumed, "batch_size": self.batch_size,
                "rng": self._generator.get_state().clone(),
                "positions": {d: list(p) for d, p in self._pos.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"loader state was saved with seed {state.get('seed')}, this run has {self.seed}: "
                             f"the data order cannot be resumed exactly")
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError(f"the checkpoint was trained with train.batch_size = {state['batch_size']} per rank, this "
                             f"run has {self.batch_size}: batches never mix buckets, so another size cuts the data "
                             f"differently. Keep train.batch_size = {state['batch_size']} and change "
                             f"train.gradient_accumulation_steps to keep the global batch")
        self._generator.set_state(state["rng"])
        self.consumed = state.get("consumed", state["step"] * state.get("world_size", 1))
        self.step = self.consumed // self.world_size
        for d, p in state["positions"].items():
            if d in self._pos:  # a dataset added since the checkpoint starts at its beginning
                self._pos[d] = list(p)
                if p[1] >= self.batches_per_epoch[d]:  # the dataset shrank: next epoch
                    self._pos[d] = [p[0] + 1, 0]
        self._plans.clear()
