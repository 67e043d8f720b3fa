"""The image table a model re-encodes from: where it lives, how it is checked and read.

EMC² (`EMC2Model`, to re-encode a chain's out-of-batch negative) and the
embedding cache (`CacheModel`, to encode its cache rows and re-encode its
sampled negatives) both keep the data set's images by index: N un-augmented
images, or with `finite_augmentations=K` the N·K stored views (row
`image·K + k`). One module holds what they share, so the two models accept
and refuse the same tables with the same one-line errors:

- `check_image_table`: dtype, rank, row count, byte limit and pixel values,
  then the table as stored in host memory (uint8 stays uint8, float →
  float32; an `ImageSource` is kept as it is);
- `image_table`: float images as uint8 when that is lossless (a quarter of
  the memory);
- `gather_images`: rows by index, gathered in host memory, as float32 in [0, 1];
- `_ImageTable`: the holder that keeps the table out of Keras' tracking.

Only the byte-limit refusal differs between the models: it says why the
method needs the table and what else it can do (`TableOwner`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf

from emc2_tf.checks import check_images
from emc2_tf.data.batch import as_float_images
from emc2_tf.data.image_source import ImageSource

#: Largest in-memory image table accepted by default (bytes as stored:
#: 4 per value for a float32 table, 1 for a uint8 table).
DEFAULT_MAX_IMAGE_TABLE_BYTES = 2 * 1024**3

#: Where the image table lives: host memory. A step gathers its B rows there
#: and copies only those (uint8: a quarter of float32) to the accelerator, so
#: the table never takes accelerator memory and is never copied whole.
IMAGE_TABLE_DEVICE = "/CPU:0"


class _ImageTable:
    """Holds the un-augmented images out of Keras' and tf.train's tracking.

    The table is data, not model state: it must not be written into weights
    files, checkpoints or exported SavedModels. `images` is an in-memory
    tensor (host memory), an `ImageSource` read by index, or None.
    """

    def __init__(self, images: tf.Tensor | ImageSource | None):
        self.images = images


@dataclasses.dataclass(frozen=True)
class TableOwner:
    """The model a table is checked for, as its byte-limit refusal names it.

    Attributes:
        reads: what the model does with the table, the reason it must fit in
            host memory (a clause: "EMC² re-encodes ...").
        instead: another way to train without the table, or "" when the
            model always needs it.
    """

    reads: str
    instead: str = ""


def _table_size_message(what: str, rows: int, dataset_size: int,
                        finite_augmentations: int | None) -> str | None:
    """The one-line refusal of a table of `rows` rows, or None when the size fits."""
    if finite_augmentations is None:
        if rows == dataset_size:
            return None
        return (f"{what} holds {rows} images but dataset_size={dataset_size}; they must "
                "match (one image per sample index).")
    expected = dataset_size * finite_augmentations
    if rows == expected:
        return None
    return (f"{what} holds {rows} rows but finite_augmentations={finite_augmentations} needs "
            f"the stored-view table of dataset_size·K = {dataset_size}·{finite_augmentations} "
            f"= {expected} rows (row = image·K + k, the rows the batches' view_index "
            f"address), not the {dataset_size} un-augmented images.")


def _table_bytes_message(table_bytes: int, stored: tf.DType, max_bytes: int,
                         owner: TableOwner) -> str:
    """The one-line refusal of an in-memory table of `table_bytes` above `max_bytes`."""
    remedies = []
    if stored != tf.uint8:
        remedies.append("pass uint8 images (emc2_tf.image_table(images): a quarter of the size)")
    remedies.append("pass an ImageSource (read by index, nothing held)")
    if owner.instead:
        remedies.append(owner.instead)
    return (f"images needs {table_bytes} bytes ({table_bytes / 1024**3:.2f} GiB) in host "
            f"memory as {stored.name}, above max_image_table_bytes={max_bytes} "
            f"({max_bytes / 1024**3:.2f} GiB): {owner.reads}, so the table must fit in host "
            f"memory; {', '.join(remedies)}, or raise max_image_table_bytes if the host has room.")


def check_image_table(images: Any, dataset_size: int, max_bytes: int,
                      finite_augmentations: int | None = None, *,
                      owner: TableOwner) -> tf.Tensor | ImageSource | None:
    """The table as stored, in host memory, or a one-line `ValueError` naming `images`.

    Accepted: None (no table); an `ImageSource` of the right row count, kept
    as it is (read by index, no byte limit: nothing is held); an array or
    tensor `[rows, H, W, C]`, uint8 (0..255, kept as uint8) or float with
    finite values in [0, 1] (stored as float32), of at most `max_bytes` as
    stored. `rows` is N = `dataset_size` (one un-augmented image per sample
    index), or with `finite_augmentations=K` the N·K stored views (row =
    image·K + k). The cheap checks (dtype, rank, rows, bytes) run before the
    pass over the pixels, so an oversized table is refused without reading it.
    """
    if images is None:
        return None
    if isinstance(images, ImageSource):
        message = _table_size_message(f"images (the source {images.name!r})",
                                      images.num_images, dataset_size, finite_augmentations)
        if message:
            raise ValueError(message)
        return images
    if not hasattr(images, "dtype"):
        images = np.asarray(images)
    dtype = tf.as_dtype(images.dtype)
    if not (dtype.is_floating or dtype == tf.uint8):
        raise ValueError(
            f"images must be float with values in [0, 1] (like the views), or uint8 "
            f"(0..255, converted per gathered row); got dtype {dtype.name}."
        )
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(
            f"images must have rank 4 [N, height, width, channels]; got shape {shape}."
        )
    message = _table_size_message("images", shape[0], dataset_size, finite_augmentations)
    if message:
        raise ValueError(message)
    stored = tf.uint8 if dtype == tf.uint8 else tf.float32
    table_bytes = int(np.prod(shape)) * stored.size
    if table_bytes > max_bytes:
        raise ValueError(_table_bytes_message(table_bytes, stored, max_bytes, owner))
    # NaN/inf (issue 13) or float pixels outside [0, 1] (issue 19: 0..255 floats)
    # would re-encode negatives unlike the views they compete with.
    check_images(images, "images (the model's image table)")
    with tf.device(IMAGE_TABLE_DEVICE):
        return tf.convert_to_tensor(images, dtype=stored)


def image_table(images: Any) -> Any:
    """`images` as EMC²'s image table: uint8 when the float images are exactly
    `k / 255` (every 8-bit data set), a quarter of the memory with identical
    re-encodings; otherwise the float images unchanged. An `ImageSource`
    (e.g. a folder) is returned as it is: the model reads it by index.

    uint8 images are returned as they are (0..255; the model scales each
    gathered row by 1/255). Float images must be finite and in [0, 1], else
    a one-line `ValueError` naming `images` and the range found
    (`emc2_tf.checks.check_images`): 0..255 floats must be divided by 255.
    """
    if isinstance(images, ImageSource):
        return images
    images = np.asarray(images)
    check_images(images, "images")
    if images.dtype == np.uint8 or not np.issubdtype(images.dtype, np.floating):
        return images
    quantised = np.rint(np.asarray(images, np.float32) * 255.0)
    if quantised.min() < 0 or quantised.max() > 255:
        return images
    as_uint8 = quantised.astype(np.uint8)
    if np.array_equal(as_uint8.astype(np.float32) / np.float32(255.0),
                      np.asarray(images, np.float32)):
        return as_uint8
    return images


def gather_images(table: tf.Tensor | ImageSource, index: tf.Tensor) -> tf.Tensor:
    """Rows `index` of the image table as float32 in [0, 1].

    The gather (or the source's read) runs in host memory; only the B rows
    travel, still as uint8 when the table is uint8, and are converted after.
    A source reads with `tf.numpy_function` or `tf.data` ops: not inside XLA.
    """
    if isinstance(table, ImageSource):
        with tf.device(IMAGE_TABLE_DEVICE):
            rows = table.read(index)
        return table.to_float(rows)
    with tf.device(table.device or IMAGE_TABLE_DEVICE):
        rows = tf.gather(table, index)
    return as_float_images(rows)
