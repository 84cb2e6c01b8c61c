"""The global batch schedule: which bucket and which records make global batch `step`.

Everything here is a pure function of (bucket counts, seed, global batch size, remainder policy):
no host talks to another, yet all compute the same schedule, so on a multi-host mesh every process
agrees on every step's bucket (hence batch shape) and takes its own slice of the same global batch.

Per bucket b with n_b records (ids `members[b]`), each epoch e permutes the bucket, seeded by
(seed, e, b): a numpy permutation (cached) for buckets below 2^16 records, grain's `index_shuffle`
(a bijection evaluated per position: O(1) memory, no table) for larger ones, where it is fast.

    remainder="drop"   epoch e yields floor(n_b / G) batches of bucket b, from epoch e's permutation;
                       the last n_b mod G records of the permutation wait for the next epoch's draw.
    remainder="carry"  bucket b's epochs are concatenated into one stream (perm_0, perm_1, ...) and
                       cut into consecutive batches of G; a batch belongs to the epoch in which it
                       completes, so leftovers open the next epoch's first batch of that bucket.
                       Epoch e then holds floor((e+1) n_b / G) - floor(e n_b / G) batches of b.

Within an epoch the batches of all buckets are shuffled together (seeded by (seed, e)), so buckets
come up in proportion to their size and alternate between steps. In drop mode a bucket with fewer
than G records is never used (a warning says so); in carry mode it appears every few epochs.
"""

import functools
import logging

import numpy as np
from grain.experimental import index_shuffle

logger = logging.getLogger(__name__)

REMAINDER_POLICIES = ("drop", "carry")
_SHUFFLE_ROUNDS = 4
_TABLE_LIMIT = 2**16  # below: a cached permutation table; index_shuffle cycle-walks slowly on small domains
_CACHE_ENTRIES = 64


def _seed32(*values: int) -> int:
    """A uint32 seed mixing several non-negative ints (SeedSequence: well spread, platform-stable)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


class BatchPlan:
    """The schedule of global batches (see the module docstring).

    bucket_of: int `[M]` bucket id per usable record (record = position in `record_ids`).
    record_ids: int `[M]` the source's ids of those records (returned in batches).
    num_epochs: None for an endless stream.
    """

    def __init__(
        self,
        bucket_of: np.ndarray,
        record_ids: np.ndarray,
        num_buckets: int,
        global_batch_size: int,
        seed: int,
        remainder: str = "drop",
        num_epochs: int | None = None,
    ):
        if remainder not in REMAINDER_POLICIES:
            raise ValueError(f"remainder must be one of {REMAINDER_POLICIES}, got {remainder!r}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self.seed, self.remainder, self.num_epochs = int(seed), remainder, num_epochs
        self._tables: dict[tuple[int, int], np.ndarray] = {}
        self.global_batch_size = int(global_batch_size)
        record_ids = np.asarray(record_ids, np.int64)
        order = np.argsort(bucket_of, kind="stable")
        self.counts = np.bincount(bucket_of, minlength=num_buckets).astype(np.int64)
        splits = np.cumsum(self.counts)[:-1]
        self.members = np.split(record_ids[order], splits)  # per bucket, in source order
        g = self.global_batch_size
        if remainder == "drop":
            unused = [(b, int(n)) for b, n in enumerate(self.counts) if 0 < n < g]
            if unused:
                logger.warning(
                    "remainder='drop': %d bucket(s) hold fewer records than the global batch %d and are never used: %s",
                    len(unused),
                    g,
                    unused,
                )
        if self.steps_in_epoch(0) == 0 and (remainder == "drop" or self.counts.sum() == 0):
            raise ValueError(f"no bucket has {g} records (a global batch): counts {self.counts.tolist()}")

    # ---- epochs and steps --------------------------------------------------------------------------

    def _batches_before(self, epoch: int) -> np.ndarray:
        """`[K]` batches each bucket has produced in epochs 0..epoch-1."""
        if self.remainder == "drop":
            return epoch * (self.counts // self.global_batch_size)
        return epoch * self.counts // self.global_batch_size

    def steps_before(self, epoch: int) -> int:
        return int(self._batches_before(epoch).sum())

    def steps_in_epoch(self, epoch: int) -> int:
        return self.steps_before(epoch + 1) - self.steps_before(epoch)

    @property
    def num_steps(self) -> int | None:
        """Total global batches, or None when endless."""
        return None if self.num_epochs is None else self.steps_before(self.num_epochs)

    def epoch_of(self, step: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of a global step."""
        if step < 0 or (self.num_steps is not None and step >= self.num_steps):
            raise IndexError(f"step {step} is outside the plan's {self.num_steps} steps")
        per_epoch = self.counts.sum() / self.global_batch_size
        epoch = int(step / per_epoch) if per_epoch else 0
        while epoch > 0 and self.steps_before(epoch) > step:
            epoch -= 1
        while self.steps_before(epoch + 1) <= step:
            epoch += 1
        return epoch, step - self.steps_before(epoch)

    @functools.lru_cache(maxsize=2)  # noqa: B019  (two epochs at most; the plan lives as long as its loader)
    def epoch_batches(self, epoch: int) -> np.ndarray:
        """`[S, 2]` (bucket, batch number within the bucket's stream) of epoch `epoch`, in step order."""
        first, last = self._batches_before(epoch), self._batches_before(epoch + 1)
        pairs = np.concatenate(
            [np.stack([np.full(e - s, b), np.arange(s, e)], 1) for b, (s, e) in enumerate(zip(first, last))]
            + [np.zeros((0, 2), np.int64)]
        )
        order = np.random.default_rng([self.seed, epoch, 0x5D41]).permutation(len(pairs))
        return pairs[order].astype(np.int64)

    # ---- records -----------------------------------------------------------------------------------

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tables"}

    def __setstate__(self, state):
        self.__dict__.update(state, _tables={})

    def _member(self, bucket: int, position: int, epoch: int) -> int:
        """The record at `position` of bucket `bucket`'s permutation in `epoch`."""
        n = int(self.counts[bucket])
        seed = _seed32(self.seed, epoch, bucket)
        if n >= _TABLE_LIMIT:
            return int(self.members[bucket][index_shuffle(position, n - 1, seed, _SHUFFLE_ROUNDS)])
        table = self._tables.get((bucket, epoch))
        if table is None:
            if len(self._tables) >= _CACHE_ENTRIES:
                self._tables.clear()
            table = self._tables[bucket, epoch] = np.random.default_rng(seed).permutation(n)
        return int(self.members[bucket][table[position]])

    def record(self, step: int, slot: int) -> tuple[int, int]:
        """(bucket, source record id) at position `slot` of global batch `step`."""
        if not 0 <= slot < self.global_batch_size:
            raise IndexError(f"slot {slot} is outside a global batch of {self.global_batch_size}")
        epoch, k = self.epoch_of(step)
        bucket, j = (int(v) for v in self.epoch_batches(epoch)[k])
        n = int(self.counts[bucket])
        if self.remainder == "drop":  # batch j of this epoch's bucket batches
            j -= int(self._batches_before(epoch)[bucket])
            return bucket, self._member(bucket, j * self.global_batch_size + slot, epoch)
        q = j * self.global_batch_size + slot  # position in the bucket's endless stream
        return bucket, self._member(bucket, q % n, q // n)

    def substitute(self, bucket: int, step: int, slot: int, attempt: int) -> int:
        """A deterministic stand-in record from the same bucket, for a record that failed to load."""
        n = int(self.counts[bucket])
        return self._member(bucket, _seed32(self.seed, step, slot, attempt) % n, 2**31 - 1 - attempt)

    def global_batch(self, step: int) -> tuple[int, np.ndarray]:
        """(bucket, int64 `[G]` record ids) of one global batch."""
        picks = [self.record(step, s) for s in range(self.global_batch_size)]
        return picks[0][0], np.array([r for _, r in picks], np.int64)
