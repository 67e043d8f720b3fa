"""TrainingCheckpoint and fit_with_checkpoints: exact resume, corrupt files, signals.

The subprocess SIGKILL test of the CLI is in test_cli_production.py; here the
library is checked in-process, against an uninterrupted run of the same
seed, weight for weight.
"""

import hashlib
import os
import signal
import sys

import keras
import numpy as np
import pytest

import emc2_tf
from emc2_tf.checkpoint import CheckpointError, list_checkpoints

N, BATCH, EPOCHS = 96, 16, 3  # 6 steps per epoch, 18 in all
STEPS = N // BATCH


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((N, 8, 8, 1)).astype(np.float32)


def _setup(images, method, directory, every_n_steps=4, keep=3, spectral=False, options=None):
    keras.utils.set_random_seed(0)
    encoder = emc2_tf.build_small_cnn_encoder((8, 8, 1))
    options = dict(options or {}, **({"images": images} if method == "emc2" else {}))
    model = emc2_tf.build_model(method, encoder=encoder, dataset_size=N, seed=0,
                                temperature=0.2, **options)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    order = None
    if spectral:
        order = emc2_tf.SpectralBatchSelection(images, BATCH, every_k_epochs=2, groups_k=3,
                                               seed=0, verbose=False)
    augment = emc2_tf.AugmentConfig.for_dataset("digits")

    def make_dataset(epoch, step):
        return emc2_tf.make_two_view_dataset(images, BATCH, augment, seed=0, batch_order=order,
                                             start_epoch=epoch, start_step=step)

    checkpoint = emc2_tf.TrainingCheckpoint(str(directory), model, STEPS,
                                            every_n_steps=every_n_steps, keep=keep,
                                            batch_order=order)
    callbacks = [order] if order is not None else []
    return model, checkpoint, make_dataset, callbacks


class _Crash(keras.callbacks.Callback):
    """Raises at a global step: a crash without any chance to save."""

    def __init__(self, at_step):
        super().__init__()
        self.at_step = at_step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.at_step:
            raise RuntimeError("simulated crash")


def _state(model):
    return [keras.ops.convert_to_numpy(w) for w in [*model.weights, *model.optimizer.variables]]


@pytest.mark.parametrize("method,spectral,options", [
    ("emc2", False, None),
    # Burn-in 0: the first recorded MH step of every visit sits on the chain's
    # stored state, so the result depends on the restored chain tables (with
    # the default burn-in B − 1 every chain forgets its start before recording).
    ("emc2", False, {"burn_in": 0}),
    ("sogclr", False, None),
    ("simclr", True, None),
], ids=["emc2", "emc2-burn_in0", "sogclr", "simclr-spectral"])
def test_crash_then_resume_equals_the_uninterrupted_run(images, tmp_path, method, spectral,
                                                        options):
    """A crash at step 11, resumed from ckpt-8, ends bit-identical to the uninterrupted run.

    Catches: a checkpoint without the chain tables (`chain_index`,
    `chain_log_score`; seen with burn-in 0), without SogCLR's `u`, the
    optimizer slots, the seed generator or the spectral selection; a resume
    that restarts the data stream at the wrong (epoch, step).
    """
    model, checkpoint, make_dataset, callbacks = _setup(images, method, tmp_path / "a",
                                                        spectral=spectral, options=options)
    emc2_tf.fit_with_checkpoints(model, make_dataset, EPOCHS, checkpoint, callbacks, verbose=0)
    reference = _state(model)
    assert checkpoint.global_step == EPOCHS * STEPS

    # Crash at global step 11 (epoch 1, step 5): the last checkpoint is step 8 (epoch 1, step 2).
    model, checkpoint, make_dataset, callbacks = _setup(images, method, tmp_path / "b",
                                                        spectral=spectral, options=options)
    with pytest.raises(RuntimeError, match="simulated crash"):
        emc2_tf.fit_with_checkpoints(model, make_dataset, EPOCHS, checkpoint,
                                     [*callbacks, _Crash(11)], verbose=0)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "b"))] == [
        "ckpt-4", "ckpt-6", "ckpt-8"]

    model, checkpoint, make_dataset, callbacks = _setup(images, method, tmp_path / "b",
                                                        spectral=spectral, options=options)
    assert checkpoint.restore().endswith("ckpt-8")
    assert checkpoint.position == (1, 2)
    emc2_tf.fit_with_checkpoints(model, make_dataset, EPOCHS, checkpoint, callbacks, verbose=0)
    resumed = _state(model)
    assert len(resumed) == len(reference)
    for got, expected in zip(resumed, reference):
        np.testing.assert_array_equal(got, expected)  # bit for bit, chains and u included
    assert checkpoint.global_step == EPOCHS * STEPS
    # keep=3: the newest three remain.
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "b"))] == [
        "ckpt-12", "ckpt-16", "ckpt-18"]


def test_restore_brings_back_every_per_sample_state(images, tmp_path):
    model, checkpoint, make_dataset, _ = _setup(images, "emc2", tmp_path)
    emc2_tf.fit_with_checkpoints(model, make_dataset, 1, checkpoint, verbose=0)
    saved_chains = model.chain_index.numpy().copy()
    saved_seed = keras.ops.convert_to_numpy(model.seed_generator.state)
    assert (saved_chains >= 0).sum() > N // 2  # the chains did move
    fresh, fresh_checkpoint, _, _ = _setup(images, "emc2", tmp_path)
    assert (fresh.chain_index.numpy() == -1).all()
    fresh_checkpoint.restore()
    np.testing.assert_array_equal(fresh.chain_index.numpy(), saved_chains)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fresh.seed_generator.state), saved_seed)
    assert int(fresh.optimizer.iterations.numpy()) == STEPS


def _digest(directory):
    digest = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            digest[name] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return digest


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_index"])
def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_overwritten(images, tmp_path, damage):
    model, checkpoint, make_dataset, _ = _setup(images, "emc2", tmp_path, every_n_steps=0)
    emc2_tf.fit_with_checkpoints(model, make_dataset, 2, checkpoint, verbose=0)
    latest = list_checkpoints(str(tmp_path))[-1]
    assert latest.endswith("ckpt-12")
    data_file = latest + ".data-00000-of-00001"
    if damage == "truncate":
        with open(data_file, "r+b") as handle:
            handle.truncate(os.path.getsize(data_file) // 2)
    elif damage == "garbage":
        with open(data_file, "r+b") as handle:
            handle.write(os.urandom(4096))
        os.truncate(latest + ".index", 40)
    else:
        os.remove(latest + ".index")
    before = _digest(tmp_path)
    fresh, fresh_checkpoint, _, _ = _setup(images, "emc2", tmp_path, every_n_steps=0)
    with pytest.raises(CheckpointError) as error:
        fresh_checkpoint.restore()
    message = str(error.value)
    assert "ckpt-12" in message and "ckpt-6" in message, message  # names the bad and the good one
    assert "\n" not in message and "Traceback" not in message
    assert _digest(tmp_path) == before  # nothing written, the good checkpoint intact
    # The earlier checkpoint still restores.
    assert fresh_checkpoint.restore(list_checkpoints(str(tmp_path))[0]).endswith("ckpt-6")
    assert fresh_checkpoint.position == (1, 0)


def test_a_different_run_is_refused(images, tmp_path):
    model, checkpoint, make_dataset, _ = _setup(images, "emc2", tmp_path, every_n_steps=0)
    emc2_tf.fit_with_checkpoints(model, make_dataset, 1, checkpoint, verbose=0)
    other, other_checkpoint, _, _ = _setup(images, "sogclr", tmp_path)
    with pytest.raises(CheckpointError, match="different model"):
        other_checkpoint.restore()
    same = _setup(images, "emc2", tmp_path)[0]
    wrong_steps = emc2_tf.TrainingCheckpoint(str(tmp_path), same, STEPS * 2)
    with pytest.raises(CheckpointError, match="written with 6 steps per epoch, this run has 12"):
        wrong_steps.restore()


class _Signal(keras.callbacks.Callback):
    def __init__(self, at_step, signum):
        super().__init__()
        self.at_step, self.signum = at_step, signum

    def on_train_batch_begin(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.at_step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_stops_after_the_current_step(images, tmp_path, signum):
    model, checkpoint, make_dataset, _ = _setup(images, "emc2", tmp_path, every_n_steps=0)
    previous = signal.getsignal(signum)
    history = emc2_tf.fit_with_checkpoints(model, make_dataset, EPOCHS, checkpoint,
                                           [_Signal(9, signum)], verbose=0)
    assert checkpoint.interrupted == signum
    assert checkpoint.global_step == 10  # the step that was running finished
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == [
        "ckpt-6", "ckpt-10"]
    assert len(history["loss"]) == 2  # stopped in the second epoch
    assert signal.getsignal(signum) == previous  # handlers restored


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
