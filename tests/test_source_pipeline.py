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
from helpers import ROOT

SOURCE_WORKER = os.path.join(ROOT, "tests", "source_worker.py")


def _epoch(dataset):
    return [{key: value.numpy() for key, value in batch.items()} for batch in dataset]


# -- several workers ----------------------------------------------------------------


def test_each_worker_dataset_holds_its_replicas_rows_of_the_global_batch():
    """Catches a worker pipeline that reads other rows than its replicas' slices of
    each global batch (tf.distribute's split: replica r gets rows r·b … r·b + b − 1,
    worker-major), views augmented with draws of their own instead of the whole
    batch's (a worker's views would differ from the one-process views), or several
    local replicas not given one slice each."""
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
        np.testing.assert_array_equal(run["own_rows.read"],
                                      batches[:, worker * 8:(worker + 1) * 8].ravel())
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


def _write_png_folder(directory, images, labels=None):
    """Writes uint8 `[N, H, W, 1]` images as PNG files whose sorted order is the
    index order (class folders `c<label>` when labelled); returns the folder."""
    from PIL import Image

    for i, image in enumerate(images):
        folder = directory if labels is None else directory / f"c{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"{i:05d}.png")
    return str(directory)


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

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
