"""The exact global contrastive loss (SogCLR / EMC² objective; algorithms.md §1).

For an anchor view `a` of image `i` with positive `p`:

    L_i = −β s(a, p) + log Σ_{z ∈ Neg(i)} exp(β s(a, z))

where `Neg(i)` is every view of every other image `j ≠ i` of the whole data
set (the positive is not in the denominator); the loss is the mean over
images and over both views as anchors. EMC² estimates its gradient; this
function computes the value exactly (log-sum-exp over all N, chunked over
anchors so memory is O(chunk · N)): the yardstick for tests and monitoring.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf


def global_contrastive_loss(
    view1: tf.Tensor, view2: tf.Tensor, temperature: float, chunk_size: int = 1024
) -> tf.Tensor:
    """Exact global contrastive loss of N images given both views' embeddings.

    Args:
        view1, view2: `[N, D]` L2-normalised embeddings of the two views.
        temperature: τ > 0.
        chunk_size: anchors processed at a time.

    Returns:
        Scalar loss (dtype of the inputs).
    """
    view1 = tf.convert_to_tensor(view1)
    view2 = tf.convert_to_tensor(view2, dtype=view1.dtype)
    beta = tf.convert_to_tensor(1.0 / temperature, dtype=view1.dtype)
    num_images = tf.shape(view1)[0]
    candidates = tf.concat([view1, view2], axis=0)  # [2N, D]
    candidate_image = tf.concat([tf.range(num_images), tf.range(num_images)], axis=0)
    total = tf.zeros([], view1.dtype)
    n = int(view1.shape[0])
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        image = tf.range(start, stop)
        for anchor, positive in ((view1[start:stop], view2[start:stop]),
                                 (view2[start:stop], view1[start:stop])):
            logits = beta * tf.matmul(anchor, candidates, transpose_b=True)
            own = tf.equal(image[:, None], candidate_image[None, :])
            logits = tf.where(own, tf.constant(-np.inf, logits.dtype), logits)
            log_partition = tf.reduce_logsumexp(logits, axis=1)
            positive_logit = beta * tf.reduce_sum(anchor * positive, axis=1)
            total += tf.reduce_sum(log_partition - positive_logit)
    return total / tf.cast(2 * num_images, view1.dtype)


def exact_global_contrastive_loss(
    encoder: keras.Model, images: Any, temperature: float, batch_size: int = 512
) -> float:
    """Global contrastive loss of `encoder` over a whole (small) data set.

    Uses the un-augmented images as both views (fixed augmentation = the
    identity), so the value is deterministic and comparable across epochs.
    `images`: an array (uint8 0..255 or float in [0, 1]) or an
    `ImageSource`, embedded `batch_size` images at a time (only the `[N, D]`
    embeddings are held; the loss itself is O(N²) compute).
    """
    from emc2_tf.evaluation import embed

    embeddings = tf.constant(embed(encoder, images, features="embedding",
                                   batch_size=batch_size), tf.float32)
    return float(global_contrastive_loss(embeddings, embeddings, temperature))
