"""Finite augmentations, the exact global objective F over them, and the gradient-error monitor.

References: a float64 NumPy transcription of the official
`evaluation.py: compute_global_loss` (amazon-science/contrastive_emc2), float64
finite differences of F for its gradient, and plain SGD's own update
(θ_t − θ_{t+1}) / lr for the gradient a step applied.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf
from emc2_tf.data.finite import FiniteViews


def official_global_loss(embeddings: np.ndarray, num_views: int, beta: float) -> float:
    """The official compute_global_loss, transcribed in float64 (not our code path):
    embeddings scaled by β, Gram matrix, diagonal K×K blocks removed for the
    negatives, one CE row per (anchor, other view of its image), label 0."""
    scaled = embeddings * beta
    similarity = scaled @ scaled.T
    n = len(similarity)
    rows, positives = [], []
    for i in range(n // num_views):
        block = slice(i * num_views, (i + 1) * num_views)
        negatives = np.concatenate([similarity[block, : i * num_views],
                                    similarity[block, (i + 1) * num_views:]], axis=1)
        diagonal = similarity[block, block]
        positives.append(diagonal[~np.eye(num_views, dtype=bool)])
        rows.append(negatives)
    negatives = np.concatenate(rows, axis=0)  # [n, n − K]
    positive = np.concatenate(positives)[:, None]  # [n·(K − 1), 1], row-major per block
    expanded = np.broadcast_to(negatives[None], (num_views - 1, *negatives.shape))
    expanded = expanded.reshape(n * (num_views - 1), -1)
    logits = np.concatenate([positive, expanded], axis=1)
    top = logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_sum - logits[:, 0]))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("num_views", [2, 3])
def test_finite_global_loss_matches_the_official_code(num_views):
    """Catches: a global loss unlike the official one on identical embeddings: the
    positive left out of the denominator, the own image's other views counted
    as negatives, a wrong (anchor, positive) pairing or mean, or a chunk seam.
    (With K = 2 the official pairing of positives with rows is exact; with K = 3
    only the mean over all rows is compared, which the official expand also
    gives: each block's positives are averaged with every row of the block.)"""
    rng = np.random.default_rng(0)
    embeddings = _unit(rng.normal(size=(7 * num_views, 5)))
    temperature = 0.2
    ours = emc2_tf.finite_global_loss(tf.constant(embeddings), num_views, temperature,
                                      chunk_size=4)
    if num_views == 2:  # official logits are β_off² s: equal to ours at β_off = τ^(−1/2)
        reference = official_global_loss(embeddings, num_views, temperature ** -0.5)
    else:  # the definition in the module docstring, transcribed directly
        beta = 1 / temperature
        s = beta * embeddings @ embeddings.T
        image = np.arange(len(s)) // num_views
        terms = []
        for a in range(len(s)):
            negatives = s[a][image != image[a]]
            for p in np.flatnonzero((image == image[a]) & (np.arange(len(s)) != a)):
                terms.append(np.log(np.exp(s[a, p]) + np.exp(negatives).sum()) - s[a, p])
        reference = float(np.mean(terms))
    np.testing.assert_allclose(float(ours), reference, rtol=1e-12)


def _linear_encoder(image_shape, dim=4, seed=0):
    """A float64 linear encoder z = normalize(flatten(x) W + b)."""
    inputs = keras.Input(image_shape)
    x = keras.layers.Flatten(dtype="float64")(inputs)
    x = keras.layers.Dense(dim, dtype="float64",
                           kernel_initializer=keras.initializers.RandomNormal(seed=seed),
                           bias_initializer=keras.initializers.RandomNormal(seed=seed + 1))(x)
    outputs = keras.layers.UnitNormalization(dtype="float64")(x)
    return keras.Model(inputs, outputs)


def _random_views(num_images=9, num_views=2, shape=(3, 3, 1), seed=0) -> FiniteViews:
    table = np.random.default_rng(seed).integers(0, 256, (num_images * num_views, *shape),
                                                 dtype=np.uint8)
    return FiniteViews(table, num_views)


def _numpy_loss(weights, views, temperature):
    kernel, bias = weights
    # the pixels as the encoder sees them (float32 k / 255), then float64 throughout
    x = (views.table.reshape(len(views.table), -1).astype(np.float32) / np.float32(255.0))
    x = x.astype(np.float64)
    return official_global_loss(_unit(x @ kernel + bias), views.num_views, temperature ** -0.5)


def test_exact_gradient_in_chunks_matches_finite_differences():
    """Catches: a wrong chunked ∇F (a chunk's vector-Jacobian product with the wrong
    rows of dF/dZ, a chunk missed or counted twice at a seam, gradients not
    summed): compared with float64 central differences of the official F."""
    views = _random_views()
    encoder = _linear_encoder(views.image_shape)
    objective = emc2_tf.GlobalObjective(views, temperature=0.5, chunk_size=5)  # 18 rows: 4 chunks
    loss, gradient = objective.loss_and_gradient(encoder)
    weights = [np.asarray(w, np.float64) for w in encoder.get_weights()]
    # rtol 1e-7: in a graph, the float32 pixels k/255 may be computed as k · (1/255)
    # (one float32 ulp away); everything after them is float64.
    np.testing.assert_allclose(float(loss), _numpy_loss(weights, views, 0.5), rtol=1e-7)
    for which, grad in enumerate(gradient):
        numeric = np.zeros_like(weights[which])
        for position in np.ndindex(weights[which].shape):
            step = 1e-6
            plus = [w.copy() for w in weights]
            minus = [w.copy() for w in weights]
            plus[which][position] += step
            minus[which][position] -= step
            numeric[position] = (_numpy_loss(plus, views, 0.5)
                                 - _numpy_loss(minus, views, 0.5)) / (2 * step)
        np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-5, atol=1e-7)


def test_finite_views_are_stored_views_drawn_in_distinct_uniform_pairs():
    """Catches: a batch view that is not the stored row index·K + view_index (a
    wrong row formula, a view re-augmented per step), two equal views of an
    image (the official draw is without replacement), non-uniform pairs, and
    pairs that are not a function of (seed, epoch, step)."""
    images = np.random.default_rng(1).integers(0, 256, (12, 4, 4, 1), dtype=np.uint8)
    views = emc2_tf.finite_views(images, 3, augment=emc2_tf.AugmentConfig(crop_scale=(0.5, 1.0)),
                                 seed=5)
    assert views.table.dtype == np.uint8 and views.table.shape == (36, 4, 4, 1)
    again = emc2_tf.finite_views(images, 3, augment=emc2_tf.AugmentConfig(crop_scale=(0.5, 1.0)),
                                 seed=5)
    np.testing.assert_array_equal(views.table, again.table)
    assert not np.array_equal(views.table[0::3], views.table[1::3])  # views differ

    counts = np.zeros((3, 3))
    for epoch in range(40):
        dataset = emc2_tf.make_two_view_dataset(views, 4, seed=2, start_epoch=epoch)
        for batch in dataset:
            index, pairs = batch["index"].numpy(), batch["view_index"].numpy()
            assert np.all(pairs[:, 0] != pairs[:, 1]) and pairs.min() >= 0 and pairs.max() < 3
            rows = index[:, None] * 3 + pairs
            # allclose at 1e-7: the graph may compute k / 255 as k · (1/255) in float32
            np.testing.assert_allclose(batch["view1"].numpy(), views.table[rows[:, 0]] / 255.0,
                                       rtol=1e-7, atol=1e-7)
            np.testing.assert_allclose(batch["view2"].numpy(), views.table[rows[:, 1]] / 255.0,
                                       rtol=1e-7, atol=1e-7)
            np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
    ordered = counts[~np.eye(3, dtype=bool)]
    expected = counts.sum() / 6  # 480 draws over the 6 ordered pairs
    assert np.all(np.abs(ordered - expected) < 4 * np.sqrt(expected)), counts
    first = [b["view_index"].numpy() for b in emc2_tf.make_two_view_dataset(views, 4, seed=2)]
    second = [b["view_index"].numpy() for b in emc2_tf.make_two_view_dataset(views, 4, seed=2)]
    np.testing.assert_array_equal(np.stack(first), np.stack(second))


def test_each_worker_reads_its_rows_of_the_finite_batch():
    """Catches: a worker's share of a finite-view batch whose view_index (or views)
    is not the same rows of the global batch as its index (the view pairs not
    sliced like the indices)."""
    views = _random_views(num_images=32, num_views=3)
    whole = next(iter(emc2_tf.make_two_view_dataset(views, 16, seed=3)))
    dataset = emc2_tf.make_two_view_dataset(views, 16, seed=3)  # a fresh schedule: epoch 0
    part = next(iter(dataset.worker_dataset(tf.distribute.InputContext(2, 1, 2))))
    for key in ("index", "view_index", "view1", "view2"):
        np.testing.assert_array_equal(part[key].numpy(), whole[key].numpy()[8:16])


class _SGDUpdate(keras.callbacks.Callback):
    """Records θ before every step, and F's full-tape gradient there (no chunks)."""

    def __init__(self, views, temperature):
        super().__init__()
        self.views, self.temperature = views, temperature
        self.before, self.after, self.exact = [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append([w.numpy().copy() for w in self.model.trainable_variables])
        with tf.GradientTape() as tape:
            z = self.model.encoder(tf.constant(self.views.table, tf.float32) / 255.0)
            loss = emc2_tf.finite_global_loss(z, self.views.num_views, self.temperature)
        self.exact.append([g.numpy() for g in tape.gradient(loss,
                                                             self.model.trainable_variables)])

    def on_train_batch_end(self, batch, logs=None):
        self.after.append([w.numpy().copy() for w in self.model.trainable_variables])


def _emc2_run(views, monitor):
    keras.utils.set_random_seed(0)
    encoder = emc2_tf.build_small_cnn_encoder(views.image_shape, projection_dim=8)
    # τ = 0.05 without waste recycling: MH rejections happen and move the chains,
    # so one extra (or missing) uniform draw changes the weights.
    model = emc2_tf.EMC2Model(encoder, views.num_images, temperature=0.05, seed=3,
                              waste_recycling=False)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    probe = _SGDUpdate(views, 0.05)
    callbacks = [probe] + ([monitor] if monitor else [])
    model.fit(emc2_tf.make_two_view_dataset(views, 4, seed=1), epochs=2, verbose=0,
              callbacks=callbacks)
    return model, probe


def test_monitoring_does_not_change_training_and_measures_the_applied_gradient():
    """Catches: a monitor that changes training (a random draw, a state write or a
    weight change: EMC²'s chains and MH uniforms make any of them visible in
    the weights), and a recorded g_t that is not the gradient the optimizer
    applied (SGD's (θ_t − θ_{t+1}) / lr), or an error/norm taken at the wrong θ."""
    views = _random_views(num_images=12, num_views=2, shape=(6, 6, 1), seed=4)
    monitor = emc2_tf.GlobalObjectiveMonitor(views, every_n_steps=2)
    watched, probe = _emc2_run(views, monitor)
    plain, _ = _emc2_run(views, None)
    for a, b in zip(watched.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in monitor.records] == [0, 2, 4]  # 6 steps: 3 per epoch
    for record in monitor.records:
        t = record["step"]
        applied = [(b - a) / 0.1 for b, a in zip(probe.before[t], probe.after[t])]
        exact = probe.exact[t]
        error = sum(np.sum((g - e).astype(np.float64) ** 2) for g, e in zip(applied, exact))
        norm = sum(np.sum(e.astype(np.float64) ** 2) for e in exact)
        np.testing.assert_allclose(record["gradient_error"], error, rtol=2e-3)
        np.testing.assert_allclose(record["gradient_norm"], norm, rtol=1e-4)
    assert watched.gradient_record is None  # detached after fit: plain steps again


def test_bad_arguments_are_refused_in_one_line():
    """Catches: K < 2, a monitor without FiniteViews or with n < 1, a dataset whose
    views disagree with finite_augmentations, passing silently."""
    images = np.zeros((6, 3, 3, 1), np.uint8)
    with pytest.raises(ValueError, match=r"finite_augmentations must be None .* or an "
                                         r"integer ≥ 2"):
        emc2_tf.make_two_view_dataset(images, 2, finite_augmentations=1)
    views = emc2_tf.finite_views(images, 2, augment=None)
    with pytest.raises(ValueError, match="finite_augmentations=3 but the FiniteViews"):
        emc2_tf.make_two_view_dataset(views, 2, finite_augmentations=3)
    with pytest.raises(ValueError, match="views must be an emc2_tf.FiniteViews"):
        emc2_tf.GlobalObjectiveMonitor(images)
    with pytest.raises(ValueError, match="every_n_steps must be an integer ≥ 1"):
        emc2_tf.GlobalObjectiveMonitor(views, every_n_steps=0)
    # A monitor refused at the start of fit (its views do not match the model)
    # leaves the model's steps unwatched.
    model = emc2_tf.build_model("simclr", encoder=_linear_encoder((3, 3, 1)), dataset_size=5)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="The views hold 6 images but the model was built for"):
        model.fit(emc2_tf.make_two_view_dataset(np.zeros((5, 3, 3, 1), np.uint8), 2,
                                                augment=None),
                  epochs=1, verbose=0, callbacks=[emc2_tf.GlobalObjectiveMonitor(views)])
    assert model.gradient_record is None


if __name__ == "__main__":
    import sys

    import pytest

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
