"""CacheModel (the embedding-cache baseline) against a float64 transcription of the official code."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf
from emc2_tf.models.cache import CacheModel

from helpers import ROOT, embedding_images, fixed_embeddings, frozen_encoder, run_python

WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")


def official_gumbel_gradients(anchors, positives, anchor_image, cache, row_image, beta,
                              exponential_draws, negatives_now):
    """The official `gumbel_max_sampling_distributed` + `gumbel_max_sampling_losses`
    (amazon-science/contrastive_emc2, cache.py and main_gumbel.py; one rank,
    alpha = 1), in float64 NumPy.

    Args:
        anchors: `[A, D]` the anchors (official `aug_image_features`).
        positives: `[A, D]` each anchor's positive (official: the raw image's
            embedding; here the other view).
        anchor_image: `[A]` each anchor's image; `row_image`: `[R]` each cache row's.
        cache: `[R, D]` the cache after the batch's greedy write.
        exponential_draws: `[M, A, R]` the Exp(1) draws (official `.exponential_()`);
            `−log E` is the Gumbel noise.
        negatives_now: `[R, D]` every row re-encoded with the current weights.

    Returns `(rows [A, M], grad_anchors, grad_positives, grad_negatives_now [R, D],
    positive_weight [A], cumulative [A, M])` of the official backward losses (their sum
    over anchors divided by A = global_pos_batch · transform_batch_size).

    One correction: the official removes the own image's rows from Z with
    `normalizing_sumexp[pos_idx] -= exp(...)`, an indexed `-=` whose repeated
    indices (the K rows of a finite-augmentation image) keep only one of the K
    subtractions; here all K own rows leave Z (with K = 1, identical).
    """
    num_draws, num_anchors, num_rows = exponential_draws.shape
    inner = anchors @ cache.T
    shift = np.max(beta * inner, axis=1)
    sumexp = np.sum(np.exp(beta * inner - shift[:, None]), axis=1)
    score = beta * inner[None] - np.log(exponential_draws)
    own_anchor, own_row = np.where(anchor_image[:, None] == row_image[None, :])
    score[:, own_anchor, own_row] += -np.inf
    np.subtract.at(sumexp, own_anchor, np.exp(beta * inner[own_anchor, own_row]
                                             - shift[own_anchor]))
    positive_scores = np.sum(anchors * anchors, axis=1)
    sumexp += np.exp(beta * positive_scores - shift)
    rows = np.zeros((num_draws, num_anchors), np.int64)
    sample_scores = np.zeros((num_draws, num_anchors))
    for j in range(num_draws):
        rows[j] = np.argmax(score[j], axis=-1)
        sample_scores[j] = inner[np.arange(num_anchors), rows[j]]
        score[:, np.arange(num_anchors), rows[j]] += -np.inf
    rows, sample_scores = rows.T, sample_scores.T
    exp_positive = np.exp(beta * positive_scores - shift)
    sample_exp = np.exp(beta * sample_scores - shift[:, None])
    cumulative = np.cumsum(np.concatenate([exp_positive[:, None], sample_exp], axis=1), axis=1)
    cumulative = (cumulative / sumexp[:, None])[:, :-1]
    positive_weight = cumulative[:, 0]

    scale = beta / num_anchors
    # backward_losses: −β Σ ⟨x_i, (1 − π⁺) a_i⟩; stage 2: β Σ ⟨n_ij, (1 − c_ij) sg(a_i)⟩ / M;
    # stage 3: β Σ ⟨a_i, sg((1 − c_ij) n_ij)⟩ / M; all / A.
    grad_anchors = -scale * (1 - positive_weight)[:, None] * positives
    grad_positives = -scale * (1 - positive_weight)[:, None] * anchors
    grad_negatives = np.zeros_like(negatives_now)
    for i in range(num_anchors):
        for j in range(num_draws):
            weight = scale * (1 - cumulative[i, j]) / num_draws
            grad_anchors[i] += weight * negatives_now[rows[i, j]]
            grad_negatives[rows[i, j]] += weight * anchors[i]
    return rows, grad_anchors, grad_positives, grad_negatives, positive_weight, cumulative


def surrogate_value(anchors, positives, negatives, positive_weight, cumulative, beta):
    """L̂ = mean_a [−β (1 − π⁺) s(a, p) + (β/M) Σ_j (1 − c_j) s(a, n_j)], float64."""
    negative = np.einsum("ad,amd->am", anchors, negatives)
    return float(np.mean(-beta * (1 - positive_weight) * np.sum(anchors * positives, axis=1)
                         + beta * np.mean((1 - cumulative) * negative, axis=1)))


def _lookup_encoder(model, current):
    """Makes `model` re-encode row r as `current[r]` (a watched variable) and records
    the rows of each call."""
    calls = []

    def encode_rows(rows, training):
        calls.append((np.asarray(rows), training))
        return tf.gather(current, rows)

    model._encode_rows = encode_rows
    return calls


def _fixed_uniforms(model, uniforms):
    model.random_uniform = lambda shape: tf.constant(uniforms, tf.float32)


@pytest.mark.parametrize("finite", [2, None])
def test_gradient_and_draws_equal_the_official_code(finite):
    """The gradient w.r.t. the batch's embeddings and the re-encoded negatives, and
    the drawn rows, equal the official code's (float64 transcription above) on the
    same embeddings, cache and uniforms; the loss value is the surrogate's.

    Catches: the own image's rows left in Z or drawable (all K of them with finite
    augmentations), a missing (1 − π⁺) or (1 − c) weight, c without the positive's
    share or including the draw's own share, a missing / M, the positive's softmax
    term not s(a, a), a sampler reading the cache before the batch's greedy write
    (or writing the wrong rows: image·K + view_index), draws with replacement, and
    a gradient through π⁺, c or the sampling scores.
    """
    n, dim, beta, draws = 6, 4, 5.0, 2
    k = finite or 1
    rows_total = n * k
    rng = np.random.default_rng(1)
    images = embedding_images(fixed_embeddings(rows_total, dim, seed=3))
    model = CacheModel(frozen_encoder(dim), n, images=images, temperature=1 / beta,
                       cache_negatives=draws, finite_augmentations=finite, seed=0)
    model.cache_embeddings.assign(fixed_embeddings(rows_total, dim, seed=2).astype(np.float32))
    model.cache_written_step.assign(np.zeros(rows_total, np.int32))
    current_np = fixed_embeddings(rows_total, dim, seed=3).astype(np.float32)
    current = tf.Variable(current_np)
    calls = _lookup_encoder(model, current)
    index = np.array([0, 2, 5])
    view_index = np.array([[0, 1], [1, 0], [1, 0]]) if finite else None
    embeddings_np = fixed_embeddings(6, dim, seed=4).astype(np.float32)
    uniforms = rng.random((draws, 6, rows_total)).astype(np.float32)
    _fixed_uniforms(model, uniforms)

    embeddings = tf.constant(embeddings_np)
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        loss, scalars = model.contrastive_loss(
            tf.constant(index, tf.int32), embeddings, training=True,
            view_index=None if view_index is None else tf.constant(view_index, tf.int32))
    grad_embeddings, grad_current = tape.gradient(loss, [embeddings, current])
    grad_current = tf.convert_to_tensor(grad_current)

    # The official greedy write, then the official step.
    z = embeddings_np.astype(np.float64)
    anchors = z
    positives = np.concatenate([z[3:], z[:3]])
    cache = model.cache_embeddings.numpy().astype(np.float64)  # after our write
    expected_cache = fixed_embeddings(rows_total, dim, seed=2).astype(np.float32).astype(
        np.float64)
    if finite:
        expected_cache[np.concatenate([index * k + view_index[:, 0],
                                       index * k + view_index[:, 1]])] = z
    else:
        expected_cache[index] = current_np[index]
    np.testing.assert_array_equal(cache, expected_cache)
    rows, g_anchor, g_positive, g_negative, weight, cumulative = official_gumbel_gradients(
        anchors, positives, np.concatenate([index, index]), expected_cache,
        np.arange(rows_total) // k, beta, -np.log(uniforms.astype(np.float64)),
        current_np.astype(np.float64))
    g_embeddings = g_anchor + np.concatenate([g_positive[3:], g_positive[:3]])

    negative_calls = [rows for rows, training in calls if training]
    np.testing.assert_array_equal(negative_calls[-1].reshape(6, draws), rows)
    assert not np.any(rows // k == np.concatenate([index, index])[:, None])
    np.testing.assert_allclose(grad_embeddings.numpy(), g_embeddings, atol=1e-5)
    np.testing.assert_allclose(grad_current.numpy(), g_negative, atol=1e-5)
    assert np.abs(g_negative).sum() > 0.1 and np.abs(g_embeddings).sum() > 0.1
    value = surrogate_value(anchors, positives, current_np[rows].astype(np.float64),
                            weight, cumulative, beta)
    assert float(loss) == pytest.approx(value, abs=1e-5)
    assert float(scalars["positive_weight"]) == pytest.approx(weight.mean(), abs=1e-6)
    assert float(scalars["cache_staleness"]) == 0.0


def test_draws_follow_the_softmax_over_other_images_rows():
    """Gumbel-max top-1 from the model is the exact softmax over the rows of other
    images: 2 × 2000 anchors of image 0 (its two stored views), one row of another
    image dominant (p ≈ 0.5); frequencies within 4.5σ of the exact probabilities,
    image 0's rows never drawn.

    Catches: the own image's other view drawable (the mask by row instead of by
    image, row // K), Gumbel noise of the wrong sign or scale (−log U instead of
    −log(−log U)), a draw that is not the softmax (plain argmax).
    """
    n, k, dim, beta, copies = 8, 2, 3, 5.0, 2000
    rows_total = n * k
    table = fixed_embeddings(rows_total, dim, seed=5)
    table[9] = table[0] + table[1]  # image 4's view 1: near both anchors
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    images = embedding_images(table)
    model = CacheModel(frozen_encoder(dim), n, images=images, temperature=1 / beta,
                       finite_augmentations=k, seed=0)
    model.fill_cache()
    recorded = []
    encode = model._encode_rows
    model._encode_rows = lambda rows, training: (recorded.append(np.asarray(rows)),
                                                 encode(rows, training))[1]
    index = tf.zeros([copies], tf.int32)
    views = tf.constant(np.stack([images[0]] * copies))
    other = tf.constant(np.stack([images[1]] * copies))
    embeddings = tf.cast(model.encoder(tf.concat([views, other], 0)), tf.float32)
    model.contrastive_loss(index, embeddings, training=True,
                           view_index=tf.constant([[0, 1]] * copies, tf.int32))
    drawn = recorded[-1].reshape(2, copies)
    cache = model.cache_embeddings.numpy().astype(np.float64)
    for view in (0, 1):
        logits = beta * cache @ cache[view]
        logits[:k] = -np.inf
        p = np.exp(logits - logits.max())
        p /= p.sum()
        assert p.max() > 0.25  # far from uniform (1/14)
        frequency = np.bincount(drawn[view], minlength=rows_total) / copies
        assert frequency[:k].sum() == 0
        bound = 4.5 * np.sqrt(p * (1 - p) / copies) + 1e-3
        assert np.all(np.abs(frequency - p) <= bound), (view, frequency, p)


def _dense_encoder(shape, dim=4, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input(shape), keras.layers.Flatten(),
                             keras.layers.Dense(dim), keras.layers.UnitNormalization()])


@pytest.mark.parametrize("chunk", [1024, 3])
def test_step_writes_the_batch_and_refreshes_the_stalest_rows(chunk, monkeypatch):
    """After one training step: the batch's rows hold the embeddings of the step's
    weights (stamped with the step), the ⌊ρ·R⌋ = 4 stalest other rows hold the
    updated weights' embeddings (stamped step + 1), every other row is untouched,
    `cache_step` advanced by one, and `cache_staleness` is the sampled rows' mean age.

    Catches: no greedy write, a refresh of the freshest or of random rows, a refresh
    with the weights before the update, rows refreshed twice or not stamped, a
    staleness measured after the write-back or from the wrong rows; refreshing in
    chunks of 3 (the 4 rows as 2 chunks, the last padded) changes nothing.
    """
    from emc2_tf.models import cache

    monkeypatch.setattr(cache, "REFRESH_CHUNK_SIZE", chunk)  # 3: two chunks, one padded
    n, rng = 16, np.random.default_rng(6)
    images = rng.random((n, 4, 4, 1)).astype(np.float32)
    model = CacheModel(_dense_encoder((4, 4, 1)), n, images=images, temperature=0.2,
                       cache_refresh=0.25, cache_negatives=2, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.5), run_eagerly=True)
    model.fill_cache()
    stamps = rng.permutation(n).astype(np.int32)  # 0..15, distinct
    model.cache_written_step.assign(stamps)
    model.cache_step.assign(20)
    before = model.cache_embeddings.numpy()
    index = np.array([3, 7])
    recorded = []
    encode = model._encode_rows
    model._encode_rows = lambda rows, training: (
        recorded.append(np.asarray(rows)) if training else None, encode(rows, training))[1]
    old_embeddings = model.encoder(images[index], training=False).numpy()
    batch = {"index": tf.constant(index, tf.int32),
             "view1": tf.constant(images[index]), "view2": tf.constant(images[index][:, ::-1])}
    logs = model.train_step(batch)
    new_embeddings = model.encoder(images, training=False).numpy()
    after = model.cache_embeddings.numpy()
    after_stamps = model.cache_written_step.numpy()

    others = np.setdiff1d(np.arange(n), index)
    stalest = others[np.argsort(stamps[others])[:4]]
    untouched = np.setdiff1d(others, stalest)
    np.testing.assert_allclose(after[index], old_embeddings, atol=1e-6)
    np.testing.assert_allclose(after[stalest], new_embeddings[stalest], atol=1e-6)
    assert np.abs(new_embeddings[stalest] - before[stalest]).max() > 1e-3  # weights moved
    np.testing.assert_array_equal(after[untouched], before[untouched])
    np.testing.assert_array_equal(after_stamps[index], [20, 20])
    np.testing.assert_array_equal(after_stamps[stalest], [21] * 4)
    np.testing.assert_array_equal(after_stamps[untouched], stamps[untouched])
    assert int(model.cache_step.numpy()) == 21
    drawn = recorded[-1]
    stamps_at_draw = stamps.copy()
    stamps_at_draw[index] = 20
    assert float(logs["cache_staleness"]) == pytest.approx(
        np.mean(20 - stamps_at_draw[drawn]), abs=1e-5)


def _expected_write_steps(batches, rows, refresh):
    """`cache_written_step` after `fill_cache` and one step per batch (float64-free
    NumPy): step t writes its batch's rows with t, then the `refresh` rows with the
    oldest write (ties: lowest row) with t + 1."""
    written = np.zeros(rows, np.int64)
    for step, index in enumerate(batches):
        written[index] = step
        stalest = np.lexsort((np.arange(rows), written))[:refresh]
        written[stalest] = step + 1
    return written


def test_two_replicas_keep_identical_tables_with_every_replicas_rows(tmp_path):
    """Three steps under MirroredStrategy (2 logical CPUs, `tests/distributed_worker.py`):
    every replica holds the same cache, and each row's write step is the NumPy
    replay's: both replicas' batch rows written at each step, then the ⌊0.1·64⌋ = 6
    stalest rows refreshed, split between the replicas.

    Catches: each replica writing only its own batch rows (diverging tables), the
    first replica's rows only (ONLY_FIRST_REPLICA without all-gather), replicas
    refreshing the same rows instead of splitting the stalest between them.
    """
    out = tmp_path / "mirrored.npz"
    result = run_python([WORKER, str(out), "--strategy=mirrored", "--method=cache",
                         "--temperature=0.2"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = dict(np.load(out))
    assert int(two["replicas"]) == 2 and np.isfinite(two["loss"])
    for key, copies in two.items():
        if key.endswith(".copies"):
            for copy in copies[1:]:
                np.testing.assert_array_equal(copy, copies[0], err_msg=key)
    # The worker's data: 64 random 4x4 images, batches of 16, seed 0, three steps.
    images = np.random.default_rng(0).random((64, 4, 4, 1)).astype(np.float32)
    dataset = emc2_tf.make_two_view_dataset(images, 16, augment=None, seed=0).take(3)
    batches = [batch["index"].numpy() for batch in dataset]
    (stamp_key,) = [key for key in two if key.endswith("cache_written_step")]
    (step_key,) = [key for key in two if key.endswith("cache_step")]
    np.testing.assert_array_equal(two[stamp_key], _expected_write_steps(batches, 64, 6))
    assert int(two[step_key]) == 3


def test_keras_file_round_trip_and_fit_loss_equals_float64_recomputation(tmp_path):
    """`fit` on a `make_two_view_dataset` (64 digits-size 8x8 images, B = 32, one
    step, fixed uniforms): it fills the cache with the initial weights, and its
    logged loss equals the float64 surrogate recomputed from those weights, the
    batch and the draws. Then `model.save` / `keras.models.load_model` keep the
    cache, its write steps, the step count and the config; the loaded model needs
    its image table again (one line).

    Catches: `fit` training on an empty cache (no fill), a loss that is not the
    surrogate, cache state missing from the .keras file, `images` saved in config.
    """
    n, batch_size, beta = 64, 32, 5.0
    rng = np.random.default_rng(7)
    images = (rng.integers(0, 17, (n, 8, 8, 1)) / 16).astype(np.float32)
    encoder = _dense_encoder((8, 8, 1), dim=8)
    initial = encoder(images).numpy().astype(np.float64)
    model = CacheModel(encoder, n, images=images, temperature=1 / beta, cache_refresh=0.25,
                       cache_negatives=3, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    uniforms = rng.random((3, 2 * batch_size, n)).astype(np.float32)
    _fixed_uniforms(model, uniforms)
    dataset = emc2_tf.make_two_view_dataset(images, batch_size, augment=None, seed=0)
    dataset.epoch_schedule.set_epoch(0)  # the epoch `fit` trains
    batch = next(iter(dataset))
    history = model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0)

    index = batch["index"].numpy()
    z = np.concatenate([initial[index], initial[index]])
    positives = np.concatenate([z[batch_size:], z[:batch_size]])
    rows, _, _, _, weight, cumulative = official_gumbel_gradients(
        z, positives, np.concatenate([index, index]), initial, np.arange(n), beta,
        -np.log(uniforms.astype(np.float64)), initial)
    value = surrogate_value(z, positives, initial[rows], weight, cumulative, beta)
    assert history.history["loss"][0] == pytest.approx(value, abs=2e-5)
    assert np.isfinite(value) and abs(value) > 0.1

    path = str(tmp_path / "cache.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, CacheModel) and loaded.images is None
    config = {key: value for key, value in model.get_config().items() if key != "encoder"}
    assert {key: value for key, value in loaded.get_config().items() if key != "encoder"} == (
        config) and "images" not in config and config["cache_negatives"] == 3
    for name in ("cache_embeddings", "cache_written_step", "cache_step"):
        np.testing.assert_array_equal(getattr(loaded, name).numpy(),
                                      getattr(model, name).numpy(), err_msg=name)
    assert int(loaded.cache_step.numpy()) == 1
    loaded.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="CacheModel needs `images`"):
        loaded.fit(dataset, epochs=1, verbose=0)


def test_evaluate_reads_the_cache_writes_nothing_and_compiles_with_xla():
    """Under `jit_compile=True` (Keras' "auto" on a GPU): one training step, then
    `evaluate` on a held-out batch twice. Both give the float64 surrogate computed
    from the cache, the `evaluation_uniform` draws, no excluded row (held-out indices
    own no cache row) and negatives encoded with the current weights; every weight,
    the cache and the training draws' seed state are unchanged.

    Catches: evaluation writing the batch into the cache (held-out images over
    training rows), excluding rows by the held-out indices, advancing the training
    draws, a value that changes between calls, a step XLA cannot compile.
    """
    n, batch_size, beta, draws = 32, 8, 5.0, 2
    rng = np.random.default_rng(8)
    images = (rng.integers(0, 256, (n, 8, 8, 1))).astype(np.uint8)
    held_out = (rng.integers(0, 256, (batch_size, 8, 8, 1)) / 255).astype(np.float32)
    model = CacheModel(_dense_encoder((8, 8, 1), dim=8), n, images=images,
                       temperature=1 / beta, cache_negatives=draws, seed=3)
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=True)
    model.fit(emc2_tf.make_two_view_dataset(images, batch_size, seed=0), epochs=1,
              steps_per_epoch=1, verbose=0)
    state = [np.array(weight.numpy()) for weight in model.weights]
    seed_state = np.array(model.seed_generator.state.numpy())
    index = np.arange(batch_size)
    batch = {"index": tf.constant(index, tf.int32), "view1": tf.constant(held_out),
             "view2": tf.constant(held_out[:, :, ::-1])}
    evaluations = [model.evaluate(tf.data.Dataset.from_tensors(batch), verbose=0,
                                  return_dict=True) for _ in range(2)]
    assert evaluations[0] == evaluations[1]
    for before, weight in zip(state, model.weights):
        np.testing.assert_array_equal(weight.numpy(), before, err_msg=weight.path)
    np.testing.assert_array_equal(model.seed_generator.state.numpy(), seed_state)

    encode = lambda x: model.encoder(x, training=False).numpy().astype(np.float64)  # noqa: E731
    z = np.concatenate([encode(held_out), encode(held_out[:, :, ::-1])])
    positives = np.concatenate([z[batch_size:], z[:batch_size]])
    # XLA's stateless Philox stream differs from TensorFlow's kernel: draw as the step did.
    uniforms = tf.function(lambda held_out_index: model.evaluation_uniform(
        held_out_index, [draws, 2, n, batch_size]), jit_compile=True)(
            tf.constant(index, tf.int32)).numpy()
    uniforms = np.transpose(uniforms, (0, 1, 3, 2)).reshape(draws, 2 * batch_size, n)
    rows, _, _, _, weight, cumulative = official_gumbel_gradients(
        z, positives, np.full(2 * batch_size, -1), model.cache_embeddings.numpy().astype(float),
        np.arange(n), beta, -np.log(uniforms.astype(np.float64)), encode(images / 255))
    value = surrogate_value(z, positives, encode(images / 255)[rows], weight, cumulative, beta)
    assert evaluations[0]["loss"] == pytest.approx(value, abs=2e-5)
    assert evaluations[0]["positive_weight"] == pytest.approx(weight.mean(), abs=1e-6)

@pytest.mark.parametrize("argument, value, message", [
    ("cache_refresh", 1.5, "cache_refresh must be a number in \\[0, 1\\]"),
    ("cache_refresh", "x", "cache_refresh must be a number in \\[0, 1\\]"),
    ("cache_negatives", 0, "cache_negatives must be an integer ≥ 1"),
    ("cache_negatives", 2.0, "cache_negatives must be an integer ≥ 1"),
    ("cache_negatives", 8, "cache_negatives must be at most the 7 cache rows"),
    ("finite_augmentations", 1, "finite_augmentations must be None .* or an integer ≥ 2"),
    ("images", np.zeros((9, 1, 1, 1), np.float32),
     "images holds 9 images but dataset_size=8; they must match"),
])
def test_bad_arguments_are_refused_in_one_line(argument, value, message):
    """Catches: an argument accepted that the estimator cannot honour (ρ outside
    [0, 1], M = 0 or more negatives than other images' rows, K = 1, an image table
    of the wrong row count) instead of a one-line error naming it."""
    options = {"images": np.zeros((8, 1, 1, 1), np.float32), argument: value}
    with pytest.raises(ValueError, match=message) as error:
        CacheModel(frozen_encoder(1), 8, **options)
    assert "\n" not in str(error.value)


def test_the_table_byte_limit_names_what_the_cache_needs():
    """A float32 table over `max_image_table_bytes` is refused in one line, at
    construction and by `set_image_table`, naming the limit, why the cache needs
    the table and its remedies (uint8, an ImageSource); the same images as uint8,
    a quarter of the size, fit under the limit.

    Catches: the cache's limit lost when its checks moved to `image_store`
    (`max_image_table_bytes` not passed on: an oversized table accepted), or its
    refusal offering EMC²'s remedy, out_of_batch='drop', which the cache has not.
    """
    floats = np.zeros((8, 1, 1, 4), np.float32)  # 128 bytes as float32, 32 as uint8
    with pytest.raises(ValueError, match=r"max_image_table_bytes=127 .*CacheModel encodes "
                                         r"every cache row.*uint8.*ImageSource") as error:
        CacheModel(frozen_encoder(4), 8, images=floats, max_image_table_bytes=127)
    assert "\n" not in str(error.value) and "out_of_batch" not in str(error.value)
    model = CacheModel(frozen_encoder(4), 8, images=emc2_tf.image_table(floats),
                       max_image_table_bytes=127)
    assert model.images.dtype == tf.uint8
    with pytest.raises(ValueError, match="max_image_table_bytes=127"):
        model.set_image_table(floats)


def test_finite_model_refuses_a_batch_without_view_index():
    """Catches: a finite-augmentation cache silently writing rows image·K + 0 for a
    batch without `view_index`; and an N-row table accepted with K set."""
    images = np.zeros((8, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"images holds 8 rows but finite_augmentations=2 "
                                         r"needs .* dataset_size·K = 8·2 = 16 rows"):
        CacheModel(frozen_encoder(1), 8, images=images, finite_augmentations=2)
    model = CacheModel(frozen_encoder(1), 8, images=np.zeros((16, 1, 1, 1), np.float32),
                       finite_augmentations=2)
    with pytest.raises(ValueError, match="needs batches with 'view_index'"):
        model.contrastive_loss(tf.constant([0, 1]), tf.ones([4, 1]), training=True)


def test_cli_trains_cache_with_its_flags(tmp_path):
    """`python -m trainers.train --method=cache --cache_negatives=2 --cache_refresh=0.25`
    (256 digits, one epoch of 4 steps): runs, records both flags, builds the model
    with them, and lowers the exact global contrastive loss (measured 6.19 → 5.70;
    with M = 2 negatives per anchor a short run's path is noisy, so only "it learns").

    Catches: the flags not reaching `CacheModel` (`method_arguments`), a cache run
    that fails in the trainer (no image table, fill or refresh failing under
    checkpoints and export), or one that does not learn.
    """
    from helpers import parse_summary

    args = ["-m", "trainers.train", "--method=cache", "--epochs=1", "--batch_size=64",
            "--train_size=256", "--eval_every=0", "--temperature=0.2", "--cache_negatives=2",
            "--cache_refresh=0.25", "--tensorboard_dir=", "--noexport",
            f"--checkpoint_dir={tmp_path / 'ck'}"]
    result = run_python(args, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    assert summary["method"] == "cache" and summary["global_step"] == 4
    assert summary["global_contrastive_loss"] < summary["initial_global_contrastive_loss"] - 0.05
    # The cache's own scalars reach the summary (a row sampled in step t ≤ 3 is ≤ 3 steps old).
    assert 0 < summary["positive_weight"] < 1 and 0 <= summary["cache_staleness"] <= 3
    flags_file = (tmp_path / "ck" / "flags.txt").read_text()
    assert "--cache_negatives=2" in flags_file and "--cache_refresh=0.25" in flags_file

    from absl import flags

    from trainers.common import build_run
    from trainers.run_flags import define_train_flags

    run_flags = flags.FlagValues()
    define_train_flags(run_flags)
    run_flags(["train", *args[2:]])
    model = build_run("train", run_flags).model  # the trainer's own model for these flags
    assert isinstance(model, CacheModel) and model.images is not None
    assert (model.cache_negatives, model.cache_refresh, model.temperature) == (2, 0.25, 0.2)

def test_cli_trains_cache_over_finite_stored_views(tmp_path):
    """`--method=cache --finite_augmentations=2 --gradient_error_every=4` (100 digits,
    20 steps of B = 10): the trainer gives `CacheModel` K = 2 and the N·K = 200
    stored views as its image table, trains (finite surrogate, both step scalars
    logged) and measures the gradient error against the exact objective.

    Catches: the trainer building a per-image cache (N rows) for batches carrying
    `view_index` (refused in one line by CacheModel), or not passing K.
    """
    from helpers import parse_summary

    result = run_python(["-m", "trainers.train", "--method=cache", "--dataset=digits",
                         "--train_size=100", "--batch_size=10", "--epochs=2",
                         "--finite_augmentations=2", "--gradient_error_every=4",
                         "--optimizer=sgd", "--temperature=0.2", "--eval_every=0",
                         "--export=false", "--tensorboard_dir=",
                         f"--checkpoint_dir={tmp_path / 'ck'}"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = parse_summary(result.stdout)
    assert summary["method"] == "cache" and summary["global_step"] == 20
    assert np.isfinite(summary["final_loss"])
    assert summary["global_objective"]["step"] == 16
    assert 0 < summary["global_objective"]["gradient_error"] < np.inf
    assert "cache_staleness:" in result.stdout and "positive_weight:" in result.stdout

if __name__ == "__main__":
    import sys

    import pytest

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
