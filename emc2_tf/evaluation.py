"""Evaluation of frozen encoder features (algorithms.md §9).

The papers' protocol: embed the train split (with labels) and the held-out
split with the frozen encoder, then classify the held-out images by their
nearest train neighbour (Euclidean, `knn_accuracy`) or by a logistic
regression fitted on standardised train features (`linear_probe_accuracy`).

Representation metrics of the L2-normalised embedding `f`:

- alignment (Wang & Isola 2020): `E_pos ‖f(x) − f(y)‖²` over positive pairs
  (two augmented views of one image); 0 is perfect;
- uniformity: `log E_{i≠j} exp(−2 ‖f(x_i) − f(x_j)‖²)`; lower is more
  uniform on the sphere;
- effective rank (RankMe, Garrido et al. 2023): `exp(H(σ/‖σ‖₁))` of the
  singular values σ of the embedding matrix; dimensional collapse shows as
  a value far below D.

Images may be in-memory arrays (uint8 0..255 or float in [0, 1]) or any
`emc2_tf.ImageSource` (a folder of files, ...): features are computed batch
by batch (`float_batches`), so no split is ever held as float32 all at once.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator

import keras
import numpy as np
import tensorflow as tf

from emc2_tf.data.batch import as_float_images
from emc2_tf.data.image_source import ImageSource, SourceReadError
from emc2_tf.encoders import BACKBONE_NAME

#: Images per batch when features are computed from an array or a source.
EVALUATION_BATCH_SIZE = 512


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


def float_batches(images: Any, batch_size: int = EVALUATION_BATCH_SIZE) -> Iterator[tf.Tensor]:
    """`images` as float32 batches in [0, 1], in order: an `ImageSource` read by
    index (`iter_batches`; a file that cannot be read is a one-line
    `SourceReadError` naming it), an array (or tensor) converted chunk by chunk
    (uint8 scaled by 1/255: `as_float_images`), never the whole at once."""
    if isinstance(images, ImageSource):
        batches = iter(images.iter_batches(batch_size))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except tf.errors.OpError as error:  # e.g. a file damaged inside: one line
                message = images.read_error(error)
                if message is None:
                    raise
                raise SourceReadError(message) from None
            yield batch
        return
    for start in range(0, len(images), batch_size):
        yield as_float_images(images[start : start + batch_size])


def embed(
    encoder: keras.Model, images: Any, features: str = "backbone",
    batch_size: int = EVALUATION_BATCH_SIZE,
) -> np.ndarray:
    """Frozen features of `images`: `backbone` representation or `embedding`.

    `images`: an array `[N, H, W, C]` (uint8 0..255 or float in [0, 1]) or an
    `ImageSource`, embedded `batch_size` images at a time.
    """
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
    chunks = [forward(batch).numpy() for batch in float_batches(images, batch_size)]
    return np.concatenate(chunks).astype(np.float32)


#: The byte budget of one k-NN distance block (float64 `[queries, N]`).
KNN_BLOCK_BYTES = 64 << 20


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    k: int = 1,
    chunk_size: int | None = None,
) -> float:
    """k-NN accuracy (Euclidean, majority vote; k = 1 is 1-NN).

    The held-out features are compared `chunk_size` at a time: by default as
    many as keep each float64 distance block `[chunk, N]` within
    `KNN_BLOCK_BYTES` (64 MiB), so memory does not grow with the N training
    images × 1024 queries (2 GiB at N = 126k before).
    """
    train_features = np.asarray(train_features, np.float64)
    test_features = np.asarray(test_features, np.float64)
    if chunk_size is None:
        chunk_size = int(np.clip(KNN_BLOCK_BYTES // (8 * max(len(train_features), 1)), 1, 1024))
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


def alignment(view1_embeddings: np.ndarray, view2_embeddings: np.ndarray) -> float:
    """Alignment `E_pos ‖f(x) − f(y)‖²`: row i of each array embeds one view of image i."""
    u = np.asarray(view1_embeddings, np.float64)
    v = np.asarray(view2_embeddings, np.float64)
    if u.shape != v.shape or u.ndim != 2:
        raise ValueError(f"alignment needs two [n, D] arrays of one shape; got {u.shape}, {v.shape}.")
    return float(np.mean(np.sum((u - v) ** 2, axis=1)))


def uniformity(embeddings: np.ndarray, t: float = 2.0, chunk_size: int = 2048) -> float:
    """Uniformity `log E_{i≠j} exp(−t ‖f(x_i) − f(x_j)‖²)` over all ordered pairs i ≠ j."""
    z = np.asarray(embeddings, np.float64)
    n = len(z)
    if z.ndim != 2 or n < 2:
        raise ValueError(f"uniformity needs [n ≥ 2, D] embeddings; got shape {z.shape}.")
    squared = np.sum(z**2, axis=1)
    # log-sum-exp over the pairs, chunked: O(chunk · n) memory.
    log_terms = []
    for start in range(0, n, chunk_size):
        block = z[start : start + chunk_size]
        distance = np.maximum(
            squared[start : start + chunk_size, None] + squared[None, :] - 2.0 * block @ z.T, 0.0)
        exponent = -t * distance
        rows = np.arange(len(block))
        exponent[rows, start + rows] = -np.inf  # i = j
        peak = exponent.max()
        log_terms.append(peak + np.log(np.exp(exponent - peak).sum()))
    return float(np.logaddexp.reduce(log_terms) - np.log(n * (n - 1.0)))


def effective_rank(embeddings: np.ndarray, epsilon: float = 1e-7) -> float:
    """RankMe effective rank `exp(−Σ p_k log p_k)`, `p = σ/‖σ‖₁ + ε`, in [1, min(n, D)]."""
    z = np.asarray(embeddings, np.float64)
    if z.ndim != 2:
        raise ValueError(f"effective_rank needs an [n, D] matrix; got shape {z.shape}.")
    singular_values = np.linalg.svd(z, compute_uv=False)
    p = singular_values / max(singular_values.sum(), np.finfo(np.float64).tiny) + epsilon
    return float(np.exp(-np.sum(p * np.log(p))))


def representation_metrics(encoder, images: Any, augment=None, seed: int = 0,
                           embeddings: np.ndarray | None = None,
                           batch_size: int = 1024) -> dict[str, float]:
    """Alignment, uniformity and effective rank of the L2-normalised embedding of `images`.

    Args:
        encoder: a Keras encoder (its `embedding` output is used), or any
            function `float32 images [b, H, W, C] -> [b, D] embeddings` (e.g.
            a SavedModel's serving signature), called per batch.
        images: an array (uint8 0..255 or float in [0, 1]) or an `ImageSource`.
        augment: an `AugmentConfig`; alignment compares two views of each
            image augmented with it (batch k's views seeded `[seed, 2k + 1]`
            and `[seed, 2k + 2]`: `[seed, 1]`, `[seed, 2]` when one batch
            holds all images). None leaves alignment out.
        embeddings: `images`' embeddings if already computed.
        batch_size: images embedded (and augmented) at a time.
    """
    if isinstance(encoder, keras.layers.Layer):
        model = encoder

        def embed_fn(x):
            return embed(model, x, features="embedding")
    else:
        def embed_fn(x):
            return np.asarray(encoder(np.asarray(x)))
    if embeddings is None:
        embeddings = np.concatenate([embed_fn(batch)
                                     for batch in float_batches(images, batch_size)])
    results = {"uniformity": uniformity(embeddings), "effective_rank": effective_rank(embeddings)}
    if augment is not None:
        from emc2_tf.data.augment import SimCLRAugment

        augmenter = SimCLRAugment(augment)
        views = ([], [])
        for k, batch in enumerate(float_batches(images, batch_size)):
            for view, out in zip((1, 2), views):
                seed_k = tf.constant([seed, 2 * k + view], tf.int64)
                out.append(embed_fn(augmenter(batch, seed=seed_k).numpy()))
        results["alignment"] = alignment(np.concatenate(views[0]), np.concatenate(views[1]))
    return results


def evaluation_unavailable(dataset) -> str | None:
    """Why `evaluate_encoder` cannot score `dataset` (one line), or None when it can:
    the 1-NN and the probe fit on labelled training images and score labelled
    held-out ones (a label -1, TFDS' "no label", does not count)."""
    for split, labels in (("training", dataset.train_labels), ("held-out", dataset.test_labels)):
        if split == "held-out" and dataset.test_images is None:
            return f"{dataset.name} has no held-out split"
        if labels is None or not np.any(np.asarray(labels) >= 0):
            return f"the {split} images of {dataset.name} have no labels"
    return None


def evaluate_encoder(encoder: keras.Model, dataset, linear_probe: bool = True,
                     representation: bool = False, augment=None) -> dict[str, float]:
    """1-NN (and linear-probe) accuracy of the encoder on an `ImageDataset`.

    The splits may be arrays or `ImageSource`s (features computed in
    batches); both need labels. Images labelled -1 (no label, e.g. STL-10's
    `unlabelled` split inside `train+unlabelled`) are left out: only the
    labelled ones are embedded and scored. With `representation`, also the
    held-out split's alignment (needs `augment`), uniformity and effective
    rank (`representation_metrics`).
    """
    from emc2_tf.data.catalog import labelled_part

    reason = evaluation_unavailable(dataset)
    if reason:
        raise ValueError(f"{reason}: evaluation needs labelled training and held-out images.")
    train_images, train_labels = labelled_part(dataset.train_images, dataset.train_labels)
    test_images, test_labels = labelled_part(dataset.test_images, dataset.test_labels)
    train = embed(encoder, train_images)
    test = embed(encoder, test_images)
    results = {"knn_accuracy": knn_accuracy(train, train_labels, test, test_labels)}
    if linear_probe:
        results["linear_probe_accuracy"] = linear_probe_accuracy(
            train, train_labels, test, test_labels
        )
    if representation:
        results.update(representation_metrics(encoder, test_images, augment))
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
