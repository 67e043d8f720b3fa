"""DCL, the decoupled contrastive loss (Yeh et al. 2022; algorithms.md §5).

For view `a` of image `i`:

    ℓ_a = −β s(a, p) + log Σ_{j ≠ i, both views of j} exp(β s(a, z_j))

InfoNCE with the positive removed from the denominator: one log-sum-exp over
the same-view and cross-view negatives together. Mean over the 2B views.
"""

import tensorflow as tf

from emc2_tf.losses._common import check_views, masked_logsumexp


def dcl_loss(view1: tf.Tensor, view2: tf.Tensor, temperature: float = 0.1) -> tf.Tensor:
    """DCL over the batch; `view1`, `view2`: `[B, D]` L2-normalised embeddings."""
    view1, view2 = check_views(view1, view2)
    beta = tf.cast(1.0 / temperature, view1.dtype)
    z = tf.concat([view1, view2], axis=0)
    image = tf.tile(tf.range(tf.shape(view1)[0]), [2])
    logits = beta * tf.matmul(z, z, transpose_b=True)
    other_image = tf.not_equal(image[:, None], image[None, :])
    positive = beta * tf.reduce_sum(z * tf.concat([view2, view1], axis=0), axis=-1)
    return tf.reduce_mean(masked_logsumexp(logits, other_image) - positive)
