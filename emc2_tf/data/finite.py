"""Finite augmentations: K views of each image, drawn once and stored as uint8.

The EMC² paper's convergence experiment (Yau et al., ICML 2024, official
`--finite_aug --n_aug K`) replaces the infinite family of random
augmentations by a fixed set: each of the N images gets K augmented views,
drawn once, and training draws every step's two views among them. The global
contrastive loss over all N·K views and its exact gradient are then
computable (`emc2_tf.GlobalObjective`), and so is the error of a method's
gradient estimate.

The views live in one uint8 table of N·K rows, row `image · K + k` being view
`k` of `image` (1 byte per pixel: a quarter of float32; STL-10's 105k images
at 96 px and K = 2 take 5.8 GB, so this is an option for small N). A batch
carries `view_index` `[B, 2]`, the two distinct stored views of each image
(`emc2_tf.data.batch.view_index_of`), drawn as the official
`IndexedFiniteAugmentedDataset` draws them: a uniform ordered pair of
distinct views, `np.random.choice(K, 2, replace=False)` (ours is a pure
function of `(seed, epoch, step)` instead of NumPy's global state, so a
resumed run and every worker see the same pairs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from emc2_tf.data.augment import AugmentConfig, SimCLRAugment
from emc2_tf.data.image_source import ArraySource, as_source


def check_num_views(num_views: Any, argument: str = "finite_augmentations",
                    allow_none: bool = False) -> int | None:
    """K as an int ≥ 2, or a one-line `ValueError` naming `argument`.

    The one check of a number of stored views per image (the models'
    `finite_augmentations`, the datasets', `FiniteViews`'). With `allow_none`,
    None (fresh augmentations every step: no stored views) is accepted and
    returned as is, and the refusal names it among the accepted values.
    A bool or a float such as 2.0 is refused: K counts table rows per image.
    """
    if allow_none and num_views is None:
        return None
    if isinstance(num_views, bool) or not isinstance(num_views, (int, np.integer)) or num_views < 2:
        accepted = ("None (fresh augmentations every step) or an integer ≥ 2" if allow_none
                    else "an integer ≥ 2")
        raise ValueError(f"{argument} must be {accepted} (K stored views per image, two of "
                         f"them per step); got {num_views!r}.")
    return int(num_views)


class FiniteViews:
    """K stored views of each of N images, as one uint8 table of N·K rows.

    Attributes:
        table: uint8 `[N·K, H, W, C]`; row `image · K + k` is view `k` of `image`.
        num_images: N.
        num_views: K.
        labels: the images' labels `[N]`, or None.
        source: the table as an `ArraySource` of N·K images (read by row).
    """

    def __init__(self, table: np.ndarray, num_views: int, labels: Any = None,
                 name: str = "finite_views"):
        self.num_views = check_num_views(num_views, "num_views")
        table = np.asarray(table)
        if table.dtype != np.uint8 or table.ndim != 4 or len(table) % self.num_views:
            raise ValueError(
                f"table must be uint8 [N·K, H, W, C] with K={self.num_views} rows per image; "
                f"got {table.dtype} {table.shape}.")
        self.table = table
        self.num_images = len(table) // self.num_views
        self.labels = None if labels is None else np.asarray(labels)
        self.name = name
        self.source = ArraySource(table, name=f"{name} (K={self.num_views})")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.table.shape[1:])

    @property
    def num_rows(self) -> int:
        """N·K."""
        return len(self.table)

    def rows(self, index: Any, view_index: Any) -> Any:
        """Table rows `index · K + view_index` (NumPy or tensors)."""
        return index * self.num_views + view_index

    def view_pairs(self, seed: int, epoch: int, step: int, batch_size: int) -> np.ndarray:
        """The step's `view_index`, int32 `[B, 2]`: per image a uniform ordered
        pair of distinct views, a pure function of `(seed, epoch, step)`."""
        rng = np.random.default_rng([int(seed), int(epoch), int(step), 2024])
        first = rng.integers(self.num_views, size=batch_size)
        second = (first + 1 + rng.integers(self.num_views - 1, size=batch_size)) % self.num_views
        return np.stack([first, second], axis=1).astype(np.int32)

    def __repr__(self) -> str:
        return (f"FiniteViews({self.name!r}, N={self.num_images}, K={self.num_views}, "
                f"image_shape={self.image_shape})")


def finite_views(
    images: Any,
    num_views: int,
    augment: AugmentConfig | None = AugmentConfig(),
    seed: int = 0,
    labels: Any = None,
    chunk_size: int = 256,
) -> FiniteViews:
    """Draws K augmented views of every image once and stores them as uint8.

    Args:
        images: an `ImageSource` or an array `[N, H, W, C]` (as
            `make_two_view_dataset` takes), read in chunks of `chunk_size`.
        num_views: K ≥ 2 views per image (the paper: 2).
        augment: the augmentation strengths (`SimCLRAugment`); None stores
            K copies of the un-augmented image.
        seed: view `k` of the chunk starting at image `i` uses the seeds
            `SeedSequence([seed, k, i])`: the table is a function of `seed`.
        labels: kept as `FiniteViews.labels` (default: the source's).

    Each view is rounded to the nearest of the 256 uint8 levels.
    """
    num_views = check_num_views(num_views, "num_views")
    source = as_source(images, "images")
    augmenter = None if augment is None else SimCLRAugment(augment)
    num_images = source.num_images
    table = np.empty((num_images * num_views, *source.image_shape), np.uint8)
    for start in range(0, num_images, chunk_size):
        index = tf.range(start, min(start + chunk_size, num_images), dtype=tf.int64)
        batch = source.to_float(source.read(index))
        for k in range(num_views):
            seeds = np.random.SeedSequence([int(seed), k, start]).generate_state(2)
            view = batch if augmenter is None else augmenter(batch, seed=seeds.astype(np.int64))
            pixels = np.rint(np.clip(np.asarray(view), 0.0, 1.0) * 255.0).astype(np.uint8)
            table[index.numpy() * num_views + k] = pixels
    if labels is None:
        labels = source.labels
    return FiniteViews(table, num_views, labels=labels, name=source.name)


def as_finite_views(images: Any, finite_augmentations: Any, augment: AugmentConfig | None,
                    seed: int) -> FiniteViews | None:
    """The `FiniteViews` a dataset draws from: `images` itself when it is one,
    `finite_views(images, K, augment, seed)` when `finite_augmentations=K`, else None."""
    if isinstance(images, FiniteViews):
        if finite_augmentations not in (None, images.num_views):
            raise ValueError(
                f"finite_augmentations={finite_augmentations!r} but the FiniteViews given hold "
                f"K={images.num_views} views per image; pass None or {images.num_views}.")
        return images
    num_views = check_num_views(finite_augmentations, allow_none=True)
    if num_views is None:
        return None
    return finite_views(images, num_views, augment, seed)

