"""Image sources wired into the library (issue 18): the two-view pipeline reads by
index from a source, workers read only their share, EMC²'s image table and the
evaluation read from sources, and a PNG folder trains exactly like the arrays
it was written from."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import emc2_tf
from emc2_tf.data.image_source import ArraySource
from fake_data import write_png_folder
from helpers import ROOT

SOURCE_WORKER = os.path.join(ROOT, "tests", "source_worker.py")


def _epoch(dataset):
    return [{key: value.numpy() for key, value in batch.items()} for batch in dataset]


# -- several workers ----------------------------------------------------------------


def test_each_worker_dataset_holds_its_replicas_rows_of_the_global_batch():
    """Catches a worker pipeline that reads other rows than its replicas' slices of
    each global batch (tf.distribute's split: replica r gets rows r·b … r·b + b − 1,
    worker-major), views augmented with draws of their own instead of the whole
    batch's (a worker's views would differ from the one-process views), several
    local replicas not given one slice each, or indices left unchecked."""
    images = np.random.default_rng(0).integers(0, 256, (40, 6, 6, 3), np.uint8)
    dataset = emc2_tf.make_two_view_dataset(images, 8, emc2_tf.AugmentConfig(), seed=4)
    whole = _epoch(dataset)
    for workers, replicas in ((2, 2), (2, 4), (4, 4)):
        per_replica = 8 // replicas
        for worker in range(workers):
            context = tf.distribute.InputContext(workers, worker, replicas)
            dataset.epoch_schedule.set_epoch(0)
            own = _epoch(dataset.worker_dataset(context, dataset_size=40))
            local = replicas // workers
            assert len(own) == len(whole) * local
            for step, batch in enumerate(whole):
                for replica in range(local):
                    got = own[step * local + replica]
                    first = (worker * local + replica) * per_replica
                    for key in ("index", "view1", "view2"):
                        np.testing.assert_array_equal(
                            got[key], batch[key][first:first + per_replica],
                            err_msg=f"{workers} workers, {replicas} replicas: {key}")
    # The whole batch's indices are checked before the worker cuts out its rows.
    with pytest.raises(tf.errors.InvalidArgumentError, match="sample index out of range"):
        _epoch(dataset.worker_dataset(tf.distribute.InputContext(2, 1, 2), dataset_size=39))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_each_read_only_their_share_and_train_identically(tmp_path):
    """Two real worker processes (MultiWorkerMirroredStrategy) train one epoch of EMC²
    with SimCLR augmentations from a source that counts what it reads.

    Catches a worker that reads (decodes) every image of each global batch and
    keeps its share (before issue 18: 48 reads per worker per epoch, not 24),
    rows other than its replica's, and any change of the training result: the
    weights and chains must equal, bit for bit, those of the same run through a
    dataset every worker reads in full (the pre-issue-18 path, `.take(steps)`)."""
    import json

    ports = [_free_port(), _free_port()]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    workers = []
    for index in range(2):
        config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                  "task": {"type": "worker", "index": index}}
        workers.append(subprocess.Popen(
            [sys.executable, SOURCE_WORKER, str(tmp_path / f"w{index}.npz")], cwd=ROOT,
            env=dict(env, TF_CONFIG=json.dumps(config)), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outputs = [w.communicate(timeout=240) for w in workers]
    finally:
        for w in workers:
            w.kill()
            w.wait()
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    runs = [dict(np.load(tmp_path / f"w{index}.npz")) for index in range(2)]
    batches = runs[0]["batches"]  # [3, 16]: epoch 0's global batches
    assert int(runs[0]["replicas"]) == 2
    for worker, run in enumerate(runs):
        assert sorted(run["every_image.read"]) == sorted(batches.ravel())  # 48 reads
        # One read per batch, of exactly this worker's 8 rows in order; tf.data's
        # parallel map may make the reads of different batches in any order.
        reads = sorted(map(tuple, run["own_rows.read"].reshape(-1, 8)))
        assert reads == sorted(map(tuple, batches[:, worker * 8:(worker + 1) * 8])), reads
    names = list(runs[0]["weight_names"])
    assert "chain_index" in names and len(names) >= 4
    for position, name in enumerate(names):
        key = f"weight{position}"
        for run in runs:
            np.testing.assert_array_equal(run[f"own_rows.{key}"], run[f"every_image.{key}"],
                                          err_msg=name)
        np.testing.assert_array_equal(runs[0][f"own_rows.{key}"], runs[1][f"own_rows.{key}"])
    chains = runs[0][f"own_rows.weight{names.index('chain_index')}"]
    assert (chains >= 0).sum() > 0



# -- EMC²'s image table ----------------------------------------------------------------


_write_png_folder = write_png_folder


def _tiny_encoder(shape):
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(shape, name="images"), keras.layers.Flatten(),
                             keras.layers.Dense(8), keras.layers.UnitNormalization()])


def test_emc2_reencodes_from_a_source_bit_identically_to_the_in_memory_table(tmp_path):
    """EMC² with `out_of_batch="reencode"` and with `exact_ratio` re-encodes its stored
    negatives from the image table; an `ArraySource` of the images and a PNG folder
    of them must give the in-memory table's weights and chains bit for bit.

    Catches a source table read at other rows than the chains' stored indices, a
    float conversion other than the table's (uint8 / 255), and a test blind to the
    table (a table of other images must change the weights)."""
    import keras

    from emc2_tf.data.folder import ImageFolderSource

    images = np.random.default_rng(3).integers(0, 256, (32, 6, 6, 1), np.uint8)
    folder = ImageFolderSource(_write_png_folder(tmp_path / "flat", images))
    other = ArraySource(images[::-1].copy())
    # burn_in=0: the first MH step, which compares with the re-encoded current
    # state, is recorded (with the default burn-in the table only moves the chains).
    for options, tables in (({"out_of_batch": "reencode"}, (images, ArraySource(images), other)),
                            ({"exact_ratio": True, "burn_in": 0}, (images, folder))):
        runs = []
        for table in tables:
            model = emc2_tf.EMC2Model(_tiny_encoder((6, 6, 1)), 32, images=table,
                                      temperature=0.2, seed=0, **options)
            model.compile(optimizer=keras.optimizers.SGD(0.5))
            model.fit(emc2_tf.make_two_view_dataset(images, 8, augment=None, seed=0), epochs=2,
                      verbose=0)
            runs.append([np.asarray(weight) for weight in model.weights])
        if tables[-1] is other:  # the table matters: other images, other weights
            wrong = runs.pop()
            assert [np.array_equal(a, b) for a, b in zip(wrong, runs[0])].count(False) >= 2
        for run in runs[1:]:
            for expected, got in zip(runs[0], run):
                np.testing.assert_array_equal(got, expected, err_msg=str(options))


def test_an_xla_step_reading_a_source_table_is_refused_in_one_line():
    """Catches `jit_compile=True` with a source table reaching XLA (a raw TensorFlow
    error about tf.numpy_function deep in the compiled step), and a refusal where
    nothing is read from the source (out_of_batch='drop' without exact_ratio) or
    where XLA is off."""
    import keras

    images = np.random.default_rng(0).integers(0, 256, (16, 4, 4, 1), np.uint8)
    dataset = emc2_tf.make_two_view_dataset(images, 8, augment=None, seed=0)
    source = ArraySource(images, name="mine")
    model = emc2_tf.EMC2Model(_tiny_encoder((4, 4, 1)), 16, images=source,
                              out_of_batch="reencode")
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=True)
    with pytest.raises(ValueError) as error:
        model.fit(dataset, epochs=1, verbose=0)
    message = str(error.value)
    assert "\n" not in message and "jit_compile=True" in message and "'mine'" in message
    assert int(model.optimizer.iterations.numpy()) == 0
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
    model.fit(dataset, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2
    drop = emc2_tf.EMC2Model(_tiny_encoder((4, 4, 1)), 16, images=source)  # reads nothing
    drop.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=True)
    assert drop.image_sources() == ()
    drop._check_jit_for_source()  # no refusal
    with pytest.raises(ValueError, match="source 'mine'.* holds 16 images but dataset_size=17"):
        emc2_tf.EMC2Model(_tiny_encoder((4, 4, 1)), 17, images=source)


# -- data sets and evaluation from sources ---------------------------------------------------


class _BatchRecordingSource(ArraySource):
    """An `ArraySource` that records the size of every batch it reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_sizes = []

    def _gather(self, index):
        self.batch_sizes.append(len(index))
        return super()._gather(index)


def test_evaluation_from_sources_equals_evaluation_from_arrays(tmp_path):
    """`embed`, `evaluate_encoder`, `representation_metrics`,
    `exact_global_contrastive_loss` and `KNNAccuracyCallback` on `ImageDataset`s
    whose splits are a PNG folder or uint8 arrays give exactly the values of the
    float32 arrays (k/255) they hold, reading a source in batches.

    Catches uint8 images reaching the encoder unscaled (0..255), a source read
    whole instead of batch by batch (the held-out set held as float32 at once),
    batches embedded out of order, and labels not taken from the source."""
    import keras

    from emc2_tf.data.folder import ImageFolderSource

    rng = np.random.default_rng(5)
    train = rng.integers(0, 256, (60, 8, 8, 1), np.uint8)
    train_labels = np.repeat(np.arange(3), 20)
    test = rng.integers(0, 256, (25, 8, 8, 1), np.uint8)
    test_labels = np.arange(25) % 3
    as_float = [images.astype(np.float32) / np.float32(255.0) for images in (train, test)]
    keras.utils.set_random_seed(0)
    encoder = emc2_tf.build_small_cnn_encoder((8, 8, 1))

    reference = emc2_tf.from_arrays(as_float[0], train_labels, as_float[1], test_labels)
    uint8 = emc2_tf.from_arrays(train, train_labels, test, test_labels, keep_uint8=True)
    recording = _BatchRecordingSource(test, test_labels)
    folder = emc2_tf.from_sources(
        ImageFolderSource(_write_png_folder(tmp_path / "train", train, train_labels)),
        recording, name="folder")
    assert uint8.train_images.dtype == np.uint8
    assert (folder.num_train, folder.image_shape, folder.num_classes) == (60, (8, 8, 1), 3)
    np.testing.assert_array_equal(folder.train_labels, train_labels)  # c0, c1, c2 in order
    augment = emc2_tf.AugmentConfig.for_dataset("digits")
    expected = emc2_tf.evaluate_encoder(encoder, reference, representation=True,
                                        augment=augment)
    for data in (uint8, folder):
        assert emc2_tf.evaluate_encoder(encoder, data, representation=True,
                                        augment=augment) == expected
        np.testing.assert_array_equal(emc2_tf.embed(encoder, data.train_images),
                                      emc2_tf.embed(encoder, reference.train_images))
        assert emc2_tf.exact_global_contrastive_loss(encoder, data.train_images, 0.2) == (
            emc2_tf.exact_global_contrastive_loss(encoder, reference.train_images, 0.2))
    # Held-out alignment over batches of 10: the same values from a source and an array.
    recording.batch_sizes.clear()
    assert emc2_tf.representation_metrics(encoder, recording, augment, batch_size=10) == (
        emc2_tf.representation_metrics(encoder, test, augment, batch_size=10))
    assert recording.batch_sizes and max(recording.batch_sizes) == 10
    callback = emc2_tf.KNNAccuracyCallback(encoder, folder)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert logs == {"knn_accuracy": expected["knn_accuracy"]}
    with pytest.raises(ValueError, match="have no labels: evaluation needs labelled"):
        emc2_tf.evaluate_encoder(encoder, emc2_tf.from_sources(ArraySource(train)))


def test_a_stratified_subset_of_a_source_is_the_subset_of_its_array():
    """Catches `subset_train` on a source split taking other images (or labels) than
    on the array it holds, and an unlabelled split that cannot be subset."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (90, 4, 4, 1), np.uint8)
    labels = np.arange(90) % 3
    arrays = emc2_tf.from_arrays(images, labels, images[:6], labels[:6], keep_uint8=True)
    sources = emc2_tf.from_sources(ArraySource(images, labels),
                                        ArraySource(images[:6], labels[:6]))
    small_arrays = emc2_tf.subset_train(arrays, 30, seed=2)
    small_sources = emc2_tf.subset_train(sources, 30, seed=2)
    assert small_sources.num_train == 30 and small_sources.test_images is sources.test_images
    np.testing.assert_array_equal(small_sources.train_labels, small_arrays.train_labels)
    np.testing.assert_array_equal(
        small_sources.train_images.read(tf.range(30, dtype=tf.int64)).numpy(),
        small_arrays.train_images)
    assert small_sources.train_images.fingerprint() != sources.train_images.fingerprint()
    unlabelled = emc2_tf.subset_train(emc2_tf.from_sources(ArraySource(images)), 10, seed=0)
    assert unlabelled.num_train == 10 and unlabelled.train_labels is None


# -- a PNG folder trains exactly like the arrays it was written from ------------------------


def _fashion_like(count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` uint8 28x28 images with labels: real Fashion-MNIST when Debian's
    package is installed, else scikit-learn's digits upscaled (bilinear) with
    a little noise, so every image is distinct and has structure."""
    if os.path.isdir(emc2_tf.DEFAULT_FASHION_MNIST_DIR):
        data = emc2_tf.load_fashion_mnist()
        return data.train_images[:count], data.train_labels[:count]
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = np.arange(count) % len(digits.images)
    upscaled = tf.image.resize(digits.images[index][..., None] * (255.0 / 16.0), [28, 28])
    noise = np.random.default_rng(0).normal(0.0, 8.0, upscaled.shape)
    images = np.clip(np.rint(upscaled.numpy() + noise), 0, 255).astype(np.uint8)
    return images, digits.target[index]


def test_a_png_folder_trains_bit_identically_to_its_in_memory_arrays(tmp_path):
    """Issue 18's equivalence: 2,000 Fashion-MNIST(-like) images written as a PNG
    folder. The folder source must give the same labels and order as the array,
    the same batch indices and bit-identical views (SimCLR augmentations), and
    bit-identical weights and chains after one epoch of EMC² (default options,
    a small CNN, B = 64, same seed).

    Catches any difference between decoding files and gathering rows (order,
    dtype, channels, scaling), a pipeline whose batches depend on the source,
    and a folder read that is not the array's pixels exactly."""
    import keras

    from emc2_tf.data.folder import ImageFolderSource

    images, labels = _fashion_like(2000)
    folder = ImageFolderSource(_write_png_folder(tmp_path / "fashion", images, labels))
    order = [int(os.path.basename(path)[:5]) for path in folder.files]  # (class, name) order
    arrays = images[order]
    np.testing.assert_array_equal(folder.labels, labels[order])
    augment = emc2_tf.AugmentConfig()
    from_folder = emc2_tf.make_two_view_dataset(folder, 64, augment, seed=0)
    from_arrays = emc2_tf.make_two_view_dataset(arrays, 64, augment, seed=0)
    for a, b in zip(_epoch(from_folder), _epoch(from_arrays), strict=True):
        for key in ("index", "view1", "view2"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    weights = []
    for source in (folder, arrays):
        keras.utils.set_random_seed(0)  # a two-layer CNN: the library's takes 1.3 s a step here
        encoder = keras.Sequential([
            keras.Input((28, 28, 1)), keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(16),
            keras.layers.UnitNormalization()])
        model = emc2_tf.EMC2Model(encoder, 2000, seed=0)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        model.fit(emc2_tf.make_two_view_dataset(source, 64, augment, seed=0), epochs=1,
                  verbose=0)
        weights.append([np.asarray(weight) for weight in model.weights])
    assert int(model.optimizer.iterations.numpy()) == 31
    assert (weights[0][0] >= 0).sum() > 1000  # chain_index: the chains moved
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_file_that_fails_to_read_during_fit_is_one_line_naming_it(tmp_path):
    """A PNG damaged after the folder was scanned (same size: the scan's fingerprint
    cannot see it) stops `fit` with one `ValueError` naming the file, not a
    TensorFlow traceback, from the pipeline's read and from EMC²'s image table.

    Catches `fit` not asking the dataset's source (`image_source`) or the model's
    table (`image_sources()`) to name the file."""
    import keras

    from emc2_tf.data.folder import ImageFolderSource

    images = np.random.default_rng(0).integers(0, 256, (16, 4, 4, 1), np.uint8)
    folder = ImageFolderSource(_write_png_folder(tmp_path / "flat", images))
    damaged = folder.path(5)
    size = os.path.getsize(damaged)
    with open(damaged, "r+b") as handle:  # keep the PNG signature and end, break the rest
        handle.seek(16)
        handle.write(b"\xff" * (size - 28))
    for table, dataset_images in ((None, folder), (folder, images)):
        model = emc2_tf.EMC2Model(_tiny_encoder((4, 4, 1)), 16, images=table,
                                  out_of_batch="reencode" if table is not None else "drop")
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        if table is not None:  # every chain starts on image 5: the table reads it at once
            model.chain_index.assign(np.full(16, 5, np.int32))
            model.chain_log_score.assign(np.zeros(16, np.float32))
        with pytest.raises(ValueError) as error:
            model.fit(emc2_tf.make_two_view_dataset(dataset_images, 8, augment=None),
                      epochs=1, verbose=0)
        message = str(error.value)
        assert message.startswith(f"image file {damaged} cannot be read or decoded")
        assert "\n" not in message and "Traceback" not in message

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
