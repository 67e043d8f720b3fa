"""TensorBoard: training scalars and the embedding projector.

`TrainingScalars` writes, against the global step (the optimizer's
`iterations`, so a resumed run continues the same curves):

- `train/<name>` at each epoch end for every value in the epoch's logs:
  `loss`, the method's own scalars (`acceptance_rate` and
  `out_of_batch_fraction` of the EMC² chains), and `knn_accuracy` on the
  epochs `KNNAccuracyCallback` evaluates (list that callback first);
- `train/learning_rate` (a schedule's current value) and
  `train/seconds_per_step` (the epoch's wall time over its steps);
- with `every_n_steps`, `step/<name>` every n steps: the epoch's running
  means so far and the seconds per step since the last write.

`export_projector` writes embeddings (and labels) for TensorBoard's
projector tab.
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate the optimizer applies at its current step (schedules included)."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class TrainingScalars(keras.callbacks.Callback):
    """Writes training scalars to `log_dir` (see the module docstring).

    Args:
        log_dir: the run's TensorBoard folder.
        every_n_steps: also write the running values every n steps (0 = off).
    """

    def __init__(self, log_dir: str, every_n_steps: int = 0):
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an integer ≥ 0; got {every_n_steps!r}.")
        self.log_dir = log_dir
        self.every_n_steps = every_n_steps
        self._writer = None

    def _step(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _write(self, prefix: str, values: dict) -> None:
        step = self._step()
        with self._writer.as_default(step=step):
            for name, value in values.items():
                value = np.asarray(keras.ops.convert_to_numpy(value), np.float64).reshape(-1)
                if value.size == 1 and np.isfinite(value[0]):
                    tf.summary.scalar(f"{prefix}/{name}", float(value[0]))
        self._writer.flush()

    def on_train_begin(self, logs=None):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.perf_counter()
        self._epoch_first_step = self._step()
        self._last_write = (self._epoch_started, self._epoch_first_step)

    def on_train_batch_end(self, batch, logs=None):
        if not self.every_n_steps or self._step() % self.every_n_steps:
            return
        now, step = time.perf_counter(), self._step()
        since, since_step = self._last_write
        values = dict(logs or {})
        if step > since_step:
            values["seconds_per_step"] = (now - since) / (step - since_step)
        values["learning_rate"] = current_learning_rate(self.model.optimizer)
        self._write("step", values)
        self._last_write = (now, step)

    def on_epoch_end(self, epoch, logs=None):
        values = dict(logs or {})
        steps = self._step() - self._epoch_first_step
        if steps > 0:
            values["seconds_per_step"] = (time.perf_counter() - self._epoch_started) / steps
        values["learning_rate"] = current_learning_rate(self.model.optimizer)
        self._write("train", values)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard folder's event files: `{tag: [(step, value), …]}`."""
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
        TENSORS,
    )

    scalars: dict[str, list[tuple[int, float]]] = {}
    for root, _, files in os.walk(log_dir):
        if not any(name.startswith("events.out.tfevents") for name in files):
            continue
        accumulator = EventAccumulator(root, size_guidance={TENSORS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["tensors"]:
            for event in accumulator.Tensors(tag):
                value = float(tf.make_ndarray(event.tensor_proto))
                scalars.setdefault(tag, []).append((event.step, value))
    for values in scalars.values():
        values.sort()
    return scalars


def export_projector(
    embeddings: np.ndarray, labels: np.ndarray | None, log_dir: str, name: str = "embedding"
) -> str:
    """Writes `embeddings` `[n, D]` (and one label per row) for TensorBoard's projector.

    Returns the projector config path. Open TensorBoard on `log_dir`, tab
    "Projector".
    """
    from tensorboard.plugins import projector

    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [n, D]; got shape {embeddings.shape}.")
    os.makedirs(log_dir, exist_ok=True)
    variable = tf.Variable(embeddings, name=name)
    checkpoint = tf.train.Checkpoint(embedding=variable)
    checkpoint.save(os.path.join(log_dir, f"{name}.ckpt"))
    config = projector.ProjectorConfig()
    entry = config.embeddings.add()
    entry.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != len(embeddings):
            raise ValueError(f"labels has {len(labels)} rows, embeddings {len(embeddings)}.")
        metadata = f"{name}_metadata.tsv"
        with open(os.path.join(log_dir, metadata), "w") as handle:
            handle.writelines(f"{label}\n" for label in labels)
        entry.metadata_path = metadata
    projector.visualize_embeddings(log_dir, config)
    return os.path.join(log_dir, "projector_config.pbtxt")
