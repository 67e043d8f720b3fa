"""Argument checks shared across modules: one message format for every option."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def finite_number(value: Any, name: str, strictly_positive: bool = True) -> float:
    """`value` as a float, or a one-line `ValueError` naming `name` unless it is
    finite and > 0 (`strictly_positive`) or ≥ 0."""
    bound = "> 0" if strictly_positive else "≥ 0"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}.") from None
    if not math.isfinite(number) or number < 0 or (strictly_positive and number == 0):
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}.")
    return number


def non_finite_images(images: Any, chunk_bytes: int = 64 * 1024**2) -> tuple[int, int | None]:
    """`(count, first index)` of the images (along axis 0) holding NaN or inf.

    Works on NumPy arrays and tensors, chunk by chunk (no full-size temporary);
    integer images are finite by construction: `(0, None)`.
    """
    if not hasattr(images, "dtype"):
        images = np.asarray(images)
    dtype = getattr(images.dtype, "as_numpy_dtype", images.dtype)  # a tf.DType, or NumPy's
    if not np.issubdtype(np.dtype(dtype), np.floating):
        return 0, None
    total = int(images.shape[0]) if len(images.shape) else 0
    per_image = max(1, int(np.prod(images.shape[1:])) * 4) if total else 1
    chunk = max(1, chunk_bytes // per_image)
    count, first = 0, None
    for start in range(0, total, chunk):
        block = np.asarray(images[start : start + chunk])
        bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if bad.any():
            count += int(bad.sum())
            if first is None:
                first = start + int(np.argmax(bad))
    return count, first


def check_finite_images(images: Any, name: str) -> None:
    """A one-line `ValueError` naming `name` and the first bad image unless every
    pixel is finite (NaN or inf images silently wreck training: issue 13)."""
    count, first = non_finite_images(images)
    if count:
        raise ValueError(
            f"{name}: {count} image(s) hold NaN or inf pixel values (the first: index "
            f"{first}); every pixel must be a finite value in [0, 1]: fix or drop them."
        )


#: The pixel range every float image must lie in (training, image tables, serving).
IMAGE_RANGE = (0.0, 1.0)


def check_images(images: Any, argument: str) -> None:
    """A one-line `ValueError` naming `argument` unless `images` hold valid pixels.

    The one rule for every place images enter (`make_two_view_dataset`,
    `from_arrays`, EMC²'s image table; the serving signature applies it per
    image in the graph: `emc2_tf.export`):

    - uint8: accepted as is (0..255; the caller scales by 1/255, per batch);
    - other integer types: their values must lie in 0..255 (8-bit images);
    - float: every pixel finite and in [0, 1]. Float images in 0..255 (an
      unscaled 8-bit data set) trained silently to a worse encoder before
      (issue 19: 1-NN 0.875 against 0.94-0.96 after one epoch).

    Cheap on large arrays: NumPy's min and max (two passes, no float copy;
    NaN propagates through both, so finite bounds prove every pixel finite),
    and the chunked NaN/inf count only when a bound is not finite.
    """
    if not hasattr(images, "dtype"):
        images = np.asarray(images)
    dtype = np.dtype(getattr(images.dtype, "as_numpy_dtype", images.dtype))
    if dtype == np.uint8:
        return
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"{argument}: images must be uint8 (0..255) or float in [0, 1]; got "
                         f"dtype {dtype.name}.")
    values = np.asarray(images)
    if not values.size:
        return
    low, high = values.min(), values.max()
    if np.issubdtype(dtype, np.integer):
        if low < 0 or high > 255:
            raise ValueError(f"{argument}: integer images must hold 8-bit values 0..255 (scaled "
                             f"by 1/255); got range [{low}, {high}]. Pass float images in [0, 1] "
                             "instead.")
        return
    if not (np.isfinite(low) and np.isfinite(high)):
        check_finite_images(values, argument)
    if low < IMAGE_RANGE[0] or high > IMAGE_RANGE[1]:
        raise ValueError(f"{argument}: float images must have values in [0, 1]; got range "
                         f"[{low:.4g}, {high:.4g}]. For 0..255 pixels divide by 255 (or pass "
                         "them as uint8, scaled by 1/255 per batch).")


def valid_image_mask(images: Any) -> Any:
    """`tf.bool [B]`: whether each image of `[B, H, W, C]` obeys `check_images`' float rule.

    In the graph (the serving signature): every pixel finite and in [0, 1].
    NaN fails both comparisons, so it needs no separate test.
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    inside = (images >= IMAGE_RANGE[0]) & (images <= IMAGE_RANGE[1])
    return tf.reduce_all(tf.reshape(inside, [tf.shape(images)[0], -1]), axis=1)
