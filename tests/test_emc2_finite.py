"""EMC² with finite augmentations: chains over stored views (issue 21).

With `finite_augmentations=K` every image has K stored views, rows
`image·K + k` of one N·K table, and a batch carries `view_index` `[B, 2]`.
`EMC2Model` then keeps one chain per stored view (the official `--finite_aug`
layout), each anchor view advancing its own chain by one pass over the 2B
candidate views, whose identities are view rows. Pinned here: the chains'
state frequencies against the exact softmax over view rows (frozen encoder);
the exact-ratio score against `β s(anchor, stored view)` in float64; the
loss, gradient and written-back chains of one step against a float64 NumPy
restatement of the official path on the same draws; the stored states as
view rows of other images; the N·K table and its refusals; `fit` without a
table for `out_of_batch="drop"`.
"""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf
from emc2_tf.models import emc2 as emc2_module

import emc2_reference as ref
from helpers import frozen_encoder, run_python

N, K, B, TAU = 6, 3, 4, 0.25


def _views_of(table, index, view_index):
    """The batch's two views, float32 in [0, 1], cut from the uint8 table (no noise)."""
    pixels = table.astype(np.float32) / np.float32(255.0)
    return pixels[index * K + view_index[:, 0]], pixels[index * K + view_index[:, 1]]


def _random_view_index(rng, b, k=K):
    """`[b, 2]` int32: two different stored views of each image."""
    first = rng.integers(0, k, b)
    second = (first + rng.integers(1, k, b)) % k
    return np.stack([first, second], axis=1).astype(np.int32)


# ---- The one-pass scan (one chain per anchor view) ----------------------------------------


@pytest.mark.parametrize("scan", ["sequential", "parallel", "blocked"])
@pytest.mark.parametrize("burn_in", [0, 3])
def test_one_pass_scan_equals_the_sequential_reference(scan, burn_in, monkeypatch):
    """`mh_scan` on logits `[1, A, 2B]` (A = 2B chains, one pass each) = the
    one-chain-at-a-time loop: states, states before each step, decisions,
    probabilities, recorded steps, final state and score; a refresh between
    passes is refused for one pass.

    Catches: a one-pass chain starting from anything but its stored state
    (e.g. the state after its first step as the state before it), a final state
    read from a pass that does not exist, the refresh row read from a one-pass
    `out_of_batch_logits` (`[1, A]` has no row 1).
    """
    from emc2_tf.samplers import candidate_mask, metropolis_hastings, mh_scan

    monkeypatch.setattr(metropolis_hastings, "SCAN_BLOCK_SIZE", 5)
    rng = np.random.default_rng(burn_in)
    b = 6
    index = np.array([0, 1, 2, 3, 2, 5], np.int32)  # image 2 twice
    chains = np.concatenate([index, index])
    logits = rng.normal(scale=3.0, size=(1, 2 * b, 2 * b)).astype(np.float32)
    log_u = np.log(rng.random((1, 2 * b, 2 * b))).astype(np.float32)
    initial = rng.normal(size=2 * b).astype(np.float32)
    initial[[0, 7]] = -np.inf  # empty chains
    initial[3] = 1e3  # a sticky one
    valid = candidate_mask(tf.constant(chains), tf.constant(index))
    got = mh_scan(tf.constant(logits), valid, tf.constant(log_u), tf.constant(initial), burn_in,
                  out_of_batch_logits=tf.zeros([1, 2 * b]), scan=scan)
    want = ref.reference_scan(logits, ref.valid_candidates(chains, index), log_u, initial,
                              burn_in)
    np.testing.assert_array_equal(got.valid.numpy(), want.valid)
    for name in ("states", "previous_states", "accepted", "recorded"):
        np.testing.assert_array_equal(getattr(got, name).numpy(), getattr(want, name),
                                      err_msg=name)
    np.testing.assert_allclose(got.accept_probability.numpy(), want.accept_probability,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got.final_state.numpy(), want.final_state)
    np.testing.assert_allclose(got.final_log_score.numpy(), want.final_log_score, rtol=1e-6)
    assert want.accepted[0, :, 0].any()  # some chain accepts at the first step
    with pytest.raises(ValueError, match="needs two passes"):
        mh_scan(tf.constant(logits), valid, tf.constant(log_u), tf.constant(initial), burn_in,
                refresh_log_score_between_passes=True, out_of_batch_logits=tf.zeros([1, 2 * b]))


# ---- One step against the float64 restatement of the official --finite_aug path ----------


class _FiniteFixture:
    """A tiny encoder (Flatten → Dense(3) → unit norm), a uint8 table of N·K stored
    views and a batch of B = 4 images whose 2B anchor chains hold every kind of state."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        keras.utils.set_random_seed(seed)
        self.encoder = keras.Sequential([
            keras.Input((2, 2, 1)), keras.layers.Flatten(), keras.layers.Dense(3),
            keras.layers.UnitNormalization()])
        self.table = rng.integers(0, 256, (N * K, 2, 2, 1)).astype(np.uint8)
        # Stored view 5·K + 1 is a copy of 1·K + 0 (the highest possible score β).
        self.table[5 * K + 1] = self.table[1 * K + 0]
        self.index = np.array([1, 0, 4, 2], np.int32)
        self.view_index = np.array([[0, 2], [1, 0], [2, 1], [0, 1]], np.int32)
        self.view1, self.view2 = _views_of(self.table, self.index, self.view_index)
        # Chains (key = stored-view row): 1·K+0 on its copy 5·K+1 (sticky); 0·K+1 empty; 4·K+2 on 3·K+0 with an absurd stale score
        # (sticky without exact ratio); 2·K+0 on 0·K+2 (a view of a batch image that
        # is not in the batch); 1·K+2 on 2·K+1, which is also a candidate this step;
        # 4·K+1 on row 0 (view 0 of image 0: a state, not an empty chain).
        self.chain_index = np.full(N * K, -1, np.int32)
        self.chain_log_score = np.full(N * K, -np.inf, np.float32)
        for chain, state, score in ((1 * K + 0, 5 * K + 1, 1.0 / TAU), (4 * K + 2, 3 * K + 0, 1e3),
                                    (2 * K + 0, 0 * K + 2, -1.0), (1 * K + 2, 2 * K + 1, 0.5),
                                    (0 * K + 0, 4 * K + 0, 0.0), (4 * K + 1, 0, 2.0)):
            self.chain_index[chain], self.chain_log_score[chain] = state, score
        self.uniforms = rng.random((2, 2 * B, B)).astype(np.float32)
        # Chain 0 (anchor view 1 of image 1, on its copy) accepts only a score within
        # 1e-4 of β: it stays on its stored view (a write-back of the old row).
        self.uniforms[0, :, 0] = 0.9999
        self.rows = np.concatenate([self.index * K + self.view_index[:, 0],
                                    self.index * K + self.view_index[:, 1]])

    @property
    def params(self):
        kernel, bias = self.encoder.get_weights()
        return [kernel.astype(np.float64), bias.astype(np.float64)]

    def model(self, **options):
        options = {"out_of_batch": "reencode", "waste_recycling": False, **options}
        model = emc2_tf.EMC2Model(encoder=self.encoder, dataset_size=N, images=self.table,
                                  temperature=TAU, seed=0, finite_augmentations=K, **options)
        model.chain_index.assign(self.chain_index)
        model.chain_log_score.assign(self.chain_log_score)
        uniforms = tf.constant(self.uniforms)

        def fixed_draws(shape):
            tf.debugging.assert_equal(tf.cast(tf.stack(shape), tf.int32), [2, 2 * B, B])
            return uniforms

        model.random_uniform = fixed_draws
        return model

    def reference(self, params=None, decisions=None, **options):
        options = {k: v for k, v in options.items() if k != "scan"}
        return ref.finite_emc2_step(
            self.params if params is None else params, self.table, K, self.index,
            self.view_index, self.chain_index, self.chain_log_score, self.uniforms, TAU,
            scan=decisions, **options)

    def model_step(self, model, graph=False, jit_compile=False):
        index, view_index = tf.constant(self.index), tf.constant(self.view_index)
        views = tf.constant(np.concatenate([self.view1, self.view2]))
        variables = self.encoder.trainable_variables

        def step():
            with tf.GradientTape() as tape:
                loss, scalars = model.contrastive_loss(index, self.encoder(views),
                                                       view_index=view_index)
            return loss, scalars, tape.gradient(loss, variables)

        if graph or jit_compile:
            step = tf.function(step, jit_compile=jit_compile)
        loss, scalars, gradients = step()
        return (float(loss), {k: float(v) for k, v in scalars.items()},
                [g.numpy() for g in gradients])


SCANS = ["sequential", "parallel", "blocked"]
OPTIONS = [
    dict(out_of_batch=mode, exact_ratio=exact, waste_recycling=recycle,
         scan=SCANS[(2 * exact + recycle + (mode == "drop")) % 3])
    for mode in ("reencode", "drop") for exact in (False, True) for recycle in (False, True)
] + [dict(out_of_batch="reencode", exact_ratio=True, burn_in=1, scan="sequential"),
      dict(out_of_batch="reencode", burn_in=0, waste_recycling=True, scan="blocked")]


@pytest.fixture(scope="module")
def fixture():
    return _FiniteFixture()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(
    f"{k}={v}" for k, v in o.items()))
def test_finite_step_equals_the_float64_reference(fixture, options):
    """One finite-augmentation step = the float64 restatement of the official
    `--finite_aug` path on the same draws: loss, gradient with respect to the
    encoder weights (central differences at fixed accept decisions), the
    written-back `chain_index` / `chain_log_score` of the 2B anchor-view chains
    (other chains untouched) and the logged scalars.

    Catches: chains keyed by image instead of stored view (the two anchor views
    of an image sharing or swapping a chain), the view-2 block's rows built from
    `view_index[:, 0]`, candidate identities written back as image indices, the
    draws mapped to the wrong chain, the anchor's own image not masked (or only
    its own view masked), the stored view re-encoded from the wrong row or
    without gradient, the exact-ratio score taken from the stale stored one, a
    second pass run per chain, `acceptance_rate` over the wrong number of steps,
    a one-pass scan whose chains start from anything but their stored state
    (seen by waste recycling at burn-in 0).
    """
    model = fixture.model(**options)
    loss, scalars, gradients = fixture.model_step(model)
    want = fixture.reference(**options)
    assert loss == pytest.approx(want.loss, rel=1e-5, abs=1e-5)
    for got, expected in zip(gradients, ref.numeric_gradient(fixture, want.scan, options)):
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)

    scan = want.scan
    assert scalars["acceptance_rate"] == pytest.approx(
        scan.accepted.sum() / scan.valid.sum(), rel=1e-6)
    assert scalars["out_of_batch_fraction"] == pytest.approx((scan.final_state < 0).mean())
    rows = fixture.rows
    old = fixture.chain_index[rows]
    new_rows = np.where(scan.final_state >= 0, rows[np.maximum(scan.final_state, 0)], old)
    np.testing.assert_array_equal(model.chain_index.numpy()[rows], new_rows)
    np.testing.assert_allclose(model.chain_log_score.numpy()[rows], scan.final_log_score,
                               rtol=1e-5)
    untouched = np.setdiff1d(np.arange(N * K), rows)
    np.testing.assert_array_equal(model.chain_index.numpy()[untouched],
                                  fixture.chain_index[untouched])
    np.testing.assert_array_equal(model.chain_log_score.numpy()[untouched],
                                  fixture.chain_log_score[untouched])


def test_the_finite_fixture_exercises_every_kind_of_step(fixture):
    """The reference cases are not vacuous: recorded steps on a stored
    (out-of-batch) view exist, so "reencode" and "drop" differ; exact ratio
    changes the decisions; some chain ends on a view of another batch image
    (a written-back view row) and some stays on its stored view."""
    base = fixture.reference()
    assert (base.scan.recorded & (base.scan.states < 0)).any()
    assert fixture.reference(out_of_batch="drop").loss != pytest.approx(base.loss, rel=1e-3)
    assert (fixture.reference(exact_ratio=True).scan.accepted != base.scan.accepted).any()
    final = fixture.reference(exact_ratio=True).scan.final_state
    assert (final >= 0).any() and (final < 0).any()
    # The view-2 block ends on candidates whose rows differ from the view-1 block's.
    assert (final[final >= 0] >= B).any()


@pytest.mark.parametrize("compiled", ["graph", "xla"])
def test_graph_and_xla_steps_equal_eager(fixture, compiled):
    """The step as a `tf.function` (its scan compiled by XLA in a nested function),
    or whole under `jit_compile=True`, = eager on the same draws: written-back
    chains (view rows) identical, scores, loss and gradients to rounding.

    Catches: the one-pass finite scan differing between the compiled and the
    uncompiled core (e.g. its draws reshaped differently in a graph), a
    finite step XLA cannot compile (the view-row checks, the table gather).
    """
    options = dict(exact_ratio=True, waste_recycling=True, scan="parallel")
    results = []
    for graph in (False, True):
        model = fixture.model(**options)
        loss, _, gradients = fixture.model_step(
            model, graph=graph and compiled == "graph", jit_compile=graph and compiled == "xla")
        results.append((loss, gradients, model.chain_index.numpy(),
                        model.chain_log_score.numpy()))
    (loss_e, grads_e, index_e, score_e), (loss_g, grads_g, index_g, score_g) = results
    np.testing.assert_array_equal(index_g, index_e)
    # XLA reassociates float sums (as in test_emc2_reference's XLA test).
    rtol, atol = (1e-6, 1e-7) if compiled == "graph" else (1e-5, 1e-6)
    np.testing.assert_allclose(score_g, score_e, rtol=rtol)
    assert loss_g == pytest.approx(loss_e, rel=rtol, abs=atol)
    for got, expected in zip(grads_g, grads_e):
        np.testing.assert_allclose(got, expected, rtol=10 * rtol, atol=atol)
    assert loss_e == pytest.approx(fixture.reference(**options).loss, rel=1e-5)


def test_exact_ratio_scores_the_stored_view_exactly(fixture, monkeypatch):
    """With `exact_ratio` the score each chain starts from is `β s(anchor, table row
    of its state)` with the current weights, equal to a float64 NumPy computation
    (−inf for an empty chain), whatever the stale stored score (1e3 included).

    Catches: the stored view re-encoded from an image row (`row // K`, or the
    image's first view), the view-2 anchors scored against the view-1 anchors'
    chains, the stale stored score used, a chain on stored view 0 (row 0) taken
    for empty.
    """
    seen = {}
    original = emc2_module.mh_scan

    def spy(logits, valid, log_uniforms, initial_log_score, *args, **kwargs):
        seen["initial"] = initial_log_score.numpy()
        return original(logits, valid, log_uniforms, initial_log_score, *args, **kwargs)

    monkeypatch.setattr(emc2_module, "mh_scan", spy)
    model = fixture.model(exact_ratio=True, out_of_batch="drop")
    fixture.model_step(model)

    beta = 1.0 / TAU
    pixels = fixture.table.astype(np.float64) / 255.0
    anchors = ref.dense_unit_encoder(fixture.params, pixels[fixture.rows])
    old = fixture.chain_index[fixture.rows]
    stored = ref.dense_unit_encoder(fixture.params, pixels[np.maximum(old, 0)])
    want = np.where(old >= 0, beta * (anchors * stored).sum(1), -np.inf)
    np.testing.assert_allclose(seen["initial"], want, rtol=1e-5, atol=1e-5)
    # Not vacuous: the absurd stale score 1e3 was replaced, empty chains stayed empty,
    # and the chain on stored view row 0 (chain 4·K + 1) has a finite score.
    assert np.isfinite(want).sum() == 6 and np.isinf(want).sum() == 2 * B - 6
    assert np.isfinite(want[fixture.rows == 4 * K + 1]).all()
    assert 1e3 not in seen["initial"]


def test_two_replicas_write_the_same_view_rows_as_one_device(tmp_path):
    """One finite step under MirroredStrategy (2 CPU replicas, each with its own
    images, the same draws per anchor view) = the step on one device: the
    written-back chains (view rows) identical, and identical on both replicas;
    scores and loss to float rounding (`tests/finite_replicas_worker.py`).

    Catches: the candidates' view rows built from this replica's `view_index`
    only (not all-gathered, or gathered in another order than the indices), so
    a chain writes back the row of another replica's view with the wrong view
    number; replicas holding different chain tables.
    """
    out = tmp_path / "out.json"
    result = run_python(["tests/finite_replicas_worker.py", str(out)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    data = json.loads(out.read_text())
    one, two = data["one_device"], data["two_replicas"]
    assert one["chain_index"] == two["chain_index"]
    assert len(two["copies"]) == 2 and all(c == two["chain_index"] for c in two["copies"])
    np.testing.assert_allclose(two["chain_log_score"], one["chain_log_score"], rtol=1e-5)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    # Not vacuous: chains of replica 1's images moved onto view rows of replica 0's
    # images and the other way round (index [3, 0 | 7, 5], K = 3).
    moved = np.flatnonzero(np.array(one["chain_index"]) != np.array(data["initial_chain_index"]))
    replica = lambda rows: np.isin(rows // 3, [7, 5]).astype(int)  # noqa: E731
    crossings = set(zip(replica(moved), replica(np.array(one["chain_index"])[moved])))
    assert {(0, 1), (1, 0)} <= crossings


# ---- Stationary distribution over view rows (frozen encoder, no augmentation noise) -------


def test_chain_frequencies_match_the_softmax_over_view_rows():
    """A frozen encoder whose embeddings are known (a uint8 table of N·K = 12 stored
    views, the views of an image close to each other), no augmentation noise,
    exact ratio, every chain started on a sticky stale state: after 2,000 steps of
    random batches (B = 3) the state frequencies of each stored-view chain (i, k)
    match the exact softmax

        π_{i,k}(r) ∝ exp(β s(z_{i,k}, z_r)),  r a view row of another image,

    computed in float64: total-variation distance ≤ 0.12 averaged over the chains
    (measured 0.060, the in-batch scan's known bias plus Monte-Carlo noise).

    Catches: the own image's other views proposed (a mask on rows, or on the
    anchor view only: measured TV 0.34), states stored as image indices or
    candidates' rows from the wrong view, one chain per image shared by its
    views (its target changes with the anchor), the exact-ratio refresh skipped
    (the sticky stale states never move).
    """
    n, k, dim, b, temperature, steps = 6, 2, 4, 3, 0.5, 2000
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n, 1, dim))
    z = centres + 0.6 * rng.normal(size=(n, k, dim))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    table = np.rint((z.reshape(n * k, 1, 1, dim) + 1) / 2 * 255).astype(np.uint8)
    # What the frozen encoder computes from the table: Rescaling(2, −1), unit norm.
    embeddings = 2.0 * table.reshape(n * k, dim).astype(np.float64) / 255.0 - 1.0
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)

    model = emc2_tf.EMC2Model(frozen_encoder(dim), dataset_size=n, images=table,
                              temperature=temperature, seed=0, finite_augmentations=k,
                              exact_ratio=True, out_of_batch="drop", scan="sequential")
    rows_all = np.arange(n * k)
    model.chain_index.assign(((rows_all + k) % (n * k)).astype(np.int32))  # another image
    model.chain_log_score.assign(np.full(n * k, 1e3, np.float32))  # sticky if not refreshed
    pixels = tf.constant(table.astype(np.float32) / np.float32(255.0))

    @tf.function
    def step(index, view_index):
        rows = tf.concat([index * k + view_index[:, 0], index * k + view_index[:, 1]], 0)
        model.contrastive_loss(index, model.encoder(tf.gather(pixels, rows)),
                               view_index=view_index)
        return tf.gather(model.chain_index, rows)

    counts = np.zeros((n * k, n * k))
    for s in range(steps):
        index = rng.choice(n, b, replace=False).astype(np.int32)
        view_index = _random_view_index(rng, b, k)
        states = step(tf.constant(index), tf.constant(view_index)).numpy()
        rows = np.concatenate([index * k + view_index[:, 0], index * k + view_index[:, 1]])
        if s >= 50:
            np.add.at(counts, (rows, states), 1)

    logits = embeddings @ embeddings.T / temperature
    own_image = (rows_all[:, None] // k) == (rows_all[None, :] // k)
    target = np.where(own_image, 0.0, np.exp(logits - logits.max(1, keepdims=True)))
    target /= target.sum(1, keepdims=True)
    visits = counts.sum(1)
    assert visits.min() > 500
    distance = 0.5 * np.abs(counts / visits[:, None] - target).sum(1)
    assert np.average(distance, weights=visits) <= 0.12, distance
    assert (counts[own_image] == 0).all()


# ---- Stored states, the table's size, fit without a table ---------------------------------


def _finite_dataset(table, steps, b, seed):
    """`steps` hand-built finite-augmentation batches of b distinct images, as a dataset."""
    rng = np.random.default_rng(seed)
    index = np.stack([rng.choice(N, b, replace=False) for _ in range(steps)]).astype(np.int32)
    view_index = np.stack([_random_view_index(rng, b) for _ in range(steps)])
    views = [_views_of(table, i, v) for i, v in zip(index, view_index)]
    return tf.data.Dataset.from_tensor_slices({
        "index": index, "view_index": view_index,
        "view1": np.stack([v[0] for v in views]), "view2": np.stack([v[1] for v in views])})


def test_fit_stores_view_rows_of_other_images_without_a_table():
    """`fit` on hand-built finite batches with `out_of_batch="drop"` and no exact
    ratio runs without any image table (nothing is re-encoded), trains the
    encoder, and leaves every visited chain on a VIEW row `r` in `[0, N·K)` of
    another image (`r // K` ≠ the chain's image), with rows of every view number
    k among the states.

    Catches: states written back as image indices (they would all be < N and
    view 0 of nothing), a mask that lets a chain land on its own image's other
    views, `fit` demanding a table that "drop" never reads.
    """
    fixture = _FiniteFixture(seed=1)
    model = emc2_tf.EMC2Model(encoder=fixture.encoder, dataset_size=N, temperature=TAU,
                              seed=0, finite_augmentations=K, out_of_batch="drop")
    assert model.images is None and model.chain_index.shape == (N * K,)
    before = [w.copy() for w in fixture.encoder.get_weights()]
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit(_finite_dataset(fixture.table, 40, B, seed=2), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.array_equal(a, w) for a, w in zip(before, fixture.encoder.get_weights()))

    chains = np.arange(N * K)
    states = model.chain_index.numpy()
    visited = states >= 0
    assert visited.sum() >= N * K - 2
    assert (states[visited] < N * K).all()
    assert (states[visited] // K != chains[visited] // K).all()
    assert set(states[visited] % K) == set(range(K))
    assert (states[visited] >= N).any()
    assert np.isfinite(model.chain_log_score.numpy()[visited]).all()


def test_keras_file_keeps_the_view_chains(tmp_path):
    """A finite model saved as `.keras` and loaded has K, its N·K chains (view rows
    and scores) and no table: `fit` with `exact_ratio` asks for the stored-view
    table, and trains once it is given.

    Catches: K missing from the config (the loaded model would build N chains
    and fail to load, or load them into the wrong layout), the table saved
    with the model.
    """
    fixture = _FiniteFixture(seed=3)
    model = fixture.model(exact_ratio=True, out_of_batch="drop")
    del model.random_uniform  # real draws: the fixed ones are not a model attribute to save
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(_finite_dataset(fixture.table, 4, B, seed=1), epochs=1, verbose=0)
    path = str(tmp_path / "finite.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.finite_augmentations == K and loaded.images is None
    np.testing.assert_array_equal(loaded.chain_index.numpy(), model.chain_index.numpy())
    np.testing.assert_array_equal(loaded.chain_log_score.numpy(), model.chain_log_score.numpy())
    assert (loaded.chain_index.numpy() >= N).any()  # view rows, not image indices
    with pytest.raises(ValueError, match="stored-view table"):
        loaded.fit(_finite_dataset(fixture.table, 2, B, seed=2), epochs=1, verbose=0)
    loaded.set_image_table(fixture.table)
    history = loaded.fit(_finite_dataset(fixture.table, 2, B, seed=2), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_the_table_must_hold_n_times_k_stored_views(fixture):
    """With `finite_augmentations=K` the table holds N·K stored views: one of the N
    un-augmented images is refused in one line naming both numbers (constructor
    and `set_image_table`); without K an N·K table is refused as before.

    Catches: an N-row table accepted (re-encoding would read view row r of an
    N-row table: another image, or out of range), the check still asking for N.
    """
    images = fixture.table[:N]
    message = r"holds 6 rows but finite_augmentations=3 needs .* = 18 rows"
    with pytest.raises(ValueError, match=message):
        emc2_tf.EMC2Model(encoder=fixture.encoder, dataset_size=N, images=images,
                          finite_augmentations=K)
    model = emc2_tf.EMC2Model(encoder=fixture.encoder, dataset_size=N, images=fixture.table,
                              finite_augmentations=K, exact_ratio=True)
    assert model.images.shape[0] == N * K
    with pytest.raises(ValueError, match=message):
        model.set_image_table(images)
    with pytest.raises(ValueError, match="images holds 18 images but dataset_size=6"):
        emc2_tf.EMC2Model(encoder=fixture.encoder, dataset_size=N, images=fixture.table)


def test_arguments_config_and_missing_inputs_are_refused_in_one_line(fixture):
    """`finite_augmentations` is None or an integer ≥ 2, round-trips through
    `get_config` (the chains then have N·K rows); a training batch without
    `view_index` and a missing table for `exact_ratio` are refused in one line;
    a held-out batch needs no `view_index`; without K, `view_index` is ignored.

    Catches: K = 1 (no two different views) or a bool accepted, K lost when a
    `.keras` file is loaded (chains of N rows), a finite model silently treating
    a batch without `view_index` as one chain per image.
    """
    for bad in (1, 0, True, 2.0, "3"):
        with pytest.raises(ValueError, match="finite_augmentations must be None"):
            emc2_tf.EMC2Model(encoder=fixture.encoder, dataset_size=N,
                              finite_augmentations=bad)
    model = emc2_tf.EMC2Model(encoder=fixture.encoder, dataset_size=N, finite_augmentations=K,
                              out_of_batch="drop")
    config = model.get_config()
    assert config["finite_augmentations"] == K
    restored = emc2_tf.EMC2Model.from_config(config)
    assert restored.finite_augmentations == K and restored.chain_log_score.shape == (N * K,)
    assert emc2_tf.EMC2Model(encoder=fixture.encoder, dataset_size=N).get_config()[
        "finite_augmentations"] is None

    index = tf.constant(fixture.index)
    embeddings = fixture.encoder(np.concatenate([fixture.view1, fixture.view2]))
    with pytest.raises(ValueError, match=r"carry 'view_index' \[B, 2\]"):
        model.contrastive_loss(index, embeddings)
    loss, _ = model.contrastive_loss(index, embeddings, training=False)  # held out: fine
    assert np.isfinite(float(loss))

    exact = emc2_tf.EMC2Model(encoder=fixture.encoder, dataset_size=N, finite_augmentations=K,
                              exact_ratio=True)
    exact.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"stored-view table \[N·K, H, W, C\] = \[18, H, W, C\]"):
        exact.fit(_finite_dataset(fixture.table, 2, B, seed=0), epochs=1, verbose=0)

    # Without K a view_index is ignored: the same loss as without it.
    plain = emc2_tf.EMC2Model(encoder=fixture.encoder, dataset_size=N, out_of_batch="drop",
                              seed=0)
    plain.random_uniform = lambda shape: tf.constant(fixture.uniforms)
    with_view = plain.contrastive_loss(index, embeddings,
                                       view_index=tf.constant(fixture.view_index))[0]
    plain.chain_index.assign(np.full(N, -1, np.int32))
    plain.chain_log_score.assign(np.full(N, -np.inf, np.float32))
    assert float(with_view) == float(plain.contrastive_loss(index, embeddings)[0])


if __name__ == "__main__":
    import pytest

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
