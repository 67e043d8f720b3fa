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

import numpy as np
import tensorflow as tf

from emc2_tf.data.augment import AugmentConfig, SimCLRAugment


def make_two_view_dataset(
    images: np.ndarray,
    batch_size: int,
    augment: AugmentConfig | None = AugmentConfig(),
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """Batches of `{'index', 'view1', 'view2'}` over an in-memory image array.

    Args:
        images: float32 `[N, H, W, C]` in [0, 1] (an `ImageDataset`'s
            `train_images`).
        batch_size: B ≥ 2 images per batch (2B views).
        augment: augmentation strengths, or None for identical, un-augmented
            views (for tests with a frozen encoder).
        seed: seeds the shuffle and the augmentations; re-iterating the
            dataset (the next epoch) draws a new order and new views.
        shuffle: shuffle every epoch.
        drop_remainder: drop the last partial batch (keeps shapes static).
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
    return dataset.prefetch(tf.data.AUTOTUNE)
