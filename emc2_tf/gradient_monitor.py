"""The exact global objective over finite views, and the error of a step's gradient.

With finite augmentations (`emc2_tf.finite_views`) the global contrastive
loss F(θ) over all N·K stored views (`emc2_tf.finite_global_loss`, the
official `compute_global_loss`) and its exact gradient ∇F(θ) are computable.
The EMC² paper's convergence experiment logs, every few steps t,

    gradient error   ‖g_t − ∇F(θ_t)‖²   (official `compute_gradient_error`)
    gradient norm    ‖∇F(θ_t)‖²          (official `compute_gradient_norm`)
    global loss      F(θ_t)

where g_t is the gradient estimate the optimizer applies at step t (the
gradient of the method's loss, before weight decay and momentum), and θ_t the
weights before that step. `GlobalObjectiveMonitor` is the Keras callback that
does it: before a due step it computes F and ∇F at θ_t; the model's
`train_step` copies its gradient g_t into side variables; after the step the
callback takes the difference. Nothing else changes: no random draw, no
state update, bit-identical weights with and without the monitor.

∇F is computed exactly in two passes over the N·K views, in chunks: the
embeddings Z without gradient, then dF/dZ (cheap, `[N·K, D]`), then each
chunk's vector-Jacobian product `(∂Z_chunk/∂θ)ᵀ dF/dZ_chunk`, summed. Memory
is one chunk's activations.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from emc2_tf.data.batch import as_float_images
from emc2_tf.data.finite import FiniteViews
from emc2_tf.losses.finite_global import finite_global_loss

#: What each record of `GlobalObjectiveMonitor` holds besides `step` and `epoch`.
MONITOR_METRICS = ("gradient_error", "gradient_norm", "global_loss")


class GlobalObjective:
    """F(θ) and ∇F(θ) of an encoder over a `FiniteViews` table.

    Args:
        views: the N·K stored views.
        temperature: τ of F (β = 1/τ); the method's own τ in a monitor.
        chunk_size: views embedded (and differentiated) at a time.

    Call `loss_and_gradient(encoder, variables)` for `(F, [∇F per variable])`
    (zeros for variables the encoder does not use), `loss(encoder)` for F.
    """

    def __init__(self, views: FiniteViews, temperature: float, chunk_size: int = 256):
        if not isinstance(views, FiniteViews):
            raise ValueError(f"views must be an emc2_tf.FiniteViews (emc2_tf.finite_views(...) or "
                             f"a dataset's .finite_views); got {type(views).__name__}.")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
                or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer ≥ 1; got {chunk_size!r}.")
        self.views = views
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)
        self._table = tf.constant(views.table)
        self._functions: dict[tuple, Callable] = {}

    def _chunks(self):
        rows = self.views.num_rows
        return [(start, min(start + self.chunk_size, rows))
                for start in range(0, rows, self.chunk_size)]

    def _embed(self, encoder, start, stop):
        images = as_float_images(self._table[start:stop])
        embeddings = encoder(images, training=False)
        if embeddings.dtype in (tf.float16, tf.bfloat16):  # mixed precision: F in float32
            embeddings = tf.cast(embeddings, tf.float32)
        return embeddings

    def _build(self, encoder: keras.Model, variables: list) -> Callable:
        chunks = self._chunks()
        num_views, temperature = self.views.num_views, self.temperature

        @tf.function
        def loss_and_gradient():
            embeddings = tf.concat([self._embed(encoder, *chunk) for chunk in chunks], axis=0)
            with tf.GradientTape() as tape:
                tape.watch(embeddings)
                loss = finite_global_loss(embeddings, num_views, temperature)
            d_embeddings = tape.gradient(loss, embeddings)
            gradients = [tf.zeros_like(variable) for variable in variables]
            for start, stop in chunks:
                with tf.GradientTape() as tape:
                    chunk_embeddings = self._embed(encoder, start, stop)
                chunk_gradients = tape.gradient(
                    chunk_embeddings, variables, output_gradients=d_embeddings[start:stop],
                    unconnected_gradients=tf.UnconnectedGradients.ZERO)
                gradients = [total + tf.cast(part, total.dtype)
                             for total, part in zip(gradients, chunk_gradients)]
            return loss, gradients

        return loss_and_gradient

    def loss_and_gradient(self, encoder: keras.Model,
                          variables: list | None = None) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """`(F(θ), [∂F/∂v for v in variables])`, variables default the encoder's trainable ones."""
        variables = list(encoder.trainable_variables if variables is None else variables)
        key = (id(encoder), tuple(id(variable) for variable in variables))
        if key not in self._functions:  # one traced function per encoder and variable list
            self._functions[key] = self._build(encoder, variables)
        return self._functions[key]()

    def loss(self, encoder: keras.Model) -> float:
        """F(θ) alone."""
        embeddings = tf.concat([self._embed(encoder, *chunk) for chunk in self._chunks()], 0)
        return float(finite_global_loss(embeddings, self.views.num_views, self.temperature))


class GradientRecord:
    """Side variables a `ContrastiveModel.train_step` copies its gradient g_t into.

    Not model state: held out of Keras' and tf.train's tracking (never in a
    weights file, checkpoint or export), and only while a monitor watches.
    """

    def __init__(self, variables: list):
        self.gradients = [tf.Variable(tf.zeros(variable.shape, variable.dtype), trainable=False)
                          for variable in variables]

    def record(self, gradients: list) -> list:
        """The assign ops of one step (a None gradient records zeros)."""
        return [slot.assign(tf.zeros_like(slot) if gradient is None
                            else tf.cast(tf.convert_to_tensor(gradient), slot.dtype))
                for slot, gradient in zip(self.gradients, gradients)]


def _squared_norm(tensors) -> float:
    return float(sum(np.sum(np.square(np.asarray(t, np.float64))) for t in tensors))


class GlobalObjectiveMonitor(keras.callbacks.Callback):
    """Logs the gradient error, the gradient norm and the global loss every n steps.

    Example:

    ```python
    views = emc2_tf.finite_views(data.train_images, 2, seed=0)
    dataset = emc2_tf.make_two_view_dataset(views, batch_size=32, seed=0)
    monitor = emc2_tf.GlobalObjectiveMonitor(views, every_n_steps=25)
    model.fit(dataset, epochs=10, callbacks=[monitor])
    monitor.records  # [{'step': 0, 'epoch': 0, 'gradient_error': ..., ...}, ...]
    ```

    Args:
        views: the `FiniteViews` the model trains on (a dataset's `.finite_views`).
        every_n_steps: measure at the steps t with `t mod n = 0` (t counts
            the optimizer's steps, 0 first).
        temperature: τ of F; default the model's own.
        chunk_size: views per chunk of the exact gradient.
        log_dir: if given, TensorBoard scalars `global/gradient_error`,
            `global/gradient_norm`, `global/loss` against the step.

    `records` holds one dict per measured step: `step`, `epoch`,
    `gradient_error` ‖g_t − ∇F(θ_t)‖², `gradient_norm` ‖∇F(θ_t)‖²,
    `global_loss` F(θ_t), and `seconds` (the measurement's own time). g_t is
    the gradient the optimizer receives, so the model must train on one
    device, one step per execution (`steps_per_execution=1`), without loss
    scaling: anything else is refused in one line.
    """

    def __init__(self, views: FiniteViews, every_n_steps: int = 25,
                 temperature: float | None = None, chunk_size: int = 256,
                 log_dir: str | None = None):
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, (int, np.integer)) \
                or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer ≥ 1; got {every_n_steps!r}.")
        if not isinstance(views, FiniteViews):
            raise ValueError(f"views must be an emc2_tf.FiniteViews (emc2_tf.finite_views(...) or "
                             f"a dataset's .finite_views); got {type(views).__name__}.")
        self.views = views
        self.every_n_steps = int(every_n_steps)
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.log_dir = log_dir
        self.records: list[dict[str, Any]] = []
        self._objective: GlobalObjective | None = None
        self._pending: tuple | None = None
        self._epoch = 0
        self._writer = None

    def set_model(self, model):
        super().set_model(model)
        if hasattr(model, "watch_gradients"):
            model.watch_gradients(True)

    def _check_model(self) -> None:
        model = self.model
        if not hasattr(model, "watch_gradients"):
            raise ValueError("GlobalObjectiveMonitor needs an emc2_tf ContrastiveModel (its "
                             f"train_step records the gradient); got {type(model).__name__}.")
        if model.distribute_strategy.num_replicas_in_sync != 1:
            raise ValueError(
                "GlobalObjectiveMonitor measures on one device; the model trains on "
                f"{model.distribute_strategy.num_replicas_in_sync} replicas.")
        if int(getattr(model, "steps_per_execution", 1) or 1) != 1:
            raise ValueError("GlobalObjectiveMonitor needs compile(steps_per_execution=1): it "
                             "measures before and after single steps.")
        if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError("GlobalObjectiveMonitor does not support loss scaling "
                             "(mixed_float16): train in float32 to measure gradient errors.")
        if model.dataset_size != self.views.num_images:
            raise ValueError(f"The views hold {self.views.num_images} images but the model was "
                             f"built for dataset_size={model.dataset_size}.")

    def on_train_begin(self, logs=None):
        try:
            self._check_model()
        except ValueError:  # refused: leave the model's steps as they were
            if hasattr(self.model, "watch_gradients"):
                self.model.watch_gradients(False)
            raise
        temperature = self.temperature or self.model.temperature
        self._objective = GlobalObjective(self.views, temperature, self.chunk_size)
        if self.log_dir:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every_n_steps:
            self._pending = None
            return
        started = time.perf_counter()
        loss, gradient = self._objective.loss_and_gradient(
            self.model.encoder, self.model.trainable_variables)
        self._pending = (step, float(loss), [g.numpy() for g in gradient], time.perf_counter() - started)

    def on_train_batch_end(self, batch, logs=None):
        if self._pending is None:
            return
        step, loss, exact, seconds = self._pending
        self._pending = None
        estimate = [slot.numpy() for slot in self.model.gradient_record.gradients]
        record = {
            "step": step,
            "epoch": self._epoch,
            "gradient_error": _squared_norm(g - e for g, e in zip(estimate, exact)),
            "gradient_norm": _squared_norm(exact),
            "global_loss": loss,
            "seconds": seconds,
        }
        self.records.append(record)
        if self._writer is not None:
            with self._writer.as_default(step=step):
                tf.summary.scalar("global/gradient_error", record["gradient_error"])
                tf.summary.scalar("global/gradient_norm", record["gradient_norm"])
                tf.summary.scalar("global/loss", record["global_loss"])

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
        if hasattr(self.model, "watch_gradients"):
            self.model.watch_gradients(False)
