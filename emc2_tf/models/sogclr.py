"""SogCLR: global contrastive learning with a per-sample moving average `u` (algorithms.md §3).

`SogCLRModel.train_step` is the shared skeleton of `ContrastiveModel`;
`contrastive_loss` here:

1. estimates, for every anchor, `g = mean exp(β s)` over the batch negatives
   (`emc2_tf.losses.sogclr_batch_estimate`);
2. updates each view's estimate `u ← (1 − γ) u + γ g` from the stored
   `log_u` of its image (γ = 1 on the image's first visit);
3. returns the surrogate loss whose negatives are weighted by
   `exp(β s) / u` (`emc2_tf.losses.sogclr_surrogate_loss`);
4. writes back, for the batch's images only, the mean of the two views'
   updated `u` (log space).

Under a distribution strategy, steps 1-4 run on the global batch (all
replicas' views, gathered) on every replica: the negatives are the global
batch, as in the official code, and every replica writes the same rows.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from emc2_tf.losses.sogclr import (
    sogclr_batch_estimate,
    sogclr_moving_average,
    sogclr_surrogate_loss,
)
from emc2_tf.models.contrastive_model import ContrastiveModel


def check_gamma(gamma: float) -> float:
    """Returns γ as a float in (0, 1], or raises a `ValueError` naming the argument."""
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"gamma must be a number in (0, 1]; got {gamma!r}.") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"gamma must be in (0, 1] (SogCLR's moving-average rate, paper 0.9); got {gamma!r}."
        )
    return value


@keras.saving.register_keras_serializable(package="emc2_tf")
class SogCLRModel(ContrastiveModel):
    """Contrastive pre-training with SogCLR (Yuan et al., ICML 2022).

    Example:

    ```python
    data = emc2_tf.load_digits()
    encoder = emc2_tf.build_small_cnn_encoder(data.image_shape)
    model = emc2_tf.SogCLRModel(encoder, dataset_size=data.num_train, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(emc2_tf.make_two_view_dataset(data.train_images, 64, seed=0), epochs=5)
    ```

    Args:
        encoder: images `[B, H, W, C]` → L2-normalised embeddings `[B, D]`.
        dataset_size: N; sample indices address `[0, N)`.
        temperature: τ (paper default 0.1).
        gamma: moving-average rate γ in (0, 1] (paper default 0.9).
        seed: unused by SogCLR's loss (kept for the shared interface).

    State (non-trainable, saved with the weights and checkpoints):
        log_u: float32 `[N]`, `log u_i`; −∞ = the image was never seen.
    """

    def __init__(
        self,
        encoder: keras.Model,
        dataset_size: int,
        temperature: float = 0.1,
        gamma: float = 0.9,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(encoder, dataset_size, temperature, seed, **kwargs)
        self.gamma = check_gamma(gamma)
        self.log_u = self.add_weight(
            shape=(self.dataset_size,),
            dtype="float32",
            initializer=keras.initializers.Constant(-math.inf),
            trainable=False,
            aggregation="only_first_replica",
            name="log_u",
        )

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}

    def contrastive_loss(self, index, embeddings, training=True):
        # Every replica computes the global batch's estimate and update: the
        # same numbers everywhere, so the u-table stays identical across replicas.
        index, embeddings = self.global_batch(index, embeddings)
        batch_size = tf.shape(index)[0]
        view1, view2 = embeddings[:batch_size], embeddings[batch_size:]
        log_g = tf.stop_gradient(sogclr_batch_estimate(view1, view2, self.temperature))
        if not training:
            # Held-out images have no stored u: the first-visit rule, u = g.
            return sogclr_surrogate_loss(view1, view2, log_g, self.temperature), {}
        stored = tf.gather(self.log_u.value, index)
        log_u_views = sogclr_moving_average(stored, log_g, self.gamma)  # [2, B]
        loss = sogclr_surrogate_loss(view1, view2, log_u_views, self.temperature)
        # u_i takes the mean of its two views' updates.
        new_log_u = tf.reduce_logsumexp(log_u_views, axis=0) - tf.math.log(
            tf.constant(2.0, log_u_views.dtype)
        )
        self.update_sample_state(index, [(self.log_u, new_log_u)], replicated=True)
        return loss, {}
