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


def test_alignment_against_its_definition():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(50, 6)); v = rng.normal(size=(50, 6))
    expected = np.mean([np.sum((a - b) ** 2) for a, b in zip(u, v)])
    assert emc2_tf.alignment(u, v) == pytest.approx(expected, rel=1e-12)
    unit = u / np.linalg.norm(u, axis=1, keepdims=True)
    assert emc2_tf.alignment(unit, unit) == 0.0
    assert emc2_tf.alignment(unit, -unit) == pytest.approx(4.0)  # antipodal views
    with pytest.raises(ValueError, match="alignment needs two"):
        emc2_tf.alignment(u, v[:3])


def test_uniformity_brute_force_and_the_uniform_circle():
    from scipy.special import i0

    rng = np.random.default_rng(1)
    z = rng.normal(size=(40, 5)); z /= np.linalg.norm(z, axis=1, keepdims=True)
    pairs = [np.exp(-2 * np.sum((z[i] - z[j]) ** 2)) for i in range(40) for j in range(40) if i != j]
    assert emc2_tf.uniformity(z, chunk_size=7) == pytest.approx(np.log(np.mean(pairs)), rel=1e-12)
    # Uniform on the circle: E exp(−2‖x − y‖²) = e^{−4} I0(4) (cos of a uniform angle).
    angles = rng.uniform(0, 2 * np.pi, 3000)
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    assert emc2_tf.uniformity(circle) == pytest.approx(-4 + np.log(i0(4.0)), abs=0.03)
    assert emc2_tf.uniformity(np.ones((10, 3)) / np.sqrt(3)) == pytest.approx(0.0, abs=1e-12)


def test_effective_rank_of_known_spectra():
    rng = np.random.default_rng(2)
    q1, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    q2, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    sigma = np.array([3.0, 2.0, 1.0, 0, 0, 0, 0, 0])
    z = q1[:, :8] @ np.diag(sigma) @ q2.T
    p = np.array([3, 2, 1]) / 6.0
    assert emc2_tf.effective_rank(z, epsilon=0.0) == pytest.approx(np.exp(-np.sum(p * np.log(p))),
                                                                   rel=1e-9)
    assert emc2_tf.effective_rank(q1[:, :8]) == pytest.approx(8.0, rel=1e-4)  # isotropic
    assert emc2_tf.effective_rank(np.outer(rng.normal(size=30), rng.normal(size=8))) == (
        pytest.approx(1.0, abs=1e-4))  # collapsed to one direction


def test_representation_metrics_of_an_encoder():
    data = emc2_tf.load_digits()
    encoder = emc2_tf.build_small_cnn_encoder(data.image_shape)
    images = data.test_images[:100]
    results = emc2_tf.representation_metrics(
        encoder, images, emc2_tf.AugmentConfig.for_dataset("digits"), seed=0)
    z = emc2_tf.embed(encoder, images, features="embedding")
    assert results["uniformity"] == pytest.approx(emc2_tf.uniformity(z))
    assert results["effective_rank"] == pytest.approx(emc2_tf.effective_rank(z))
    assert 0.0 < results["alignment"] < 4.0
    assert 1.0 <= results["effective_rank"] <= 64.0
    # A plain embedding function (what trainers.evaluate passes for a SavedModel) agrees.
    as_function = emc2_tf.representation_metrics(
        lambda x: emc2_tf.embed(encoder, x, features="embedding"), images,
        emc2_tf.AugmentConfig.for_dataset("digits"), seed=0)
    assert as_function == results
    no_augment = emc2_tf.representation_metrics(encoder, images)
    assert "alignment" not in no_augment


def test_knn_memory_does_not_grow_with_the_training_set():
    """Catches (audit) the 1-NN comparing 1024 queries at once with all N
    training features: float64 blocks of 1024 × N (2 GiB at N = 126k, every
    --eval_every epoch). With the 64 MiB budget the peak stays near it at
    N = 40,000 (was ≈ 650 MiB), and the accuracy equals fixed small chunks'."""
    import tracemalloc

    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(40000, 4)), rng.normal(size=(1500, 4))
    train_y, test_y = rng.integers(0, 5, 40000), rng.integers(0, 5, 1500)
    expected = emc2_tf.knn_accuracy(train, train_y, test, test_y, chunk_size=7)
    tracemalloc.start()
    got = emc2_tf.knn_accuracy(train, train_y, test, test_y)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == expected
    assert peak < 200 * 2**20, peak / 2**20


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
