"""Batch orders: which images form each step's batch, as a pure function of the epoch.

A batch order has `batch_size`, `num_batches` and `epoch_batches(epoch) ->
int64 [num_batches, B]`. Because epoch `e`'s batches (and, in the pipeline,
its augmentation seeds) depend on `(seed, e)` only, never on how many times
a dataset was iterated before, a run resumed from a checkpoint at epoch `e`,
step `k` sees exactly the batches the uninterrupted run saw, and every
worker of a cluster builds the same order.

`RandomBatchOrder` is uniform shuffling without replacement (every batch a
uniform draw from the data set: the property the EMC² in-batch proposal
relies on); `emc2_tf.SpectralBatchSelection` is the other order.
"""

from __future__ import annotations

import numpy as np


class RandomBatchOrder:
    """Uniform shuffling without replacement, a new permutation each epoch.

    Args:
        num_images: N.
        batch_size: B; the `N mod B` images left over sit out the epoch
            (a different remainder each epoch).
        seed: epoch `e`'s permutation is `default_rng([seed, e])`'s.
        shuffle: False keeps the data set's order (every epoch the same).
    """

    def __init__(self, num_images: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 2 or batch_size > num_images:
            raise ValueError(
                f"batch_size must be in [2, N={num_images}]; got {batch_size}."
            )
        self.num_images = int(num_images)
        self.batch_size = int(batch_size)
        self.num_batches = self.num_images // self.batch_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s batches, int64 `[N // B, B]`."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_images)
        else:
            order = np.arange(self.num_images)
        used = self.num_batches * self.batch_size
        return order[:used].reshape(self.num_batches, self.batch_size).astype(np.int64)


class EpochSchedule:
    """Which epoch the next iteration of a dataset yields.

    Each iteration takes `next_epoch` and advances it, so a dataset iterated
    by hand yields epochs `start_epoch, start_epoch + 1, …`.
    `ContrastiveModel.fit` also sets `next_epoch` to Keras' epoch number at
    the start of every epoch, so a look at the data before training (Keras
    builds a model under a strategy by drawing one batch) shifts nothing.

    With `start_step` > 0 the dataset is the *rest of one epoch*: every
    iteration yields steps `start_step, …, num_batches − 1` of `start_epoch`
    (how a run resumes mid-epoch).
    """

    def __init__(self, order, start_epoch: int = 0, start_step: int = 0):
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, (int, np.integer)) or (
            start_epoch < 0
        ):
            raise ValueError(f"start_epoch must be an integer ≥ 0; got {start_epoch!r}.")
        if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) or not (
            0 <= start_step < order.num_batches
        ):
            raise ValueError(
                f"start_step must be an integer in [0, {order.num_batches}) (the epoch's "
                f"batches); got {start_step!r}."
            )
        self.order = order
        self.next_epoch = int(start_epoch)
        self.start_step = int(start_step)

    @property
    def steps_per_iteration(self) -> int:
        """Batches one iteration yields."""
        return self.order.num_batches - self.start_step

    def set_epoch(self, epoch: int) -> None:
        """The next iteration yields epoch `epoch` (ignored for the rest of one epoch)."""
        if not self.start_step:
            self.next_epoch = int(epoch)

    def next_iteration(self):
        """Yields `(epoch, step, index [B])` for the steps of the next iteration."""
        epoch = self.next_epoch
        if not self.start_step:
            self.next_epoch += 1
        batches = np.asarray(self.order.epoch_batches(epoch), np.int64)
        if batches.shape != (self.order.num_batches, self.order.batch_size):
            raise ValueError(
                f"batch order returned batches of shape {batches.shape} for epoch {epoch}; "
                f"expected ({self.order.num_batches}, {self.order.batch_size})."
            )
        for step in range(self.start_step, len(batches)):
            yield epoch, step, batches[step]
