"""The global contrastive loss over a finite set of stored views (the EMC² paper's F).

With K stored views per image (`emc2_tf.finite_views`: N·K views, row
`image · K + k`), the official `evaluation.py: compute_global_loss` is one
cross-entropy row per ordered pair (anchor view a, other view p of the same
image), the positive competing with every view of every other image:

    F(θ) = 1 / (N·K·(K−1)) Σ_a Σ_{p ∈ Pos(a)} [ −β s(a, p)
               + log( exp(β s(a, p)) + Σ_{z ∈ Neg(a)} exp(β s(a, z)) ) ]

Pos(a): the K − 1 other stored views of a's image; Neg(a): the N·K − K views
of the other images; s the cosine similarity of the L2-normalised
embeddings, β = 1/τ. Unlike `global_contrastive_loss` (the EMC² surrogate's
objective, algorithms.md §1) the positive is in the denominator, as in the
official code. The official code scales the embeddings by β *before* the
Gram product, so its logits are β² s (at `--beta 5`, 25 s, while its training
uses 5 s); ours uses β s, one temperature for training and for F (a named
deviation: the official value is ours at τ = 1/β_official²).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def finite_global_loss(embeddings: tf.Tensor, num_views: int, temperature: float,
                       chunk_size: int = 1024) -> tf.Tensor:
    """F over all N·K stored views, given their embeddings.

    Args:
        embeddings: `[N·K, D]` L2-normalised embeddings, row `image · K + k`.
        num_views: K ≥ 2.
        temperature: τ > 0 (β = 1/τ).
        chunk_size: anchors at a time (memory O(chunk · N·K)).

    Returns:
        The scalar loss, differentiable with respect to `embeddings`.
    """
    embeddings = tf.convert_to_tensor(embeddings)
    beta = tf.constant(1.0 / temperature, embeddings.dtype)
    rows = int(embeddings.shape[0])
    if rows % num_views:
        raise ValueError(f"embeddings has {rows} rows, not a multiple of num_views={num_views}.")
    image = tf.range(rows) // num_views
    total = tf.zeros([], embeddings.dtype)
    for start in range(0, rows, chunk_size):
        stop = min(start + chunk_size, rows)
        logits = beta * tf.matmul(embeddings[start:stop], embeddings, transpose_b=True)
        anchor = tf.range(start, stop)
        own_image = tf.equal((anchor // num_views)[:, None], image[None, :])
        positive = own_image & tf.not_equal(anchor[:, None], tf.range(rows)[None, :])
        minus_inf = tf.constant(-np.inf, logits.dtype)
        negative_log_sum = tf.reduce_logsumexp(tf.where(own_image, minus_inf, logits), axis=1)
        row_loss = tf.math.softplus(negative_log_sum[:, None] - logits)  # log(1 + Σneg / pos)
        total += tf.reduce_sum(tf.where(positive, row_loss, tf.zeros_like(row_loss)))
    return total / tf.cast(rows * (num_views - 1), embeddings.dtype)
