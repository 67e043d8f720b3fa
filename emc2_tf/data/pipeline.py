"""The index-carrying two-view `tf.data` pipeline.

Each element is a batch `{'index': int32 [B], 'view1': [B, H, W, C],
'view2': [B, H, W, C]}`: the sample indices address the per-sample state of
EMC² chains and SogCLR's `u`; the two views are independent augmentations
drawn inside the graph (`SimCLRAugment`). One epoch visits every image at
most once (uniform shuffling without replacement), so every batch is a
uniform draw from the data set: the property the EMC² in-batch proposal
relies on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from emc2_tf.data.augment import AugmentConfig, SimCLRAugment


def _ordered_indices(batch_order: Any, batch_size: int) -> tf.data.Dataset:
    """Index batches drawn from `batch_order.epoch_batches()` on every iteration."""
    if getattr(batch_order, "batch_size", None) != batch_size:
        raise ValueError(
            f"batch_order has batch_size={getattr(batch_order, 'batch_size', None)!r} but the "
            f"dataset was asked for batch_size={batch_size}; they must match."
        )

    def generate():
        yield from np.asarray(batch_order.epoch_batches(), np.int64)

    indices = tf.data.Dataset.from_generator(
        generate, output_signature=tf.TensorSpec([batch_size], tf.int64)
    )
    return indices.apply(tf.data.experimental.assert_cardinality(batch_order.num_batches))


def make_two_view_dataset(
    images: np.ndarray,
    batch_size: int,
    augment: AugmentConfig | None = AugmentConfig(),
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    batch_order: Any = None,
) -> tf.data.Dataset:
    """Batches of `{'index', 'view1', 'view2'}` over an in-memory image array.

    Args:
        images: float32 `[N, H, W, C]` in [0, 1] (an `ImageDataset`'s
            `train_images`).
        batch_size: B ≥ 2 images per batch (2B views).
        augment: augmentation strengths, or None for identical, un-augmented
            views (for tests with a frozen encoder).
        seed: seeds the shuffle and the augmentations; re-iterating the
            dataset (the next epoch) draws a new order and new views. As
            everywhere in tf.data, the global seed (`keras.utils.set_random_seed`,
            which the trainer calls first) also enters these draws.
        shuffle: shuffle every epoch.
        drop_remainder: drop the last partial batch (keeps shapes static).
        batch_order: None for uniform shuffling, or an object choosing each
            epoch's batches (e.g. `emc2_tf.SpectralBatchSelection`): it has
            `batch_size`, `num_batches` and `epoch_batches()`, called once per
            iteration of the dataset (once per epoch), returning
            `[num_batches, B]` sample indices. `shuffle` and
            `drop_remainder` are then the order's business.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, H, W, C]; got {images.shape}.")
    num_images = images.shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
        raise ValueError(f"batch_size must be an integer ≥ 2; got {batch_size!r}.")
    if batch_size > num_images:
        raise ValueError(
            f"batch_size={batch_size} is larger than the data set ({num_images} images)."
        )
    table = tf.constant(images, dtype=tf.float32)
    if batch_order is not None:
        indices = _ordered_indices(batch_order, batch_size)
    else:
        indices = tf.data.Dataset.range(num_images)
        if shuffle:
            indices = indices.shuffle(num_images, seed=seed, reshuffle_each_iteration=True)
        indices = indices.batch(batch_size, drop_remainder=drop_remainder)
    augmenter = None if augment is None else SimCLRAugment(augment)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(4)

    def to_views(index, seed_pair):
        batch = tf.gather(table, index)
        if augmenter is None:
            view1 = view2 = batch
        else:
            view1 = augmenter(batch, seed=seed_pair[:2])
            view2 = augmenter(batch, seed=seed_pair[2:])
        return {"index": tf.cast(index, tf.int32), "view1": view1, "view2": view2}

    dataset = tf.data.Dataset.zip(indices, seeds).map(
        to_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    options = tf.data.Options()
    # Under MultiWorkerMirroredStrategy every worker builds the same pipeline
    # (same seeds) and keeps its part of each global batch: sharding by data,
    # not by file (the images are in memory).
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
