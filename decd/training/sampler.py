"""Identity-balanced sampling: P identities x K samples per batch (`--samples_per_identity K`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Sampler


class IdentityBalancedSampler(Sampler[int]):
    """Yield indices so that every consecutive `batch_size` block holds `batch_size // K` identities x K samples.

    Identities with fewer than K samples are topped up by sampling with replacement. The number of
    batches per epoch is fixed (about one pass over the data). Under several processes, accelerate
    hands whole consecutive batches to each process, so every per-process batch stays P x K; call
    `set_epoch` (the Trainer does) for a new order each epoch.
    """

    def __init__(self, person_ids, batch_size: int, samples_per_identity: int, seed: int = 0):
        if samples_per_identity < 1 or batch_size % samples_per_identity:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of samples_per_identity ({samples_per_identity})."
            )
        self.person_ids = np.asarray(person_ids)
        self.batch_size = batch_size
        self.samples_per_identity = samples_per_identity
        self.identities_per_batch = batch_size // samples_per_identity
        self.seed = seed
        self.epoch = 0
        self.index_by_identity = {}
        for index, identity in enumerate(self.person_ids.tolist()):
            self.index_by_identity.setdefault(identity, []).append(index)
        if len(self.index_by_identity) < self.identities_per_batch:
            raise ValueError(
                f"Only {len(self.index_by_identity)} identities, fewer than the {self.identities_per_batch} needed per "
                f"batch (batch_size {batch_size} / samples_per_identity {samples_per_identity})."
            )
        self.num_batches = max(1, len(self.person_ids) // batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        k = self.samples_per_identity
        identities = list(self.index_by_identity)
        pools: dict[Any, list[list[int]]] = {}

        def refill(identity):
            members = np.asarray(self.index_by_identity[identity])
            if len(members) < k:
                members = rng.choice(members, size=k, replace=True)
            members = rng.permutation(members)
            usable = len(members) // k * k
            pools[identity] = [members[i : i + k].tolist() for i in range(0, usable, k)]

        for identity in identities:
            refill(identity)
        for _ in range(self.num_batches):
            with_chunks = [identity for identity in identities if pools[identity]]
            if len(with_chunks) < self.identities_per_batch:
                for identity in identities:
                    if not pools[identity]:
                        refill(identity)
                with_chunks = identities
            chosen = rng.choice(len(with_chunks), size=self.identities_per_batch, replace=False)
            for position in chosen:
                yield from pools[with_chunks[position]].pop()


__all__ = ["IdentityBalancedSampler"]
