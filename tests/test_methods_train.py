"""Every registered in-batch method trains on digits through model.fit and the CLI."""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf

from helpers import parse_summary, run_python

IN_BATCH = ["simclr", "dcl", "dhel", "kcl"]


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
    """The method's own objective with the whole training set as one batch."""
    z1 = model.encoder.predict(view1, batch_size=512, verbose=0)
    z2 = model.encoder.predict(view2, batch_size=512, verbose=0)
    n = len(z1)
    return float(model.contrastive_loss(tf.range(n), tf.concat([z1, z2], axis=0))[0])


@pytest.mark.parametrize("method", IN_BATCH)
def test_fit_two_epochs_lowers_the_methods_full_data_loss(method, digits, fixed_views):
    keras.utils.set_random_seed(0)
    encoder = emc2_tf.build_small_cnn_encoder(digits.image_shape)
    model = emc2_tf.build_model(method, encoder=encoder, dataset_size=digits.num_train,
                                temperature=0.2, seed=0)
    before = _full_data_loss(model, *fixed_views)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    dataset = emc2_tf.make_two_view_dataset(
        digits.train_images, 64, emc2_tf.AugmentConfig.for_dataset("digits"), seed=0)
    history = model.fit(dataset, epochs=2, verbose=0)
    after = _full_data_loss(model, *fixed_views)
    assert np.all(np.isfinite(history.history["loss"]))
    assert after < before - 0.01 * abs(before), (method, before, after)


@pytest.mark.parametrize("method", IN_BATCH)
def test_cli_trains_each_method(method, tmp_path):
    result = run_python(
        ["-m", "trainers.train", f"--method={method}", "--epochs=2", "--temperature=0.2",
         "--eval_every=0", f"--export_dir={tmp_path}", "--tensorboard_dir="])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    assert np.isfinite(summary["final_loss"]) and summary["knn_accuracy"] > 0.5
    assert summary["export_path"] == str(tmp_path / method / "1")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
