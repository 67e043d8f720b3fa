"""Data sources and the index-carrying two-view pipeline."""

import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow as tf

import emc2_tf
from emc2_tf.data import read_idx


def test_pipeline_carries_indices_and_two_distinct_views():
    rng = np.random.default_rng(0)
    images = rng.random((50, 8, 8, 1)).astype(np.float32)
    dataset = emc2_tf.make_two_view_dataset(images, 8, emc2_tf.AugmentConfig.for_dataset("digits"), seed=3)
    seen, nearest_is_own = [], []
    for batch in dataset:
        index = batch["index"].numpy()
        assert batch["index"].dtype == tf.int32 and batch["view1"].shape == (8, 8, 8, 1)
        seen.extend(index)
        v1, v2 = batch["view1"].numpy(), batch["view2"].numpy()
        assert 0.0 <= v1.min() and v1.max() <= 1.0
        assert not np.allclose(v1, v2)  # independent augmentations
        # Each view is an augmentation of the image its index names: closer to it than to others.
        dist = ((v1[:, None] - images[None]) ** 2).sum(axis=(2, 3, 4))
        nearest_is_own.extend(np.argmin(dist, axis=1) == index)
    # Over the epoch (per batch of 8 it varies with the global seed, which tf.data
    # mixes into its draws): far above the chance level 1/50.
    assert np.mean(nearest_is_own) >= 0.6
    assert len(seen) == 48 and len(set(seen)) == 48  # one epoch: each image at most once
    # Without augmentation both views are the image itself.
    plain = next(iter(emc2_tf.make_two_view_dataset(images, 8, augment=None, seed=0)))
    np.testing.assert_array_equal(plain["view1"].numpy(), images[plain["index"].numpy()])
    np.testing.assert_array_equal(plain["view2"].numpy(), plain["view1"].numpy())


def test_pipeline_is_reproducible_and_reshuffles_per_epoch():
    images = np.random.default_rng(1).random((40, 4, 4, 1)).astype(np.float32)
    a = emc2_tf.make_two_view_dataset(images, 10, seed=7)
    b = emc2_tf.make_two_view_dataset(images, 10, seed=7)
    epoch_a1 = [x["index"].numpy() for x in a]
    epoch_b1 = [x["index"].numpy() for x in b]
    epoch_a2 = [x["index"].numpy() for x in a]
    np.testing.assert_array_equal(np.concatenate(epoch_a1), np.concatenate(epoch_b1))
    assert not np.array_equal(np.concatenate(epoch_a1), np.concatenate(epoch_a2))


def _epoch(dataset):
    return [{key: value.numpy() for key, value in batch.items()} for batch in dataset]


def test_pipeline_is_a_function_of_seed_epoch_and_step():
    """Epoch e's batches and views do not depend on how often the data was read
    before: what a resumed run (start_epoch, start_step) relies on."""
    images = np.random.default_rng(2).random((40, 6, 6, 1)).astype(np.float32)
    augment = emc2_tf.AugmentConfig.for_dataset("digits")
    full = emc2_tf.make_two_view_dataset(images, 8, augment, seed=5)
    epochs = [_epoch(full) for _ in range(3)]
    resumed = emc2_tf.make_two_view_dataset(images, 8, augment, seed=5, start_epoch=2)
    rest = emc2_tf.make_two_view_dataset(images, 8, augment, seed=5, start_epoch=1, start_step=3)
    assert rest.cardinality().numpy() == 2 and full.cardinality().numpy() == 5
    for expected, got in [(epochs[2], _epoch(resumed)), (epochs[1][3:], _epoch(rest)),
                          (epochs[1][3:], _epoch(rest))]:  # the rest of an epoch, every time
        assert len(expected) == len(got)
        for a, b in zip(expected, got):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(epochs[0][0]["view1"], epochs[1][0]["view1"])
    # set_epoch (what ContrastiveModel.fit calls at on_epoch_begin) rewinds the stream.
    full.epoch_schedule.set_epoch(1)
    np.testing.assert_array_equal(_epoch(full)[0]["view2"], epochs[1][0]["view2"])
    with pytest.raises(ValueError, match=r"start_step must be an integer in \[0, 5\)"):
        emc2_tf.make_two_view_dataset(images, 8, start_step=5)


def test_batch_size_errors_name_the_argument():
    images = np.zeros((10, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="batch_size must be an integer ≥ 2"):
        emc2_tf.make_two_view_dataset(images, 1)
    with pytest.raises(ValueError, match="larger than the data set"):
        emc2_tf.make_two_view_dataset(images, 11)


def test_digits_split_is_stratified_and_scaled():
    data = emc2_tf.load_digits()
    assert data.image_shape == (8, 8, 1)
    assert data.num_train + len(data.test_images) == 1797
    assert 0.0 == data.train_images.min() and data.train_images.max() == 1.0
    assert np.bincount(data.test_labels).min() >= 34


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_generated_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (12, 28, 28)); test = rng.integers(0, 256, (5, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    data = emc2_tf.load_fashion_mnist(str(tmp_path))
    assert data.image_shape == (28, 28, 1)
    # Kept as stored (uint8: a quarter of float32's memory), scaled per batch where used.
    assert data.train_images.dtype == np.uint8 and data.test_images.dtype == np.uint8
    np.testing.assert_array_equal(data.train_images[..., 0], train)
    np.testing.assert_array_equal(data.test_labels, np.arange(5))


def test_idx_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        emc2_tf.load_fashion_mnist(str(tmp_path))
    bad = tmp_path / "x.idx"
    bad.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(bad))


@pytest.mark.heavy
def test_real_fashion_mnist_from_debian_package():
    if not os.path.isdir(emc2_tf.DEFAULT_FASHION_MNIST_DIR):
        pytest.fail("apt-get install dataset-fashion-mnist first (files under "
                    f"{emc2_tf.DEFAULT_FASHION_MNIST_DIR})")
    data = emc2_tf.load_fashion_mnist()
    assert data.train_images.shape == (60000, 28, 28, 1) and data.test_images.shape == (10000, 28, 28, 1)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10


def test_tfds_loader_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        data = emc2_tf.load_tfds("cifar10")
    assert data.image_shape == (32, 32, 3) and data.num_train == 12
    assert data.train_images.dtype == np.uint8  # 8-bit pixels stay uint8 (a quarter of float32)


def test_tfds_missing_data_set_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="without downloading"):
        emc2_tf.load_tfds("cifar10", data_dir=str(tmp_path))


if __name__ == "__main__":
    import sys

    import pytest

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
