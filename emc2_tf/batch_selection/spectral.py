r"""Spectral-clustering mini-batch selection (Cho et al., TMLR 2024; algorithms.md §8).

Mini-batch contrastive training matches full-batch training only if every
batch is used; training on *high-loss* batches (hard negatives together)
speeds SGD up. The selection groups images that are hard negatives of each
other, with the current encoder and no gradient:

1. embed both views of every image: `u_i`, `v_i` (L2-normalised),
   `s_ij = u_iᵀ v_j / τ`;
2. shuffle and cut the data into groups of `k·B` images;
3. in each group the affinity (the pair's contribution to the batch loss)

       A_ij = log(1 + (B−1) e^{s_ij − s_ii}) + log(1 + (B−1) e^{s_ji − s_ii}),
       A ← A + Aᵀ,   W = exp(A);

4. spectral embedding of `W` (normalised Laplacian, `k` components),
   k-means with `k` clusters, then an equal-size assignment: every centroid
   repeated `B` times, Hungarian assignment on the Euclidean (not squared)
   distances, as the authors' `cdist`, so each cluster is one batch of
   exactly `B` images;
5. the clusters are the epoch's batches, for any objective.

Cost: one forward pass over the 2N views, then per group an `(kB)²`
affinity, an eigen-solve and a `(kB)²` assignment: `O(N·kB)` memory-time
overall, `O(N²)` if one group holds the whole data set. `max_group_size`
(default 4096, a 128 MiB float64 affinity) refuses larger groups and
`SpectralBatchSelection` refuses data sets above `max_dataset_size`, each
with a message naming the argument.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from emc2_tf.data.augment import AugmentConfig, SimCLRAugment
from emc2_tf.data.image_source import as_source
from emc2_tf.models.contrastive_model import check_temperature

#: Largest group k·B accepted by default: a 4096² float64 affinity is 128 MiB.
DEFAULT_MAX_GROUP_SIZE = 4096

#: Images read, augmented and embedded at a time by a selection.
SELECTION_CHUNK = 4096


def spectral_affinity(view1: np.ndarray, view2: np.ndarray, batch_size: int,
                      temperature: float) -> np.ndarray:
    """The symmetrised affinity `A + Aᵀ` of one group (step 3), float64 `[n, n]`.

    Args:
        view1, view2: `[n, D]` L2-normalised embeddings `u_i`, `v_i`.
        batch_size: B.
        temperature: τ.
    """
    u = np.asarray(view1, np.float64)
    v = np.asarray(view2, np.float64)
    s = (u @ v.T) / temperature  # s_ij = u_iᵀ v_j / τ
    diagonal = np.diag(s)[:, None]  # s_ii per row i
    log_b = np.log(batch_size - 1.0)
    affinity = np.logaddexp(0.0, log_b + s - diagonal) + np.logaddexp(0.0, log_b + s.T - diagonal)
    return affinity + affinity.T


def equal_size_clusters(affinity: np.ndarray, cluster_size: int,
                        rng: np.random.Generator) -> np.ndarray:
    """Cluster labels `[n]` with exactly `cluster_size` members each (step 4).

    `W = exp(A − max A)` (the normalised Laplacian does not change when `W` is
    scaled, and the shift keeps `exp` finite for any τ).
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist
    from sklearn.cluster import KMeans
    from sklearn.manifold import spectral_embedding

    n = affinity.shape[0]
    num_clusters = n // cluster_size
    if num_clusters * cluster_size != n:
        raise ValueError(f"group of {n} images is not a multiple of batch_size={cluster_size}.")
    if num_clusters == 1:
        return np.zeros(n, np.int64)
    weights = np.exp(affinity - affinity.max())
    seed = int(rng.integers(2**31 - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "graph is not fully connected"
        maps = spectral_embedding(weights, n_components=num_clusters, norm_laplacian=True,
                                  drop_first=False, random_state=seed)
    kmeans = KMeans(n_clusters=num_clusters, n_init=4, random_state=seed).fit(maps)
    centroids = kmeans.cluster_centers_  # [k, k]
    # Euclidean, not squared, distances, as the authors' `cdist(X, centers)`
    # (krafton-ai/mini-batch-cl utils.py, `spectral_clustering`, sc_even): the
    # assignment minimises the sum of costs, and a sum of distances and a sum
    # of squared distances have different minimisers.
    distances = cdist(maps, centroids)  # [n, k]
    cost = np.repeat(distances, cluster_size, axis=1)  # each centroid B times: [n, n]
    rows, columns = linear_sum_assignment(cost)
    labels = np.empty(n, np.int64)
    labels[rows] = columns // cluster_size
    return labels


def _check_grouping(num_images: int, batch_size: int, groups_k: int, max_group_size: int) -> int:
    """Validates B and k against N and the group-size limit; returns the group size k·B."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or not (
        2 <= batch_size <= num_images
    ):
        raise ValueError(f"batch_size must be an integer in [2, N={num_images}]; got {batch_size!r}.")
    if isinstance(groups_k, bool) or not isinstance(groups_k, (int, np.integer)) or groups_k < 1:
        raise ValueError(f"groups_k must be an integer ≥ 1 (batches per group); got {groups_k!r}.")
    group_size = min(groups_k, num_images // batch_size) * batch_size
    if group_size > max_group_size:
        raise ValueError(
            f"Spectral batch selection would cluster groups of {group_size} images "
            f"(groups_k={groups_k} × batch_size={batch_size}), above max_group_size="
            f"{max_group_size}: each group needs a {group_size}² affinity and eigen-solve. "
            f"Use groups_k ≤ {max(1, max_group_size // batch_size)} or raise max_group_size."
        )
    return group_size


def spectral_batches(
    view1: np.ndarray,
    view2: np.ndarray,
    batch_size: int,
    temperature: float = 0.1,
    groups_k: int = 40,
    seed: int | np.random.Generator | None = None,
    max_group_size: int = DEFAULT_MAX_GROUP_SIZE,
) -> np.ndarray:
    """One epoch of spectral-clustering batches: int64 `[N // B, B]` sample indices.

    Args:
        view1, view2: `[N, D]` L2-normalised embeddings of the two views of
            every image, row `i` = sample index `i`.
        batch_size: B ≥ 2.
        temperature: τ of the affinity (authors: 0.1).
        groups_k: k, the number of batches per group (authors: 40).
        seed: seeds the shuffle, spectral embedding and k-means.
        max_group_size: refuse `k·B` (capped at N) above this.

    The `N mod B` images left after the shuffle sit out this epoch (as
    `drop_remainder` does with random batches); every other image appears in
    exactly one batch. Batches come in a random order.
    """
    view1 = np.asarray(view1)
    view2 = np.asarray(view2)
    if view1.ndim != 2 or view1.shape != view2.shape:
        raise ValueError(
            f"view1 and view2 must both be [N, D] embeddings; got {view1.shape} and {view2.shape}."
        )
    num_images = view1.shape[0]
    group_size = _check_grouping(num_images, batch_size, groups_k, max_group_size)
    num_batches = num_images // batch_size
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    order = rng.permutation(num_images)[: num_batches * batch_size]
    batches = []
    for start in range(0, len(order), group_size):
        group = order[start : start + group_size]
        affinity = spectral_affinity(view1[group], view2[group], batch_size, temperature)
        labels = equal_size_clusters(affinity, batch_size, rng)
        for cluster in range(len(group) // batch_size):
            batches.append(np.sort(group[labels == cluster]))
    batches = np.stack(batches).astype(np.int64)
    return batches[rng.permutation(len(batches))]


#: Largest data set `SpectralBatchSelection` accepts by default. At B = 32,
#: k = 40 a selection costs ≈ 1.1 s per group of 1280 on a 2-core CPU, so
#: 200,000 images ≈ 156 groups ≈ 3 minutes per selection, plus one forward
#: pass over the 2N views.
DEFAULT_MAX_DATASET_SIZE = 200_000


class SpectralBatchSelection(keras.callbacks.Callback):
    """Chooses each epoch's batches by spectral clustering (every `every_k_epochs`).

    A Keras callback and a batch order in one: pass it to
    `make_two_view_dataset(..., batch_order=selection)` and to
    `model.fit(..., callbacks=[selection])`. At the start of epoch 0 and of
    every `every_k_epochs`-th epoch it embeds two augmented views of every
    image with the current encoder and runs `spectral_batches`; the epochs in
    between reuse those batches in a new random order. Works with any
    objective.

    ```python
    selection = emc2_tf.SpectralBatchSelection(data.train_images, batch_size=32)
    dataset = emc2_tf.make_two_view_dataset(data.train_images, 32, batch_order=selection)
    model.fit(dataset, epochs=10, callbacks=[selection])
    ```

    Args:
        images: the images the dataset indexes: an array `[N, H, W, C]`
            (uint8 0..255 or float in [0, 1]) or an `ImageSource`, read in
            chunks of `SELECTION_CHUNK` images.
        batch_size: B.
        temperature: τ of the affinity (authors: 0.1).
        every_k_epochs: re-select every this many epochs.
        groups_k: batches per clustered group (authors: 40).
        augment: the views' augmentation (None = un-augmented images).
        seed: seeds the views, the clustering and the batch order.
        max_group_size, max_dataset_size: refuse costlier selections.
        verbose: print one line per selection (its time).
    """

    def __init__(
        self,
        images: Any,
        batch_size: int,
        temperature: float = 0.1,
        every_k_epochs: int = 1,
        groups_k: int = 40,
        augment: AugmentConfig | None = AugmentConfig(),
        seed: int = 0,
        max_group_size: int = DEFAULT_MAX_GROUP_SIZE,
        max_dataset_size: int = DEFAULT_MAX_DATASET_SIZE,
        verbose: bool = True,
    ):
        super().__init__()
        self.source = as_source(images, "images")
        num_images = self.source.num_images
        if num_images > max_dataset_size:
            raise ValueError(
                f"Spectral batch selection refuses N={num_images} images (max_dataset_size="
                f"{max_dataset_size}): each selection embeds all 2N views and clusters N/(k·B) "
                "groups, ≈1 s per group of 1280 on a 2-core CPU. Use --batch_selection=random, "
                "a larger every_k_epochs, or raise max_dataset_size."
            )
        # spectral_batches' own checks, before any training starts.
        _check_grouping(num_images, batch_size, groups_k, max_group_size)
        if isinstance(every_k_epochs, bool) or not isinstance(every_k_epochs, (int, np.integer)) or (
            every_k_epochs < 1
        ):
            raise ValueError(f"every_k_epochs must be an integer ≥ 1; got {every_k_epochs!r}.")
        self.images = images
        self.num_images = num_images
        self.batch_size = int(batch_size)
        self.num_batches = num_images // self.batch_size
        self.temperature = check_temperature(temperature)
        self.every_k_epochs = int(every_k_epochs)
        self.groups_k = int(groups_k)
        self.augment = None if augment is None else SimCLRAugment(augment)
        self.seed = int(seed)
        self.max_group_size = max_group_size
        self.verbose = verbose
        # The current selection [N // B, B] and the epoch it was made at, as
        # variables: a checkpoint (`checkpoint_state`) restores them, so a run
        # resumed between two selections uses the batches it had.
        self.selection = tf.Variable(
            tf.zeros([self.num_batches, self.batch_size], tf.int64), trainable=False,
            name="spectral_selection")
        self.selected_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False,
                                          name="spectral_selected_epoch")
        self.selection_epochs: list[int] = []
        self.selection_seconds: list[float] = []

    @property
    def batches(self) -> np.ndarray | None:
        """The current selection `[N // B, B]`, or None before the first."""
        return None if int(self.selected_epoch.numpy()) < 0 else self.selection.numpy()

    @property
    def checkpoint_state(self) -> tf.train.Checkpoint:
        """What a training checkpoint must hold to resume between two selections."""
        return tf.train.Checkpoint(selection=self.selection, selected_epoch=self.selected_epoch)

    def _embedded_views(self, encoder: keras.Model, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Both views' embeddings `[N, D]`, read, augmented and embedded chunk by
        chunk (`SELECTION_CHUNK` images): the images are never all float at once."""
        embedded = ([], [])
        for chunk, start in enumerate(range(0, self.num_images, SELECTION_CHUNK)):
            index = tf.range(start, min(start + SELECTION_CHUNK, self.num_images), dtype=tf.int64)
            images = self.source.to_float(self.source.read(index))
            for view, out in enumerate(embedded):
                if self.augment is not None:
                    seed = tf.constant([self.seed * 7919 + epoch, 2 * chunk + view], tf.int32)
                    views = self.augment(images, seed=seed)
                else:
                    views = images
                out.append(encoder.predict(views, batch_size=512, verbose=0))
        return np.concatenate(embedded[0]), np.concatenate(embedded[1])

    def select(self, encoder: keras.Model, epoch: int = 0) -> np.ndarray:
        """Runs one selection with `encoder`; returns and keeps the batches."""
        started = time.time()
        z1, z2 = self._embedded_views(encoder, epoch)
        batches = spectral_batches(
            z1, z2, self.batch_size, self.temperature, self.groups_k,
            np.random.default_rng([self.seed, epoch]), self.max_group_size,
        )
        self.selection.assign(batches)
        self.selected_epoch.assign(epoch)
        seconds = time.time() - started
        self.selection_epochs.append(epoch)
        self.selection_seconds.append(seconds)
        if self.verbose:
            print(f"spectral batch selection (epoch {epoch + 1}): {self.num_batches} batches "
                  f"of {self.batch_size} in {seconds:.1f} s")
        return self.batches

    def selection_epoch(self, epoch: int) -> int:
        """The epoch whose selection epoch `epoch` trains on."""
        return epoch - epoch % self.every_k_epochs

    def on_epoch_begin(self, epoch, logs=None):
        if int(self.selected_epoch.numpy()) != self.selection_epoch(epoch):
            self.select(getattr(self.model, "encoder", self.model), self.selection_epoch(epoch))

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s batches `[N // B, B]`: the selection, in an order drawn from `(seed, epoch)`.

        Before the first selection (e.g. when Keras peeks at the dataset
        before training) the batches are a random split.
        """
        rng = np.random.default_rng([self.seed, 1_000_003, int(epoch)])
        batches = self.batches
        if batches is None:
            order = rng.permutation(self.num_images)[: self.num_batches * self.batch_size]
            return order.reshape(self.num_batches, self.batch_size).astype(np.int64)
        return batches[rng.permutation(len(batches))]
