"""The two-view batch contract every contrastive model of emc2-tf trains on.

A training element holds, for a batch of B images:

- `index`: int `[B]`, each image's position in the data set, in `[0, N)`, so
  per-sample state (EMC² chains, SogCLR's `u`) can be addressed;
- `view1`, `view2`: float `[B, H, W, C]`, two independent augmentations.

It may be a dict with those keys or a tuple `(index, view1, view2)`. The
checks here turn a wrong element into one `ValueError` that names the
problem, before any graph is traced.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

INDEX_RANGE_MESSAGE = "emc2_tf: sample index out of range"
#: A finite-augmentation batch whose view numbers are outside [0, K) or equal.
VIEW_INDEX_MESSAGE = "emc2_tf: view_index out of range"
#: A batch of one image has no negatives: its loss is 0 and nothing is learnt.
BATCH_SIZE_MESSAGE = "emc2_tf: a batch of fewer than 2 images"

_EXPECTED = (
    "each element must hold the sample index and two views: a dict "
    "{'index': int [B], 'view1': float [B, H, W, C], 'view2': float [B, H, W, C]} "
    "or a tuple (index, view1, view2) (see emc2_tf.make_two_view_dataset)"
)


def as_float_images(images: tf.Tensor) -> tf.Tensor:
    """Images as float32 in [0, 1]: uint8 (0..255) scaled by 1/255, float cast.

    The one place 8-bit pixels become the float views a model sees: applied
    per gathered batch, so a uint8 table stays uint8 in memory.
    """
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    return tf.cast(images, tf.float32)


def _describe(structure: Any) -> str:
    return str(tf.nest.map_structure(lambda s: getattr(s, "shape", s), structure))


def unpack_two_view_batch(data: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Returns `(index, view1, view2)` from a batch, or raises `ValueError`."""
    if isinstance(data, dict):
        missing = [k for k in ("index", "view1", "view2") if k not in data]
        if missing:
            raise ValueError(
                f"Dataset without {', '.join(missing)}: {_EXPECTED}; got keys "
                f"{sorted(data)}."
            )
        index, view1, view2 = data["index"], data["view1"], data["view2"]
    elif isinstance(data, (tuple, list)) and len(data) == 3:
        index, view1, view2 = data
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(
        data[1], (tuple, list)
    ) and len(data[1]) == 2:
        index, (view1, view2) = data
    else:
        raise ValueError(
            f"Dataset without sample indices: {_EXPECTED}; got {_describe(data)}."
        )
    check_two_view_spec(index, view1, view2)
    return index, view1, view2


def view_index_of(data: Any) -> tf.Tensor | None:
    """The numbers of the two stored views of each image, int32 `[B, 2]`, or None.

    A batch drawn from a finite set of K stored augmentations per image
    (`make_two_view_dataset(..., finite_augmentations=K)`) carries, besides
    `index`, `view_index[b] = (k1, k2)`: view 1 of image `index[b]` is its
    stored view `k1`, view 2 its stored view `k2` (`k1 != k2`, both in
    `[0, K)`). Row `index * K + k` of the stored-view table is that view.
    Other batches (a dict without the key, or a tuple) have none.
    """
    if not isinstance(data, dict) or "view_index" not in data:
        return None
    view_index = data["view_index"]
    dtype = tf.as_dtype(view_index.dtype)
    if not dtype.is_integer or view_index.shape.rank != 2 or view_index.shape[-1] not in (2, None):
        raise ValueError(
            f"view_index must be an integer tensor [B, 2] (the two stored views of each "
            f"image); got dtype {dtype.name}, shape {view_index.shape}."
        )
    return tf.cast(view_index, tf.int32)


def check_two_view_spec(index: Any, view1: Any, view2: Any) -> None:
    """Static checks of dtypes and ranks (works on tensors and TensorSpecs)."""
    index_dtype = tf.as_dtype(index.dtype)
    if not index_dtype.is_integer:
        raise ValueError(
            f"The sample index must be an integer tensor of shape [B]; got dtype "
            f"{index_dtype.name}. {_EXPECTED}."
        )
    if index.shape.rank != 1:
        raise ValueError(
            f"The sample index must have shape [B] (rank 1, a batched dataset); "
            f"got shape {index.shape}. Batch the dataset first."
        )
    for name, view in (("view1", view1), ("view2", view2)):
        dtype = tf.as_dtype(view.dtype)
        if not dtype.is_floating:
            raise ValueError(
                f"{name} must be float images with values in [0, 1]; got dtype "
                f"{dtype.name}. Convert with tf.cast(images, tf.float32) / 255."
            )
        if view.shape.rank != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, height, width, channels]; got "
                f"shape {view.shape}."
            )
    if view1.shape[1:] != view2.shape[1:]:
        raise ValueError(
            f"view1 and view2 must have the same image shape; got {view1.shape} "
            f"and {view2.shape}."
        )


def check_dataset(dataset: tf.data.Dataset, dataset_size: int,
                  num_views: int | None = None) -> tf.data.Dataset:
    """Validates a dataset's element spec and adds run-time index range and batch
    size (≥ 2) checks.

    A static batch below 2 raises `ValueError` at once. The run-time checks run
    in the input pipeline (outside any XLA cluster, where assertions would be
    dropped) and fail with `INDEX_RANGE_MESSAGE` or
    `BATCH_SIZE_MESSAGE`, which `ContrastiveModel.fit` turns into a `ValueError`.
    """
    index_spec = unpack_two_view_batch(dataset.element_spec)[0]
    static_batch = index_spec.shape[0] if index_spec.shape.rank else None
    if static_batch is not None and static_batch < 2:
        raise ValueError(
            f"The dataset's batches hold {static_batch} image(s): a contrastive batch needs "
            "B ≥ 2 images (the negatives of each image are the others' views; with one the "
            "loss is 0 and nothing is learnt). Batch it with a batch size ≥ 2."
        )

    def check_range(*element):
        data = element[0] if len(element) == 1 else element
        index = unpack_two_view_batch(data)[0]
        checks = index_checks(index, dataset_size)
        view_index = view_index_of(data)
        if num_views and view_index is not None:
            checks += view_index_checks(view_index, num_views)
        with tf.control_dependencies(checks):
            return tf.nest.map_structure(tf.identity, element if len(element) > 1 else data)

    return dataset.map(check_range)


def index_checks(index: tf.Tensor, dataset_size: int) -> list:
    """The run-time checks of one batch's sample indices (`[B]`): B ≥ 2 and every
    index in `[0, dataset_size)`, failing with `BATCH_SIZE_MESSAGE` or
    `INDEX_RANGE_MESSAGE` (see `check_dataset`)."""
    return [
        # A partial last batch (drop_remainder=False) can hold a single image.
        tf.debugging.assert_greater_equal(tf.shape(index)[0], 2, message=BATCH_SIZE_MESSAGE),
        tf.debugging.assert_greater_equal(index, tf.cast(0, index.dtype),
                                          message=INDEX_RANGE_MESSAGE),
        tf.debugging.assert_less(index, tf.cast(dataset_size, index.dtype),
                                 message=INDEX_RANGE_MESSAGE),
    ]


def view_index_checks(view_index: tf.Tensor, num_views: int) -> list:
    """The run-time checks of a finite-augmentation batch's `view_index` `[B, 2]`:
    both views in `[0, K)` and distinct, failing with `VIEW_INDEX_MESSAGE`. In the
    input pipeline, because an XLA-compiled step drops assertions and would
    gather a wrong table row silently."""
    return [
        tf.debugging.assert_greater_equal(view_index, 0, message=VIEW_INDEX_MESSAGE),
        tf.debugging.assert_less(view_index, num_views, message=VIEW_INDEX_MESSAGE),
        tf.debugging.assert_none_equal(view_index[:, 0], view_index[:, 1],
                                       message=VIEW_INDEX_MESSAGE),
    ]
