"""`benchmarks.recycling_variance`: its exact moments against the float64 reference.

The benchmark enumerates each chain's MH paths in a vectorised way and maps
their column weights to the gradient. Here the same paths are enumerated
through `tests/emc2_reference.py` instead (its scan, driven by uniforms that
force each accept/reject decision, and its `negative_term` differentiated
along every coordinate), so the README's variance numbers rest on the
reference's statement of the estimator, not on the benchmark's own code.
"""

import sys

import numpy as np
import pytest

import emc2_reference as ref
from benchmarks import recycling_variance as rv

B, DIM, TAU = 3, 2, 0.2


def _logits(views, stored, beta):
    """`(anchor logits [2, b, 2b], out-of-batch logits [2, b])` of the embeddings."""
    b = len(stored)
    logits = beta * views @ views.T
    return (np.stack([logits[:b], logits[b:]]),
            beta * np.stack([(views[:b] * stored).sum(1), (views[b:] * stored).sum(1)]))


def _reference_moments(views, stored, temperature, mode, chain):
    """Exact mean and variance of chain `chain`'s gradient (views then stored, flattened),
    `(plain, recycled)`, by driving `ref.reference_scan` down every path."""
    b, beta = len(stored), 1.0 / temperature
    anchor_logits, out_of_batch_logits = _logits(views, stored, beta)
    valid = ref.valid_candidates(np.arange(b))
    initial = out_of_batch_logits[0]  # each chain on its stored negative, scored against view 1
    steps = [(p, c) for p in range(2) for c in np.flatnonzero(valid[chain])]
    # d(logits)/d(coordinate) for every coordinate of the views and the stored negatives.
    directions = []
    for j in range(3 * b * DIM):
        d = np.zeros(3 * b * DIM)
        d[j] = 1.0
        d_views, d_stored = d[:2 * b * DIM].reshape(2 * b, DIM), d[2 * b * DIM:].reshape(b, DIM)
        d_logits = beta * (d_views @ views.T + views @ d_views.T)
        d_out = beta * np.stack([(d_views[:b] * stored + views[:b] * d_stored).sum(1),
                                 (d_views[b:] * stored + views[b:] * d_stored).sum(1)])
        directions.append((np.stack([d_logits[:b], d_logits[b:]]), d_out))

    leaves = []

    def visit(uniforms, probability, k):
        scan = ref.reference_scan(anchor_logits, valid, np.log(uniforms), initial, b - 1)
        if k == len(steps):
            leaves.append((probability, scan))
            return
        p, c = steps[k]
        alpha = scan.accept_probability[p, chain, c]
        for accept, share in ((True, alpha), (False, 1.0 - alpha)):
            if share > 0:
                forced = uniforms.copy()
                forced[p, c, chain] = alpha / 2 if accept else (1 + alpha) / 2
                visit(forced, probability * share, k + 1)

    visit(np.full((2, 2 * b, b), 0.5), 1.0, 0)
    probability = np.array([leaf[0] for leaf in leaves])
    moments = []
    for recycling in (False, True):
        gradients = np.array([[ref.negative_term(d_logits, d_out, scan, np.ones(b, bool), mode,
                                                 recycling)[:, chain].sum() / (2 * b)
                               for d_logits, d_out in directions] for _, scan in leaves])
        mean = probability @ gradients
        moments.append((mean, probability @ (gradients - mean) ** 2))
    return probability, moments


@pytest.mark.parametrize("mode", ["reencode", "drop"])
def test_exact_moments_equal_the_reference_path_by_path(mode):
    """The benchmark's exact mean and per-coordinate variance of the gradient,
    with and without waste recycling, equal those of the float64 reference
    enumerated path by path (to 1e-10), on a case where the claim's
    exception shows: the total variance falls while a stored negative's
    coordinate rises.

    Catches: a wrong branch probability or a missing branch, a recycled step
    weighted `(1 − α, α)` the wrong way round or on the state after the step,
    the plain estimator's rejection credited to the candidate, the burn-in
    off by one, the stored negative's column mapped to the wrong block, and
    "drop" still adding the stored negative's score.
    """
    views, stored = rv.random_case(B, DIM, 0.5, TAU, seed=9)
    chains_plain, chains_recycled = [0.0, 0.0], [0.0, 0.0]
    for chain in range(B):
        probability, (plain, recycled) = _reference_moments(views, stored, TAU, mode, chain)
        assert probability.sum() == pytest.approx(1.0, abs=1e-12)
        for total, (mean, variance) in ((chains_plain, plain), (chains_recycled, recycled)):
            total[0] = total[0] + mean
            total[1] = total[1] + variance
    got = rv.exact_moments(views, stored, TAU, mode)
    for name, (mean, variance) in (("plain", chains_plain), ("recycled", chains_recycled)):
        np.testing.assert_allclose(got[name]["mean"], mean, rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got[name]["variance"], variance, rtol=1e-10, atol=1e-12,
                                   err_msg=name)
    # Same expectation (recycling is unbiased); lower total variance.
    np.testing.assert_allclose(chains_recycled[0], chains_plain[0], rtol=1e-10, atol=1e-12)
    summary = rv.summarise(got, B, DIM)
    assert summary["total_recycled"] < summary["total_plain"]
    stored_variance = chains_plain[1][2 * B * DIM:]
    if mode == "drop":  # the stored negative adds nothing: no gradient, no variance
        assert np.abs(stored_variance).max() == 0
    else:  # the exception: a stored negative's coordinate with a higher variance
        assert summary["max_increase_stored"] > 0.01


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
