"""Image sources: image i by sample index, in its stored dtype, read per batch.

A training source holds N images and hands out any batch of them by sample
index, un-augmented, in the dtype they are stored in (uint8 for image files
and 8-bit arrays, float in [0, 1] for float arrays). The input pipeline reads
each batch inside `tf.data` (`read`) and converts it to float only then
(`to_float`), so host memory never holds the data set as float32, and a
source that reads files (`emc2_tf.data.folder.ImageFolderSource`) keeps only
its table of paths in memory.

Example:

```python
source = ArraySource(images_uint8, labels, name="mine")
index = tf.data.Dataset.range(source.num_images).batch(64)
views = index.map(lambda i: source.to_float(source.read(i)))
```

`read` is a graph function built from `tf.numpy_function` or `tf.data`
ops: call it in `tf.data.Dataset.map` or a `tf.function` without XLA
(`jit_compile=False`), never inside an XLA-compiled step.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import numpy as np
import tensorflow as tf

from emc2_tf.checks import check_images
from emc2_tf.data.batch import as_float_images


def fingerprint_of(parts: Iterable[str]) -> str:
    """A 16-hex-digit SHA-256 digest of `parts`, one per line: the short,
    machine-independent identity `--resume` compares."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]


class SourceReadError(ValueError):
    """An image could not be read from a source while training (e.g. a file
    damaged inside or removed after the scan); the message is one line
    naming it (`ImageSource.read_error`)."""


def _check_batch_size(batch_size: Any) -> int:
    if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1):
        raise ValueError(f"batch_size must be an integer ≥ 1; got {batch_size!r}.")
    return int(batch_size)


class ImageSource:
    """N images read by sample index, in their stored dtype.

    Subclasses set `name`, `num_images`, `image_shape`, `labels` and `dtype`
    and implement `read` and `fingerprint`.

    Attributes:
        name: a short name for messages and logs.
        num_images: N; sample indices are `0 .. N - 1`.
        image_shape: `(H, W, C)` of every image `read` returns.
        labels: int64 `[N]` class ids, or None for unlabelled data.
        dtype: the stored dtype (`tf.uint8`, or a float type with values in [0, 1]).
    """

    name: str
    num_images: int
    image_shape: tuple[int, int, int]
    labels: np.ndarray | None
    dtype: tf.DType

    def read(self, index: tf.Tensor) -> tf.Tensor:
        """Images `index` (int64 `[B]`) as `[B, H, W, C]` in `dtype`.

        Reads only those B images. A graph function: call it in
        `tf.data.Dataset.map` (with `num_parallel_calls`) or a `tf.function`
        without XLA.
        """
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short hash of what the per-sample state is indexed by: `--resume`
        refuses a source whose fingerprint changed."""
        raise NotImplementedError

    def to_float(self, batch: tf.Tensor) -> tf.Tensor:
        """A batch from `read` as float32 in [0, 1]: uint8 / 255, float cast.

        The one place stored pixels become float, applied per batch
        (`emc2_tf.data.batch.as_float_images`).
        """
        return as_float_images(batch)

    def iter_batches(self, batch_size: int = 512) -> tf.data.Dataset:
        """Every image in index order as float32 batches `[b, H, W, C]` (the last
        one may be smaller), read per batch: for evaluation at any N without
        holding all images as float32. Iterate it, or pass it to `predict`.
        """
        batch_size = _check_batch_size(batch_size)
        return (
            tf.data.Dataset.range(self.num_images)
            .batch(batch_size)
            .map(lambda index: self.to_float(self.read(index)),
                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    def read_error(self, error: BaseException) -> str | None:
        """The one-line message for an error raised while reading, or None when
        it is not a read error of this source (the caller re-raises it)."""
        return None

    @property
    def num_classes(self) -> int | None:
        """Number of classes (largest label + 1), or None when unlabelled."""
        if self.labels is None or not len(self.labels):
            return None
        return int(self.labels.max()) + 1

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, num_images={self.num_images}, "
                f"image_shape={self.image_shape}, dtype={self.dtype.name}, "
                f"labelled={self.labels is not None})")


def as_labels(labels: Any, num_images: int, name: str) -> np.ndarray | None:
    """`labels` as int64 `[N]`, None kept; a one-line `ValueError` naming `name`
    when the count differs from the number of images."""
    if labels is None:
        return None
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != num_images:
        raise ValueError(f"{name}: got {num_images} images and {len(labels)} labels; "
                         "counts must match.")
    return labels


class ArraySource(ImageSource):
    """An in-memory array as a source, read by index without copying it.

    Args:
        images: `[N, H, W, C]` or `[N, H, W]` (grey: a channel axis is added,
            as a view). uint8 stays uint8 (0..255); float stays in its float
            dtype and must lie in [0, 1] (e.g. scikit-learn digits, k/16, are
            not uint8-representable); other integer types must hold 0..255
            and are stored as uint8 (a copy). Anything else is a one-line
            `ValueError` naming `name` (`emc2_tf.checks.check_images`).
        labels: int `[N]` class ids, or None.
        name: names the source in messages.
        argument: names the images in the one-line errors of bad input
            (default `"{name} images"`; e.g. `"images"` for a function's
            argument).

    The array is not copied (uint8 and float inputs): `read` gathers the B
    requested rows with NumPy inside `tf.numpy_function`, so the data are
    never embedded in a graph (a `tf.constant` of the array copies it: 3.1
    GiB of float32 images peaked at 14.1 GiB resident). Do not modify the
    array while a pipeline reads it.
    """

    def __init__(self, images: Any, labels: Any = None, name: str = "arrays",
                 argument: str | None = None):
        argument = argument or f"{name} images"
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(f"{argument} must have shape [N, H, W] or [N, H, W, C]; got "
                             f"{images.shape}.")
        check_images(images, argument)
        if images.dtype != np.uint8 and np.issubdtype(images.dtype, np.integer):
            images = images.astype(np.uint8)  # 0..255, checked above
        self._images = images
        self.name = name
        self.num_images = int(images.shape[0])
        self.image_shape = tuple(int(d) for d in images.shape[1:])
        self.labels = as_labels(labels, self.num_images, name)
        self.dtype = tf.as_dtype(images.dtype)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        """Rows `index` (B of them: the only copy), refusing indices outside
        [0, N) (NumPy would wrap negative ones silently)."""
        if index.size and (index.min() < 0 or index.max() >= self.num_images):
            raise IndexError(f"{self.name}: sample index out of range [0, {self.num_images}): "
                             f"got {index.min()}..{index.max()}.")
        return np.take(self._images, index, axis=0)

    def read(self, index: tf.Tensor) -> tf.Tensor:
        index = tf.cast(index, tf.int64)
        rows = tf.numpy_function(self._gather, [index], self.dtype, stateful=False,
                                 name="array_source_read")
        return tf.ensure_shape(rows, [index.shape[0], *self.image_shape])

    def fingerprint(self) -> str:
        """N, the image shape and the dtype (hashing the pixels of a large array
        on every start would cost a full pass over it)."""
        return fingerprint_of(["array", str(self.num_images), str(self.image_shape),
                               self.dtype.name])


class SubsetSource(ImageSource):
    """Images `indices` of another source, as a source of `len(indices)` images.

    Sample index `i` of the subset is image `indices[i]` of `source` (e.g. a
    stratified `--train_size` subset of a folder: `emc2_tf.subset_train`).
    Only the index table is held; reads go to `source`.

    Args:
        source: the source to take images from.
        indices: int `[M]` positions in `[0, source.num_images)`.
        name: names the subset in messages (default: the source's name).
    """

    def __init__(self, source: ImageSource, indices: Any, name: str | None = None):
        indices = np.asarray(indices).reshape(-1)
        if not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"indices must be integers; got dtype {indices.dtype}.")
        if indices.size and (indices.min() < 0 or indices.max() >= source.num_images):
            raise ValueError(f"indices must lie in [0, {source.num_images}) (the images of "
                             f"{source.name}); got {indices.min()}..{indices.max()}.")
        self.source = source
        self.indices = indices.astype(np.int64)
        self.name = name or source.name
        self.num_images = len(self.indices)
        self.image_shape = source.image_shape
        self.labels = None if source.labels is None else source.labels[self.indices]
        self.dtype = source.dtype
        self._table = tf.constant(self.indices)  # M int64: the positions, not the images

    def read(self, index: tf.Tensor) -> tf.Tensor:
        return self.source.read(tf.gather(self._table, tf.cast(index, tf.int64)))

    def to_float(self, batch: tf.Tensor) -> tf.Tensor:
        return self.source.to_float(batch)

    def fingerprint(self) -> str:
        """The source's fingerprint and the chosen positions."""
        digest = hashlib.sha256(self.indices.tobytes()).hexdigest()[:16]
        return fingerprint_of(["subset", self.source.fingerprint(), digest])

    def read_error(self, error: BaseException) -> str | None:
        return self.source.read_error(error)


def as_source(images: Any, argument: str = "images") -> ImageSource:
    """`images` as an `ImageSource`: a source is returned as it is, an array is
    wrapped in an `ArraySource` (no copy for uint8 and float arrays), its bad
    input refused in one line naming `argument`."""
    if isinstance(images, ImageSource):
        return images
    return ArraySource(images, name=argument, argument=argument)
