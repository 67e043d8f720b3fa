"""EMC2Model end to end on digits, jit_compile, and clear errors for bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf

from helpers import embedding_images, fixed_embeddings, frozen_encoder


@pytest.fixture(scope="module")
def digits():
    return emc2_tf.load_digits()


def _model(data, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    encoder = emc2_tf.build_small_cnn_encoder(data.image_shape)
    model = emc2_tf.EMC2Model(
        encoder=encoder, dataset_size=data.num_train, images=data.train_images,
        temperature=0.1, seed=seed, **kwargs,
    )
    return encoder, model


def test_fit_on_digits_lowers_global_loss_and_beats_random_init(digits):
    encoder, model = _model(digits)
    loss_before = emc2_tf.exact_global_contrastive_loss(encoder, digits.train_images, 0.1)
    knn_before = emc2_tf.evaluate_encoder(encoder, digits, linear_probe=False)["knn_accuracy"]
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    dataset = emc2_tf.make_two_view_dataset(
        digits.train_images, 64, emc2_tf.AugmentConfig.for_dataset("digits"), seed=0
    )
    history = model.fit(dataset, epochs=4, verbose=0)
    loss_after = emc2_tf.exact_global_contrastive_loss(encoder, digits.train_images, 0.1)
    knn_after = emc2_tf.evaluate_encoder(encoder, digits, linear_probe=False)["knn_accuracy"]
    assert loss_after < loss_before - 0.5, (loss_before, loss_after)
    assert knn_after > knn_before + 0.02, (knn_before, knn_after)
    assert knn_after > 0.9
    rates = history.history["acceptance_rate"]
    assert all(0.0 < r < 1.0 for r in rates)
    assert set(history.history) >= {"loss", "acceptance_rate", "out_of_batch_fraction"}
    index = model.chain_index.numpy()
    assert (index >= 0).mean() > 0.95 and index.max() < digits.num_train


def test_jit_compile_trains_reproducibly():
    """jit_compile=True (XLA): same seed → identical chains and weights; the loss goes down.

    XLA's Philox stream differs from TensorFlow's CPU kernel, so an XLA run
    and a plain-graph run draw different MH uniforms: they are compared on
    what must hold, not draw for draw. (The TV test runs the sampler in XLA.)
    """
    n, batch = 64, 16
    rng = np.random.default_rng(0)
    images = rng.random((n, 4, 4, 1)).astype(np.float32)
    data = emc2_tf.from_arrays(images, np.zeros(n), images[:4], np.zeros(4))
    runs = []
    for _ in range(2):
        encoder, model = _model(data, seed=3)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=True)
        before = emc2_tf.exact_global_contrastive_loss(encoder, images, 0.1)
        dataset = emc2_tf.make_two_view_dataset(images, batch, augment=None, seed=1)
        history = model.fit(dataset, epochs=3, verbose=0)
        after = emc2_tf.exact_global_contrastive_loss(encoder, images, 0.1)
        runs.append((model.chain_index.numpy(), encoder.get_weights()[0], before, after, history))
    (chains_a, weights_a, before, after, history), (chains_b, weights_b, *_rest) = runs
    np.testing.assert_array_equal(chains_a, chains_b)
    np.testing.assert_array_equal(weights_a, weights_b)
    assert after < before - 0.1, (before, after)
    assert ((chains_a >= 0) & (chains_a < n) & (chains_a != np.arange(n))).all()
    assert all(0.0 < r < 1.0 for r in history.history["acceptance_rate"])


def test_exact_ratio_refreshes_scores_with_current_weights():
    """With exact_ratio the stored score is recomputed: a stale score cannot block moves."""
    n, dim = 32, 4
    z = fixed_embeddings(n, dim, seed=1)
    images = embedding_images(z)
    encoder = frozen_encoder(dim)
    index = tf.range(8)
    x = tf.gather(images, index)
    for exact, expect_moves in ((False, False), (True, True)):
        model = emc2_tf.EMC2Model(encoder=encoder, dataset_size=n, images=images,
                                  temperature=0.1, exact_ratio=exact, seed=0)
        # Chains on images 20.. with an absurdly high stale score: only a refresh lets them move.
        model.chain_index.assign(tf.range(20, 20 + n) % n)
        model.chain_log_score.assign(tf.fill([n], 1e6))
        model.contrastive_loss(index, encoder(tf.concat([x, x], 0)))
        moved = model.chain_index.numpy()[:8] != (np.arange(20, 28) % n)
        assert moved.any() == expect_moves


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(0)
    images = rng.random((20, 4, 4, 1)).astype(np.float32)
    return emc2_tf.from_arrays(images, np.zeros(20), images[:2], np.zeros(2))


class TestBadInput:

    def _fit(self, small, dataset):
        _, model = _model(small)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        model.fit(dataset, epochs=1, verbose=0)

    def _views(self, small, index, view1=None):
        view = small.train_images[: len(index)] if view1 is None else view1
        return tf.data.Dataset.from_tensors(
            {"index": np.asarray(index, np.int32), "view1": view, "view2": small.train_images[: len(index)]}
        )

    def test_temperature_must_be_positive(self, small):
        for bad in (0.0, -0.1, float("nan")):
            with pytest.raises(ValueError, match="temperature must be > 0"):
                emc2_tf.EMC2Model(encoder=frozen_encoder(4), dataset_size=20,
                                  images=small.train_images, temperature=bad)

    def test_index_beyond_dataset_size(self, small):
        with pytest.raises(ValueError, match=r"outside \[0, dataset_size=20\)"):
            self._fit(small, self._views(small, [0, 5, 20, 3]))

    def test_negative_index(self, small):
        with pytest.raises(ValueError, match="outside"):
            self._fit(small, self._views(small, [0, -1, 2, 3]))

    def test_dataset_without_indices(self, small):
        no_index = tf.data.Dataset.from_tensors((small.train_images[:4], small.train_images[:4]))
        with pytest.raises(ValueError, match="Dataset without sample indices"):
            self._fit(small, no_index)
        no_key = tf.data.Dataset.from_tensors({"view1": small.train_images[:4], "view2": small.train_images[:4]})
        with pytest.raises(ValueError, match="Dataset without index"):
            self._fit(small, no_key)

    def test_wrong_image_rank(self, small):
        flat = small.train_images[:4].reshape(4, 16)
        with pytest.raises(ValueError, match="view1 must have rank 4"):
            self._fit(small, self._views(small, [0, 1, 2, 3], view1=flat))

    def test_wrong_image_dtype(self, small):
        as_uint8 = (small.train_images[:4] * 255).astype(np.uint8)
        with pytest.raises(ValueError, match="view1 must be float images"):
            self._fit(small, self._views(small, [0, 1, 2, 3], view1=as_uint8))

    def test_image_table_must_match_dataset_size(self, small):
        with pytest.raises(ValueError, match="images holds 20 images but dataset_size=21"):
            emc2_tf.EMC2Model(encoder=frozen_encoder(4), dataset_size=21, images=small.train_images)

    def test_image_table_limit_is_named(self, small):
        with pytest.raises(ValueError, match="max_image_table_bytes=1000"):
            emc2_tf.EMC2Model(encoder=frozen_encoder(4), dataset_size=20,
                              images=small.train_images, max_image_table_bytes=1000)

    def test_images_are_required_to_fit_a_reencoding_model(self, small):
        """Without the table a re-encoding variant fails at fit, before any step,
        naming `images` and `set_image_table` (a loaded .keras model has none)."""
        model = emc2_tf.EMC2Model(encoder=frozen_encoder(4), dataset_size=20,
                                  out_of_batch="reencode")
        model.compile(optimizer=keras.optimizers.SGD(0.0))
        with pytest.raises(ValueError, match="EMC2Model needs `images`.*set_image_table"):
            model.fit(self._views(small, [0, 1, 2, 3]), epochs=1, verbose=0)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_state(policy):
    """The benchmarks' --mixed_precision: the encoder computes in 16 bits, the loss,
    chains and optimizer state stay float32; mixed_float16 gets loss scaling."""
    n = 128
    images = np.random.default_rng(0).random((n, 8, 8, 1)).astype(np.float32)
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        encoder = emc2_tf.build_small_cnn_encoder((8, 8, 1))
        model = emc2_tf.EMC2Model(encoder=encoder, dataset_size=n, images=images,
                                  temperature=0.2, seed=0)
        model.compile(optimizer=keras.optimizers.Adam(3e-3))
        before = emc2_tf.exact_global_contrastive_loss(encoder, images, 0.2)
        history = model.fit(emc2_tf.make_two_view_dataset(images, 16, augment=None), epochs=3,
                            verbose=0)
        after = emc2_tf.exact_global_contrastive_loss(encoder, images, 0.2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (
        policy == "mixed_float16")
    assert encoder.compute_dtype == policy.split("_")[1]
    assert model.chain_log_score.dtype == "float32" and encoder.weights[0].dtype == "float32"
    assert np.isfinite(history.history["loss"]).all()
    assert after < before - 0.1, (before, after)


if __name__ == "__main__":
    import sys

    import pytest

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
