"""SimCLR, DCL, DHEL, KCL: value and gradient against float64 NumPy references."""

import numpy as np
import pytest
import tensorflow as tf

import emc2_tf

from helpers import fixed_embeddings, numeric_gradient


def _lse(x):
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


def ref_nt_xent(u, v, temperature):
    tau = temperature
    z = np.concatenate([u, v]); n = len(u); losses = []
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        others = [c for c in range(2 * n) if c != a]
        losses.append(-z[a] @ z[p] / tau + _lse(np.array([z[a] @ z[c] / tau for c in others])))
    return np.mean(losses)


def ref_dcl(u, v, temperature):
    tau = temperature
    z = np.concatenate([u, v]); n = len(u); losses = []
    for a in range(2 * n):
        i, p = a % n, (a + n) % (2 * n)
        negatives = [c for c in range(2 * n) if c % n != i]
        losses.append(-z[a] @ z[p] / tau + _lse(np.array([z[a] @ z[c] / tau for c in negatives])))
    return np.mean(losses)


def ref_dhel(u, v, temperature, symmetric=True):
    tau = temperature
    n = len(u); losses = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        loss = -u[i] @ v[i] / tau + _lse(np.array([u[i] @ u[j] / tau for j in others]))
        if symmetric:
            loss += _lse(np.array([v[i] @ v[j] / tau for j in others]))
        losses.append(loss)
    return np.mean(losses)


def ref_kcl(u, v, t=2.0, gamma=16.0):
    """−(2/M) Σ_i K(u_i, v_i) + γ Σ_views mean_{i≠j} K: the factor 2 is the authors'
    `alignment = 2 * align_gaussian(...)` (pakoromilas/DHEL-KCL losses.py)."""
    n = len(u)
    k = lambda x, y: np.exp(-t * np.sum((x - y) ** 2))
    alignment = 2.0 * np.mean([k(u[i], v[i]) for i in range(n)])
    energy = sum(np.mean([k(w[i], w[j]) for i in range(n) for j in range(n) if i != j]) for w in (u, v))
    return -alignment + gamma * energy


CASES = [
    ("simclr", emc2_tf.nt_xent_loss, ref_nt_xent, {"temperature": 0.1}),
    ("dcl", emc2_tf.dcl_loss, ref_dcl, {"temperature": 0.2}),
    ("dhel", emc2_tf.dhel_loss, ref_dhel, {"temperature": 0.3}),
    ("dhel_one_sided", lambda u, v, **k: emc2_tf.dhel_loss(u, v, symmetric=False, **k),
     lambda u, v, **k: ref_dhel(u, v, symmetric=False, **k), {"temperature": 0.3}),
    ("kcl", emc2_tf.kcl_loss, ref_kcl, {"t": 2.0, "gamma": 16.0}),
]


@pytest.mark.parametrize("name, loss, reference, kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("batch", [2, 5])
def test_value_and_gradient_match_float64_reference(name, loss, reference, kwargs, batch):
    u = fixed_embeddings(batch, 4, seed=batch)
    v = fixed_embeddings(batch, 4, seed=batch + 10)
    expected = reference(u, v, **kwargs)
    expected_grads = numeric_gradient(lambda a, b: reference(a, b, **kwargs), u, v)
    tu, tv = tf.Variable(u), tf.Variable(v)
    with tf.GradientTape() as tape:
        value = loss(tu, tv, **kwargs)
    grads = tape.gradient(value, [tu, tv])
    assert float(value) == pytest.approx(expected, rel=1e-5)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # float32 within 1e-4.
    value32 = loss(tf.constant(u, tf.float32), tf.constant(v, tf.float32), **kwargs)
    assert float(value32) == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("loss, reference", [(emc2_tf.nt_xent_loss, ref_nt_xent),
                                             (emc2_tf.dcl_loss, ref_dcl),
                                             (emc2_tf.dhel_loss, ref_dhel)])
def test_large_inverse_temperature_does_not_overflow(loss, reference):
    u, v = fixed_embeddings(6, 4, seed=1), fixed_embeddings(6, 4, seed=2)
    value = float(loss(tf.constant(u, tf.float32), tf.constant(v, tf.float32), temperature=1e-3))
    assert np.isfinite(value)
    assert value == pytest.approx(reference(u, v, 1e-3), rel=1e-4)


def test_kcl_alignment_carries_the_authors_factor_2_and_honours_t_and_gamma():
    """Bug caught: KCL's alignment without the authors' factor 2 (−(1/M) Σ K(u_i, v_i)
    instead of −(2/M)), which makes γ = 16 weigh the energy like their γ = 32; and
    `t`/`gamma` not reaching the loss.

    Independent of `ref_kcl`: identical views have K(u_i, u_i) = 1, so at γ = 0
    the loss is exactly −2; and the energy's weight is exactly γ.
    """
    u = tf.constant(fixed_embeddings(5, 4, seed=3))
    v = tf.constant(fixed_embeddings(5, 4, seed=4))
    assert float(emc2_tf.kcl_loss(u, u, gamma=0.0)) == pytest.approx(-2.0, abs=1e-12)
    aligned = float(emc2_tf.kcl_loss(u, v, t=0.7, gamma=0.0))
    distances = np.sum((u.numpy() - v.numpy()) ** 2, axis=1)
    assert aligned == pytest.approx(-2.0 * np.mean(np.exp(-0.7 * distances)), rel=1e-12)
    energy = float(emc2_tf.kcl_loss(u, v, t=0.7, gamma=1.0)) - aligned
    assert float(emc2_tf.kcl_loss(u, v, t=0.7, gamma=5.0)) == pytest.approx(
        aligned + 5.0 * energy, rel=1e-12)


def test_registry_builds_every_method():
    assert set(emc2_tf.METHODS) == {"emc2", "sogclr", "simclr", "dcl", "dhel", "kcl", "cache"}
    with pytest.raises(ValueError, match="accepted: cache, dcl, dhel, emc2, kcl, simclr, sogclr"):
        emc2_tf.build_model("moco", encoder=None, dataset_size=10)


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
