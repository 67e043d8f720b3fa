"""Issue 13, items 1 and 4: finite or stop, and early one-line errors.

Through the Python API and the command line (subprocesses, as tests/test_cli*.py).
Every training here is tiny: digits (or a 300-image subset), one epoch.
"""

import errno
import os
import re
import signal
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf
from helpers import ROOT, parse_summary, run_python


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def _one_line_error(result, *needles) -> str:
    """The single `<program>: error: ...` line of a failed command, holding `needles`."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _files(directory) -> list[str]:
    """Every path under `directory`, relative, sorted ([] if it does not exist)."""
    found = []
    for root, dirs, names in os.walk(directory):
        for name in dirs + names:
            found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(found)


def _digits_subset(n=256):
    return emc2_tf.load_digits().train_images[:n]


def _model(method="simclr", n=256, learning_rate=1e-3, images=None, seed=0):
    keras.utils.set_random_seed(seed)
    encoder = emc2_tf.build_small_cnn_encoder((8, 8, 1))
    options = {"images": images} if method == "emc2" else {}
    model = emc2_tf.build_model(method, encoder=encoder, dataset_size=n, seed=seed, **options)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    return model


def _two_view_batches(images, batch_size, nan_at=None):
    """Un-augmented two-view batches in order; `nan_at`: one NaN pixel in that image's view 1."""
    view1 = images.copy()
    if nan_at is not None:
        view1[nan_at, 3, 3, 0] = np.nan
    return tf.data.Dataset.from_tensor_slices({
        "index": np.arange(len(images), dtype=np.int32), "view1": view1, "view2": images,
    }).batch(batch_size, drop_remainder=True)


# 1. Finite or stop -------------------------------------------------------------------


def test_every_float_flag_refuses_nan_and_inf():
    """Bug caught: `--temperature=inf` and `--worker_timeout=inf` were accepted (inf > 0);
    any float flag added later without a finiteness check fails here too (every
    float flag of the trainer is tried with inf, -inf and nan)."""
    from absl import flags

    from trainers.run_flags import define_train_flags

    values = flags.FlagValues()
    define_train_flags(values)
    float_flags = sorted(name for name, flag in values._flags().items()
                         if flag.flag_type() == "float" and name == flag.name)
    assert {"temperature", "learning_rate", "weight_decay", "gamma", "kcl_t", "kcl_gamma",
            "worker_timeout"} <= set(float_flags)
    for name in float_flags:
        for bad in ("inf", "-inf", "nan"):
            fresh = flags.FlagValues()
            define_train_flags(fresh)
            with pytest.raises(flags.IllegalFlagValueError) as error:
                fresh(["train", f"--{name}={bad}"])
            text = str(error.value)
            assert f"--{name}" in text and "\n" not in text, (name, bad, text)
            if bad == "inf" and name not in ("gamma", "test_fraction"):  # "(0, 1]", "(0, 1)"
                assert "finite" in text, text


def test_cli_refuses_an_infinite_temperature_before_anything_is_written(tmp_path):
    """Bug caught: `--temperature=inf` got past the flag parser (refused only after
    the data set was loaded, by the model's constructor)."""
    result = run_python(["-m", "trainers.train", "--temperature=inf", "--epochs=1",
                         f"--checkpoint_dir={tmp_path / 'ck'}", f"--export_dir={tmp_path / 'sm'}",
                         f"--tensorboard_dir={tmp_path / 'tb'}"])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--temperature must be > 0 and finite" in result.stderr, result.stderr[-2000:]
    assert _files(tmp_path) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_pixels_are_refused_where_images_enter(bad):
    """Bug caught: one NaN pixel in `images` passed `from_arrays` (NaN slips through the
    [0, 1] range check), `make_two_view_dataset` and `EMC2Model`'s image table, and
    silently made the weights non-finite."""
    images = _digits_subset(64)
    broken = images.copy()
    broken[5, 2, 2, 0] = bad
    labels = np.zeros(64, np.int64)
    with pytest.raises(ValueError, match=r"1 image\(s\) hold NaN or inf .*index 5"):
        emc2_tf.from_arrays(broken, labels, images[:8], labels[:8])
    with pytest.raises(ValueError, match=r"images: 1 image\(s\) hold NaN or inf .*index 5"):
        emc2_tf.make_two_view_dataset(broken, 8)
    with pytest.raises(ValueError, match=r"model's image table\): 1 image\(s\) .*index 5"):
        _model("emc2", n=64, images=broken)  # refused when the table is set
    model = _model("emc2", n=64, images=images)
    with pytest.raises(ValueError, match=r"model's image table\): 1 image\(s\) .*index 5"):
        model.set_image_table(broken)


class _RecordLoss(emc2_tf.StopOnNonFinite):
    """Records the logged loss and never stops (a `StopOnNonFinite` in the callbacks
    replaces the one `ContrastiveModel.fit` adds)."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass


class _NonFiniteToZero(keras.layers.Layer):
    """Maps NaN and inf to 0, as the fused Conv2D+BiasAdd+ReLU kernel of some CPUs'
    oneDNN builds does inside a tf.function (seen on Intel; not on AMD EPYC)."""

    def call(self, x):
        return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


def _nan_hiding_encoder():
    """A small CNN whose first layer's non-finite outputs become 0 on every CPU."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        _NonFiniteToZero(),
        keras.layers.Flatten(),
        keras.layers.Dense(16),
        keras.layers.UnitNormalization(),
    ])


def test_loss_is_logged_as_nan_not_zero_once_the_weights_are_not_finite():
    """Bug caught: the logged loss stayed finite (0.0) while the weights were NaN, so
    keras.callbacks.TerminateOnNaN never fired. Why: inside a tf.function TensorFlow
    fuses Conv2D+BiasAdd+ReLU, and on some CPUs the fused ReLU maps NaN to 0, so a
    NaN first-layer kernel gives every image the same finite embedding and the loss
    β − β = 0. The encoder here maps its first layer's NaN to 0 explicitly, so the
    case arises on every CPU (on AMD EPYC the fused kernel keeps the NaN). The step
    must log NaN when the loss, a gradient or an updated weight is not finite."""
    images = _digits_subset(32)
    model = emc2_tf.build_model("emc2", encoder=_nan_hiding_encoder(), dataset_size=32,
                                seed=0, images=images)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    first = _RecordLoss()
    model.fit(_two_view_batches(images, 32, nan_at=3), epochs=1, verbose=0, callbacks=[first])
    kernel = model.encoder.trainable_variables[0]
    assert not np.isfinite(kernel.numpy()).all()  # the NaN pixel's gradient reached it
    assert np.isnan(first.losses).all(), first.losses  # the forward loss itself was finite
    # A clean batch with the broken weights: the graph's forward loss is 0 (β − β) ...
    clean = next(iter(_two_view_batches(images, 32)))
    forward = tf.function(lambda views: model.contrastive_loss(
        clean["index"], model.encoder(views, training=True))[0])
    assert abs(float(forward(tf.concat([clean["view1"], clean["view2"]], 0)))) < 1e-5
    # ... and the logged loss is NaN, not that 0.
    second = _RecordLoss()
    model.fit(_two_view_batches(images, 32), epochs=1, verbose=0, callbacks=[second])
    assert np.isnan(second.losses).all(), second.losses
    # keras.callbacks.TerminateOnNaN now fires (our own StopOnNonFinite left out).
    terminate = keras.callbacks.TerminateOnNaN()
    model.fit(_two_view_batches(images, 32), epochs=3, verbose=0,
              callbacks=[terminate, _RecordLoss()])
    assert model.stop_training


def test_fit_stops_at_the_first_non_finite_step_naming_epoch_and_step():
    """Bug caught: `model.fit` went on training after a NaN step (weights NaN, 1-NN at
    chance) instead of stopping with an error naming the epoch and the step."""
    images = _digits_subset(128)
    model = _model("simclr", n=128)
    dataset = _two_view_batches(images, 32, nan_at=70)  # batch 3 of 4
    with pytest.raises(emc2_tf.NonFiniteError) as error:
        model.fit(dataset, epochs=2, verbose=0)
    message = str(error.value)
    assert "\n" not in message and "epoch 1, step 3 (global step 3)" in message, message
    assert (error.value.epoch, error.value.step, error.value.global_step) == (1, 3, 3)
    assert re.search(r"conv2d(_\d+)?/kernel", message)  # names the broken weights
    assert int(model.optimizer.iterations.numpy()) <= 4  # stopped within epoch 1


def test_checkpointed_fit_stops_and_never_writes_non_finite_weights(tmp_path):
    """Bugs caught: a diverged run (learning rate 1e30: NaN from step 2) kept writing
    NaN checkpoints; `TrainingCheckpoint.save` wrote NaN weights when asked; the
    SIGINT/SIGTERM handlers of `fit_with_checkpoints` stayed installed after the
    error (Ctrl-C then no longer interrupted the Python session)."""
    images = _digits_subset(256)
    model = _model("simclr", n=256, learning_rate=1e30)
    checkpoint = emc2_tf.TrainingCheckpoint(str(tmp_path / "ck"), model, steps_per_epoch=8,
                                            every_n_steps=1, keep=20)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(emc2_tf.NonFiniteError) as error:
        emc2_tf.fit_with_checkpoints(
            model, lambda epoch, step: emc2_tf.make_two_view_dataset(
                images, 32, augment=None, start_epoch=epoch, start_step=step),
            epochs=2, checkpoint=checkpoint, verbose=0)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    failed = error.value.global_step
    assert failed >= 2 and f"epoch 1, step {failed}/8" in str(error.value)
    saved = emc2_tf.list_checkpoints(str(tmp_path / "ck"))
    assert [os.path.basename(p) for p in saved] == [f"ckpt-{s}" for s in range(1, failed)]
    for path in saved:
        reader = tf.train.load_checkpoint(path)
        for name, dtype in reader.get_variable_to_dtype_map().items():
            if dtype.is_floating:
                assert np.isfinite(reader.get_tensor(name)).all(), (path, name)
    # Asked directly, save refuses the NaN weights and writes nothing.
    before = _files(tmp_path / "ck")
    with pytest.raises(emc2_tf.NonFiniteError, match="refusing to write checkpoint ckpt-"):
        checkpoint.save()
    assert _files(tmp_path / "ck") == before


def test_export_refuses_non_finite_weights(tmp_path):
    """Bug caught: `export_encoder` exported NaN weights (served silently as NaN
    embeddings)."""
    keras.utils.set_random_seed(0)
    encoder = emc2_tf.build_small_cnn_encoder((8, 8, 1))
    kernel = encoder.trainable_variables[0]
    kernel.assign(np.where(np.arange(kernel.numpy().size).reshape(kernel.shape) == 7, np.inf,
                           kernel.numpy()))
    with pytest.raises(emc2_tf.NonFiniteError, match=r"refusing to export .*conv2d(_\d+)?/kernel"):
        emc2_tf.export_encoder(encoder, str(tmp_path / "sm"), "m")
    assert not (tmp_path / "sm").exists()


def test_cli_stops_a_diverging_run_in_one_line_and_saves_nothing_non_finite(tmp_path):
    """Bug caught: `--learning_rate=1e30` (any rate too high) trained on with a NaN loss,
    wrote NaN checkpoints, ended in an SVD traceback; it must stop with one line
    naming the epoch and step, exit ≠ 0, keep only finite checkpoints, export nothing."""
    result = run_python(["-m", "trainers.train", "--method=simclr", "--learning_rate=1e30",
                         "--train_size=300", "--batch_size=32", "--epochs=1", "--eval_every=0",
                         "--checkpoint_every_steps=1", f"--checkpoint_dir={tmp_path / 'ck'}",
                         f"--export_dir={tmp_path / 'sm'}", f"--tensorboard_dir={tmp_path / 'tb'}"])
    line = _one_line_error(result, "train: error: non-finite training step at epoch 1, step ",
                           "nothing exported")
    assert result.returncode == 2
    step = int(re.search(r"step (\d+)/9", line).group(1))
    saved = emc2_tf.list_checkpoints(str(tmp_path / "ck"))
    assert [os.path.basename(p) for p in saved] == [f"ckpt-{s}" for s in range(1, step)][-3:]
    for path in saved:
        reader = tf.train.load_checkpoint(path)
        for name, dtype in reader.get_variable_to_dtype_map().items():
            if dtype.is_floating:
                assert np.isfinite(reader.get_tensor(name)).all(), (path, name)
    assert not (tmp_path / "sm").exists()


def test_cli_export_and_evaluate_refuse_a_non_finite_checkpoint(tmp_path):
    """Bugs caught: `trainers.export` of a checkpoint holding NaN weights (as written
    before this fix) exited 0 and published a version serving NaN embeddings;
    `trainers.evaluate` of it printed accuracies of NaN embeddings."""
    from absl import flags

    from trainers.common import build_run
    from trainers.run_flags import define_train_flags, flags_file_text, write_flags_file

    values = flags.FlagValues()
    define_train_flags(values)
    args = ["--method=simclr", "--train_size=300", "--batch_size=32", "--epochs=1"]
    values(["train", *args])
    run = build_run("train", values)
    directory = str(tmp_path / "ck")
    write_flags_file(directory, flags_file_text(values, ["method", "train_size", "batch_size",
                                                          "epochs"]))
    saver = emc2_tf.TrainingCheckpoint(directory, run.model, steps_per_epoch=9,
                                       handle_signals=False)
    run.model.optimizer.build(run.model.trainable_variables)
    kernel = run.encoder.trainable_variables[0]
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    saver.manager.save(checkpoint_number=9)  # behind the guard: a checkpoint of old
    result = run_python(["-m", "trainers.export", f"--checkpoint_dir={directory}",
                         f"--export_dir={tmp_path / 'sm'}"])
    _one_line_error(result, "export: error: checkpoint ", "ckpt-9 holds non-finite weights",
                    "conv2d/kernel", "Nothing was written")
    assert _files(tmp_path / "sm") == []
    result = run_python(["-m", "trainers.evaluate", f"--checkpoint_dir={directory}",
                         f"--output_json={tmp_path / 'eval.json'}"])
    _one_line_error(result, "evaluate: error: checkpoint ", "ckpt-9 holds non-finite weights",
                    "conv2d/kernel")
    assert not (tmp_path / "eval.json").exists()


_NAN_DIGITS = r"""
import sys
import numpy as np
import sklearn.datasets
from absl import app

real = sklearn.datasets.load_digits
def load_digits(*args, **kwargs):  # a data file with one NaN pixel
    bunch = real(*args, **kwargs)
    bunch.images = bunch.images.copy()
    bunch.images[0, 3, 3] = np.nan
    return bunch
sklearn.datasets.load_digits = load_digits
from trainers import train
sys.argv = ["train", *sys.argv[1:]]
app.run(train.main)
"""


def test_cli_refuses_nan_pixels_in_the_loaded_data(tmp_path):
    """Bug caught: a data set with a NaN pixel was loaded and trained on (weights NaN
    from step 6 with a finite logged loss); the loader must refuse it in one line."""
    result = run_python(["-c", _NAN_DIGITS, "--epochs=1", f"--checkpoint_dir={tmp_path / 'ck'}",
                         f"--export_dir={tmp_path / 'sm'}", f"--tensorboard_dir={tmp_path / 'tb'}"])
    _one_line_error(result, "train: error: --dataset=digits: digits ", "hold NaN or inf")
    assert _files(tmp_path) == []


# 4. Early, one-line errors ----------------------------------------------------------


def test_unwritable_reason_for_files_and_read_only_folders(tmp_path):
    """Bug caught: an output folder that cannot be written (a file in the way, a
    read-only folder) was found only when first written, after the data set was
    loaded and the model built (a traceback)."""
    from trainers.common import unwritable_reason

    (tmp_path / "file").write_text("x")
    assert unwritable_reason(str(tmp_path / "ok" / "new")) is None
    assert "is a file, not a folder" in unwritable_reason(str(tmp_path / "file"))
    assert "is a file, so the folder" in unwritable_reason(str(tmp_path / "file" / "a" / "b"))
    if os.geteuid() != 0:  # chmod does not stop root
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            assert "is not writable" in unwritable_reason(str(locked / "sub"))
        finally:
            locked.chmod(0o700)
    assert _files(tmp_path) == ["file"] + (["locked"] if os.geteuid() != 0 else [])


@pytest.mark.parametrize("flag", ["checkpoint_dir", "tensorboard_dir", "export_dir"])
def test_cli_refuses_an_unwritable_output_folder_before_anything_is_built(tmp_path, flag):
    """Bug caught: `--<flag>` under a regular file (fails for root too, unlike chmod)
    failed only at its first write, after loading and building (or training), with
    a traceback; it must be one line before anything is built or written."""
    (tmp_path / "file").write_text("x")
    paths = {"checkpoint_dir": tmp_path / "ck", "tensorboard_dir": tmp_path / "tb",
             "export_dir": tmp_path / "sm"}
    paths[flag] = tmp_path / "file" / "out"
    result = run_python(["-m", "trainers.train", "--epochs=1",
                         *[f"--{name}={path}" for name, path in paths.items()]])
    _one_line_error(result, f"train: error: --{flag}={tmp_path / 'file' / 'out'}: ",
                    "is a file, so the folder")
    assert "Pre-training" not in result.stdout  # nothing built
    assert _files(tmp_path) == ["file"]


def test_export_cli_refuses_an_unwritable_export_dir_first(tmp_path):
    """Bug caught: `trainers.export` loaded the run and built the model before finding
    that `--export_dir` cannot be written."""
    (tmp_path / "file").write_text("x")
    result = run_python(["-m", "trainers.export", "--checkpoint_dir=/nonexistent",
                         f"--export_dir={tmp_path / 'file'}"])
    _one_line_error(result, f"export: error: --export_dir={tmp_path / 'file'}: ",
                    "is a file, not a folder")


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    tf.errors.ResourceExhaustedError(None, None, "No space left on device"),
])
def test_full_disk_while_checkpointing_leaves_nothing_half_written(tmp_path, monkeypatch,
                                                                   failure):
    """Bug caught: a full disk mid-checkpoint left TensorFlow's `ckpt-N_temp` folder and
    partial `ckpt-N.*` shards beside the good checkpoints, with a traceback. It must
    be one `OSError` line; the previous checkpoint stays the latest and restorable."""
    model = _model("simclr", n=256)
    directory = tmp_path / "ck"
    checkpoint = emc2_tf.TrainingCheckpoint(str(directory), model, steps_per_epoch=8)
    model.optimizer.build(model.trainable_variables)
    checkpoint.save()  # ckpt-0
    model.optimizer.iterations.assign(5)
    before = _files(directory)

    def full_disk(self, file_prefix, options=None):  # what TensorFlow leaves mid-write
        os.makedirs(file_prefix + "_temp", exist_ok=True)
        with open(os.path.join(file_prefix + "_temp", "part-00000-of-00001.data-00000-of-00001"),
                  "wb") as handle:
            handle.write(b"partial")
        with open(file_prefix + ".data-00000-of-00001", "wb") as handle:
            handle.write(b"partial")
        with open(os.path.join(os.path.dirname(file_prefix), "checkpoint.tmp0123abcd"), "w"):
            pass
        raise failure

    monkeypatch.setattr(tf.train.Checkpoint, "_write", full_disk)
    with pytest.raises(OSError) as error:
        checkpoint.save()
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message, message
    assert "cannot write checkpoint" in message and "the latest checkpoint stays ckpt-0" in message
    if isinstance(failure, OSError):
        assert error.value.errno == errno.ENOSPC
    assert _files(directory) == before
    monkeypatch.undo()
    assert checkpoint.restore() == str(directory / "ckpt-0")


def test_full_disk_while_exporting_leaves_no_staging_folder(tmp_path, monkeypatch):
    """Bug caught: a full disk while writing the SavedModel gave a multi-line
    TensorFlow/OS traceback; it must be one line, the staging folder removed, the
    served (highest) version unchanged."""
    keras.utils.set_random_seed(0)
    encoder = emc2_tf.build_small_cnn_encoder((8, 8, 1))
    os.makedirs(tmp_path / "m" / "1")  # the version served so far

    def full_disk(self, filepath, verbose=None):
        with open(os.path.join(filepath, "saved_model.pb"), "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    # ExportArchive() builds the backend's subclass (TFExportArchive): patch that.
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", full_disk)
    with pytest.raises(OSError) as error:
        emc2_tf.export_encoder(encoder, str(tmp_path), "m")
    message = str(error.value)
    assert "\n" not in message and error.value.errno == errno.ENOSPC
    assert "No space left on device" in message and "highest version stays 1" in message
    assert os.listdir(tmp_path / "m") == ["1"]
    # `model.export(path)` (Keras' API, one unversioned folder) writes the same way.
    model = emc2_tf.build_model("simclr", encoder=encoder, dataset_size=16)
    with pytest.raises(OSError) as error:
        model.export(str(tmp_path / "plain"))
    message = str(error.value)
    assert "\n" not in message and error.value.errno == errno.ENOSPC
    assert "nothing was written at" in message and os.listdir(tmp_path) == ["m"]


def test_full_disk_while_writing_flags_txt_leaves_no_staging_file(tmp_path, monkeypatch):
    """Bug caught: a full disk while writing flags.txt left a hidden `.flags-*`
    staging file behind."""
    from trainers.run_flags import FLAGS_FILE, write_flags_file

    write_flags_file(str(tmp_path), "--epochs=1\n")
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle, mode):
            self.stream = real_fdopen(handle, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(OSError, match="No space left"):
        write_flags_file(str(tmp_path), "--epochs=2\n")
    assert os.listdir(tmp_path) == [FLAGS_FILE]
    assert (tmp_path / FLAGS_FILE).read_text() == "--epochs=1\n"


def test_unknown_dataset_is_one_line_naming_the_choices(tmp_path):
    """Bug caught: `--dataset=nosuchset` printed 460 lines (TFDS' whole catalogue)
    instead of the accepted built-ins and how to point at a prepared tfds folder."""
    with pytest.raises(ValueError) as error:
        emc2_tf.load_dataset("nosuchset", data_dir=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "'nosuchset'" in message
    assert "digits, fashion_mnist, folder" in message
    assert "tfds_prepare NAME --data_dir=DIR" in message
    result = run_python(["-m", "trainers.train", "--dataset=nosuchset", f"--data_dir={tmp_path}",
                         "--epochs=1", f"--checkpoint_dir={tmp_path / 'ck'}"])
    _one_line_error(result, "train: error: --dataset=nosuchset: unknown data set",
                    "digits, fashion_mnist", "--data_dir=DIR")
    assert "abstract_reasoning" not in result.stderr and len(result.stderr.splitlines()) < 10


def _write_idx(path, array):
    import gzip
    import struct

    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_truncated_or_corrupt_idx_file_is_named(tmp_path):
    """Bug caught: a truncated `.gz` idx file gave an EOFError traceback that did not
    name the file (likewise a corrupt gzip header or a short idx header)."""
    from emc2_tf.data.sources import read_idx

    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": rng.integers(0, 255, (30, 28, 28)),
             "train-labels-idx1-ubyte": np.arange(30) % 10,
             "t10k-images-idx3-ubyte": rng.integers(0, 255, (10, 28, 28)),
             "t10k-labels-idx1-ubyte": np.arange(10) % 10}
    for stem, array in files.items():
        _write_idx(tmp_path / f"{stem}.gz", array)
    assert emc2_tf.load_fashion_mnist(str(tmp_path)).num_train == 30
    broken = tmp_path / "train-images-idx3-ubyte.gz"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(broken)) + " is truncated or corrupt"):
        read_idx(str(broken))
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(b"\x1f\x8bnot gzip at all")
    with pytest.raises(ValueError, match=re.escape(str(corrupt)) + " is truncated or corrupt"):
        read_idx(str(corrupt))
    short = tmp_path / "short-idx"
    short.write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))
    with pytest.raises(ValueError, match=re.escape(str(short)) + " is truncated: its header"):
        read_idx(str(short))
    result = run_python(["-m", "trainers.train", "--dataset=fashion_mnist",
                         f"--data_dir={tmp_path}", "--epochs=1",
                         f"--checkpoint_dir={tmp_path / 'ck'}"])
    _one_line_error(result, f"train: error: --dataset=fashion_mnist: {broken} is truncated")
    assert not (tmp_path / "ck").exists()


RUN = ["--train_size=300", "--batch_size=32", "--epochs=1", "--eval_every=0"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished run (1 epoch of 9 steps on 300 digits) named `first`."""
    tmp = tmp_path_factory.mktemp("finished")
    result = run_python(["-m", "trainers.train", *RUN, "--model_name=first",
                         f"--checkpoint_dir={tmp / 'ck'}", f"--export_dir={tmp / 'sm'}",
                         f"--tensorboard_dir={tmp / 'tb'}"], cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, parse_summary(result.stdout)


def test_resume_of_a_finished_run_trains_and_exports_nothing(finished_run):
    """Bug caught: `--resume` of a finished run silently exported a duplicate version
    (savedmodels/<name>/2) and rewrote the run's files; it must say that nothing is
    left to train."""
    tmp, summary = finished_run
    before = {name: _files(tmp / name) for name in ("ck", "sm", "tb")}
    result = run_python(["-m", "trainers.train", "--resume", f"--checkpoint_dir={tmp / 'ck'}"],
                        cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("train: ")]
    assert len(lines) == 1 and "nothing left to train" in lines[0], result.stderr[-2000:]
    assert "ckpt-9 ends epoch 1 (global step 9) and --epochs=1" in lines[0]
    assert "summary:" not in result.stdout
    assert {name: _files(tmp / name) for name in ("ck", "sm", "tb")} == before
    assert os.listdir(tmp / "sm" / "first") == ["1"]


def test_flagfile_repeat_needs_its_own_model_name(finished_run):
    """Bug caught: the README's "same run again" (`--flagfile=<run>/flags.txt
    --checkpoint_dir=<new>`) wrote into the first run's TensorBoard folder and
    published itself as the newest served version of the first run's name. Now
    flags.txt leaves out --checkpoint_dir, a new run refuses a taken name, and the
    repeat under its own --model_name reproduces the run bit for bit."""
    tmp, summary = finished_run
    flags_file = tmp / "ck" / "flags.txt"
    text = flags_file.read_text()
    assert "--model_name=first" in text and "--checkpoint_dir" not in text
    before = {name: _files(tmp / name) for name in ("ck", "sm", "tb")}
    result = run_python(["-m", "trainers.train", f"--flagfile={flags_file}",
                         f"--checkpoint_dir={tmp / 'ck-repeat'}"], cwd=tmp)
    _one_line_error(result, "train: error: --model_name=first is the name of an earlier run",
                    f"{tmp / 'tb' / 'first'} holds its TensorBoard logs",
                    "would publish itself as version 2", "--model_name=first-2")
    assert {name: _files(tmp / name) for name in ("ck", "sm", "tb")} == before
    assert not (tmp / "ck-repeat").exists()
    result = run_python(["-m", "trainers.train", f"--flagfile={flags_file}",
                         "--model_name=repeat"], cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    repeat = parse_summary(result.stdout)
    assert repeat["state_digest"] == summary["state_digest"]  # the same run again
    assert repeat["export_path"] == str(tmp / "sm" / "repeat" / "1")
    assert repeat["checkpoint_dir"] == os.path.join("checkpoints", "repeat")
    assert _files(tmp / "tb" / "repeat") and os.listdir(tmp / "sm" / "first") == ["1"]


def test_a_batch_of_one_is_refused_by_the_api_and_the_cli():
    """Bug caught: a batch of one image (no negatives) trained silently with loss 0:
    a `.batch(1)` dataset, or a partial last batch of 1 (`drop_remainder=False`)."""
    from absl import flags

    from trainers.run_flags import define_train_flags

    images = _digits_subset(65)
    with pytest.raises(ValueError, match="batch_size must be an integer ≥ 2"):
        emc2_tf.make_two_view_dataset(images, 1)
    model = _model("simclr", n=65)
    single = _two_view_batches(images, 1)
    with pytest.raises(ValueError, match=r"batches hold 1 image\(s\): a contrastive batch"):
        model.fit(single, epochs=1, verbose=0)
    partial = tf.data.Dataset.from_tensor_slices({
        "index": np.arange(65, dtype=np.int32), "view1": images, "view2": images}).batch(32)
    with pytest.raises(ValueError, match="yielded a batch of 1 image"):
        model.fit(partial, epochs=1, verbose=0)
    for bad in ("1", "0"):
        values = flags.FlagValues()
        define_train_flags(values)
        with pytest.raises(flags.IllegalFlagValueError, match="--batch_size must be ≥ 2"):
            values(["train", f"--batch_size={bad}"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
