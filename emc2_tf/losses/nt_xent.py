"""SimCLR's NT-Xent / InfoNCE loss (Chen et al. 2020; algorithms.md §4).

For each of the 2B views `a` with positive `p`:

    ℓ_a = −β s(a, p) + log Σ_{c ≠ a} exp(β s(a, c))

(the positive is in the denominator), mean over the 2B views.
"""

import keras
import tensorflow as tf

from emc2_tf.losses._common import masked_logsumexp, two_view_logits


@keras.saving.register_keras_serializable(package="emc2_tf")
def nt_xent_loss(view1: tf.Tensor, view2: tf.Tensor, temperature: float = 0.1) -> tf.Tensor:
    """NT-Xent over the batch; `view1`, `view2`: `[B, D]` L2-normalised embeddings."""
    logits, positive, _ = two_view_logits(view1, view2, temperature)
    not_self = ~tf.eye(tf.shape(logits)[0], dtype=tf.bool)
    return tf.reduce_mean(masked_logsumexp(logits, not_self) - positive)
