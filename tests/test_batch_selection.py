"""Spectral-clustering batch selection: affinity formula, planted clusters, one visit per epoch."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import adjusted_rand_score

import emc2_tf
from emc2_tf.batch_selection import equal_size_clusters, spectral_affinity, spectral_batches

from helpers import embedding_images


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted(num_clusters, cluster_size, dim=16, noise=0.3, seed=0):
    """Two views of images drawn around `num_clusters` centres, labels shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, dim))
    labels = rng.permutation(np.repeat(np.arange(num_clusters), cluster_size))
    u = _unit(centres[labels] + noise * rng.normal(size=(len(labels), dim)))
    v = _unit(centres[labels] + noise * rng.normal(size=(len(labels), dim)))
    return u, v, labels


def _batch_labels(batches, num_images):
    labels = np.full(num_images, -1)
    for b, row in enumerate(batches):
        labels[row] = b
    return labels


def test_affinity_matches_the_formula_in_float64():
    u, v, _ = planted(3, 3, dim=4)
    batch, tau = 4, 0.2
    s = u @ v.T / tau
    a = np.array([[np.log(1 + (batch - 1) * np.exp(s[i, j] - s[i, i]))
                   + np.log(1 + (batch - 1) * np.exp(s[j, i] - s[i, i]))
                   for j in range(len(u))] for i in range(len(u))])
    np.testing.assert_allclose(spectral_affinity(u, v, batch, tau), a + a.T, rtol=1e-12)
    # No overflow at a tiny τ (log-sum-exp form).
    assert np.all(np.isfinite(spectral_affinity(u, v, batch, 1e-4)))


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_clusters_are_recovered_as_batches(seed):
    u, v, labels = planted(num_clusters=8, cluster_size=16, seed=seed)
    batches = spectral_batches(u, v, batch_size=16, temperature=0.1, groups_k=40, seed=seed)
    assert batches.shape == (8, 16)
    ari = adjusted_rand_score(labels, _batch_labels(batches, len(labels)))
    assert ari >= 0.9, ari
    # The selected batches are the high-loss ones: hard negatives share a batch.
    def mean_batch_loss(rows):
        return np.mean([float(emc2_tf.nt_xent_loss(u[r], v[r], temperature=0.1)) for r in rows])
    random_rows = np.random.default_rng(seed).permutation(len(u)).reshape(8, 16)
    assert mean_batch_loss(batches) > mean_batch_loss(random_rows) + 0.5


@pytest.mark.parametrize("num_images, batch, groups_k", [(240, 8, 5), (96, 16, 40), (100, 8, 3)])
def test_every_sample_appears_exactly_once_per_epoch(num_images, batch, groups_k):
    u, v, _ = planted(num_clusters=4, cluster_size=num_images // 4 + 1, seed=2)
    u, v = u[:num_images], v[:num_images]
    batches = spectral_batches(u, v, batch, 0.1, groups_k=groups_k, seed=0)
    assert batches.shape == (num_images // batch, batch)
    counts = np.bincount(batches.ravel(), minlength=num_images)
    assert counts.max() == 1
    assert counts.sum() == (num_images // batch) * batch  # only N mod B sit out


def test_guards_name_the_argument():
    u, v, _ = planted(4, 64, seed=0)
    with pytest.raises(ValueError, match="max_group_size=100.*groups_k"):
        spectral_batches(u, v, 16, groups_k=40, max_group_size=100)
    images = np.zeros((50, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match="refuses N=50 images \\(max_dataset_size=10\\)"):
        emc2_tf.SpectralBatchSelection(images, 8, max_dataset_size=10)
    with pytest.raises(ValueError, match="every_k_epochs must be"):
        emc2_tf.SpectralBatchSelection(images, 8, every_k_epochs=0)
    with pytest.raises(ValueError, match="batch_size must be"):
        emc2_tf.SpectralBatchSelection(images, 80)


def test_fit_uses_the_selection_and_reselects_every_k_epochs():
    """With any objective (here SimCLR): selections at epochs 0 and 2; each epoch's
    dataset is exactly the selection's batches, every sample once."""
    u, v, labels = planted(num_clusters=4, cluster_size=16, dim=8, noise=0.2, seed=3)
    images = embedding_images(u)
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential([keras.Input((1, 1, 8)), keras.layers.Reshape((8,)),
                                keras.layers.Dense(8), keras.layers.UnitNormalization()])
    selection = emc2_tf.SpectralBatchSelection(images, batch_size=16, every_k_epochs=2,
                                               augment=None, seed=0, verbose=False)
    dataset = emc2_tf.make_two_view_dataset(images, 16, augment=None, batch_order=selection)
    model = emc2_tf.build_model("simclr", encoder=encoder, dataset_size=len(images))
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    history = model.fit(dataset, epochs=3, callbacks=[selection], verbose=0)
    assert selection.selection_epochs == [0, 2]
    assert np.all(np.isfinite(history.history["loss"]))
    served = np.stack([batch["index"].numpy() for batch in dataset])
    assert sorted(map(tuple, np.sort(served, axis=1))) == sorted(map(tuple, selection.batches))
    assert np.array_equal(np.sort(served.ravel()), np.arange(len(images)))
    # A slightly trained linear encoder keeps the planted structure: the batches are the clusters.
    assert adjusted_rand_score(labels, _batch_labels(selection.batches, len(images))) >= 0.9


def _optimal_equal_size_labels(points, centroids, cluster_size, squared):
    """Brute force: the labelling with `cluster_size` points per centroid of least total cost."""
    from scipy.spatial.distance import cdist

    cost = cdist(points, centroids) ** (2 if squared else 1)
    n, k = cost.shape
    best, best_labels = np.inf, None
    for labels in itertools.product(range(k), repeat=n):
        if np.all(np.bincount(labels, minlength=k) == cluster_size):
            total = cost[np.arange(n), labels].sum()
            assert not np.isclose(total, best), "ambiguous case"
            if total < best:
                best, best_labels = total, np.array(labels)
    return best_labels


def test_equal_size_assignment_minimises_euclidean_not_squared_distances(monkeypatch):
    """Bug caught: a Hungarian cost of *squared* distances (the authors' code,
    krafton-ai/mini-batch-cl utils.py, uses `cdist(X, centers)`, Euclidean).

    The spectral embedding and k-means are replaced by fixed points and
    centroids for which the two costs have different optimal equal-size
    assignments; `equal_size_clusters` must return the Euclidean one.
    """
    points = np.array([[-1.0, 0.0], [-1.0, 3.0], [0.0, 0.0], [1.0, 3.0]])
    centroids = np.array([[0.0, 0.0], [4.0, 0.0]])
    euclidean = _optimal_equal_size_labels(points, centroids, 2, squared=False)
    squared = _optimal_equal_size_labels(points, centroids, 2, squared=True)
    assert not np.array_equal(euclidean, squared)  # the case discriminates

    class FixedKMeans:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self, maps):
            np.testing.assert_array_equal(maps, points)
            self.cluster_centers_ = centroids
            return self

    monkeypatch.setattr("sklearn.manifold.spectral_embedding", lambda *a, **k: points)
    monkeypatch.setattr("sklearn.cluster.KMeans", FixedKMeans)
    affinity = np.ones((4, 4))
    labels = equal_size_clusters(affinity, 2, np.random.default_rng(0))
    np.testing.assert_array_equal(labels, euclidean)


def test_batch_order_must_match_the_batch_size():
    images = np.zeros((32, 1, 1, 4), np.float32)
    selection = emc2_tf.SpectralBatchSelection(images, batch_size=8, augment=None, verbose=False)
    with pytest.raises(ValueError, match="batch_order has batch_size=8"):
        emc2_tf.make_two_view_dataset(images, 16, batch_order=selection)


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
