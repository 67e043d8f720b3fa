"""The one `train_step` shape shared by every contrastive method of emc2-tf.

A method is a subclass of `ContrastiveModel` that supplies its loss (and owns
its per-sample state, if any) in `contrastive_loss`; the skeleton does the
rest: unpack and validate the two-view batch, encode both views with
gradient, scale the loss for the replica sum under `tf.distribute`, apply the
optimizer, and log the unscaled loss plus the method's own scalars.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from emc2_tf.data.batch import INDEX_RANGE_MESSAGE, check_dataset, unpack_two_view_batch


def check_temperature(temperature: float) -> float:
    """Returns τ as a float, or raises a `ValueError` naming the argument."""
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number > 0; got {temperature!r}.") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be > 0 (τ, e.g. 0.07); got {temperature!r}.")
    return value


def check_dataset_size(dataset_size: int) -> int:
    """Returns N as an int, or raises a `ValueError` naming the argument."""
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, (int, np.integer)):
        raise ValueError(f"dataset_size must be an integer ≥ 2; got {dataset_size!r}.")
    if dataset_size < 2:
        raise ValueError(f"dataset_size must be ≥ 2 (N images); got {dataset_size}.")
    return int(dataset_size)


class ContrastiveModel(keras.Model):
    """Base class: a Keras model whose `train_step` optimises a contrastive loss.

    Args:
        encoder: a Keras model mapping images `[B, H, W, C]` to L2-normalised
            embeddings `[B, D]`.
        dataset_size: N, the number of images the sample indices address.
        temperature: τ > 0 (β = 1/τ).
        seed: seed of the model's random draws (MH uniforms), or None.
    """

    #: Names of the per-step scalars a method logs besides `loss`.
    step_metric_names: tuple[str, ...] = ()

    def __init__(
        self,
        encoder: keras.Model,
        dataset_size: int,
        temperature: float = 0.07,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not isinstance(encoder, keras.layers.Layer):
            raise ValueError(
                f"encoder must be a Keras model/layer mapping images to embeddings; "
                f"got {type(encoder).__name__}."
            )
        self.encoder = encoder
        self.dataset_size = check_dataset_size(dataset_size)
        self.temperature = check_temperature(temperature)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.step_trackers = {
            name: keras.metrics.Mean(name=name) for name in self.step_metric_names
        }

    @property
    def inverse_temperature(self) -> float:
        """β = 1/τ."""
        return 1.0 / self.temperature

    @property
    def metrics(self):
        return [self.loss_tracker, *self.step_trackers.values()]

    def call(self, images, training=False):
        return self.encoder(images, training=training)

    def contrastive_loss(
        self, index: tf.Tensor, embeddings: tf.Tensor, training: bool = True
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """Returns `(loss, step_scalars)` for one replica's batch.

        Args:
            index: int32 `[B]` sample indices.
            embeddings: `[2B, D]`, view 1 of the B images then view 2.
        Runs inside the gradient tape; state updates happen here too.
        """
        raise NotImplementedError

    def random_uniform(self, shape) -> tf.Tensor:
        """Uniform(0, 1) draws, independent per replica and per step.

        `keras.random.SeedGenerator` gives every replica the same seed, so
        the replica id is folded into it (shared notes, Distribution).
        """
        seed = tf.cast(self.seed_generator.next(), tf.int64)
        context = tf.distribute.get_replica_context()
        replica_id = 0 if context is None else context.replica_id_in_sync_group
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int64))
        return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32, alg="philox")

    def update_sample_state(
        self, index: tf.Tensor, updates: Sequence[tuple[Any, tf.Tensor]]
    ) -> None:
        """Writes per-sample state rows `index`; identical on every replica.

        Args:
            index: int32 `[B]` this replica's sample indices.
            updates: `(variable, values)` pairs, each variable `[N, ...]`
                and its values `[B, ...]` (pairs, not a dict: Keras variables
                overload `==` and are not hashable keys).

        Under a strategy the indices and values of all replicas are gathered
        first and every replica applies the same update (shared notes,
        Distribution), so the tables never diverge and hold every replica's
        anchors.
        """
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            index = context.all_gather(index, axis=0)
            updates = [
                (variable, context.all_gather(values, axis=0)) for variable, values in updates
            ]
        rows = index[:, None]
        for variable, values in updates:
            variable.assign(
                tf.tensor_scatter_nd_update(
                    variable.value, rows, tf.cast(values, variable.dtype)
                )
            )

    def train_step(self, data):
        index, view1, view2 = unpack_two_view_batch(data)
        index = tf.cast(index, tf.int32)
        views = tf.concat([tf.cast(view1, tf.float32), tf.cast(view2, tf.float32)], axis=0)
        with tf.GradientTape() as tape:
            embeddings = self.encoder(views, training=True)
            loss, scalars = self.contrastive_loss(index, embeddings, training=True)
            context = tf.distribute.get_replica_context()
            replicas = 1 if context is None else context.num_replicas_in_sync
            scaled_loss = loss / tf.cast(replicas, loss.dtype)
        trainable = self.trainable_variables
        gradients = tape.gradient(scaled_loss, trainable)
        self.optimizer.apply(gradients, trainable)
        self.loss_tracker.update_state(loss)
        for name, value in scalars.items():
            self.step_trackers[name].update_state(value)
        return {metric.name: metric.result() for metric in self.metrics}

    def fit(self, x=None, *args, **kwargs):
        """`keras.Model.fit`, after validating a `tf.data.Dataset` input.

        The dataset must yield batches of `{'index', 'view1', 'view2'}`; a
        wrong structure, dtype, rank or an index outside `[0, dataset_size)`
        raises one `ValueError` naming the problem.
        """
        if isinstance(x, tf.data.Dataset):
            x = check_dataset(x, self.dataset_size)
            kwargs.setdefault("shuffle", False)  # a dataset's order is its own
        try:
            return super().fit(x, *args, **kwargs)
        except tf.errors.InvalidArgumentError as error:
            if INDEX_RANGE_MESSAGE in str(error):
                raise ValueError(
                    f"The dataset yielded a sample index outside [0, dataset_size="
                    f"{self.dataset_size}): every index must address one of the "
                    f"{self.dataset_size} images the model was built for."
                ) from None
            raise
