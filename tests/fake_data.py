"""Data sets written in the tests: PNG folders and TFDS data sets on disk.

Nothing is downloaded: the images are generated, and a TFDS data set is
stored with `tfds.dataset_builders.store_as_tfds_dataset` under a real
builder's name (e.g. `stl10`) in a temporary data_dir.
"""

import numpy as np

from emc2_tf.data.tfds_source import NO_LABEL, _import_tfds


def write_png_folder(directory, images, labels=None):
    """Writes uint8 `[N, H, W, 1]` images as PNG files whose sorted order is the
    index order (class folders `c<label>` when labelled); returns the folder."""
    from PIL import Image

    for i, image in enumerate(images):
        folder = directory if labels is None else directory / f"c{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"{i:05d}.png")
    return str(directory)


def tfds_examples(count, shape, labelled, seed):
    """`count` `(key, {"image", "label"})` examples: random uint8 images, labels
    in 0..9, or `NO_LABEL` (-1) when not `labelled` (STL-10's unlabelled split)."""
    rng = np.random.default_rng(seed)
    return [(i, {"image": rng.integers(0, 256, shape, dtype=np.uint8),
                 "label": int(rng.integers(0, 10)) if labelled else NO_LABEL})
            for i in range(count)]


def store_tfds(data_dir, name, splits, shape=(96, 96, 3), file_format="tfrecord",
               disable_shuffling=False):
    """Writes `splits` ({split: [(key, example)]}) as TFDS data set `name` 1.0.0."""
    tfds = _import_tfds()
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=shape),
        "label": tfds.features.ClassLabel(num_classes=10)})
    tfds.dataset_builders.store_as_tfds_dataset(
        name, "1.0.0", features, splits, data_dir=str(data_dir), file_format=file_format,
        disable_shuffling=disable_shuffling)
