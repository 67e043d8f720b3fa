"""Evaluation of frozen encoder features: 1-NN and linear-probe accuracy.

The papers' protocol (algorithms.md §9): embed the train split (with labels)
and the held-out split with the frozen encoder, then classify the held-out
images by their nearest train neighbour (Euclidean) or by a logistic
regression fitted on standardised train features.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from emc2_tf.encoders import BACKBONE_NAME


#: One compiled inference function per model, so repeated evaluations (every
#: k epochs) reuse its traces instead of tracing anew.
_FORWARD: "weakref.WeakKeyDictionary[keras.Model, tf.types.experimental.GenericFunction]" = (
    weakref.WeakKeyDictionary()
)


def _compiled_forward(model: keras.Model):
    if model not in _FORWARD:
        # A weak reference inside too: a strong one would keep the key alive.
        model_ref = weakref.ref(model)
        _FORWARD[model] = tf.function(
            lambda x: model_ref()(x, training=False), reduce_retracing=True
        )
    return _FORWARD[model]


def embed(
    encoder: keras.Model, images: np.ndarray, features: str = "backbone", batch_size: int = 512
) -> np.ndarray:
    """Frozen features of `images`: `backbone` representation or `embedding`."""
    if features == "backbone":
        model = encoder.get_layer(BACKBONE_NAME)
    elif features == "embedding":
        model = encoder
    else:
        raise ValueError(f"features must be 'backbone' or 'embedding'; got {features!r}.")
    # A compiled call per chunk rather than `predict`: it works the same with
    # or without a distribution strategy (Keras' predict under
    # MultiWorkerMirroredStrategy would shard and re-gather the images).
    forward = _compiled_forward(model)
    chunks = [
        forward(tf.constant(images[start : start + batch_size], tf.float32)).numpy()
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks).astype(np.float32)


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    k: int = 1,
    chunk_size: int = 1024,
) -> float:
    """k-NN accuracy (Euclidean, majority vote; k = 1 is 1-NN)."""
    train_features = np.asarray(train_features, np.float64)
    test_features = np.asarray(test_features, np.float64)
    train_sq = np.sum(train_features**2, axis=1)
    num_classes = int(max(train_labels.max(), test_labels.max()) + 1)
    correct = 0
    for start in range(0, len(test_features), chunk_size):
        query = test_features[start : start + chunk_size]
        distances = train_sq[None, :] - 2.0 * query @ train_features.T
        neighbours = np.argpartition(distances, k - 1, axis=1)[:, :k] if k > 1 else (
            np.argmin(distances, axis=1)[:, None]
        )
        votes = np.zeros((len(query), num_classes))
        np.add.at(votes, (np.arange(len(query))[:, None], train_labels[neighbours]), 1)
        correct += int(np.sum(np.argmax(votes, axis=1) == test_labels[start : start + chunk_size]))
    return correct / len(test_features)


def linear_probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    max_iter: int = 1000,
) -> float:
    """Accuracy of a logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    probe.fit(train_features, train_labels)
    return float(probe.score(test_features, test_labels))


def evaluate_encoder(encoder: keras.Model, dataset, linear_probe: bool = True) -> dict[str, float]:
    """1-NN (and linear-probe) accuracy of the encoder on an `ImageDataset`."""
    train = embed(encoder, dataset.train_images)
    test = embed(encoder, dataset.test_images)
    results = {"knn_accuracy": knn_accuracy(train, dataset.train_labels, test, dataset.test_labels)}
    if linear_probe:
        results["linear_probe_accuracy"] = linear_probe_accuracy(
            train, dataset.train_labels, test, dataset.test_labels
        )
    return results


class KNNAccuracyCallback(keras.callbacks.Callback):
    """Logs `knn_accuracy` (1-NN on the held-out split) every N epochs.

    The value lands in the epoch's `logs`, so `History`, `TensorBoard` and
    the progress bar pick it up.
    """

    def __init__(self, encoder: keras.Model, dataset, every_n_epochs: int = 1):
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be ≥ 1; got {every_n_epochs}.")
        self.encoder = encoder
        self.dataset = dataset
        self.every_n_epochs = every_n_epochs

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        result = evaluate_encoder(self.encoder, self.dataset, linear_probe=False)
        if logs is not None:
            logs.update(result)
