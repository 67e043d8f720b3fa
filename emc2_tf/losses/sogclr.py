r"""SogCLR: the global contrastive loss with a moving-average estimator (algorithms.md §3).

Yuan et al., ICML 2022 (official code Optimization-AI/SogCLR). Each image `i`
keeps `u_i`, a moving average of the mean of `exp(β s)` over its negatives,
so that the gradient of the global loss' log-partition can be estimated from
the batch alone:

    g_i(batch) = 1/(2(B−1)) Σ_{z ∈ batch negatives of a} exp(β s(a, z))
    u_i ← (1 − γ) u_i + γ g_i            (γ = 1 on the first visit)
    loss_a = −( s(a, p) − 1/(2(B−1)) Σ_z w_z s(a, z) ),
    w_z = stop_gradient( exp(β s(a, z)) / u_i )

averaged over both views as anchors. The gradient of the surrogate is τ
times the gradient of the global loss with its inner sum estimated by `u`
(with γ = 1 it is exactly τ times the gradient of the batch's DCL loss). `u`
is kept in log space, `log u` = −∞ meaning "never seen", so large β never
overflows. Its value is a surrogate, not the global loss: monitor that with
`emc2_tf.exact_global_contrastive_loss`.
"""

from __future__ import annotations

import math

import tensorflow as tf

from emc2_tf.losses._common import masked_logsumexp, two_view_logits


def _negatives_mask(image: tf.Tensor) -> tf.Tensor:
    return tf.not_equal(image[:, None], image[None, :])


def sogclr_batch_estimate(view1: tf.Tensor, view2: tf.Tensor, temperature: float) -> tf.Tensor:
    """`log g` per anchor: log of the mean of `exp(β s(a, z))` over the 2(B−1) batch negatives.

    Args:
        view1, view2: `[B, D]` L2-normalised embeddings of the two views.
    Returns:
        `[2, B]`: row 0 with view 1 as anchor, row 1 with view 2.
    """
    logits, _, image = two_view_logits(view1, view2, temperature)
    batch_size = tf.shape(view1)[0]
    num_negatives = tf.cast(2 * (batch_size - 1), logits.dtype)
    log_g = masked_logsumexp(logits, _negatives_mask(image)) - tf.math.log(num_negatives)
    return tf.reshape(log_g, [2, batch_size])


def sogclr_moving_average(log_u: tf.Tensor, log_g: tf.Tensor, gamma: float) -> tf.Tensor:
    """`log((1 − γ) u + γ g)`, with γ = 1 where `log u = −∞` (first visit).

    Args:
        log_u: `[B]` the anchors' stored `log u` (−∞ = never seen).
        log_g: `[..., B]` the batch estimate (`sogclr_batch_estimate`).
    Returns:
        the updated `log u`, shaped like `log_g`.
    """
    log_g = tf.convert_to_tensor(log_g)
    log_u = tf.cast(log_u, log_g.dtype)
    seen = tf.math.is_finite(log_u)
    rate = tf.where(seen, tf.convert_to_tensor(gamma, dtype=log_g.dtype), tf.ones_like(log_u))
    kept = tf.math.log1p(-rate) + log_u  # −∞ on a first visit or γ = 1
    added = tf.math.log(rate) + log_g
    high = tf.maximum(kept, added)
    return high + tf.math.log(tf.exp(kept - high) + tf.exp(added - high))


def sogclr_surrogate_loss(
    view1: tf.Tensor, view2: tf.Tensor, log_u: tf.Tensor, temperature: float = 0.1
) -> tf.Tensor:
    """The SogCLR surrogate over the batch, mean over the 2B anchors.

    Args:
        view1, view2: `[B, D]` L2-normalised embeddings.
        log_u: `[2, B]` the updated `log u` used to weight each anchor's
            negatives (`sogclr_moving_average`); treated as a constant.
        temperature: τ > 0.
    """
    similarity, positive, image = two_view_logits(view1, view2, 1.0)  # s, not β s
    beta = tf.convert_to_tensor(1.0 / temperature, dtype=similarity.dtype)
    batch_size = tf.shape(view1)[0]
    log_u = tf.reshape(tf.cast(tf.stop_gradient(log_u), similarity.dtype), [2 * batch_size, 1])
    negatives = _negatives_mask(image)
    # Masked entries get exp(−∞) = 0 before any product, so large β cannot overflow.
    minus_inf = tf.constant(-math.inf, similarity.dtype)
    weights = tf.stop_gradient(tf.exp(tf.where(negatives, beta * similarity - log_u, minus_inf)))
    num_negatives = tf.cast(2 * (batch_size - 1), similarity.dtype)
    negative_term = tf.reduce_sum(weights * similarity, axis=-1) / num_negatives
    return tf.reduce_mean(negative_term - positive)
