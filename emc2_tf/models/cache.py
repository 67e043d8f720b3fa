"""The embedding-cache baseline: Gumbel-max negatives from a table of cached embeddings.

The EMC² paper's (Yau et al., ICML 2024) cache baseline, after Lindgren et
al. (NeurIPS 2021, "Efficient training of retrieval models using negative
cache"), as the official `cache.py` (`EmbeddingCache`) and `main_gumbel.py`
(`gumbel_max_sampling_losses`, `refresh_cache`) compute it. Each training
step of `CacheModel`:

1. writes the batch's current embeddings into their cache rows (greedy
   update, no gradient);
2. scores every anchor against every cache row, `β s(a, h_r)`, and draws M
   negatives per anchor without replacement from the softmax over the rows
   of *other* images, by sequential Gumbel-max (a fresh Gumbel draw
   `−log(−log U)` per negative, the sampled rows masked after each);
3. re-encodes the M sampled rows from the stored images *with gradient* and
   returns the surrogate loss below, whose gradient is the official one;
4. after the optimizer step, re-encodes the ρ·R stalest cache rows with the
   updated encoder (`cache_refresh` = ρ).

The surrogate, averaged over the 2B anchors a (both views of every image;
the positive p of an anchor is the image's other view):

    L̂ = (1/2B) Σ_a [ −β (1 − π⁺_a) s(a, p) + (β/M) Σ_{j=1..M} (1 − c_{a,j}) s(a, n_{a,j}) ]

with `s(a, b) = aᵀb`, n_{a,j} the j-th sampled row re-encoded now, and, from
the cached embeddings h (no gradient through π⁺ or c):

    Z_a      = exp(β s(a, a)) + Σ_{r ∉ rows(image of a)} exp(β s(a, h_r))
    π⁺_a     = exp(β s(a, a)) / Z_a
    c_{a,j}  = π⁺_a + Σ_{l < j} exp(β s(a, h_{J_l})) / Z_a

The positive's share of the softmax uses the anchor with itself, s(a, a)
(official `pos_scores = Σ queries²`), and its gradient is weighted 1 − π⁺
(Lindgren et al., section 3.3); the j-th negative is weighted by the
probability mass not yet drawn before it, 1 − c_{a,j}, and the negatives are
averaged (/ M). So ∇_a L̂ = (β/2B)[−(1 − π⁺) p + (1/M) Σ_j (1 − c_j) n_j],
an estimate of the global contrastive loss's gradient with the positive
term taken out of the softmax sum. The value of L̂ is not the global loss.

Table layout: with `finite_augmentations=K` each image has K stored views and
the cache has one row per view, row `image·K + k` (R = N·K rows), the views of
the image table; otherwise one row per image (R = N), the un-augmented
images. Cache row r is always re-encoded from image-table row r.

Deviations from the official code:

- positive: the official pairs each augmented anchor with the image's raw,
  un-augmented embedding; here the two views of the batch are each other's
  positive (the skeleton's two-view batch), with gradient through both;
- without finite augmentations the official greedy write stores the raw
  image's embedding (it computes it for the positive); here the batch's raw
  images are encoded for that write only, forward (`training=False`; the
  official encodes them in training mode);
- refresh order: the official keeps a shuffled staleness queue and refreshes
  its front ρ·R rows each step (a fixed cyclic order: batch writes do not move
  rows in it); here the ρ·R rows with the oldest write (greedy or refresh)
  are refreshed, ties by row number, so rows the batch just wrote are not
  re-encoded again;
- cache initialisation: the official encodes every row before training; so
  does `fit` (`fill_cache`) when a row was never written, and a row never
  written (`train_step` called without `fit`) is excluded from the sampling
  and from Z until written;
- Z_a: all K rows of the anchor's image leave it; the official's
  `normalizing_sumexp[idx] -= exp(...)`, an indexed `-=` with repeated
  indices, removes only one of an image's K rows (with K = 1, identical);
- sampled negatives are each re-encoded (the official encodes each distinct
  requested row once; identical unless the encoder has batch statistics);
- negatives drawn from the whole cache on every replica (the official's
  distributed Gumbel-max over per-rank shards draws from the same softmax).

Memory: the cache holds R·D float32 embeddings and R int32 write steps
(O(N·D) floats; N·K·D with finite augmentations); a step scores 2b × R
similarities and M draws of 2b × R uniforms per replica.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from emc2_tf.data.finite import check_num_views
from emc2_tf.data.image_source import ImageSource
from emc2_tf.models.contrastive_model import ContrastiveModel
from emc2_tf.models.image_store import (
    DEFAULT_MAX_IMAGE_TABLE_BYTES,
    TableOwner,
    _ImageTable,
    check_image_table,
    gather_images,
)

MISSING_IMAGES_MESSAGE = (
    "CacheModel needs `images`: the image table its cache rows are encoded from and its "
    "sampled negatives re-encoded from (the N un-augmented images [N, H, W, C], or with "
    "finite_augmentations=K the N·K stored views, row image·K + k), float in [0, 1] or "
    "uint8. Pass images= to the constructor, or call model.set_image_table(images) on a "
    "loaded model (a .keras file does not store the data set)."
)

SOURCE_JIT_MESSAGE = (
    "CacheModel: jit_compile=True cannot re-encode cache rows from the image source "
    "{name!r} ({kind}): a source's read runs tf.numpy_function or tf.data ops, which XLA "
    "cannot compile inside the step; compile with jit_compile=False (on a GPU, 'auto' means "
    "True), or give images= an in-memory array."
)

#: What the byte-limit refusal of the cache's image table says the cache needs it for.
TABLE_OWNER = TableOwner(
    reads="CacheModel encodes every cache row and re-encodes its sampled negatives from "
          "the table by index, inside the step")

#: Rows per encoder call when `fill_cache` encodes the whole table.
FILL_BATCH_SIZE = 256

#: Most rows per encoder call when a step refreshes the cache (official
#: `--compute_batch_size`): ⌊ρ·R⌋ can be thousands of images (ρ = 0.1 of
#: CIFAR-10's 50,000·2 stored views: 10,000 per step), encoded in chunks so the
#: refresh's activations stay those of one chunk.
REFRESH_CHUNK_SIZE = 1024


def gumbel_max_negatives(
    logits: tf.Tensor, allowed: tf.Tensor, uniforms: tf.Tensor
) -> tf.Tensor:
    """M rows per anchor, drawn without replacement from `softmax(logits)` over `allowed`.

    Sequential Gumbel-max (official `gumbel_max_sampling_batched`): draw j takes
    `argmax_r (logits[a, r] + G_j[a, r])` over the allowed rows not drawn yet,
    `G_j = −log(−log U_j)`, a fresh Gumbel draw for each j; each draw is
    distributed as the softmax over the rows left.

    Args:
        logits: `[A, R]`, `β s(anchor, cache row)`.
        allowed: bool `[A, R]`, the rows anchor a may draw.
        uniforms: `[M, A, R]`, Uniform(0, 1) draws.

    Returns:
        int32 `[A, M]`, the drawn rows in draw order.
    """
    minus_inf = tf.constant(-np.inf, logits.dtype)
    scores = tf.where(allowed, logits, minus_inf)
    gumbel = -tf.math.log(-tf.math.log(tf.cast(uniforms, logits.dtype)))
    num_rows = tf.shape(logits)[-1]
    rows = []
    for j in range(uniforms.shape[0]):
        row = tf.argmax(scores + gumbel[j], axis=-1, output_type=tf.int32)  # [A]
        rows.append(row)
        scores = tf.where(tf.one_hot(row, num_rows, on_value=True, off_value=False),
                          minus_inf, scores)
    return tf.stack(rows, axis=1)


def cache_sample_weights(
    logits: tf.Tensor, allowed: tf.Tensor, positive_logits: tf.Tensor, rows: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """`(π⁺ [A], c [A, M])`: the positive's probability and, for each drawn row,
    the probability mass drawn before it (positive included), under
    `softmax([β s(a, a), β s(a, h_r) for allowed r])` (official `cumu_weights`).
    """
    minus_inf = tf.constant(-np.inf, logits.dtype)
    all_logits = tf.concat([positive_logits[:, None], tf.where(allowed, logits, minus_inf)],
                           axis=-1)
    log_normaliser = tf.reduce_logsumexp(all_logits, axis=-1)  # log Z_a
    positive_probability = tf.exp(positive_logits - log_normaliser)
    drawn = tf.exp(tf.gather(logits, rows, batch_dims=1) - log_normaliser[:, None])  # [A, M]
    before = positive_probability[:, None] + tf.cumsum(drawn, axis=-1, exclusive=True)
    return positive_probability, before


def _check_fraction(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}.") from None
    if not 0.0 <= number <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must be a number in [0, 1] (the share of cache rows "
                         f"re-encoded per step); got {value!r}.")
    return number


def _check_int(value: Any, name: str, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum} ({what}); got {value!r}.")
    return int(value)


def _embedding_dim(encoder: keras.layers.Layer) -> int:
    try:
        dim = encoder.output_shape[-1]
    except (AttributeError, ValueError, RuntimeError):
        dim = None
    if not isinstance(dim, (int, np.integer)):
        raise ValueError(
            "encoder must be a built Keras model with a known output size D (the cache "
            "stores [rows, D] embeddings); build it with keras.Input first.")
    return int(dim)


@keras.saving.register_keras_serializable(package="emc2_tf")
class CacheModel(ContrastiveModel):
    """Contrastive pre-training with a cache of embeddings and Gumbel-max negatives.

    The EMC² paper's embedding-cache baseline. Each step writes the batch's
    embeddings into their cache rows, draws for each anchor a (image i) M rows
    J_j of other images by Gumbel-max without replacement from
    `softmax_r(β aᵀh_r)`, re-encodes them with gradient (n_j) and minimises

        L̂ = mean_a [ −β (1 − π⁺_a) aᵀp + (β/M) Σ_j (1 − c_{a,j}) aᵀn_{a,j} ]

    with `π⁺_a = exp(β aᵀa) / Z_a`, `Z_a = exp(β aᵀa) + Σ_{r ∉ i} exp(β aᵀh_r)`
    and `c_{a,j} = π⁺_a + Σ_{l<j} exp(β aᵀh_{J_l}) / Z_a` (no gradient); then
    re-encodes the ⌊ρ·R⌋ stalest rows. Memory: the cache's R·D float32 (R = N,
    or N·K with finite augmentations: O(N·D) floats) and R int32. The module
    docstring details the estimator and its deviations from the official code.
    The paper's finite run: `temperature=0.2` (β = 5), `cache_refresh=0.1`,
    `cache_negatives=1`, `finite_augmentations=2`, SGD at 1e-3.

    Example:

    ```python
    data = emc2_tf.load_digits()
    encoder = emc2_tf.build_small_cnn_encoder(data.image_shape)
    model = emc2_tf.CacheModel(encoder, dataset_size=data.num_train,
                               images=data.train_images, temperature=0.2, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(emc2_tf.make_two_view_dataset(data.train_images, 64, seed=0), epochs=5)
    ```

    Args:
        encoder: images `[B, H, W, C]` → L2-normalised embeddings `[B, D]`.
        dataset_size: N; sample indices address `[0, N)`.
        images: the image table the cache rows are encoded from: the N
            un-augmented images `[N, H, W, C]`, or with `finite_augmentations=K`
            the N·K stored views (row `image·K + k`, the rows the batches'
            `view_index` address); float in [0, 1] or uint8 (0..255), or an
            `ImageSource`. Required to train; settable with `set_image_table`.
        temperature: τ (β = 1/τ).
        cache_refresh: ρ in [0, 1], the share of the R cache rows re-encoded
            with the updated encoder after each step (the stalest rows;
            official `--rho`, paper 0.1).
        cache_negatives: M ≥ 1, negatives drawn per anchor (official
            `--neg_batch_size`, paper 1); at most the rows of the other images.
        finite_augmentations: None, or K ≥ 2 stored views per image: the cache
            then has one row per view and a batch must carry `view_index`.
        seed: seed of the Gumbel draws.
        max_image_table_bytes: refuse an in-memory image table larger than this.

    State (non-trainable, saved with the weights and checkpoints):
        cache_embeddings: float32 `[R, D]`, the cached embedding of each row.
        cache_written_step: int32 `[R]`, the `cache_step` whose weights
            encoded the row (−1: never written). A row's staleness is
            `cache_step − cache_written_step`.
        cache_step: int32 scalar, training steps taken.

    Logged per step: `loss` (the surrogate), `positive_weight` (mean π⁺),
    `cache_staleness` (mean staleness, in steps, of the sampled rows).

    `test_step` (held-out images) reads the cache and writes nothing, draws
    with `evaluation_uniform`, excludes no row (held-out indices address no
    cache row) and re-encodes its negatives with `training=False`. A batch
    with `view_index` but `finite_augmentations=None` is trained as an
    ordinary one (its views are still views of the image; `view_index` is
    ignored).
    """

    step_metric_names = ("positive_weight", "cache_staleness")
    uses_view_index = True

    def __init__(
        self,
        encoder: keras.Model,
        dataset_size: int,
        images: Any = None,
        temperature: float = 0.07,
        cache_refresh: float = 0.1,
        cache_negatives: int = 1,
        finite_augmentations: int | None = None,
        seed: int | None = None,
        max_image_table_bytes: int = DEFAULT_MAX_IMAGE_TABLE_BYTES,
        **kwargs: Any,
    ):
        super().__init__(encoder, dataset_size, temperature, seed, **kwargs)
        self.cache_refresh = _check_fraction(cache_refresh, "cache_refresh")
        self.finite_augmentations = check_num_views(finite_augmentations, allow_none=True)
        self.views_per_image = self.finite_augmentations or 1
        self.cache_rows = self.dataset_size * self.views_per_image
        self.cache_negatives = _check_int(cache_negatives, "cache_negatives", 1,
                                          "negatives drawn per anchor")
        other_rows = self.cache_rows - self.views_per_image
        if self.cache_negatives > other_rows:
            raise ValueError(
                f"cache_negatives must be at most the {other_rows} cache rows of the other "
                f"images (drawn without replacement); got {cache_negatives}.")
        self.max_image_table_bytes = int(max_image_table_bytes)
        self._image_table = _ImageTable(None)
        self.set_image_table(images)
        dim = _embedding_dim(encoder)
        self.cache_embeddings = self.add_weight(
            shape=(self.cache_rows, dim), dtype="float32", initializer="zeros",
            trainable=False, aggregation="only_first_replica", name="cache_embeddings")
        self.cache_written_step = self.add_weight(
            shape=(self.cache_rows,), dtype="int32",
            initializer=keras.initializers.Constant(-1), trainable=False,
            aggregation="only_first_replica", name="cache_written_step")
        self.cache_step = self.add_weight(
            shape=(), dtype="int32", initializer="zeros", trainable=False,
            aggregation="only_first_replica", name="cache_step")

    # --- the image table -------------------------------------------------

    @property
    def images(self) -> tf.Tensor | ImageSource | None:
        """The image table cache rows are encoded from (tensor, `ImageSource` or None)."""
        return self._image_table.images

    def set_image_table(self, images: Any) -> None:
        """Sets (or clears, with None) the image table: R = N rows, or N·K stored
        views with `finite_augmentations=K` (row `image·K + k`)."""
        self._image_table.images = check_image_table(
            images, self.dataset_size, self.max_image_table_bytes, self.finite_augmentations,
            owner=TABLE_OWNER)

    def image_sources(self) -> tuple:
        if isinstance(self.images, ImageSource):
            return (self.images,)
        return ()

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments except `images` (data, not model state)."""
        return {**super().get_config(), "cache_refresh": self.cache_refresh,
                "cache_negatives": self.cache_negatives,
                "finite_augmentations": self.finite_augmentations,
                "max_image_table_bytes": self.max_image_table_bytes}

    def _require_images(self) -> None:
        if self.images is None:
            raise ValueError(MISSING_IMAGES_MESSAGE)
        if self.image_sources() and self.jit_compile:
            raise ValueError(SOURCE_JIT_MESSAGE.format(name=self.images.name,
                                                       kind=type(self.images).__name__))

    def _encode_rows(self, rows: tf.Tensor, training: bool) -> tf.Tensor:
        """Embeddings `[len(rows), D]` of image-table rows, float32, with gradient."""
        return tf.cast(self.encoder(gather_images(self.images, rows), training=training),
                       tf.float32)

    # --- filling and refreshing the cache ---------------------------------

    def fill_cache(self, batch_size: int = FILL_BATCH_SIZE) -> None:
        """Encodes every cache row from the image table with the current encoder
        (`training=False`), as the official code does before training; each row's
        write step becomes `cache_step`. `fit` calls it when a row was never written."""
        self._require_images()
        encode = tf.function(lambda x: tf.cast(self.encoder(x, training=False), tf.float32),
                             reduce_retracing=True)
        parts = []
        for start in range(0, self.cache_rows, batch_size):
            rows = tf.range(start, min(start + batch_size, self.cache_rows))
            parts.append(encode(gather_images(self.images, rows)))
        self.cache_embeddings.assign(tf.concat(parts, axis=0))
        self.cache_written_step.assign(
            tf.fill([self.cache_rows], tf.convert_to_tensor(self.cache_step.value)))

    def fit(self, *args, **kwargs):
        """`ContrastiveModel.fit`, after checking the image table and filling the
        cache rows never written (`fill_cache`)."""
        self._require_images()
        if int(np.min(np.asarray(self.cache_written_step.value))) < 0:
            self.fill_cache()
        return super().fit(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """`keras.Model.evaluate`, after checking the image table is there."""
        self._require_images()
        return super().evaluate(*args, **kwargs)

    def refresh_size(self) -> int:
        """Rows re-encoded after each step: ⌊ρ·R⌋ (official `int(rho * len(queue))`)."""
        return int(math.floor(self.cache_refresh * self.cache_rows + 1e-9))

    def train_step(self, data):
        logs = super().train_step(data)
        self._refresh_cache()
        self.cache_step.assign_add(1)
        return logs

    def _refresh_cache(self) -> None:
        """Re-encodes the ⌊ρ·R⌋ stalest rows with the updated weights (stamped
        `cache_step + 1`: the weights the next step uses). Under a strategy each
        replica encodes its share of them and the writes are all-gathered."""
        size = self.refresh_size()
        if size == 0:
            return
        context = tf.distribute.get_replica_context()
        replicas = 1 if context is None else context.num_replicas_in_sync
        replica = 0 if context is None else context.replica_id_in_sync_group
        per_replica = -(-size // replicas)
        chosen = min(per_replica * replicas, self.cache_rows)
        # The oldest writes first (−1: never written); ties by row number.
        stalest = tf.math.top_k(-self.cache_written_step.value, k=chosen).indices
        mine = tf.gather(stalest, (tf.cast(replica, tf.int32) * per_replica
                                   + tf.range(per_replica)) % chosen)
        chunk = min(per_replica, REFRESH_CHUNK_SIZE)
        chunks = -(-per_replica // chunk)
        if chunks > 1:  # padded with repeats of its first rows: identical rewrites
            mine = tf.reshape(tf.gather(mine, tf.range(chunks * chunk) % per_replica),
                              [chunks, chunk])
            embeddings = tf.map_fn(
                lambda rows: self._encode_rows(rows, training=False), mine,
                fn_output_signature=tf.TensorSpec([chunk, self.cache_embeddings.shape[-1]],
                                                  tf.float32))
            mine = tf.reshape(mine, [-1])
            embeddings = tf.reshape(embeddings, [chunks * chunk, -1])
        else:
            embeddings = self._encode_rows(mine, training=False)
        embeddings = tf.stop_gradient(embeddings)
        step = tf.fill(tf.shape(mine), tf.convert_to_tensor(self.cache_step.value) + 1)
        self.update_sample_state(
            mine, [(self.cache_embeddings, embeddings), (self.cache_written_step, step)])

    # --- the loss ------------------------------------------------------------

    def _row_image(self) -> tf.Tensor:
        return tf.range(self.cache_rows, dtype=tf.int32) // self.views_per_image

    def contrastive_loss(self, index, embeddings, training=True, view_index=None):
        if self.images is None:
            raise ValueError(MISSING_IMAGES_MESSAGE)
        finite = self.finite_augmentations
        if finite and view_index is None:
            raise ValueError(
                f"CacheModel(finite_augmentations={finite}) needs batches with 'view_index' "
                "[B, 2] (make_two_view_dataset(..., finite_augmentations=K)): the cache rows "
                "of the batch's views are image·K + view_index.")
        beta = tf.convert_to_tensor(self.inverse_temperature, dtype=embeddings.dtype)
        index = tf.cast(index, tf.int32)
        batch_size = tf.shape(index)[0]
        view1, view2 = embeddings[:batch_size], embeddings[batch_size:]
        anchors = embeddings  # [2b, D]: view 1 of each image, then view 2
        positives = tf.concat([view2, view1], axis=0)
        anchor_image = tf.concat([index, index], axis=0)

        # 1. Greedy write of the batch's rows with their current embeddings.
        if training:
            if finite:
                rows = tf.concat([index * finite + view_index[:, 0],
                                  index * finite + view_index[:, 1]], axis=0)
                values = tf.stop_gradient(anchors)
            else:  # official: the raw image's embedding
                rows = index
                values = tf.stop_gradient(self._encode_rows(index, training=False))
            step = tf.fill(tf.shape(rows), tf.convert_to_tensor(self.cache_step.value))
            self.update_sample_state(
                rows, [(self.cache_embeddings, values), (self.cache_written_step, step)])

        # 2. Gumbel-max draws over the cache rows of other images.
        cache = tf.convert_to_tensor(self.cache_embeddings.value)
        written_step = tf.convert_to_tensor(self.cache_written_step.value)
        logits = beta * tf.matmul(tf.stop_gradient(anchors), cache, transpose_b=True)  # [2b, R]
        allowed = tf.broadcast_to((written_step >= 0)[None, :], tf.shape(logits))
        if training:  # held-out images own no cache row
            allowed &= self._row_image()[None, :] != anchor_image[:, None]
        num_draws = self.cache_negatives
        if training:
            uniforms = self.random_uniform([num_draws, 2 * batch_size, self.cache_rows])
        else:
            all_index, _ = self.global_batch(index, embeddings)
            draws = self.evaluation_uniform(all_index,
                                            [num_draws, 2, self.cache_rows, batch_size])
            uniforms = tf.reshape(tf.transpose(draws, [0, 1, 3, 2]),
                                  [num_draws, 2 * batch_size, self.cache_rows])
        rows = gumbel_max_negatives(logits, allowed, uniforms)  # [2b, M]
        positive_logits = beta * tf.reduce_sum(tf.stop_gradient(anchors) ** 2, axis=-1)
        positive_probability, drawn_before = cache_sample_weights(
            logits, allowed, positive_logits, rows)
        # A draw with no allowed row left (a cache not yet filled) adds nothing.
        usable = tf.cast(tf.gather(allowed, rows, batch_dims=1), anchors.dtype)
        negative_weights = tf.stop_gradient((1.0 - drawn_before) * usable)

        # 3. The sampled rows re-encoded now, with gradient; the surrogate.
        negatives = tf.reshape(self._encode_rows(tf.reshape(rows, [-1]), training=training),
                               [2 * batch_size, num_draws, -1])
        negative_term = beta * tf.reduce_sum(
            negative_weights * tf.einsum("ad,amd->am", anchors, negatives), axis=-1) / num_draws
        positive_term = beta * tf.stop_gradient(1.0 - positive_probability) * tf.reduce_sum(
            anchors * positives, axis=-1)
        loss = tf.reduce_mean(negative_term - positive_term)

        staleness = tf.cast(tf.convert_to_tensor(self.cache_step.value)
                            - tf.gather(written_step, rows), tf.float32)
        return loss, {"positive_weight": tf.reduce_mean(positive_probability),
                      "cache_staleness": tf.reduce_mean(staleness)}
