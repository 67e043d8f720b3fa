"""Models for objectives computed within the batch (SimCLR, DCL, DHEL, KCL).

These objectives need no per-sample state: `contrastive_loss` gathers the
global batch (all replicas' views, so the negatives are the global batch as in
google-research/simclr), splits the 2B embeddings into the two views and calls
the loss function, one module per
objective under `emc2_tf.losses`. The registry binds each method name to its
loss (`emc2_tf.models.METHODS`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import keras
import tensorflow as tf

from emc2_tf.models.contrastive_model import ContrastiveModel


@keras.saving.register_keras_serializable(package="emc2_tf")
class InBatchContrastiveModel(ContrastiveModel):
    """A contrastive model whose loss is a function of the batch's two views.

    Args:
        encoder, dataset_size, seed: as `ContrastiveModel`.
        temperature: τ; None = the loss function's own default (DHEL 0.3,
            SimCLR and DCL 0.1). KCL has no temperature: τ then only serves
            the global-loss monitor.
        loss_fn: `loss_fn(view1, view2, [temperature=τ,] **loss_kwargs) -> scalar`.
        loss_kwargs: the objective's own hyperparameters (e.g. KCL's `t`, `gamma`).
    """

    def __init__(
        self,
        encoder: keras.Model,
        dataset_size: int,
        loss_fn: Callable[..., tf.Tensor],
        temperature: float | None = None,
        loss_kwargs: dict[str, Any] | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        parameters = inspect.signature(loss_fn).parameters
        self.uses_temperature = "temperature" in parameters
        if temperature is None:
            default = parameters["temperature"].default if self.uses_temperature else None
            temperature = 0.1 if default in (None, inspect.Parameter.empty) else default
        super().__init__(encoder, dataset_size, temperature, seed, **kwargs)
        self.loss_fn = loss_fn
        self.loss_kwargs = dict(loss_kwargs or {})

    def get_config(self):
        """Adds the loss function (registered as `emc2_tf>name`) and its options."""
        return {**super().get_config(),
                "loss_fn": keras.saving.serialize_keras_object(self.loss_fn),
                "loss_kwargs": dict(self.loss_kwargs)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["loss_fn"] = keras.saving.deserialize_keras_object(config["loss_fn"])
        return super().from_config(config)

    def contrastive_loss(self, index, embeddings, training=True):
        # Under a strategy every replica computes the loss of the global batch
        # (negatives from all replicas); see `ContrastiveModel.global_batch`.
        index, embeddings = self.global_batch(index, embeddings)
        batch_size = tf.shape(index)[0]
        options = dict(self.loss_kwargs)
        if self.uses_temperature:
            options["temperature"] = self.temperature
        return self.loss_fn(embeddings[:batch_size], embeddings[batch_size:], **options), {}
