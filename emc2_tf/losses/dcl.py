"""DCL, the decoupled contrastive loss (Yeh et al. 2022; algorithms.md §5).

For view `a` of image `i`:

    ℓ_a = −β s(a, p) + log Σ_{j ≠ i, both views of j} exp(β s(a, z_j))

InfoNCE with the positive removed from the denominator: one log-sum-exp over
the same-view and cross-view negatives together. Mean over the 2B views.
"""

import keras
import tensorflow as tf

from emc2_tf.losses._common import masked_logsumexp, two_view_logits


@keras.saving.register_keras_serializable(package="emc2_tf")
def dcl_loss(view1: tf.Tensor, view2: tf.Tensor, temperature: float = 0.1) -> tf.Tensor:
    """DCL over the batch; `view1`, `view2`: `[B, D]` L2-normalised embeddings."""
    logits, positive, image = two_view_logits(view1, view2, temperature)
    other_image = tf.not_equal(image[:, None], image[None, :])
    return tf.reduce_mean(masked_logsumexp(logits, other_image) - positive)
