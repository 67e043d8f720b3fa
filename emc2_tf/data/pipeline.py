"""The index-carrying two-view `tf.data` pipeline.

Each element is a batch `{'index': int32 [B], 'view1': [B, H, W, C],
'view2': [B, H, W, C]}`: the sample indices address the per-sample state of
EMC² chains and SogCLR's `u`; the two views are independent augmentations
drawn inside the graph (`SimCLRAugment`).

Everything random is a pure function of `(seed, epoch, step)`: the batch
order's `epoch_batches(epoch)` (uniform shuffling without replacement by
default, so every batch is a uniform draw from the data set: the property
the EMC² in-batch proposal relies on) and the augmentation seeds of each
step. A run resumed from a checkpoint at epoch `e`, step `k`
(`start_epoch=e, start_step=k`) therefore sees exactly the batches and views
the uninterrupted run saw, and every worker of a cluster builds the same
stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from emc2_tf.checks import check_images
from emc2_tf.data.augment import AugmentConfig, SimCLRAugment
from emc2_tf.data.batch import as_float_images
from emc2_tf.data.order import EpochSchedule, RandomBatchOrder


def step_seeds(seed: int, epoch: int, step: int) -> np.ndarray:
    """The step's two augmentation seeds, int64 `[4]` (view 1: `[:2]`, view 2: `[2:]`)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(step)]).generate_state(4)
    return state.astype(np.int64)


def make_two_view_dataset(
    images: np.ndarray,
    batch_size: int,
    augment: AugmentConfig | None = AugmentConfig(),
    seed: int = 0,
    shuffle: bool = True,
    batch_order: Any = None,
    start_epoch: int = 0,
    start_step: int = 0,
) -> tf.data.Dataset:
    """Batches of `{'index', 'view1', 'view2'}` over an in-memory image array.

    Args:
        images: `[N, H, W, C]`, float in [0, 1] (an `ImageDataset`'s
            `train_images`) or uint8 0..255, kept as uint8 and scaled by
            1/255 per batch. Anything else is refused in one line
            (`emc2_tf.checks.check_images`): float values outside [0, 1]
            (e.g. unscaled 0..255 pixels: divide by 255), NaN or inf.
        batch_size: B ≥ 2 images per batch (2B views); the `N mod B` images
            left over sit out each epoch (static shapes).
        augment: augmentation strengths, or None for identical, un-augmented
            views (for tests with a frozen encoder).
        seed: seeds the order and the augmentations; each iteration of the
            dataset (the next epoch) draws a new order and new views.
        shuffle: shuffle every epoch (ignored with a `batch_order`).
        batch_order: None for uniform shuffling (`RandomBatchOrder`), or an
            object choosing each epoch's batches (e.g.
            `emc2_tf.SpectralBatchSelection`): it has `batch_size`,
            `num_batches` and `epoch_batches(epoch) -> [num_batches, B]`
            sample indices.
        start_epoch: the epoch the first iteration yields.
        start_step: > 0 makes the dataset the rest of epoch `start_epoch`
            from that step (resuming mid-epoch; see `EpochSchedule`).
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, H, W, C]; got {images.shape}.")
    # NaN/inf (issue 13) and float pixels outside [0, 1] (issue 19) silently wreck training.
    check_images(images, "images")
    if images.dtype != np.uint8 and np.issubdtype(images.dtype, np.integer):
        images = images.astype(np.uint8)  # 0..255, checked
    num_images = images.shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
        raise ValueError(f"batch_size must be an integer ≥ 2; got {batch_size!r}.")
    if batch_size > num_images:
        raise ValueError(
            f"batch_size={batch_size} is larger than the data set ({num_images} images)."
        )
    if batch_order is None:
        batch_order = RandomBatchOrder(num_images, batch_size, seed=seed, shuffle=shuffle)
    elif getattr(batch_order, "batch_size", None) != batch_size:
        raise ValueError(
            f"batch_order has batch_size={getattr(batch_order, 'batch_size', None)!r} but the "
            f"dataset was asked for batch_size={batch_size}; they must match."
        )
    schedule = EpochSchedule(batch_order, start_epoch, start_step)
    seed = int(seed)

    def generate():
        for epoch, step, index in schedule.next_iteration():
            yield index, step_seeds(seed, epoch, step)

    steps = tf.data.Dataset.from_generator(
        generate,
        output_signature=(
            tf.TensorSpec([batch_size], tf.int64),
            tf.TensorSpec([4], tf.int64),
        ),
    ).apply(tf.data.experimental.assert_cardinality(schedule.steps_per_iteration))
    table = tf.constant(images, dtype=tf.uint8 if images.dtype == np.uint8 else tf.float32)
    augmenter = None if augment is None else SimCLRAugment(augment)

    def to_views(index, seeds):
        batch = as_float_images(tf.gather(table, index))
        if augmenter is None:
            view1 = view2 = batch
        else:
            view1 = augmenter(batch, seed=seeds[:2])
            view2 = augmenter(batch, seed=seeds[2:])
        return {"index": tf.cast(index, tf.int32), "view1": view1, "view2": view2}

    dataset = steps.map(to_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    # Under MultiWorkerMirroredStrategy every worker builds the same stream
    # (same seeds) and keeps its part of each global batch: sharding by data,
    # not by file (the images are in memory).
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
    dataset.epoch_schedule = schedule  # ContrastiveModel.fit keeps it in step with Keras
    return dataset
