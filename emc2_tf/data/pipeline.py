"""The index-carrying two-view `tf.data` pipeline.

Each element is a batch `{'index': int32 [B], 'view1': [B, H, W, C],
'view2': [B, H, W, C]}`: the sample indices address the per-sample state of
EMC² chains and SogCLR's `u`; the two views are independent augmentations
drawn inside the graph (`SimCLRAugment`).

The images come from an `ImageSource` (an array is wrapped in an
`ArraySource`, never embedded in the graph): each batch's B images are read
by index inside `tf.data` (`source.read`, in parallel, prefetched), in their
stored dtype, and become float only then (`source.to_float`), right before
augmentation. So host memory holds the data as stored (uint8 for 8-bit
images; a folder's paths only), plus a few batches.

Everything random is a pure function of `(seed, epoch, step)`: the batch
order's `epoch_batches(epoch)` (uniform shuffling without replacement by
default, so every batch is a uniform draw from the data set: the property
the EMC² in-batch proposal relies on) and the augmentation seeds of each
step. A run resumed from a checkpoint at epoch `e`, step `k`
(`start_epoch=e, start_step=k`) therefore sees exactly the batches and views
the uninterrupted run saw, and every worker of a cluster builds the same
stream of indices. Under `MultiWorkerMirroredStrategy`, `ContrastiveModel.fit`
builds each worker's pipeline with `worker_dataset`: the worker reads and
augments only its own rows of every global batch.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tensorflow as tf

from emc2_tf.data.augment import AugmentConfig, SimCLRAugment
from emc2_tf.data.batch import index_checks
from emc2_tf.data.finite import FiniteViews, as_finite_views
from emc2_tf.data.image_source import ImageSource, as_source
from emc2_tf.data.order import EpochSchedule, RandomBatchOrder


def step_seeds(seed: int, epoch: int, step: int) -> np.ndarray:
    """The step's two augmentation seeds, int64 `[4]` (view 1: `[:2]`, view 2: `[2:]`)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(step)]).generate_state(4)
    return state.astype(np.int64)


def make_two_view_dataset(
    images: Any,
    batch_size: int,
    augment: AugmentConfig | None = AugmentConfig(),
    seed: int = 0,
    shuffle: bool = True,
    batch_order: Any = None,
    start_epoch: int = 0,
    start_step: int = 0,
    finite_augmentations: int | None = None,
) -> tf.data.Dataset:
    """Batches of `{'index', 'view1', 'view2'}` over an image source or array.

    Args:
        images: an `ImageSource` (`emc2_tf.ImageFolderSource`,
            `emc2_tf.ArraySource`, ...) or an in-memory array `[N, H, W, C]`
            (`[N, H, W]`: one channel), wrapped in an `ArraySource` without a
            copy: float in [0, 1] (e.g. digits' k/16) or uint8 0..255, kept
            as uint8 and scaled by 1/255 per batch. Anything else is refused
            in one line (`emc2_tf.checks.check_images`): float values outside
            [0, 1] (e.g. unscaled 0..255 pixels: divide by 255), NaN or inf.
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
        finite_augmentations: K ≥ 2 for the paper's finite-augmentation
            setting: K views of every image are drawn once (`augment`,
            `seed`) and stored as uint8 (`emc2_tf.finite_views`), and each
            step's two views are two distinct stored views of the image; the
            batches then also carry `view_index` `[B, 2]` (which stored
            views). `images` may also be a `FiniteViews` table itself (e.g.
            one shared by several runs), then `augment` is not used.

    The returned dataset carries `epoch_schedule` (which epoch the next
    iteration yields), `finite_views` (the stored views, or None),
    `image_source` (whose `read_error` names a file that
    fails to read) and `worker_dataset` (`ContrastiveModel.fit` uses it under
    `MultiWorkerMirroredStrategy`). A transformed dataset (e.g. `.take(n)`)
    loses them: it still trains, but every worker then reads every image.
    """
    views = as_finite_views(images, finite_augmentations, augment, int(seed))
    source = as_source(images, "images") if views is None else views.source
    num_images = source.num_images if views is None else views.num_images
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
    augmenter = None if augment is None or views is not None else SimCLRAugment(augment)
    steps = _index_stream(schedule, int(seed), views)
    dataset = steps.map(_views_of(source, augmenter, views=views),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    # A dataset handed to MultiWorkerMirroredStrategy some other way than through
    # ContrastiveModel.fit (which uses `worker_dataset`): every worker builds the
    # same stream (same seeds) and keeps its part of each global batch, sharding
    # by data, not by file.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
    dataset.epoch_schedule = schedule  # ContrastiveModel.fit keeps it in step with Keras
    dataset.image_source = source
    dataset.finite_views = views
    dataset.worker_dataset = functools.partial(
        _worker_dataset, source, schedule, augmenter, int(seed), views)
    return dataset


def _index_stream(schedule: EpochSchedule, seed: int,
                  views: FiniteViews | None = None) -> tf.data.Dataset:
    """`(index int64 [B], seeds int64 [4])` per step of the schedule's next
    iteration; with finite views `(index, view_index int32 [B, 2])`."""
    batch_size = schedule.order.batch_size

    def generate():
        for epoch, step, index in schedule.next_iteration():
            if views is None:
                yield index, step_seeds(seed, epoch, step)
            else:
                yield index, views.view_pairs(seed, epoch, step, batch_size)

    second = (tf.TensorSpec([4], tf.int64) if views is None
              else tf.TensorSpec([batch_size, 2], tf.int32))
    return tf.data.Dataset.from_generator(
        generate, output_signature=(tf.TensorSpec([batch_size], tf.int64), second),
    ).apply(tf.data.experimental.assert_cardinality(schedule.steps_per_iteration))


def _views_of(source: ImageSource, augmenter: SimCLRAugment | None, rows=None,
              views: FiniteViews | None = None):
    """The map function `(index [b], seeds [4]) -> {'index', 'view1', 'view2'}`:
    reads images `index`, converts them to float, augments them.

    `rows=(first, total)`: `index` is rows `first …` of a global batch of
    `total`; the views are those rows of the whole batch's views. With
    finite views the function takes `(index [b], view_index [b, 2])` and
    reads the two stored views (table rows `index · K + view_index`).
    """
    if views is not None:
        return _stored_views_of(views)

    def to_views(index, seeds):
        batch = source.to_float(source.read(index))
        if augmenter is None:
            view1 = view2 = batch
        else:
            view1 = augmenter(batch, seed=seeds[:2], rows=rows)
            view2 = augmenter(batch, seed=seeds[2:], rows=rows)
        return {"index": tf.cast(index, tf.int32), "view1": view1, "view2": view2}

    return to_views


def _stored_views_of(views: FiniteViews):
    """`(index [b], view_index [b, 2]) -> {'index', 'view1', 'view2', 'view_index'}`."""
    source = views.source

    def to_views(index, view_index):
        rows = views.rows(index[:, None], tf.cast(view_index, index.dtype))
        return {"index": tf.cast(index, tf.int32),
                "view1": source.to_float(source.read(rows[:, 0])),
                "view2": source.to_float(source.read(rows[:, 1])),
                "view_index": tf.cast(view_index, tf.int32)}

    return to_views


def worker_share(global_batch: int, num_workers: int, worker: int) -> tuple[int, int]:
    """`(first, stop)`: the rows of each global batch worker `worker` of
    `num_workers` trains on, its replicas' consecutive slices.

    Replica `r` (worker-major: `r = worker · L + l`, L replicas per worker)
    trains on rows `r·b … r·b + b − 1`, `b = B / (W·L)`, as
    `tf.distribute` splits a global batch, so gathering every replica's
    rows in replica order gives back the global batch.
    """
    if global_batch % num_workers:
        raise ValueError(f"The global batch size B={global_batch} is not divisible by the "
                         f"{num_workers} workers; use a multiple of {num_workers}.")
    share = global_batch // num_workers
    return worker * share, (worker + 1) * share


def _worker_dataset(source: ImageSource, schedule: EpochSchedule,
                    augmenter: SimCLRAugment | None, seed: int,
                    views: FiniteViews | None,
                    input_context: tf.distribute.InputContext,
                    dataset_size: int | None = None) -> tf.data.Dataset:
    """This worker's pipeline for `strategy.distribute_datasets_from_function`:
    per-replica batches of its own rows of every global batch.

    The worker builds the same index stream as every other, checks the whole
    batch's indices (`index_checks`, when `dataset_size` is given), cuts out
    its rows (`worker_share`) and reads and augments only those, with the
    whole batch's augmentation draws: the same views on the same replicas as
    a dataset that every worker reads in full.
    """
    global_batch = schedule.order.batch_size
    replicas = input_context.num_replicas_in_sync
    workers = input_context.num_input_pipelines
    if global_batch % replicas:
        raise ValueError(f"The global batch size B={global_batch} is not divisible by the "
                         f"{replicas} replicas; use a multiple of {replicas}.")
    first, stop = worker_share(global_batch, workers, input_context.input_pipeline_id)
    to_views = _views_of(source, augmenter, rows=(first, global_batch), views=views)

    def own_rows(index, seeds):  # finite views: `seeds` is the view_index [B, 2]
        checks = [] if dataset_size is None else index_checks(index, dataset_size)
        with tf.control_dependencies(checks):
            return tf.identity(index[first:stop]), (seeds if views is None
                                                    else seeds[first:stop])

    dataset = (_index_stream(schedule, seed, views).map(own_rows)
               .map(to_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
    per_replica = global_batch // replicas
    if stop - first != per_replica:  # several replicas on this worker: one batch each
        dataset = dataset.rebatch(per_replica)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
