"""Finite or stop: training halts at the first non-finite step, and no checkpoint
or export is ever written with NaN or inf weights.

Why a guard is needed (issue 13). One NaN pixel made the weights of the first
convolution NaN (its gradient is input ⊗ upstream gradient), yet the logged
loss stayed finite, at exactly 0: inside a `tf.function` TensorFlow fuses
Conv2D + BiasAdd + ReLU, and the fused ReLU maps NaN to 0 (eagerly it stays
NaN). Every image then gets the same finite embedding, all similarities are
1 and the loss is β − β = 0, so `keras.callbacks.TerminateOnNaN` never fired.

- `ContrastiveModel.train_step` checks, in the graph, that the loss, every
  gradient and every trainable weight after the update are finite (one
  `is_finite` reduction per tensor) and logs the loss as NaN otherwise.
- `StopOnNonFinite` (added by `ContrastiveModel.fit`) stops training at the
  first step whose logged loss is not finite and raises `NonFiniteError`
  naming the epoch and step.
- `TrainingCheckpoint.save` and `export_encoder` refuse non-finite weights
  (`check_finite_variables`).
"""

from __future__ import annotations

import threading
from typing import Iterable

import keras
import numpy as np
import tensorflow as tf


class NonFiniteError(ValueError):
    """Training produced NaN or inf (loss, gradient or weights), or a writer was
    handed non-finite weights.

    Attributes:
        epoch, step: 1-based epoch and step within it of the first non-finite
            training step (None when not raised by a training step).
        global_step: the optimizer's step count at that point.
    """

    def __init__(self, message: str, epoch: int | None = None, step: int | None = None,
                 global_step: int | None = None):
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.global_step = global_step


def _name(variable) -> str:
    return str(getattr(variable, "path", None) or getattr(variable, "name", "?"))


def non_finite_variables(variables: Iterable) -> list[str]:
    """Names (paths) of the floating-point variables holding NaN or inf."""
    names = []
    for variable in variables:
        value = np.asarray(keras.ops.convert_to_numpy(variable))
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            names.append(_name(variable))
    return names


def describe_names(names: list[str], limit: int = 3) -> str:
    """`a, b, c and 4 more`."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_finite_variables(variables: Iterable, what: str) -> None:
    """Raises `NonFiniteError` (one line starting with `what`) unless every
    floating-point variable is finite."""
    variables = list(variables)
    bad = non_finite_variables(variables)
    if bad:
        raise NonFiniteError(
            f"{what}: {len(bad)} of the {len(variables)} weights hold NaN or inf "
            f"({describe_names(bad)})."
        )


def all_finite(values: Iterable) -> tf.Tensor:
    """A scalar bool tensor: every floating-point value in `values` (tensors,
    variables, `IndexedSlices`; None skipped) is finite. Graph- and XLA-safe."""
    checks = []
    for value in values:
        if value is None:
            continue
        if isinstance(value, tf.IndexedSlices):
            value = value.values
        value = getattr(value, "value", value)  # a Keras variable: its tensor
        value = tf.convert_to_tensor(value)
        if value.dtype.is_floating:
            checks.append(tf.reduce_all(tf.math.is_finite(value)))
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops `fit` at the first step whose loss is NaN or inf and raises
    `NonFiniteError` naming the epoch and the step.

    `ContrastiveModel.fit` adds one automatically (first in the list, so no
    later callback, a checkpoint included, runs for that step);
    `ContrastiveModel.train_step` logs the loss as NaN whenever the loss, a
    gradient or an updated weight is not finite. With any other Keras model
    it acts like `keras.callbacks.TerminateOnNaN`, but raises.

    Asynchronous callbacks (Keras runs batch-end callbacks in a thread pool
    when every callback is `async_safe`): the check then records the step and
    sets `model.stop_training`, and the error is raised at the epoch's end, on
    the thread running `fit`; it names the first non-finite step all the same.

    Args:
        steps_per_epoch: batches per epoch. Given, the position is computed
            from the optimizer's step count, so a run resumed mid-epoch
            (`fit_with_checkpoints`) reports the epoch's own step numbers;
            None: Keras' epoch and batch numbers.
    """

    async_safe = True

    def __init__(self, steps_per_epoch: int | None = None):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self._lock = threading.Lock()
        self._failure: tuple[int, int] | None = None
        self._epoch = 0
        self._epoch_start: int | None = None
        self._fit_thread = threading.current_thread()

    def _global_step(self) -> int | None:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return None
        return int(keras.ops.convert_to_numpy(optimizer.iterations))

    def on_train_begin(self, logs=None):
        self._failure = None
        self._fit_thread = threading.current_thread()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = self._global_step()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or np.all(np.isfinite(np.asarray(loss, dtype=np.float64))):
            return
        with self._lock:
            if self._failure is None or (self._epoch, batch) < self._failure:
                self._failure = (self._epoch, batch)
        self.model.stop_training = True
        if threading.current_thread() is self._fit_thread:
            self._raise()

    def on_epoch_end(self, epoch, logs=None):
        if self._failure is not None:
            self._raise()

    def on_train_end(self, logs=None):
        if self._failure is not None:
            self._raise()

    def _raise(self):
        epoch, batch = self._failure
        self._failure = None
        global_step = None if self._epoch_start is None else self._epoch_start + batch + 1
        if self.steps_per_epoch and global_step is not None:
            position_epoch, position_step = divmod(global_step - 1, self.steps_per_epoch)
            position = (f"epoch {position_epoch + 1}, step {position_step + 1}/"
                        f"{self.steps_per_epoch}")
            epoch_number, step_number = position_epoch + 1, position_step + 1
        else:
            epoch_number, step_number = epoch + 1, batch + 1
            position = f"epoch {epoch_number}, step {step_number}"
        if global_step is not None:
            position += f" (global step {global_step})"
        bad = non_finite_variables(self.model.trainable_variables)
        weights = (f"the weights now hold NaN or inf ({describe_names(bad)})" if bad
                   else "the weights are still finite")
        raise NonFiniteError(
            f"non-finite training step at {position}: the loss, a gradient or an updated "
            f"weight is NaN or inf, and {weights}; training stopped. Usual causes: a "
            "learning rate too high for the model, or NaN/inf in the input images.",
            epoch=epoch_number, step=step_number, global_step=global_step,
        )
