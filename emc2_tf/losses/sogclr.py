r"""SogCLR: the global contrastive loss with a moving-average estimator (algorithms.md §3).

Yuan et al., ICML 2022 (official code Optimization-AI/SogCLR). Each image `i`
keeps `u_i`, a moving average of the mean of `exp(β s)` over its negatives,
so that the gradient of the global loss' log-partition can be estimated from
the batch alone:

    g_i(batch) = 1/(2(B−1)) Σ_{z ∈ batch negatives of a} exp(β s(a, z))
    u_i ← (1 − γ) u_i + γ g_i            (γ = 1 on the first visit)
    loss_a = −( s(a, p) − 1/(2(B−1)) Σ_z w_z s(a, z) ),
    w_z = stop_gradient( exp(β s(a, z)) / u_i )

summed over the two views of each image and averaged over the B images, as
the official code's `loss = (loss_a + loss_b).mean()` (Optimization-AI/SogCLR
commit ef289b5, sogclr/builder.py, `dynamic_contrastive_loss`, lines
121–128, where `loss_a`, `loss_b` are the per-image losses of view 1 and
view 2 as anchors): twice the mean over the 2B anchors. The scale
is the official one because it matters under SGD/LARS (not under Adam).
Per anchor, the gradient of `loss_a` is τ times the gradient of the global
loss' `ℓ_a` with its inner sum estimated by `u`; the batch surrogate's
gradient is therefore 2τ times that of the mean over the 2B anchors (with
γ = 1, i.e. `u = g`, exactly 2τ times the gradient of the batch's DCL loss,
which is a mean over the 2B views). `u` is kept in log space, `log u` = −∞
meaning "never seen", so large β never overflows. Its value is a surrogate,
not the global loss: monitor that with `emc2_tf.exact_global_contrastive_loss`.

First visit (ours, not the official rule): γ = 1 for each image whose `u`
was never set, so that its first `u` is its batch estimate `g` rather than
`γ g` (too small by the factor γ, which over-weights its negatives by 1/γ).
The official code sets γ = 1 only when the whole batch's `u` sums to 0,
i.e. in its first epoch (builder.py lines 103–104,
`if self.u[index.cpu()].sum() == 0: gamma = 1`, u initialised to 0); an
unseen image in a batch with one seen image there gets `u = γ g`. Per image
the rule here is the more exact one; the two agree on a batch whose images
are all unseen (the first epoch) or all seen.
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
    """The SogCLR surrogate over the batch at the official scale.

    `(1/B) Σ_i (loss_a(i) + loss_b(i))`: each image's two anchors summed, mean
    over the B images (official `(loss_a + loss_b).mean()`), i.e. twice the
    mean over the 2B anchors.

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
    # Σ over the 2B anchors / B = the official (loss_a + loss_b).mean().
    return tf.reduce_sum(negative_term - positive) / tf.cast(batch_size, similarity.dtype)
