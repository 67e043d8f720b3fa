"""Image data sets with a train / held-out split: in-memory arrays or image sources.

Every loader returns an `ImageDataset`: images `[N, H, W, C]` as stored
(uint8 0..255 for 8-bit data such as Fashion-MNIST, float in [0, 1]
otherwise, e.g. digits' k/16) and integer labels (used only for evaluation:
pre-training never sees them). Each split may instead be an `ImageSource`
(`from_sources`: a folder of files, ...), read by index per batch. Nothing
here downloads: digits ship inside scikit-learn, Fashion-MNIST comes from
Debian's `dataset-fashion-mnist` package (or any folder of the four idx
files), tfds data sets load from a prepared `data_dir`.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib
from typing import Any

import numpy as np

from emc2_tf.checks import check_images
from emc2_tf.data.image_source import ImageSource, SubsetSource

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Train and held-out images with labels.

    Each split's images are an array `[N, H, W, C]` (uint8 0..255, or float
    in [0, 1]) or an `ImageSource`; everything that takes a split
    (`make_two_view_dataset`, EMC²'s image table, `embed`,
    `evaluate_encoder`, `SpectralBatchSelection`) takes either. Labels are
    int64 `[N]`, or None for an unlabelled split; `test_images` is None when
    there is no held-out split (nothing to evaluate on).
    """

    name: str
    train_images: Any
    train_labels: np.ndarray | None
    test_images: Any
    test_labels: np.ndarray | None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if isinstance(self.train_images, ImageSource):
            return tuple(self.train_images.image_shape)
        return tuple(self.train_images.shape[1:])

    @property
    def num_train(self) -> int:
        return int(len(self.train_images))

    @property
    def num_classes(self) -> int | None:
        """Largest label + 1 over the labelled splits, or None when unlabelled."""
        labelled = [labels for labels in (self.train_labels, self.test_labels)
                    if labels is not None and len(labels)]
        if not labelled:
            return None
        return int(max(labels.max() for labels in labelled) + 1)


def _as_images(images: np.ndarray, name: str, keep_uint8: bool = False) -> np.ndarray:
    """`images` (`[N, H, W]` or `[N, H, W, C]`) as float32 in [0, 1]: 8-bit integer
    pixels (0..255) scaled by 1/255, float pixels checked (`check_images`).
    `keep_uint8`: 8-bit integer pixels stay uint8 (a quarter of the memory; the
    pipeline scales each batch by 1/255)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(
            f"{name}: images must have shape [N, H, W] or [N, H, W, C]; got {images.shape}."
        )
    check_images(images, name)  # before any conversion: the range found is the caller's
    if np.issubdtype(images.dtype, np.integer):
        if keep_uint8:
            return images.astype(np.uint8, copy=False)
        return images.astype(np.float32) / np.float32(255.0)
    return images.astype(np.float32)


def from_arrays(
    train_images: Any,
    train_labels: Any,
    test_images: Any,
    test_labels: Any,
    name: str = "arrays",
    keep_uint8: bool = False,
) -> ImageDataset:
    """Wraps in-memory arrays as an `ImageDataset` (float32 images in [0, 1]).

    Images: `[N, H, W]` or `[N, H, W, C]`, either uint8 (or any integer type
    holding 0..255), scaled by 1/255, or float with every value in [0, 1].
    Float values outside [0, 1] (e.g. 0..255 pixels not divided by 255), NaN
    or inf are refused with a one-line `ValueError` naming the argument and
    the range found (`emc2_tf.checks.check_images`). `keep_uint8`: 8-bit
    pixels stay uint8 (a quarter of the memory; every consumer scales each
    batch by 1/255, with the same values).
    """
    train = _as_images(train_images, f"{name} train_images", keep_uint8)
    test = _as_images(test_images, f"{name} test_images", keep_uint8)
    train_labels = np.asarray(train_labels).astype(np.int64).reshape(-1)
    test_labels = np.asarray(test_labels).astype(np.int64).reshape(-1)
    if len(train_labels) != len(train) or len(test_labels) != len(test):
        raise ValueError(
            f"{name}: got {len(train)} train images with {len(train_labels)} labels and "
            f"{len(test)} test images with {len(test_labels)} labels; counts must match."
        )
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(
            f"{name}: train and test images differ in shape: {train.shape[1:]} vs "
            f"{test.shape[1:]}."
        )
    return ImageDataset(name, train, train_labels, test, test_labels)


def from_sources(train: ImageSource, test: ImageSource | None = None,
                 name: str | None = None) -> ImageDataset:
    """An `ImageDataset` whose splits are image sources, read by index per batch.

    Labels come from the sources (None for an unlabelled one); `test` None
    means no held-out split (training without evaluation). The two sources
    must hold images of one shape.
    """
    if not isinstance(train, ImageSource) or not (test is None or isinstance(test, ImageSource)):
        raise ValueError("from_sources takes ImageSource objects (e.g. emc2_tf.ImageFolderSource "
                         "or emc2_tf.ArraySource); for arrays use from_arrays.")
    if test is not None and tuple(test.image_shape) != tuple(train.image_shape):
        raise ValueError(f"{test.name}: held-out images of shape {tuple(test.image_shape)} differ "
                         f"from the training images' {tuple(train.image_shape)} ({train.name}).")
    return ImageDataset(name or train.name, train, train.labels, test,
                        None if test is None else test.labels)


def subset_train(data: ImageDataset, train_size: int, seed: int = 0) -> ImageDataset:
    """`data` with only `train_size` of its training images, stratified by label.

    The subset keeps each class' share of the training set (scikit-learn's
    `train_test_split(stratify=labels, random_state=seed)`) and the images'
    original order; the held-out split is untouched. An unlabelled split
    gets a uniform random subset (same seed), a source split a
    `SubsetSource` (only the chosen positions are held). `train_size` 0 or
    equal to `data.num_train` returns `data` itself. The result is the
    same dataset type (`dataclasses.replace`), so everything built from it
    (`num_train`, an EMC² image table, evaluation, batch selection) sees
    the subset.

    Raises `ValueError` (one line naming `train_size`) if it is negative,
    larger than the training set, or too small to hold every class.
    """
    from sklearn.model_selection import train_test_split

    if isinstance(train_size, bool) or not isinstance(train_size, (int, np.integer)):
        raise ValueError(f"train_size must be an integer ≥ 0; got {train_size!r}.")
    train_size = int(train_size)
    if train_size < 0 or train_size > data.num_train:
        raise ValueError(f"train_size must be in [0, {data.num_train}] (0 = all of the "
                         f"{data.num_train} training images of {data.name}); got {train_size}.")
    if train_size in (0, data.num_train):
        return data
    if data.train_labels is None:  # unlabelled: nothing to stratify by
        keep = np.sort(np.random.default_rng(seed).choice(data.num_train, train_size,
                                                          replace=False))
        return _keep_train(data, keep)
    labels = np.asarray(data.train_labels)
    classes = len(np.unique(labels))
    if train_size < classes:
        raise ValueError(f"train_size={train_size} is smaller than the {classes} classes of "
                         f"{data.name}: a stratified subset needs at least one image per class.")
    if data.num_train - train_size < classes:
        # Fewer images left out than classes: stratifying what is dropped is
        # meaningless (and refused by scikit-learn); drop them at random.
        drop = np.random.default_rng(seed).choice(data.num_train, data.num_train - train_size,
                                                  replace=False)
        keep = np.setdiff1d(np.arange(data.num_train), drop)
    else:
        try:
            keep, _ = train_test_split(np.arange(data.num_train), train_size=train_size,
                                       stratify=labels if classes > 1 else None,
                                       random_state=seed)
        except ValueError as error:  # e.g. a class with a single image
            raise ValueError(f"train_size={train_size}: no stratified subset of {data.name} "
                             f"({error})") from None
    return _keep_train(data, np.sort(keep))


def _keep_train(data: ImageDataset, keep: np.ndarray) -> ImageDataset:
    """`data` with training images `keep` (sorted positions) only."""
    if isinstance(data.train_images, ImageSource):
        images = SubsetSource(data.train_images, keep)
    else:
        images = data.train_images[keep]
    labels = None if data.train_labels is None else data.train_labels[keep]
    return dataclasses.replace(data, train_images=images, train_labels=labels)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), split stratified.

    The data ship inside scikit-learn: no download. Pixel values 0..16 are
    scaled to [0, 1] (float32: k/16 is not a uint8 value).
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed,
        stratify=digits.target,
    )
    return from_arrays(train_x, train_y, test_x, test_y, name="digits")


def read_idx(path: str) -> np.ndarray:
    """Reads one idx file (optionally gzip-compressed) as a uint8 array.

    Raises `ValueError` naming the file if it is truncated or corrupt (a cut
    `.gz` stream, a bad gzip header or CRC, a short header or body) or cannot
    be read.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(4)
            if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] != 0x08:
                raise ValueError(
                    f"{path} is not an idx file of unsigned bytes (bad magic number).")
            ndim = header[3]
            dims = handle.read(4 * ndim)
            if len(dims) != 4 * ndim:
                raise ValueError(f"{path} is truncated: its header ends after {len(dims) + 4} "
                                 f"of {4 * ndim + 4} bytes.")
            shape = struct.unpack(">" + "I" * ndim, dims)
            data = np.frombuffer(handle.read(), dtype=np.uint8)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ValueError(f"{path} is truncated or corrupt ({type(error).__name__}: {error}); "
                         "replace it with a complete copy.") from None
    except OSError as error:
        raise ValueError(f"{path} cannot be read: {error.strerror or error}.") from None
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, got {data.size}.")
    return data.reshape(shape)


def _find_idx(directory: str, stem: str) -> str:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory!r}. Install Debian's "
        f"package (`apt-get install dataset-fashion-mnist`, files under "
        f"{DEFAULT_FASHION_MNIST_DIR}) or pass --data_dir / directory= pointing at the "
        "four idx files."
    )


def load_fashion_mnist(directory: str | None = None) -> ImageDataset:
    """Fashion-MNIST (60k train / 10k test, 28x28 grey) from idx files, kept as
    uint8 0..255 (each batch is scaled by 1/255 where it is used: 47 MiB of
    training images, not 188 MiB).

    Args:
        directory: folder with `train-images-idx3-ubyte(.gz)` and the three
            other idx files; default Debian's `/usr/share/datasets/fashion-mnist`.
    """
    directory = directory or DEFAULT_FASHION_MNIST_DIR
    arrays = [
        read_idx(_find_idx(directory, stem))
        for stem in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    ]
    return from_arrays(*arrays, name="fashion_mnist", keep_uint8=True)


def load_tfds(
    name: str,
    data_dir: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    image_key: str = "image",
    label_key: str = "label",
) -> ImageDataset:
    """A prepared TensorFlow Datasets data set, read into memory as uint8; never
    downloads. For data that need not fit in memory, any split expression and
    `download`, use `load_tfds_splits` (read by index).

    Args:
        name: the tfds builder name, e.g. `cifar10` or `stl10`.
        data_dir: where the data set was prepared (`tfds build` elsewhere).
    """
    import tensorflow_datasets as tfds

    try:
        splits = tfds.load(
            name, split=[train_split, test_split], data_dir=data_dir, download=False,
            as_supervised=False,
        )
    except Exception as error:  # tfds raises several types for a missing data set
        where = data_dir or "~/tensorflow_datasets (tfds' default)"
        prepare = (f"prepare it on a machine with network (`tfds build {name} "
                   "--data_dir=DIR`) and pass data_dir=DIR (--data_dir=DIR); nothing is "
                   "downloaded here")
        if type(error).__name__ == "DatasetNotFoundError":
            # Its message lists the whole TFDS catalogue (hundreds of lines).
            raise ValueError(
                f"unknown data set {name!r}: the built-in ones are {', '.join(BUILTIN_DATASETS)}; "
                f"any other name must be a TensorFlow Datasets builder (e.g. cifar10, stl10): "
                f"{prepare}."
            ) from None
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if len(reason) > 300:
            reason = reason[:300] + "…"
        raise ValueError(
            f"could not load the tfds data set {name!r} from {where} without downloading "
            f"({type(error).__name__}: {reason}); {prepare}."
        ) from None

    def to_numpy(split):
        parts = {image_key: [], label_key: []}
        for batch in tfds.as_numpy(split.map(lambda x: {k: x[k] for k in parts}).batch(1024)):
            for key in parts:
                parts[key].append(batch[key])
        return {key: np.concatenate(value) for key, value in parts.items()}

    train, test = (to_numpy(split) for split in splits)
    return from_arrays(
        train[image_key], train[label_key], test[image_key], test[label_key], name=name,
        keep_uint8=True,
    )


#: The data sets `load_dataset` (`emc2_tf.data.catalog`) knows without TFDS.
BUILTIN_DATASETS = ("digits", "fashion_mnist", "folder")
