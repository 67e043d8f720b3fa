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
