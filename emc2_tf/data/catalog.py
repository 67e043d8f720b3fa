"""Named data sets: the built-ins, a folder of images, a TFDS data set.

`load_dataset(name, ...)` is what `--dataset` names:

- `digits`, `fashion_mnist`: in-memory arrays (`emc2_tf.data.sources`);
- `folder`: `load_image_folder(data_dir, ...)`, image files read by index
  from disk, with a held-out split: a separate folder (`test_data_dir`), or
  a deterministic stratified fraction of a labelled folder (`test_fraction`);
  an unlabelled (flat) folder has none;
- any other name: a TFDS data set, `load_tfds_splits(name, ...)`, each split
  expression (`train_split`, `test_split`) a `TFDSSource` read by index.

Only index tables stay in memory (paths, positions); images are read per
batch as uint8.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emc2_tf.data.folder import ImageFolderSource
from emc2_tf.data.image_source import ImageSource, SubsetSource
from emc2_tf.data.sources import (
    BUILTIN_DATASETS,
    ImageDataset,
    from_sources,
    load_digits,
    load_fashion_mnist,
)

#: The held-out fraction of a labelled folder without `test_data_dir`.
DEFAULT_TEST_FRACTION = 0.1

#: The held-out split of a folder does not move with the run's seed: runs
#: with different seeds are evaluated on the same images.
HOLDOUT_SEED = 0


def holdout_split(source: ImageSource, test_fraction: float = DEFAULT_TEST_FRACTION,
                  seed: int = HOLDOUT_SEED) -> tuple[ImageSource, ImageSource]:
    """`(train, held-out)` subsets of a labelled `source`, stratified by label.

    ⌈test_fraction · N⌉ images are held out, chosen by scikit-learn's
    `train_test_split(stratify=labels, random_state=seed)`: each class keeps
    its share, rounded (a class much smaller than 1 / test_fraction may
    have no held-out image); both subsets keep the source's order. The same
    folder always gives the same split.

    Raises:
        ValueError: `source` is unlabelled, `test_fraction` is not in (0, 1),
            or a class has too few images to be split (one line naming it).
    """
    from sklearn.model_selection import train_test_split

    if source.labels is None:
        raise ValueError(f"{source.name} is unlabelled: no stratified held-out split.")
    if isinstance(test_fraction, bool) or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction (--test_fraction) must be in (0, 1) (e.g. 0.1); got "
                         f"{test_fraction!r}.")
    labels = np.asarray(source.labels)
    counts = np.bincount(labels[labels >= 0])
    smallest = int(np.argmin(counts))
    if counts[smallest] < 2:
        raise ValueError(f"{source.name}: class {smallest} has {counts[smallest]} image(s); a "
                         f"held-out split needs ≥ 2 per class: add images, or name a separate "
                         "held-out folder (test_data_dir, --test_data_dir).")
    try:
        train, test = train_test_split(np.arange(source.num_images), test_size=test_fraction,
                                       stratify=labels, random_state=seed)
    except ValueError as error:  # e.g. fewer held-out images than classes
        held_out = int(np.ceil(test_fraction * source.num_images))
        side = ("training" if source.num_images - held_out < len(counts) else "held-out")
        change = "lower" if side == "training" else "raise"
        raise ValueError(f"test_fraction={test_fraction} (--test_fraction) cannot split the "
                         f"{source.num_images} images of {source.name} by class: the {side} "
                         f"share would hold fewer images than the {len(counts)} classes; "
                         f"{change} it, or name a separate held-out folder "
                         "(--test_data_dir).") from None
    return (SubsetSource(source, np.sort(train), name=source.name),
            SubsetSource(source, np.sort(test), name=f"{source.name} (held out)"))


def load_image_folder(
    directory: str,
    test_directory: str | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    image_size: int | tuple[int, int] | None = None,
    skip_corrupt: bool = False,
) -> ImageDataset:
    """A folder of images (`ImageFolderSource`) with its held-out split.

    Args:
        directory: the training images: one sub-folder per class, or a flat
            folder (unlabelled).
        test_directory: a separate held-out folder, read at the training
            images' size and channels, its class folders labelled by their
            names in the training folder (it may hold only some classes; a
            class the training folder lacks is refused). Without it, a labelled folder holds out
            `test_fraction` of its images (`holdout_split`: stratified, the
            same on every run) and an unlabelled one has no held-out split
            (`test_images` None: training without evaluation).
        test_fraction: the held-out share of a labelled `directory`, in (0, 1).
        image_size: `int` or `(height, width)`; default the first image's.
        skip_corrupt: leave unreadable files out (see `ImageFolderSource`).
    """
    train = ImageFolderSource(directory, image_size=image_size, skip_corrupt=skip_corrupt)
    if test_directory:
        height, width, channels = train.image_shape
        test = ImageFolderSource(test_directory, image_size=(height, width), channels=channels,
                                 skip_corrupt=skip_corrupt, class_names=train.class_names)
        return from_sources(train, test)
    if train.labels is None:
        return from_sources(train, None)
    train_part, test_part = holdout_split(train, test_fraction)
    return from_sources(train_part, test_part, name=train.name)


def load_tfds_splits(
    name: str,
    data_dir: str | None = None,
    train_split: str = "train",
    test_split: str | None = "test",
    download: bool = False,
    image_size: int | tuple[int, int] | None = None,
) -> ImageDataset:
    """A TFDS data set's two split expressions as sources read by index.

    E.g. STL-10 as the paper pre-trains on it: `load_tfds_splits("stl10",
    train_split="train+unlabelled", test_split="test")`. `test_split` None
    or "" means no held-out split. See `TFDSSource` for `download` and
    `image_size` (the held-out split is read at the training split's size).
    """
    from emc2_tf.data.tfds_source import TFDSSource

    train = TFDSSource(name, split=train_split, data_dir=data_dir, download=download,
                       image_size=image_size)
    test = None
    if test_split:
        test = TFDSSource(name, split=test_split, data_dir=data_dir,
                          image_size=train.image_shape[:2])
    return from_sources(train, test, name=name)


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    train_split: str = "train",
    test_split: str | None = "test",
    test_data_dir: str | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    image_size: int | tuple[int, int] | None = None,
    skip_corrupt: bool = False,
    download: bool = False,
) -> ImageDataset:
    """The data set `--dataset` names: `digits` | `fashion_mnist` | `folder` |
    a TFDS data set name.

    `data_dir` is Fashion-MNIST's idx folder, the image folder (`folder`) or
    the TFDS data_dir. The other options apply where they make sense
    (`folder`: `test_data_dir`, `test_fraction`, `image_size`,
    `skip_corrupt`; TFDS: `train_split`, `test_split`, `download`,
    `image_size`); see `load_image_folder` and `load_tfds_splits`.

    Raises:
        FileNotFoundError, ValueError: one line naming the argument or file.
    """
    if name == "digits":
        return load_digits()
    if name == "fashion_mnist":
        return load_fashion_mnist(data_dir)
    if name == "folder":
        if not data_dir:
            raise ValueError("the folder data set needs data_dir (--data_dir): the folder of "
                             "images (one sub-folder per class, or a flat folder).")
        return load_image_folder(data_dir, test_data_dir, test_fraction, image_size,
                                 skip_corrupt)
    try:
        return load_tfds_splits(name, data_dir, train_split, test_split, download, image_size)
    except ValueError as error:
        if str(error).startswith("name="):  # not a TFDS data set: name the built-ins too
            reason = str(error)[len(f"name={name!r}: "):]
            raise ValueError(f"unknown data set {name!r}: the built-in ones are "
                             f"{', '.join(BUILTIN_DATASETS)}; any other name must be a "
                             f"TensorFlow Datasets data set, but {reason} A data set prepared "
                             f"elsewhere (`python -m emc2_tf.data.tfds_prepare NAME "
                             f"--data_dir=DIR`) is read from data_dir (--data_dir=DIR).") \
                from None
        raise


def labelled_part(images: Any, labels: np.ndarray | None) -> tuple[Any, np.ndarray | None]:
    """The images with a label ≥ 0 and their labels (TFDS marks an unlabelled
    example -1, e.g. STL-10's `unlabelled` split); `(images, None)` when
    there are no labels at all."""
    if labels is None:
        return images, None
    labels = np.asarray(labels)
    keep = np.flatnonzero(labels >= 0)
    if len(keep) == len(labels):
        return images, labels
    if isinstance(images, ImageSource):
        return SubsetSource(images, keep, name=images.name), labels[keep]
    return images[keep], labels[keep]
