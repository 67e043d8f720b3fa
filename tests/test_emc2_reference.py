"""EMC² pinned to plain float64 references, draw for draw (algorithms.md §2).

The sampler (`mh_scan`) against a sequential NumPy loop; `EMC2Model.contrastive_loss`
(value, gradient with respect to the encoder weights, written-back chains,
logged scalars) against a float64 reference of the algorithm with the same
MH draws; `out_of_batch="drop"` against the official `main_mcmc` estimator;
XLA against eager. `model.random_uniform(shape)` is the one source of MH
draws, so each test replaces it with fixed draws of shape `[2, 2B, b]`.
"""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf
from emc2_tf.samplers import candidate_mask, mh_scan

import emc2_reference as ref
from helpers import embedding_images, frozen_encoder

N, B, TAU = 12, 6, 0.25


def _scan_inputs(seed, batch_index, view_logits_differ=True):
    rng = np.random.default_rng(seed)
    b = len(batch_index)
    logits = rng.normal(scale=3.0, size=(2, b, 2 * b)).astype(np.float32)
    if not view_logits_differ:
        logits[1] = logits[0]
    log_u = np.log(rng.random((2, 2 * b, b))).astype(np.float32)
    return logits, log_u


# Chains: 0 empty (−inf), 1 sticky (a stale score no candidate beats),
# 2..5 on stored out-of-batch negatives with ordinary scores.
INITIAL = np.array([-np.inf, 1e3, 0.5, -1.0, 2.0, 0.0], np.float32)


#: The scans compared with the reference; "blocked" runs with blocks of 5.
SCANS = ["sequential", "parallel", "blocked"]


@pytest.fixture(autouse=True)
def small_scan_blocks(monkeypatch):
    """Blocks of 5 candidates, so the blocked scan of these small batches crosses
    several blocks and pads the last one."""
    from emc2_tf.samplers import metropolis_hastings

    monkeypatch.setattr(metropolis_hastings, "SCAN_BLOCK_SIZE", 5)


@pytest.mark.parametrize("batch_index", [[0, 1, 2, 3, 4, 5], [0, 1, 2, 1, 4, 5]],
                         ids=["distinct", "repeated-image"])
@pytest.mark.parametrize("burn_in", [5, 0, 3, 9])
@pytest.mark.parametrize("refresh", [False, True])
@pytest.mark.parametrize("view_logits_differ", [True, False])
@pytest.mark.parametrize("scan", SCANS)
def test_scan_equals_sequential_reference_draw_for_draw(batch_index, burn_in, refresh,
                                                        view_logits_differ, scan):
    """`mh_scan` = the one-chain-at-a-time loop: states, states before each step,
    accept decisions and probabilities, recorded steps, final state and score.

    Catches: recording every step (no burn-in) or counting burn-in in raw
    columns, pass 1 anchoring view 1 again, a refresh scored against the
    view-1 anchor or skipped, an accept test with the wrong sign or a
    stale score carried wrongly between passes, self/positive proposed,
    waste-recycling probabilities from the score after the step; in the
    parallel (pointer-doubling) scan: a wrong first-acceptance pointer, too
    few doubling rounds, an off-by-one in "last visited node ≤ k"; in the
    blocked scan (blocks of 5 of 12 candidates, the last padded): a block
    not starting from the previous block's last state and score, states
    without their block's offset.
    """
    index = np.array(batch_index, np.int32)
    logits, log_u = _scan_inputs(len(batch_index) + burn_in, index, view_logits_differ)
    out_of_batch = np.random.default_rng(7).normal(size=(2, len(index))).astype(np.float32)
    valid = ref.valid_candidates(index)
    got = mh_scan(tf.constant(logits), candidate_mask(tf.constant(index)), tf.constant(log_u),
                  tf.constant(INITIAL), burn_in, refresh_log_score_between_passes=refresh,
                  out_of_batch_logits=tf.constant(out_of_batch), scan=scan)
    want = ref.reference_scan(logits, valid, log_u, INITIAL, burn_in, refresh, out_of_batch)
    np.testing.assert_array_equal(got.valid.numpy(), valid)
    for name in ("states", "previous_states", "accepted", "recorded"):
        np.testing.assert_array_equal(getattr(got, name).numpy(), getattr(want, name), err_msg=name)
    np.testing.assert_allclose(got.accept_probability.numpy(), want.accept_probability,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got.final_state.numpy(), want.final_state)
    np.testing.assert_allclose(got.final_log_score.numpy(), want.final_log_score, rtol=1e-6)
    # The cases cover what they claim: an empty chain accepted, and (without refresh)
    # the sticky one never did, so it stayed on its out-of-batch state.
    assert want.accepted[:, 0].any()
    if not refresh:
        assert not want.accepted[:, 1].any() and (want.states[:, 1] == ref.OUT_OF_BATCH).all()


@pytest.mark.parametrize("scan", SCANS)
def test_scan_follows_a_chain_that_accepts_every_candidate(scan):
    """Rising logits and log U = −50: chain 0 accepts every valid candidate of both
    passes, the longest path a pass can take (2B − 2 = 22 hops at B = 12: one
    doubling level fewer reaches only 15).

    Catches: too few pointer-doubling rounds in the parallel scan (the random
    cases above never take more than 7 hops in a pass).
    """
    b = 12
    index = np.arange(b, dtype=np.int32)
    logits = np.broadcast_to(np.arange(2 * b, dtype=np.float32), (2, b, 2 * b)).copy()
    log_u = np.full((2, 2 * b, b), -50.0, np.float32)
    initial = np.full(b, -np.inf, np.float32)
    got = mh_scan(tf.constant(logits), candidate_mask(tf.constant(index)), tf.constant(log_u),
                  tf.constant(initial), b - 1, scan=scan)
    want = ref.reference_scan(logits, ref.valid_candidates(index), log_u, initial, b - 1)
    assert want.accepted[0, 0].sum() == 2 * b - 2  # every valid candidate of pass 0
    np.testing.assert_array_equal(got.states.numpy(), want.states)
    np.testing.assert_array_equal(got.accepted.numpy(), want.accepted)


def test_auto_scan_picks_by_device_and_size(monkeypatch):
    """`scan="auto"`: parallel up to B = 32 on a CPU (measured faster there), up to
    the 2^26-element bound on a GPU, sequential beyond or with an unknown B.

    Catches: "auto" building the O(B³) comparison at a large B (memory), or
    never taking the parallel scan where it is the faster one.
    """
    from emc2_tf.samplers import metropolis_hastings as mh

    def picked(b, static=True):
        valid = tf.TensorSpec([b if static else None, 2 * b], tf.bool)
        return mh._pass_function("auto", valid).__name__

    assert [picked(b) for b in (8, 32, 64)] == ["_parallel_pass", "_parallel_pass",
                                                "_sequential_pass"]
    assert picked(8, static=False) == "_sequential_pass"
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert [picked(b) for b in (64, 128, 256)] == ["_parallel_pass", "_parallel_pass",
                                                   "_sequential_pass"]
    with pytest.raises(ValueError,
                       match="scan must be one of auto, sequential, parallel, blocked"):
        mh._pass_function("fast", tf.TensorSpec([2, 4], tf.bool))


# ---- The model's loss against the float64 reference ------------------------------------


class _Fixture:
    """A tiny encoder (Flatten → Dense(3) → unit norm) and a batch with every kind of chain."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        keras.utils.set_random_seed(seed)
        self.encoder = keras.Sequential([
            keras.Input((2, 2, 1)), keras.layers.Flatten(), keras.layers.Dense(3),
            keras.layers.UnitNormalization()])
        self.images = rng.random((N, 2, 2, 1)).astype(np.float32)
        self.images[11] = self.images[3] + 0.01  # a near-duplicate of image 3
        self.index = np.array([3, 0, 5, 7, 5, 9], np.int32)  # image 5 twice
        noise = lambda: rng.normal(scale=0.1, size=(B, 2, 2, 1))  # noqa: E731
        self.view1 = (self.images[self.index] + noise()).astype(np.float32)
        self.view2 = (self.images[self.index] + noise()).astype(np.float32)
        # Chains: 3 → its near-duplicate 11 with a true, high score (sticky under exact
        # ratio); 0 empty; 5 stale but ordinary; 7 with an absurd stale score (sticky
        # without exact ratio); 9 on image 2.
        self.chain_index = np.full(N, -1, np.int32)
        self.chain_log_score = np.full(N, -np.inf, np.float32)
        for image, state, score in ((3, 11, 1.0 / TAU), (5, 8, 0.3), (7, 1, 1e3), (9, 2, -1.0)):
            self.chain_index[image], self.chain_log_score[image] = state, score
        self.uniforms = rng.random((2, 2 * B, B)).astype(np.float32)

    @property
    def params(self):
        kernel, bias = self.encoder.get_weights()
        return [kernel.astype(np.float64), bias.astype(np.float64)]

    def model(self, **options):
        # The reference's defaults, spelled out: the library's default variant
        # (drop + waste recycling since issue 11) is not the reference's.
        options = {"out_of_batch": "reencode", "waste_recycling": False, **options}
        model = emc2_tf.EMC2Model(encoder=self.encoder, dataset_size=N, images=self.images,
                                  temperature=TAU, seed=0, **options)
        model.chain_index.assign(self.chain_index)
        model.chain_log_score.assign(self.chain_log_score)
        uniforms = tf.constant(self.uniforms)

        def fixed_draws(shape):
            # The draws' contract (checked eagerly; under XLA asserts are dropped).
            tf.debugging.assert_equal(tf.cast(tf.stack(shape), tf.int32), [2, 2 * B, B])
            return uniforms

        model.random_uniform = fixed_draws
        return model

    def reference(self, params=None, decisions=None, **options):
        """The float64 step; `decisions`: a reference scan to reuse. The model's
        `scan` option (sequential or parallel) has one reference."""
        options = {k: v for k, v in options.items() if k != "scan"}
        return ref.emc2_step(self.params if params is None else params, self.images, self.index,
                             self.view1, self.view2, self.chain_index, self.chain_log_score,
                             self.uniforms, TAU, scan=decisions, **options)

    def model_step(self, model, jit_compile=False, graph=False):
        index = tf.constant(self.index)
        views = tf.constant(np.concatenate([self.view1, self.view2]))
        variables = self.encoder.trainable_variables

        def step():
            with tf.GradientTape() as tape:
                loss, scalars = model.contrastive_loss(index, self.encoder(views))
            return loss, scalars, tape.gradient(loss, variables)

        if jit_compile or graph:
            step = tf.function(step, jit_compile=jit_compile)
        loss, scalars, gradients = step()
        return (float(loss), {k: float(v) for k, v in scalars.items()},
                [g.numpy() for g in gradients])


OPTIONS = [
    dict(out_of_batch=mode, exact_ratio=exact, burn_in=burn_in, waste_recycling=recycle,
         scan=SCANS[(2 * exact + recycle) % 3] if burn_in is None else "sequential")
    for mode in ("reencode", "drop") for exact in (False, True)
    for burn_in in (None, 1) for recycle in (False, True)
]


@pytest.fixture(scope="module")
def fixture():
    return _Fixture()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(
    f"{k}={v}" for k, v in o.items()))
def test_loss_gradient_state_and_scalars_equal_the_float64_reference(fixture, options):
    """`contrastive_loss` = algorithms.md §2 in float64 NumPy, on the same draws.

    Checks the loss, its gradient with respect to the encoder weights (against
    central differences of the reference at fixed accept decisions), the
    written-back `chain_index`/`chain_log_score`, and the logged
    `acceptance_rate` and `out_of_batch_fraction` against counts from the
    reference scan.

    Catches: `stop_gradient` on the negatives (gradient through anchors
    only), the re-encoded out-of-batch negative replaced by zeros or left
    without gradient, out-of-batch steps added in "drop" mode or left out of
    its normaliser, `exact_ratio` using the stale stored score for the first
    pass, the refresh scored against the view-1 anchor, pass 1 anchoring
    view 1 again, no burn-in, waste recycling with the wrong weights, a
    write-back of the wrong rows or scores, `acceptance_rate` logged at half
    (or any other multiple of) its value.
    """
    model = fixture.model(**options)
    loss, scalars, gradients = fixture.model_step(model)
    want = fixture.reference(**options)
    assert loss == pytest.approx(want.loss, rel=1e-5, abs=1e-5)
    for got, expected in zip(gradients, ref.numeric_gradient(fixture, want.scan, options)):
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)

    scan = want.scan
    assert scalars["acceptance_rate"] == pytest.approx(
        scan.accepted.sum() / (2 * scan.valid.sum()), rel=1e-6)
    assert scalars["out_of_batch_fraction"] == pytest.approx((scan.final_state < 0).mean())
    candidates = np.concatenate([fixture.index, fixture.index])
    old = fixture.chain_index[fixture.index]
    new_index = np.where(scan.final_state >= 0, candidates[np.maximum(scan.final_state, 0)], old)
    chain_index, chain_log_score = model.chain_index.numpy(), model.chain_log_score.numpy()
    for row, image in enumerate(fixture.index):
        rows = np.flatnonzero(fixture.index == image)  # a repeated image: either row's result
        assert any(chain_index[image] == new_index[r] and chain_log_score[image] ==
                   pytest.approx(scan.final_log_score[r], rel=1e-5) for r in rows), image
    untouched = np.setdiff1d(np.arange(N), fixture.index)
    np.testing.assert_array_equal(chain_index[untouched], fixture.chain_index[untouched])


def test_the_fixture_exercises_every_kind_of_step(fixture):
    """The reference cases are not vacuous: recorded out-of-batch steps exist (so
    "reencode" and "drop" differ), waste recycling changes the loss, exact
    ratio changes the decisions, and the burn-in changes what is recorded."""
    base = fixture.reference()
    assert (base.scan.recorded & (base.scan.states < 0)).any()
    assert fixture.reference(out_of_batch="drop").loss != pytest.approx(base.loss, rel=1e-3)
    assert fixture.reference(waste_recycling=True).loss != pytest.approx(base.loss, rel=1e-3)
    assert (fixture.reference(exact_ratio=True).scan.accepted != base.scan.accepted).any()
    assert fixture.reference(burn_in=1).scan.recorded.sum() > base.scan.recorded.sum()


def test_drop_equals_the_official_main_mcmc_estimator():
    """`out_of_batch="drop"` at the default burn-in = the official `main_mcmc` estimator,
    normaliser included: value and gradient with respect to the views, within 1e-5.

    Catches: a normaliser that leaves out the dropped out-of-batch steps (it
    would divide by fewer steps than the official `2(B − 1) − P`), a
    different burn-in rule at the default, the positive term's scale.
    """
    rng = np.random.default_rng(3)
    b, n, dim, beta = 8, 20, 5, 1 / 0.07
    index = rng.choice(n, b, replace=False).astype(np.int32)
    views = rng.normal(size=(2 * b, dim))
    views /= np.linalg.norm(views, axis=1, keepdims=True)
    chain_index = rng.integers(0, n, n).astype(np.int32)
    chain_index[index[:2]] = -1  # two empty chains
    chain_log_score = (beta * rng.uniform(0.3, 1.0, n)).astype(np.float32)  # sticky-ish
    uniforms = rng.random((2, 2 * b, b)).astype(np.float32)

    model = emc2_tf.EMC2Model(encoder=keras.Sequential([keras.layers.Identity()]),
                              dataset_size=n, images=np.zeros((n, 1, 1, 1), np.float32),
                              temperature=0.07, out_of_batch="drop", waste_recycling=False)
    model.chain_index.assign(chain_index)
    model.chain_log_score.assign(chain_log_score)
    model.random_uniform = lambda shape: tf.constant(uniforms)
    embeddings = tf.constant(views.astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        loss, _ = model.contrastive_loss(tf.constant(index), embeddings)
    gradient = tape.gradient(loss, embeddings).numpy()

    official, coefficients = ref.official_main_mcmc_loss(
        embeddings.numpy(), index, chain_index, chain_log_score.astype(np.float64), uniforms, beta)
    official_gradient = (coefficients + coefficients.T) @ embeddings.numpy().astype(np.float64)
    assert float(loss) == pytest.approx(official, rel=1e-5)
    np.testing.assert_allclose(gradient, official_gradient, rtol=1e-5,
                               atol=1e-5 * np.abs(official_gradient).max())
    # Not vacuous: some recorded steps sat on an out-of-batch state and were dropped.
    reencode = ref.reference_scan(
        beta * np.stack([views[:b] @ views.T, views[b:] @ views.T]),
        ref.valid_candidates(index), np.log(uniforms),
        np.where(chain_index[index] >= 0, chain_log_score[index], -np.inf), b - 1)
    assert (reencode.recorded & (reencode.states < 0)).any()


@pytest.mark.parametrize("options", [
    dict(scan="sequential"), dict(scan="parallel"), dict(scan="blocked"),
    dict(exact_ratio=True, waste_recycling=True, scan="parallel"),
    dict(out_of_batch="drop", burn_in=1, scan="sequential")],
    ids=["sequential", "parallel", "blocked", "parallel-exact-recycling",
         "sequential-drop-burn1"])
def test_xla_equals_eager_on_the_same_draws(fixture, options):
    """The step compiled with XLA (`jit_compile=True`) = eager, on the same MH draws:
    loss, gradients, written-back chains and scalars.

    Catches: anything XLA compiles differently (a dropped assert that guarded
    a gather, a different `tf.scan` lowering, float reassociation large
    enough to flip an accept decision). XLA draws a different Philox stream
    than the CPU kernel, so the draws are fixed here.
    """
    results = []
    for jit_compile in (False, True):
        model = fixture.model(**options)
        loss, scalars, gradients = fixture.model_step(model, jit_compile=jit_compile)
        results.append((loss, scalars, gradients, model.chain_index.numpy(),
                        model.chain_log_score.numpy()))
    (loss_e, scalars_e, grads_e, index_e, score_e), (loss_x, scalars_x, grads_x, index_x,
                                                      score_x) = results
    assert loss_x == pytest.approx(loss_e, rel=1e-5)
    assert scalars_x == pytest.approx(scalars_e)
    for got, expected in zip(grads_x, grads_e):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(index_x, index_e)
    np.testing.assert_allclose(score_x, score_e, rtol=1e-5)
    assert loss_e == pytest.approx(fixture.reference(**options).loss, rel=1e-5)


@pytest.mark.parametrize("options", [
    dict(scan="sequential"), dict(scan="parallel", exact_ratio=True, waste_recycling=True),
    dict(scan="auto", out_of_batch="drop", waste_recycling=True)],
    ids=["sequential", "parallel-exact-recycling", "auto-drop-recycling"])
def test_graph_step_with_the_xla_compiled_scan_equals_eager(fixture, options, monkeypatch):
    """The step as a plain `tf.function` (a graph: the scan runs in a nested XLA
    function, `scan_compile="auto"`) = eager on the same MH draws: written-back
    chains bit for bit, loss and gradients to float rounding, loss = the float64
    reference; and the scan was compiled.

    Catches: the compiled scan deciding differently from the eager one inside
    the model's step (written-back chains differ), the default not compiling it.
    """
    from emc2_tf.samplers import metropolis_hastings as mh

    monkeypatch.setattr(mh, "_XLA_PROBES", {})
    results = []
    for graph in (False, True):
        model = fixture.model(**options)
        loss, scalars, gradients = fixture.model_step(model, graph=graph)
        results.append((loss, scalars, gradients, model.chain_index.numpy(),
                        model.chain_log_score.numpy()))
    assert list(mh._XLA_PROBES.values()) == [True]
    (loss_e, scalars_e, grads_e, index_e, score_e), (loss_g, scalars_g, grads_g, index_g,
                                                      score_g) = results
    np.testing.assert_array_equal(index_g, index_e)
    np.testing.assert_array_equal(score_g, score_e)
    assert scalars_g == scalars_e
    assert loss_g == pytest.approx(loss_e, rel=1e-6)
    for got, expected in zip(grads_g, grads_e):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert loss_e == pytest.approx(fixture.reference(**options).loss, rel=1e-5)


class _PositionZeroCase:
    """Hand-set embeddings where two chains end the step on candidate position 0.

    B = 4 images `[4, 1, 2, 3]`, D = 8, τ = 0.1, every MH uniform 0.5.
    Position 0 (view 1 of image 4) is `e0`; the other view-1s are `e4..e6`
    and view 2 of image 4 is `e7` (similarity 0 to everything); view 2 of
    images 1..3 is `cos 60° e0 + sin 60° e_j`. So in pass 1 the chains of
    images 1 and 2 accept position 0 first (β s = 5 against their pass-0
    score 0) and then reject every later candidate (α ≤ e^(−2.5) < 0.5): the
    step ends on position 0. Image 4's chain sits on data-set image 0 and
    image 3's on image 9, both with a score of 1e3 that nothing beats: they
    end out of the batch and keep their negatives.
    """

    index = np.array([4, 1, 2, 3], np.int32)
    num_images, dim, temperature = 10, 8, 0.1

    def __init__(self):
        e = np.eye(self.dim)
        cos, sin = np.cos(np.pi / 3), np.sin(np.pi / 3)
        self.views = np.stack([e[0], e[4], e[5], e[6], e[7],
                               *[cos * e[0] + sin * e[j] for j in (1, 2, 3)]])
        self.chain_index = np.full(self.num_images, -1, np.int32)
        self.chain_log_score = np.full(self.num_images, -np.inf, np.float32)
        for image, state, score in ((4, 0, 1e3), (1, 7, 0.0), (3, 9, 1e3)):
            self.chain_index[image], self.chain_log_score[image] = state, score
        # The stored negatives' embeddings (re-encoded by "reencode"): image i is e_(i mod 8).
        self.stored_embeddings = e[np.arange(self.num_images) % self.dim]
        self.uniforms = np.full((2, 8, 4), 0.5, np.float32)

    def model_step(self, options):
        """`(loss, scalars, chain_index, chain_log_score)` of `contrastive_loss` on this batch."""
        model = emc2_tf.EMC2Model(encoder=frozen_encoder(self.dim), dataset_size=self.num_images,
                                  images=embedding_images(self.stored_embeddings),
                                  temperature=self.temperature, seed=0,
                                  **options)
        model.chain_index.assign(self.chain_index)
        model.chain_log_score.assign(self.chain_log_score)
        model.random_uniform = lambda shape: tf.constant(self.uniforms)
        loss, scalars = model.contrastive_loss(tf.constant(self.index),
                                               tf.constant(self.views, tf.float32))
        return (float(loss), {k: float(v) for k, v in scalars.items()},
                model.chain_index.numpy(), model.chain_log_score.numpy())

    def reference(self, options):
        """`(loss, scan)` of the float64 reference (stored negatives re-encoded from the table)."""
        beta, b = 1.0 / self.temperature, len(self.index)
        logits = beta * self.views @ self.views.T
        anchor_logits = np.stack([logits[:b], logits[b:]])
        old = self.chain_index[self.index]
        stored = self.stored_embeddings[np.maximum(old, 0)]
        out_of_batch_logits = beta * np.stack([(self.views[:b] * stored).sum(1),
                                               (self.views[b:] * stored).sum(1)])
        initial = np.where(old >= 0, self.chain_log_score[self.index], -np.inf)
        scan = ref.reference_scan(anchor_logits, ref.valid_candidates(self.index),
                                  np.log(self.uniforms), initial, b - 1)
        negative = ref.negative_term(anchor_logits, out_of_batch_logits, scan, old >= 0,
                                     options["out_of_batch"], options["waste_recycling"])
        positive = beta * (self.views[:b] * self.views[b:]).sum(1)
        return negative.mean() - positive.mean(), scan


@pytest.mark.parametrize("options", [
    dict(out_of_batch="drop", waste_recycling=True),
    dict(out_of_batch="reencode", waste_recycling=False)], ids=["drop-recycling", "reencode"])
def test_chains_ending_on_candidate_position_0_are_in_batch_and_written_back(options):
    """Two of four chains end the step on candidate position 0 (view 1 of the
    batch's first image, data-set image 4); one out-of-batch chain sits on
    data-set image 0. Pins `out_of_batch_fraction` = 2/4 exactly, the
    written-back `chain_index` (images 1 and 2 → 4; 3 and 4 keep 9 and 0),
    the scores, and the loss against the float64 reference.

    Catches (issue 19, a mutant that survived the suite): position 0 counted
    as out of batch (`final_state < 0` → `<= 0`: fraction 1.0), a write-back
    that skips it (`final_state >= 0` → `> 0`: images 1 and 2 keep 7 and −1),
    steps on position 0 treated as out-of-batch in the estimator
    (`states >= 0` → `> 0` in `emc2_negative_term` or in the value weights),
    and a stored negative that is data-set image 0 taken for an empty chain
    (`old_index >= 0` → `> 0`).
    """
    case = _PositionZeroCase()
    loss, scalars, chain_index, chain_log_score = case.model_step(options)
    want_loss, scan = case.reference(options)
    # The case is what it claims: chains 1 and 2 end on position 0, 0 and 3 out of batch.
    np.testing.assert_array_equal(scan.final_state, [ref.OUT_OF_BATCH, 0, 0, ref.OUT_OF_BATCH])
    assert scalars["out_of_batch_fraction"] == 0.5
    expected_index = case.chain_index.copy()
    expected_index[[1, 2]] = 4
    np.testing.assert_array_equal(chain_index, expected_index)
    np.testing.assert_array_equal(chain_index[[4, 3]], [0, 9])
    np.testing.assert_allclose(chain_log_score[[1, 2]], 5.0, rtol=1e-6)
    np.testing.assert_array_equal(chain_log_score[[3, 4]], [1e3, 1e3])
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-5)
    assert scalars["acceptance_rate"] == pytest.approx(
        scan.accepted.sum() / (2 * scan.valid.sum()), rel=1e-6)


def test_out_of_batch_mode_is_checked():
    with pytest.raises(ValueError, match="out_of_batch must be one of reencode, drop"):
        emc2_tf.EMC2Model(encoder=keras.Sequential([keras.layers.Identity()]), dataset_size=4,
                          images=np.zeros((4, 1, 1, 1), np.float32), out_of_batch="keep")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
