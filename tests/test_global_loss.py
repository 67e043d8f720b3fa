"""The exact global contrastive loss against a float64 NumPy reference."""

import numpy as np
import pytest
import tensorflow as tf

import emc2_tf

from helpers import fixed_embeddings


def reference_global_loss(view1, view2, tau):
    n = len(view1)
    candidates = np.concatenate([view1, view2])
    owner = np.concatenate([np.arange(n), np.arange(n)])
    losses = []
    for i in range(n):
        for anchor, positive in ((view1[i], view2[i]), (view2[i], view1[i])):
            negatives = candidates[owner != i]
            logits = negatives @ anchor / tau
            m = logits.max()
            losses.append(-(anchor @ positive) / tau + m + np.log(np.exp(logits - m).sum()))
    return np.mean(losses)


@pytest.mark.parametrize("n, tau", [(2, 0.5), (17, 0.1), (50, 0.01)])
def test_matches_float64_reference(n, tau):
    view1 = fixed_embeddings(n, 7, seed=n)
    view2 = fixed_embeddings(n, 7, seed=n + 100)
    expected = reference_global_loss(view1, view2, tau)
    got64 = emc2_tf.global_contrastive_loss(tf.constant(view1), tf.constant(view2), tau, chunk_size=5)
    got32 = emc2_tf.global_contrastive_loss(
        tf.constant(view1, tf.float32), tf.constant(view2, tf.float32), tau
    )
    assert float(got64) == pytest.approx(expected, rel=1e-10)
    assert float(got32) == pytest.approx(expected, rel=1e-4)
    assert np.isfinite(float(got32))  # β = 100 does not overflow (log-sum-exp)


if __name__ == "__main__":
    import sys

    import pytest

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
