"""The one `train_step` shape shared by every contrastive method of emc2-tf.

A method is a subclass of `ContrastiveModel` that supplies its loss (and owns
its per-sample state, if any) in `contrastive_loss`; the skeleton does the
rest: unpack and validate the two-view batch, encode both views with
gradient, scale the loss for the replica sum under `tf.distribute`, apply the
optimizer, and log the unscaled loss plus the method's own scalars.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from emc2_tf.data.batch import (
    INDEX_RANGE_MESSAGE,
    VIEW_INDEX_MESSAGE,
    check_dataset,
    unpack_two_view_batch,
    view_index_of,
)
from emc2_tf.data.image_source import SourceReadError


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


def all_gather(context: tf.distribute.ReplicaContext, value: tf.Tensor) -> tf.Tensor:
    """`context.all_gather(value, axis=0)`, with the value placed on the replica's device.

    Under MultiWorkerMirroredStrategy with one device per worker the replica
    function runs without a device scope, and `all_gather` of an unplaced
    tensor fails ("destinations can not be empty"); an identity under the
    replica's device fixes that and changes nothing elsewhere.
    """
    devices = context.strategy.extended.worker_devices
    if not value.device and len(devices) == 1:
        with tf.device(devices[0]):
            value = tf.identity(value)
    return context.all_gather(value, axis=0)


def _multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` is a MultiWorkerMirroredStrategy spanning several workers."""
    extended = strategy.extended
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        getattr(extended, "_in_multi_worker_mode", lambda: False)()
    )


_SEED_STATE_KEY = "seed_generator_state"


class _EpochScheduleSync(keras.callbacks.Callback):
    """Tells a `make_two_view_dataset` stream which epoch Keras starts.

    The dataset's iterator for an epoch is created after `on_epoch_begin`,
    so the epoch's batches and views are those of Keras' epoch number
    (`initial_epoch` included), however often the data was looked at before.
    """

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def on_epoch_begin(self, epoch, logs=None):
        self.schedule.set_epoch(epoch)


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

    #: Whether `contrastive_loss` takes `view_index` (int32 `[B, 2]` or None):
    #: the stored views of a finite-augmentation batch (`view_index_of`).
    #: Methods that do not care never see it.
    uses_view_index: bool = False

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
        self.gradient_record = None  # side copies of g_t while a monitor watches
        # Every weight exists from construction (the encoder is built, the
        # per-sample state is added by the subclass's __init__), so the model
        # is built: `load_weights` works on a fresh model.
        self.built = True

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, the encoder serialized with it (Keras `.keras` files).

        Per-sample state and weights are not config: `model.save` stores them
        as variables beside it.
        """
        return {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "dataset_size": self.dataset_size,
            "temperature": self.temperature,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ContrastiveModel":
        config = copy.deepcopy(config)  # deserializing consumes the nested dicts
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)

    def save_own_variables(self, store):
        """Keras' variables plus the MH seed state, so a `.keras` file resumes the draws."""
        super().save_own_variables(store)
        store[_SEED_STATE_KEY] = np.asarray(self.seed_generator.state)

    def load_own_variables(self, store):
        keys = [key for key in store.keys() if key != _SEED_STATE_KEY]
        super().load_own_variables({key: store[key] for key in keys})
        if _SEED_STATE_KEY in store.keys():
            self.seed_generator.state.assign(store[_SEED_STATE_KEY])

    def _build_optimizer(self) -> None:
        if getattr(self, "optimizer", None) is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def load_weights(self, filepath, *args, **kwargs):
        """Keras' version, with the optimizer's slots created first so that a
        compiled model restores them too (Keras skips an unbuilt optimizer)."""
        self._build_optimizer()
        return super().load_weights(filepath, *args, **kwargs)

    def export(self, filepath: str, format: str = "tf_saved_model", verbose=None, **kwargs):
        """Writes the encoder as a SavedModel at `filepath`, with the serving
        signature of `emc2_tf.export_encoder` (`serving_default`: `images` →
        `{"embedding"}`), written to a temporary folder and renamed into place.
        """
        if format != "tf_saved_model":
            raise ValueError(
                f"format must be 'tf_saved_model' (the TF Serving layout); got {format!r}.")
        from emc2_tf.export import write_saved_model

        return write_saved_model(self.encoder, filepath)

    @property
    def inverse_temperature(self) -> float:
        """β = 1/τ."""
        return 1.0 / self.temperature

    @property
    def metrics(self):
        return [self.loss_tracker, *self.step_trackers.values()]

    def call(self, images, training=False):
        """Embeds `images`; given a two-view batch (as Keras' build under a
        strategy passes), embeds its first view."""
        if isinstance(images, dict) and "view1" in images:
            images = images["view1"]
        elif isinstance(images, (tuple, list)) and len(images) == 3:
            images = images[1]
        return self.encoder(images, training=training)

    def contrastive_loss(
        self, index: tf.Tensor, embeddings: tf.Tensor, training: bool = True
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """Returns `(loss, step_scalars)` for one replica's batch.

        Args:
            index: int32 `[B]` sample indices.
            embeddings: `[2B, D]`, view 1 of the B images then view 2.
        A method with `uses_view_index = True` is also given `view_index`:
        int32 `[B, 2]`, the stored views of a finite-augmentation batch, or None.
        Runs inside the gradient tape; state updates happen here too.
        `training=False` (`test_step`, held-out data): read and write no
        per-sample state, draw with `evaluation_uniform`.
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

    def global_batch(
        self, index: tf.Tensor, embeddings: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """The global batch: every replica's images, in replica order.

        Args:
            index: int32 `[b]` this replica's sample indices.
            embeddings: `[2b, D]` this replica's view-1 then view-2 embeddings.

        Returns:
            `(index [B], embeddings [2B, D])`: the all-gathered batch, view 1
            of all B images then view 2. Without a strategy (or with one
            replica) the input itself.

        `all_gather` is differentiable: its gradient is the all-reduce sum of
        the upstream gradients, sliced back to each replica. So a loss that
        every replica computes over the global batch, divided by the replica
        count (as `train_step` does), yields the gradient of the global-batch
        loss once Keras sums the replicas' gradients; this is how SimCLR gets
        its negatives from the whole global batch (google-research/simclr's
        cross-replica concat).
        """
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return index, embeddings
        batch_size = tf.shape(index)[0]
        view1 = all_gather(context, embeddings[:batch_size])
        view2 = all_gather(context, embeddings[batch_size:])
        return all_gather(context, index), tf.concat([view1, view2], axis=0)

    def update_sample_state(
        self,
        index: tf.Tensor,
        updates: Sequence[tuple[Any, tf.Tensor]],
        replicated: bool = False,
    ) -> None:
        """Writes per-sample state rows `index`; identical on every replica.

        Args:
            index: int32 `[B]` this replica's sample indices.
            updates: `(variable, values)` pairs, each variable `[N, ...]`
                and its values `[B, ...]` (pairs, not a dict: Keras variables
                overload `==` and are not hashable keys).

            replicated: the rows are already the same on every replica (a
                method that computes the global batch's update everywhere);
                nothing is gathered.

        Under a strategy the indices and values of all replicas are gathered
        first and every replica applies the same update (shared notes,
        Distribution), so the tables never diverge and hold every replica's
        anchors.
        """
        context = tf.distribute.get_replica_context()
        if not replicated and context is not None and context.num_replicas_in_sync > 1:
            index = all_gather(context, index)
            updates = [(variable, all_gather(context, values)) for variable, values in updates]
        for variable, values in updates:
            # A sparse write of the B rows (ResourceScatterUpdate): the [N] table
            # is neither read nor copied, so the step's cost does not grow with N.
            variable.value.scatter_update(
                tf.IndexedSlices(tf.cast(values, variable.dtype), index))

    def _index_and_views(self, data) -> tuple[tf.Tensor, tf.Tensor]:
        """`(index int32 [B], views float32 [2B, H, W, C])`: view 1 then view 2."""
        index, view1, view2 = unpack_two_view_batch(data)
        views = tf.concat([tf.cast(view1, tf.float32), tf.cast(view2, tf.float32)], axis=0)
        return tf.cast(index, tf.int32), views

    def _view_kwargs(self, data) -> dict[str, Any]:
        """`{'view_index': ...}` for a method that takes it (`uses_view_index`), else `{}`."""
        if not self.uses_view_index:
            return {}
        return {"view_index": view_index_of(data)}

    def watch_gradients(self, on: bool) -> None:
        """Starts (or stops) copying each step's gradient g_t into
        `gradient_record.gradients` (`emc2_tf.GlobalObjectiveMonitor` reads
        them). The copies are side effects only: training is bit-identical.
        The step is traced again when this changes."""
        if on == (self.gradient_record is not None):
            return
        from emc2_tf.gradient_monitor import GradientRecord

        self.gradient_record = GradientRecord(self.trainable_variables) if on else None
        self.train_function = None

    def _logs(self, loss: tf.Tensor, scalars: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Updates the loss and step trackers; returns the logs Keras reports."""
        self.loss_tracker.update_state(loss)
        for name, value in scalars.items():
            self.step_trackers[name].update_state(value)
        logs = {metric.name: metric.result() for metric in self.metrics}
        if _multi_worker(self.distribute_strategy):
            # Keras reduces logs across workers with `strategy.reduce(MEAN, v,
            # axis=0)`, which rejects scalars; a [1] vector reduces to a scalar.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def train_step(self, data):
        index, views = self._index_and_views(data)
        with tf.GradientTape() as tape:
            # Under a mixed-precision policy the encoder computes in float16 or
            # bfloat16; the loss, the sampler and the per-sample state stay float32.
            embeddings = tf.cast(self.encoder(views, training=True), tf.float32)
            loss, scalars = self.contrastive_loss(
                index, embeddings, training=True, **self._view_kwargs(data))
            context = tf.distribute.get_replica_context()
            replicas = 1 if context is None else context.num_replicas_in_sync
            scaled_loss = loss / tf.cast(replicas, loss.dtype)
            # mixed_float16: compile wraps the optimizer in a LossScaleOptimizer,
            # which scales here and unscales (skipping non-finite steps) in apply.
            scaled_loss = self.optimizer.scale_loss(scaled_loss)
        trainable = self.trainable_variables
        gradients = tape.gradient(scaled_loss, trainable)
        if self.gradient_record is not None:  # GlobalObjectiveMonitor's g_t
            self.gradient_record.record(gradients)
        self.optimizer.apply(gradients, trainable)
        # Issue 13, finite or stop: the logged loss is NaN unless the loss, every
        # gradient and every updated weight are finite (one is_finite reduction per
        # tensor), so a broken step cannot log a finite loss; StopOnNonFinite, which
        # `fit` adds, stops on it. Needed because in a graph the fused Conv2D+ReLU
        # maps NaN to 0: NaN first-layer weights gave a finite loss of exactly 0.
        # A LossScaleOptimizer skips steps with non-finite (scaled) gradients
        # itself: only the loss and the weights are checked then.
        from emc2_tf.safety import all_finite

        skips_bad_gradients = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        finite = all_finite([loss, *([] if skips_bad_gradients else gradients), *trainable])
        loss = tf.where(finite, loss, tf.constant(np.nan, loss.dtype))
        return self._logs(loss, scalars)

    def test_step(self, data):
        """The method's loss on a held-out two-view batch, per-sample state untouched.

        `contrastive_loss(..., training=False)`: no state is read or written
        and no training draw is consumed (held-out indices address no stored
        state), so `fit(validation_data=...)` trains exactly as without it.
        """
        index, views = self._index_and_views(data)
        embeddings = tf.cast(self.encoder(views, training=False), tf.float32)
        return self._logs(*self.contrastive_loss(index, embeddings, training=False,
                                                  **self._view_kwargs(data)))

    def predict_step(self, data):
        """Embeddings of a batch of images (or of view 1 of a two-view batch)."""
        if isinstance(data, (tuple, list)) and len(data) == 1:
            data = data[0]
        return self(data, training=False)

    def evaluation_uniform(self, index: tf.Tensor, shape) -> tf.Tensor:
        """Uniform(0, 1) draws for `test_step`: a pure function of the model's
        seed and the global batch's indices, whatever the replica count.

        Args:
            index: int `[B]`, the global batch's sample indices (every
                replica's, in replica order: `global_batch`).
            shape: this replica's draws `[..., b]`, the last axis its b chains.

        The draws of the whole batch, `[..., B]`, come from the seed and
        `index` alone; each replica takes the columns of its own chains
        (global positions `r·b … r·b + b − 1`). So a held-out image's chain
        sees the same draws on one device and on any number of replicas
        (issue 19: every replica drew the same `[..., b]`, and the value of
        `evaluate` changed with the replica count), evaluating never advances
        the training draws (`random_uniform`), and it gives the same value
        every time.
        """
        index = tf.cast(index, tf.int64)
        mixed = tf.reduce_sum((index + 1) * tf.range(1, tf.size(index) + 1, dtype=tf.int64))
        seed = tf.stack([tf.constant(self.seed or 0, tf.int64), mixed])
        shape = list(shape)
        whole_batch = tf.random.stateless_uniform(
            [*shape[:-1], tf.size(index)], seed=seed, dtype=tf.float32, alg="philox")
        context = tf.distribute.get_replica_context()
        replica_id = 0 if context is None else context.replica_id_in_sync_group
        chains = tf.cast(shape[-1], tf.int32)
        first = tf.cast(replica_id, tf.int32) * chains
        return tf.gather(whole_batch, tf.range(first, first + chains), axis=-1)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Builds the optimizer without peeking at the data.

        Under a strategy Keras' version draws one batch from a fresh iterator
        of the dataset to build the model. That consumes one iteration: a
        dataset that reshuffles each iteration then trains on a different
        order than the same run without a strategy. A contrastive model is
        built at construction (its encoder is), so only the optimizer's slots
        remain to create, under the strategy's scope.
        """
        if not (self.encoder.built and getattr(self, "_compile_metrics", None) is None
                and getattr(self, "_compile_loss", None) is None):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        self.built = True
        self._build_optimizer()

    def check_global_batch(self, dataset: tf.data.Dataset) -> None:
        """Raises `ValueError` unless the global batch splits evenly over the replicas."""
        replicas = self.distribute_strategy.num_replicas_in_sync
        if replicas == 1:
            return
        index_spec, _, _ = unpack_two_view_batch(dataset.element_spec)
        batch_size = index_spec.shape[0] if index_spec.shape.rank else None
        if batch_size is None:
            raise ValueError(
                f"Under a strategy with {replicas} replicas the global batch size must be "
                "static: batch the dataset with drop_remainder=True (make_two_view_dataset "
                "does by default)."
            )
        if batch_size % replicas:
            raise ValueError(
                f"The global batch size B={batch_size} is not divisible by the {replicas} "
                f"replicas of the strategy; use a multiple of {replicas} (e.g. "
                f"{max(replicas, batch_size // replicas * replicas)})."
            )

    def image_sources(self) -> tuple:
        """The image sources the model itself reads in `train_step` (EMC²'s image
        table, when it is a source); `fit` asks them to name a file that fails."""
        return ()

    def _distribute_by_worker(self, dataset: tf.data.Dataset):
        """`dataset` with its run-time checks (`check_dataset`); under
        MultiWorkerMirroredStrategy, a `make_two_view_dataset` stream as a
        distributed dataset in which every worker reads and augments only its
        own rows of each global batch (`worker_dataset`), instead of reading
        every image and keeping its share."""
        worker_dataset = getattr(dataset, "worker_dataset", None)
        if worker_dataset is None or not _multi_worker(self.distribute_strategy):
            return check_dataset(dataset, self.dataset_size,
                                 getattr(self, "finite_augmentations", None))
        return self.distribute_strategy.distribute_datasets_from_function(
            functools.partial(worker_dataset, dataset_size=self.dataset_size))

    def fit(self, x=None, *args, **kwargs):
        """`keras.Model.fit`, after validating a `tf.data.Dataset` input.

        The dataset must yield batches of `{'index', 'view1', 'view2'}`; a
        wrong structure, dtype, rank or an index outside `[0, dataset_size)`
        raises one `ValueError` naming the problem. A dataset from
        `make_two_view_dataset` yields Keras' epoch (`initial_epoch`
        included): its batches and views depend on the epoch number only.
        A batch of fewer than 2 images raises `ValueError`; a step whose loss, gradient or updated
        weights are not finite stops training with `emc2_tf.NonFiniteError`
        naming the epoch and step (`emc2_tf.StopOnNonFinite`). An image that
        cannot be read (the dataset's `image_source`, or the model's
        `image_sources()`) raises one `ValueError` naming its file.
        Under MultiWorkerMirroredStrategy each worker reads only its share of
        a `make_two_view_dataset` stream (`_distribute_by_worker`).
        `jit_compile=True` with replicas on logical CPU devices (`split_cpu`)
        raises one `ValueError` before the first step (`check_jit_compile`).
        """
        # Issue 13 (safety, see emc2_tf/safety.py): stop at the first non-finite
        # step with a NonFiniteError (StopOnNonFinite, first in the list, unless the
        # caller passed one). (EMC²'s image table is checked when it is set.)
        from emc2_tf.data.batch import BATCH_SIZE_MESSAGE
        from emc2_tf.distribute import check_jit_compile
        from emc2_tf.safety import StopOnNonFinite

        check_jit_compile(self.distribute_strategy, self.jit_compile)

        steps_per_epoch = None
        sources = list(self.image_sources())
        if isinstance(x, tf.data.Dataset):
            schedule = getattr(x, "epoch_schedule", None)
            if schedule is not None:
                steps_per_epoch = schedule.order.num_batches
                callbacks = list(kwargs.get("callbacks") or [])
                kwargs["callbacks"] = [_EpochScheduleSync(schedule), *callbacks]
            if getattr(x, "image_source", None) is not None:
                sources.insert(0, x.image_source)
            self.check_global_batch(x)
            x = self._distribute_by_worker(x)
            kwargs.setdefault("shuffle", False)  # a dataset's order is its own
        callbacks = list(kwargs.get("callbacks") or [])
        if not any(isinstance(callback, StopOnNonFinite) for callback in callbacks):
            kwargs["callbacks"] = [StopOnNonFinite(steps_per_epoch), *callbacks]
        try:
            return super().fit(x, *args, **kwargs)
        except tf.errors.OpError as error:
            for source in sources:  # e.g. a damaged image file: one line naming it
                message = source.read_error(error)
                if message:
                    raise SourceReadError(message) from None
            if not isinstance(error, tf.errors.InvalidArgumentError):
                raise
            if INDEX_RANGE_MESSAGE in str(error):
                raise ValueError(
                    f"The dataset yielded a sample index outside [0, dataset_size="
                    f"{self.dataset_size}): every index must address one of the "
                    f"{self.dataset_size} images the model was built for."
                ) from None
            if VIEW_INDEX_MESSAGE in str(error):
                raise ValueError(
                    f"The dataset yielded a view_index outside [0, finite_augmentations="
                    f"{getattr(self, 'finite_augmentations', None)}) or two equal views of an "
                    "image: each row must name two distinct stored views "
                    "(make_two_view_dataset(..., finite_augmentations=K) draws them)."
                ) from None
            if BATCH_SIZE_MESSAGE in str(error):  # issue 13: e.g. a partial last batch of 1
                raise ValueError(
                    "The dataset yielded a batch of 1 image: a contrastive batch needs B ≥ 2 "
                    "images (with one the loss is 0 and nothing is learnt); batch with "
                    "drop_remainder=True (make_two_view_dataset does) or drop that image."
                ) from None
            raise
