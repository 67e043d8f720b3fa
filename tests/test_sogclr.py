"""SogCLR: estimator, moving average and surrogate gradient against float64 NumPy; the u-state update."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf

from helpers import embedding_images, fixed_embeddings, numeric_gradient


def _lse(x):
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


def _negatives(n):
    """Per anchor a of the 2n views: the views of every other image."""
    return [[c for c in range(2 * n) if c % n != a % n] for a in range(2 * n)]


def ref_log_g(u, v, tau):
    z = np.concatenate([u, v]); n = len(u)
    return np.array([_lse(z[neg] @ z[a] / tau) - np.log(2 * (n - 1))
                     for a, neg in enumerate(_negatives(n))]).reshape(2, n)


def ref_surrogate(u, v, log_u, tau, weights=None):
    """Official scale: per image i, loss_a(i) + loss_b(i), mean over the B images
    (Optimization-AI/SogCLR sogclr/builder.py: `loss = (loss_a + loss_b).mean()`),
    with loss_a = −s(a,p) + 1/(2(B−1)) Σ_z w_z s(a,z), w_z = exp(β s(a,z) − log u_a).

    `weights` freezes w (the stop-gradient) for finite differences.
    """
    z = np.concatenate([u, v]); n = len(u); log_u = np.asarray(log_u).reshape(-1)
    losses, all_w = [], []
    for a, neg in enumerate(_negatives(n)):
        p = (a + n) % (2 * n)
        s = z[neg] @ z[a]
        w = np.exp(s / tau - log_u[a]) if weights is None else weights[a]
        all_w.append(w)
        losses.append(-z[a] @ z[p] + np.sum(w * s) / (2 * (n - 1)))
    loss_a, loss_b = np.array(losses[:n]), np.array(losses[n:])  # view 1, view 2 as anchors
    return np.mean(loss_a + loss_b), all_w


@pytest.mark.parametrize("batch", [2, 5])
def test_batch_estimate_matches_reference(batch):
    u, v = fixed_embeddings(batch, 4, seed=batch), fixed_embeddings(batch, 4, seed=batch + 7)
    got = emc2_tf.sogclr_batch_estimate(tf.constant(u), tf.constant(v), 0.1).numpy()
    np.testing.assert_allclose(got, ref_log_g(u, v, 0.1), rtol=1e-10)


def test_moving_average_in_log_space():
    log_u = np.array([-np.inf, np.log(3.0), np.log(0.5)])
    log_g = np.log(np.array([[2.0, 5.0, 1.0], [4.0, 1.0, 2.0]]))
    got = np.exp(emc2_tf.sogclr_moving_average(tf.constant(log_u), tf.constant(log_g), 0.9).numpy())
    u = np.exp(log_u)
    expected = np.where(np.isfinite(log_u), 0.1 * u + 0.9 * np.exp(log_g), np.exp(log_g))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # γ = 1 forgets the past entirely.
    got1 = emc2_tf.sogclr_moving_average(tf.constant(log_u), tf.constant(log_g), 1.0).numpy()
    np.testing.assert_allclose(got1, log_g, rtol=1e-12)


@pytest.mark.parametrize("batch", [2, 5])
def test_surrogate_value_and_gradient_match_float64_reference(batch):
    """Bugs caught: a wrong surrogate formula, and the scale: the mean over the 2B
    anchors (half the official per-image sum of the two views' losses) fails
    here, in value and gradient."""
    tau = 0.2
    u, v = fixed_embeddings(batch, 4, seed=batch), fixed_embeddings(batch, 4, seed=batch + 3)
    log_u = np.random.default_rng(batch).normal(size=(2, batch)) + 2.0  # any positive u
    expected, weights = ref_surrogate(u, v, log_u, tau)
    # The weights are constants: differentiate with them frozen.
    expected_grads = numeric_gradient(
        lambda a, b: ref_surrogate(a, b, log_u, tau, weights)[0], u, v)
    tu, tv = tf.Variable(u), tf.Variable(v)
    with tf.GradientTape() as tape:
        value = emc2_tf.sogclr_surrogate_loss(tu, tv, tf.constant(log_u), tau)
    grads = tape.gradient(value, [tu, tv])
    assert float(value) == pytest.approx(expected, rel=1e-5)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    value32 = emc2_tf.sogclr_surrogate_loss(
        tf.constant(u, tf.float32), tf.constant(v, tf.float32), tf.constant(log_u, tf.float32), tau)
    assert float(value32) == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("batch", [2, 6])
def test_gradient_is_2tau_times_the_batch_dcl_gradient_when_u_is_fresh(batch):
    """With u = g (first visit), each anchor's ∇ loss_a = τ ∇ ℓ_a (DCL's anchor
    loss): the paper's identity. The surrogate sums the 2B anchors over B
    (official scale) and DCL averages them over 2B, so ∇ surrogate = 2τ ∇ DCL.

    Bugs caught: the surrogate at half the official scale (gives τ ∇ DCL), and
    a first visit that does not take γ = 1 (u = γ g breaks the identity)."""
    tau = 0.1
    u, v = fixed_embeddings(batch, 8, seed=batch), fixed_embeddings(batch, 8, seed=batch + 1)
    tu, tv = tf.Variable(u), tf.Variable(v)
    with tf.GradientTape(persistent=True) as tape:
        log_g = tf.stop_gradient(emc2_tf.sogclr_batch_estimate(tu, tv, tau))
        log_u = emc2_tf.sogclr_moving_average(tf.fill([batch], -math.inf), log_g, 0.9)
        surrogate = emc2_tf.sogclr_surrogate_loss(tu, tv, tf.cast(log_u, tf.float64), tau)
        dcl = emc2_tf.dcl_loss(tu, tv, temperature=tau)
    for got, want in zip(tape.gradient(surrogate, [tu, tv]), tape.gradient(dcl, [tu, tv])):
        np.testing.assert_allclose(got.numpy(), 2 * tau * want.numpy(), rtol=1e-10, atol=1e-12)


def test_large_inverse_temperature_does_not_overflow():
    u, v = fixed_embeddings(6, 4, seed=1), fixed_embeddings(6, 4, seed=2)
    tau = 1e-3
    log_g = ref_log_g(u, v, tau)
    got_g = emc2_tf.sogclr_batch_estimate(tf.constant(u, tf.float32), tf.constant(v, tf.float32), tau)
    np.testing.assert_allclose(got_g.numpy(), log_g, rtol=1e-5)
    value = float(emc2_tf.sogclr_surrogate_loss(
        tf.constant(u, tf.float32), tf.constant(v, tf.float32), tf.constant(log_g, tf.float32), tau))
    assert np.isfinite(value)
    assert value == pytest.approx(ref_surrogate(u, v, log_g, tau)[0], rel=1e-4, abs=1e-5)


def _dense_encoder(dim, seed=0):
    """A trainable encoder on 1×1 `embedding_images`: back to [−1, 1], Dense, then L2
    normalisation (deterministic)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((1, 1, dim)), keras.layers.Rescaling(2.0, offset=-1.0),
                             keras.layers.Reshape((dim,)), keras.layers.Dense(dim),
                             keras.layers.UnitNormalization()])


@pytest.mark.parametrize("gamma", [0.9, 0.5])
def test_one_step_moves_exactly_the_batch_anchors_u_by_gamma(gamma):
    """Bugs caught: a wrong u update (rate, first visit, rows outside the batch), and
    a model step on another loss or scale than the official-scale surrogate (the
    logged loss and the SGD step are checked against it)."""
    n, dim, tau = 20, 6, 0.1
    encoder = _dense_encoder(dim)
    model = emc2_tf.SogCLRModel(encoder, dataset_size=n, temperature=tau, gamma=gamma)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    # Some images already seen (finite u), the rest never seen (−∞): both branches.
    rng = np.random.default_rng(0)
    stored = np.full(n, -np.inf, np.float32)
    stored[::2] = rng.normal(size=n // 2).astype(np.float32) + 1.0
    model.log_u.assign(stored)
    index = np.array([3, 4, 10, 17, 0, 9], np.int32)
    view1 = embedding_images(fixed_embeddings(n, dim, seed=1))[index]
    view2 = embedding_images(fixed_embeddings(n, dim, seed=2))[index]
    # The batch estimate from the pre-step weights, float64.
    z1 = encoder(view1).numpy().astype(np.float64)
    z2 = encoder(view2).numpy().astype(np.float64)
    g = np.exp(ref_log_g(z1, z2, tau))  # [2, B]
    old_u = np.exp(stored[index].astype(np.float64))
    seen = np.isfinite(stored[index])
    rate = np.where(seen, gamma, 1.0)
    expected_u = (1 - rate) * old_u + rate * g.mean(axis=0)
    weights_before = encoder.get_weights()[0].copy()
    # The step the model must take: SGD on the surrogate at the official scale,
    # with each view's u updated from its own batch estimate.
    log_u_views = np.log((1 - rate) * old_u + rate * g)  # [2, B]
    expected_loss = ref_surrogate(z1, z2, log_u_views, tau)[0]
    with tf.GradientTape() as tape:
        embeddings = encoder(np.concatenate([view1, view2]), training=True)
        surrogate = emc2_tf.sogclr_surrogate_loss(
            embeddings[: len(index)], embeddings[len(index):], log_u_views.astype(np.float32), tau)
    expected_kernel = weights_before - 0.5 * tape.gradient(
        surrogate, encoder.trainable_variables)[0].numpy()

    batch = tf.data.Dataset.from_tensors({"index": index, "view1": view1, "view2": view2})
    history = model.fit(batch, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    np.testing.assert_allclose(encoder.get_weights()[0], expected_kernel, rtol=1e-4, atol=1e-6)

    after = model.log_u.numpy()
    np.testing.assert_allclose(np.exp(after[index]), expected_u, rtol=1e-5)
    untouched = np.setdiff1d(np.arange(n), index)
    np.testing.assert_array_equal(after[untouched], stored[untouched])
    # The moved amount is γ·(g − u) for seen anchors: check it directly too.
    moved = np.exp(after[index]) - np.where(seen, old_u, 0.0)
    np.testing.assert_allclose(moved[seen], gamma * (g.mean(axis=0) - old_u)[seen], rtol=1e-4)
    assert not np.allclose(encoder.get_weights()[0], weights_before)  # a real training step


def test_bad_gamma_is_a_clear_error():
    encoder = _dense_encoder(4)
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\]"):
        emc2_tf.SogCLRModel(encoder, dataset_size=10, gamma=0.0)
    with pytest.raises(ValueError, match="gamma must be a number"):
        emc2_tf.build_model("sogclr", encoder=encoder, dataset_size=10, gamma="fast")


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
