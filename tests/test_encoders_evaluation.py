"""Encoders' contract and the evaluation functions against independent references."""

import keras
import numpy as np
import pytest

import emc2_tf


@pytest.mark.parametrize("name, shape, dim", [("small_cnn", (8, 8, 1), 64), ("small_cnn", (28, 28, 1), 64),
                                             ("resnet18", (32, 32, 3), 128)])
def test_encoder_contract(name, shape, dim):
    encoder = emc2_tf.build_encoder(name, shape)
    assert encoder.input.name == "images" or encoder.inputs[0].name == "images"
    images = np.random.default_rng(0).random((3, *shape)).astype(np.float32)
    z = encoder(images).numpy()
    assert z.shape == (3, dim)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    backbone = encoder.get_layer("backbone")
    assert backbone(images).shape[0] == 3
    if name == "resnet18":
        # CIFAR ResNet-18 backbone: ≈ 11.2 M weights; GroupNorm, no BatchNorm.
        assert 11.0e6 < backbone.count_params() < 11.4e6
        assert not any(isinstance(l, keras.layers.BatchNormalization) for l in backbone.layers)


def test_unknown_encoder_is_named():
    with pytest.raises(ValueError, match="accepted: resnet18, small_cnn"):
        emc2_tf.build_encoder("vit", (8, 8, 1))


def test_knn_accuracy_matches_sklearn():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(300, 5)), rng.normal(size=(120, 5))
    train_y, test_y = rng.integers(0, 4, 300), rng.integers(0, 4, 120)
    for k in (1, 5):
        reference = KNeighborsClassifier(n_neighbors=k).fit(train, train_y).score(test, test_y)
        got = emc2_tf.knn_accuracy(train, train_y, test, test_y, k=k, chunk_size=50)
        if k == 1:
            assert got == pytest.approx(reference)
        else:  # vote ties may break differently
            assert abs(got - reference) <= 0.03


def test_linear_probe_separates_separable_classes_and_not_noise():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    separable = np.eye(3)[y] * 5 + rng.normal(scale=0.3, size=(400, 3))
    noise = rng.normal(size=(400, 3))
    assert emc2_tf.linear_probe_accuracy(separable[:300], y[:300], separable[300:], y[300:]) == 1.0
    assert emc2_tf.linear_probe_accuracy(noise[:300], y[:300], noise[300:], y[300:]) < 0.5


def test_knn_callback_logs_accuracy_every_n_epochs():
    data = emc2_tf.load_digits()
    encoder = emc2_tf.build_small_cnn_encoder(data.image_shape)
    callback = emc2_tf.KNNAccuracyCallback(encoder, data, every_n_epochs=2)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert "knn_accuracy" not in logs
    callback.on_epoch_end(1, logs)
    expected = emc2_tf.evaluate_encoder(encoder, data, linear_probe=False)["knn_accuracy"]
    assert logs["knn_accuracy"] == pytest.approx(expected)


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
