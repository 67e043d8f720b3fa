"""SimCLR's NT-Xent / InfoNCE loss (Chen et al. 2020; algorithms.md §4).

For each of the 2B views `a` with positive `p`:

    ℓ_a = −β s(a, p) + log Σ_{c ≠ a} exp(β s(a, c))

(the positive is in the denominator), mean over the 2B views.
"""

import tensorflow as tf

from emc2_tf.losses._common import check_views, masked_logsumexp


def nt_xent_loss(view1: tf.Tensor, view2: tf.Tensor, temperature: float = 0.1) -> tf.Tensor:
    """NT-Xent over the batch; `view1`, `view2`: `[B, D]` L2-normalised embeddings."""
    view1, view2 = check_views(view1, view2)
    beta = tf.cast(1.0 / temperature, view1.dtype)
    z = tf.concat([view1, view2], axis=0)
    n = tf.shape(z)[0]
    logits = beta * tf.matmul(z, z, transpose_b=True)
    not_self = ~tf.eye(n, dtype=tf.bool)
    positive = beta * tf.reduce_sum(z * tf.concat([view2, view1], axis=0), axis=-1)
    return tf.reduce_mean(masked_logsumexp(logits, not_self) - positive)
