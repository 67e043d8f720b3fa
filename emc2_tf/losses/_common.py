"""Helpers shared by the in-batch objectives."""

import tensorflow as tf


def masked_logsumexp(logits: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
    """`log Σ_{c : keep} exp(logits_c)` per row, stable for large β (log-sum-exp)."""
    minus_inf = tf.constant(float("-inf"), logits.dtype)
    return tf.reduce_logsumexp(tf.where(keep, logits, minus_inf), axis=-1)


def check_views(view1: tf.Tensor, view2: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    view1 = tf.convert_to_tensor(view1)
    return view1, tf.convert_to_tensor(view2, dtype=view1.dtype)
