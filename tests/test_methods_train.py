"""Every registered method trains on digits through model.fit and the CLI, and its exact loss goes down."""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf

from helpers import parse_summary, run_python

IN_BATCH = ["simclr", "dcl", "dhel", "kcl"]
#: Methods whose objective is the global contrastive loss (a stateful estimator of it).
GLOBAL = ["sogclr", "emc2"]


@pytest.fixture(scope="module")
def digits():
    return emc2_tf.load_digits()


@pytest.fixture(scope="module")
def fixed_views(digits):
    """Two fixed augmentations of the whole training set (seeded)."""
    augment = emc2_tf.SimCLRAugment(emc2_tf.AugmentConfig.for_dataset("digits"))
    return (augment(digits.train_images, seed=tf.constant([1, 2])).numpy(),
            augment(digits.train_images, seed=tf.constant([3, 4])).numpy())


def _full_data_loss(model, view1, view2):
    """The method's exact objective with the whole training set as one batch.

    In-batch methods: their own loss. SogCLR and EMC²: the global contrastive
    loss their surrogates estimate the gradient of (their surrogate values are
    not objectives, and calling them would move their per-sample state).
    """
    z1 = model.encoder.predict(view1, batch_size=512, verbose=0)
    z2 = model.encoder.predict(view2, batch_size=512, verbose=0)
    if isinstance(model, emc2_tf.InBatchContrastiveModel):
        n = len(z1)
        return float(model.contrastive_loss(tf.range(n), tf.concat([z1, z2], axis=0))[0])
    return float(emc2_tf.global_contrastive_loss(z1, z2, model.temperature))


@pytest.mark.parametrize("method", IN_BATCH + GLOBAL)
def test_fit_two_epochs_lowers_the_methods_full_data_loss(method, digits, fixed_views):
    keras.utils.set_random_seed(0)
    encoder = emc2_tf.build_small_cnn_encoder(digits.image_shape)
    extra = {"images": digits.train_images} if method == "emc2" else {}
    model = emc2_tf.build_model(method, encoder=encoder, dataset_size=digits.num_train,
                                temperature=0.2, seed=0, **extra)
    before = _full_data_loss(model, *fixed_views)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    dataset = emc2_tf.make_two_view_dataset(
        digits.train_images, 64, emc2_tf.AugmentConfig.for_dataset("digits"), seed=0)
    history = model.fit(dataset, epochs=2, verbose=0)
    after = _full_data_loss(model, *fixed_views)
    assert np.all(np.isfinite(history.history["loss"]))
    assert after < before - 0.01 * abs(before), (method, before, after)


@pytest.mark.parametrize("method", ["sogclr", *IN_BATCH])  # emc2: tests/test_cli.py
def test_cli_trains_each_method(method, tmp_path):
    result = run_python(
        ["-m", "trainers.train", f"--method={method}", "--epochs=2", "--temperature=0.2",
         "--eval_every=0", f"--export_dir={tmp_path}", "--tensorboard_dir=",
         f"--checkpoint_dir={tmp_path / 'ck'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    assert np.isfinite(summary["final_loss"]) and summary["knn_accuracy"] > 0.5
    assert summary["export_path"] == str(tmp_path / method / "1")
    # The exact global contrastive loss of the encoder, before and after training.
    assert summary["global_contrastive_loss"] < summary["initial_global_contrastive_loss"] - 0.1


def test_cli_spectral_batch_selection_with_sogclr(tmp_path):
    result = run_python(
        ["-m", "trainers.train", "--method=sogclr", "--batch_selection=spectral", "--epochs=2",
         "--spectral_every=2", "--eval_every=0", "--export=false", "--tensorboard_dir=",
         f"--checkpoint_dir={tmp_path / 'ck'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("spectral batch selection (epoch") == 1  # every 2 epochs
    summary = parse_summary(result.stdout)
    assert summary["batch_selection"] == "spectral" and summary["temperature"] == 0.1
    assert summary["global_contrastive_loss"] < summary["initial_global_contrastive_loss"] - 0.1


def test_cli_method_flags_are_checked_against_the_method():
    for flags, message in ((["--method=simclr", "--gamma=0.5"],
                            "--gamma is not an option of --method=simclr; it applies to --method=sogclr"),
                           (["--method=sogclr", "--burn_in=3"],
                            "--burn_in is not an option of --method=sogclr; it applies to --method=emc2"),
                           (["--gamma=1.5"], "--gamma must be in (0, 1]"),
                           (["--batch_selection=hard"], "batch_selection"),
                           (["--batch_selection=spectral", "--spectral_groups=0"],
                            "--spectral_groups must be ≥ 1")):
        result = run_python(["-m", "trainers.train", *flags, "--epochs=1"])
        assert result.returncode != 0
        assert message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
