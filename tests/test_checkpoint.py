"""TrainingCheckpoint and fit_with_checkpoints: exact resume, corrupt files, signals.

The subprocess SIGKILL test of the CLI is in test_cli_production.py; here the
library is checked in-process, against an uninterrupted run of the same
seed, weight for weight.
"""

import hashlib
import os
import re
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


@pytest.fixture(scope="module")
def two_epochs(images, tmp_path_factory):
    """A folder with the checkpoints of 2 epochs (ckpt-6, ckpt-12), written once."""
    directory = tmp_path_factory.mktemp("two_epochs") / "ck"
    model, checkpoint, make_dataset, _ = _setup(images, "simclr", directory, every_n_steps=0)
    emc2_tf.fit_with_checkpoints(model, make_dataset, 2, checkpoint, verbose=0)
    checkpoint.release()
    return directory


def _checkpoint_digest(directory):
    """SHA-256 of every checkpoint file (`ckpt-*`, the state file), by name."""
    return {name: digest for name, digest in _digest(directory).items()
            if name.startswith("ckpt-") or name == "checkpoint"}


_STATE_DAMAGE = {
    # name: (what is done to the state file, the problem the one line must name)
    "garbage": (lambda state: state.write_text("garbage here\n"), "does not parse"),
    "binary": (lambda state: state.write_bytes(bytes(range(256))), "does not parse (not text)"),
    "empty": (lambda state: state.write_text(""), "names no checkpoint"),
    "deleted": (lambda state: state.unlink(), "is missing"),
    # A kill between writing ckpt-12 and recording it: the state still names ckpt-6.
    "behind": (lambda state: state.write_text(
        'model_checkpoint_path: "ckpt-6"\nall_model_checkpoint_paths: "ckpt-6"\n'),
        "names ckpt-6 as the latest, but ckpt-12 on disk is newer"),
    # The latest it names is gone (its files deleted or never complete).
    "ahead": (lambda state: state.write_text(
        'model_checkpoint_path: "ckpt-18"\nall_model_checkpoint_paths: "ckpt-12"\n'
        'all_model_checkpoint_paths: "ckpt-18"\n'),
        "names ckpt-18 as the latest, but none of its files is on disk"),
}


@pytest.mark.parametrize("damage", sorted(_STATE_DAMAGE))
def test_a_state_file_that_disagrees_stops_restore_and_nothing_is_lost(
        images, two_epochs, tmp_path, damage):
    """The `checkpoint` state file garbled, binary, empty, deleted, behind or ahead
    of the ckpt-* files: `restore()` raises one line naming the checkpoints on disk
    and the newest's path, TensorFlow logs nothing, every checkpoint file stays
    byte-identical, and after an explicit `restore(path)` the run saves on
    without deleting or overwriting the earlier checkpoints.

    Bugs caught (issue 19): a garbled or deleted state file made `--resume` start
    at step 0 ("no checkpoint yet") and overwrite the run; TensorFlow's four
    ParseError warnings; `list_checkpoints` read only the state file (so saw
    nothing); an empty state file made the CheckpointManager raise a traceback.
    """
    import logging
    import shutil

    directory = tmp_path / "ck"
    shutil.copytree(two_epochs, directory)
    action, problem = _STATE_DAMAGE[damage]
    action(directory / "checkpoint")
    before = _checkpoint_digest(directory)
    assert [os.path.basename(p) for p in list_checkpoints(str(directory))] == [
        "ckpt-6", "ckpt-12"]  # found from the files, whatever the state file says
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("tensorflow").addHandler(handler)
    try:
        model, checkpoint, make_dataset, _ = _setup(images, "simclr", directory,
                                                    every_n_steps=0)
        with pytest.raises(emc2_tf.CheckpointStateError) as error:
            checkpoint.restore()
        # Without a restore, the folder is an earlier run's: fit refuses before step 1.
        with pytest.raises(CheckpointError, match="holds checkpoints of an earlier run"):
            emc2_tf.fit_with_checkpoints(model, make_dataset, 3, checkpoint, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 0
        assert _checkpoint_digest(directory) == before
        # The explicit choice continues the run (a save at step 13 here, as a step would
        # write); the earlier checkpoints stay as they were.
        assert checkpoint.restore(str(directory / "ckpt-12")).endswith("ckpt-12")
        model.optimizer.iterations.assign(13)
        assert checkpoint.save() == str(directory / "ckpt-13")
    finally:
        logging.getLogger("tensorflow").removeHandler(handler)
        checkpoint.release()
    message = str(error.value)
    assert message == (f"{directory}: ckpt-6, ckpt-12 on disk; its state file "
                       f"{directory / 'checkpoint'} {problem}; restore one explicitly by its "
                       f"path (the newest complete one is {directory / 'ckpt-12'}).")
    # No ParseError / "Checkpoint ignored". Left out: the warnings TensorFlow logs when
    # the garbage collector deletes another test's partly restored checkpoint (they
    # come and go with the xdist worker's test order).
    unrelated = ("Detecting that an object or model or tf.train.Checkpoint is being deleted",
                 "Value in checkpoint could not be found in the restored object")
    assert [r.getMessage() for r in records
            if not r.getMessage().startswith(unrelated)] == []
    earlier = {k: v for k, v in before.items() if k.startswith("ckpt-")}
    assert {k: v for k, v in _checkpoint_digest(directory).items()
            if k.startswith("ckpt-") and not k.startswith("ckpt-13")} == earlier
    assert emc2_tf.latest_checkpoint(str(directory)) == str(directory / "ckpt-13")


def test_a_checkpoint_never_saves_into_an_earlier_run_it_did_not_restore(images, two_epochs,
                                                                         tmp_path):
    """A TrainingCheckpoint on a folder holding another run's checkpoints, not restored
    from it, refuses `fit` before the first step and `save`; nothing is written.

    Bug caught: a fresh run's saves overwrote the earlier run's ckpt-6/ckpt-12
    (same step numbers) and its CheckpointManager deleted the ones its state file
    listed (keep).
    """
    import shutil

    directory = tmp_path / "ck"
    shutil.copytree(two_epochs, directory)
    before = _checkpoint_digest(directory)
    model, checkpoint, make_dataset, _ = _setup(images, "simclr", directory, every_n_steps=0)
    expected = (f"{directory} holds checkpoints of an earlier run (ckpt-6, ckpt-12 on disk; "
                "the latest ckpt-12), and none was restored")
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        emc2_tf.fit_with_checkpoints(model, make_dataset, 2, checkpoint, verbose=0)
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        checkpoint.save()
    assert int(model.optimizer.iterations.numpy()) == 0
    assert _checkpoint_digest(directory) == before and (directory / "checkpoint").is_file()
    checkpoint.release()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
