"""Helpers shared by the in-batch objectives."""

import tensorflow as tf


def masked_logsumexp(logits: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
    """`log Σ_{c : keep} exp(logits_c)` per row, stable for large β (log-sum-exp)."""
    minus_inf = tf.constant(float("-inf"), logits.dtype)
    return tf.reduce_logsumexp(tf.where(keep, logits, minus_inf), axis=-1)


def check_views(view1: tf.Tensor, view2: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    view1 = tf.convert_to_tensor(view1)
    return view1, tf.convert_to_tensor(view2, dtype=view1.dtype)


def two_view_logits(
    view1: tf.Tensor, view2: tf.Tensor, temperature: float
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The 2B views' logits `β ZZᵀ`, each view's positive logit, and image ids.

    Rows and columns follow `concat([view1, view2])`; view `a`'s positive is
    the other view of the same image.

    Returns:
        logits `[2B, 2B]`, positive `[2B]`, image `[2B]` (int32 image position).
    """
    view1, view2 = check_views(view1, view2)
    beta = tf.convert_to_tensor(1.0 / temperature, dtype=view1.dtype)
    z = tf.concat([view1, view2], axis=0)
    logits = beta * tf.matmul(z, z, transpose_b=True)
    positive = beta * tf.reduce_sum(z * tf.concat([view2, view1], axis=0), axis=-1)
    image = tf.tile(tf.range(tf.shape(view1)[0]), [2])
    return logits, positive, image
