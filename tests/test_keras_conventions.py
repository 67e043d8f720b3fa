"""Keras conventions: config, `.keras` round-trip, ModelCheckpoint, export,
validation/evaluate and predict, for every kind of contrastive model.

Small synthetic images (6x6, N = 48) keep each case to a few seconds.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf

N, BATCH = 48, 8
IMAGES = np.random.default_rng(0).random((N, 6, 6, 1)).astype(np.float32)
HELD_OUT = np.random.default_rng(1).random((16, 6, 6, 1)).astype(np.float32)

#: method → constructor options that differ from the defaults (so a lost option shows).
VARIANTS = {
    "simclr": {"temperature": 0.2},
    "kcl": {"kcl_t": 1.5, "kcl_gamma": 8.0},
    "sogclr": {"temperature": 0.2, "gamma": 0.8},
    "emc2": {"temperature": 0.2, "burn_in": 3, "exact_ratio": True, "waste_recycling": True,
             "scan": "sequential", "out_of_batch": "reencode"},
    "emc2_drop": {"temperature": 0.2, "out_of_batch": "drop"},
}


def _model(variant: str, seed: int = 0, images=IMAGES):
    keras.utils.set_random_seed(seed)
    method = "emc2" if variant.startswith("emc2") else variant
    encoder = emc2_tf.build_small_cnn_encoder((6, 6, 1), representation_dim=16,
                                              projection_dim=8, width=4)
    options = dict(VARIANTS[variant], seed=seed)
    if method == "emc2":
        options["images"] = images
    model = emc2_tf.build_model(method, encoder=encoder, dataset_size=N, **options)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))  # 1e-2 collapses this encoder
    return model


def _dataset(images=IMAGES, seed=0):
    return emc2_tf.make_two_view_dataset(images, BATCH, seed=seed)


def _state(model) -> list[np.ndarray]:
    """Every variable of the model (weights, per-sample state, seed) and of its optimizer."""
    return [np.array(v) for v in model.weights] + [np.array(v) for v in model.optimizer.variables]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_round_trip_keeps_every_option(variant):
    """Catches an option missing from `get_config` (e.g. EMC²'s exact_ratio or
    KCL's kcl_gamma) or a loss function that does not deserialize: the rebuilt
    model's config equals the original's."""
    model = _model(variant)
    config = model.get_config()
    rebuilt = type(model).from_config(config)
    assert rebuilt.get_config() == config
    for key, value in VARIANTS[variant].items():
        if key.startswith("kcl_"):
            assert rebuilt.loss_kwargs[key[4:]] == value
        else:
            assert getattr(rebuilt, key) == value, key


@pytest.mark.parametrize("variant", ["simclr", "sogclr", "emc2"])
def test_keras_file_round_trip_resumes_identically(variant, tmp_path):
    """Catches a `.keras` file that drops the per-sample state (chains, u), the
    optimizer slots or the MH seed: a model trained 1 epoch, saved, loaded and
    trained 1 more epoch must end bit-identical to the one trained 2 epochs."""
    reference = _model(variant)
    reference.fit(_dataset(), epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    reference.save(path)
    loaded = keras.models.load_model(path)
    for before, after in zip(_state(reference), _state(loaded)):
        np.testing.assert_array_equal(before, after)
    if variant == "emc2":
        assert int(np.sum(np.array(loaded.chain_index) >= 0)) > N // 2  # chains were saved
        with pytest.raises(ValueError, match="set_image_table"):
            loaded.fit(_dataset(), epochs=2, initial_epoch=1, verbose=0)
        loaded.set_image_table(IMAGES)
    reference.fit(_dataset(), epochs=2, initial_epoch=1, verbose=0)
    loaded.fit(_dataset(), epochs=2, initial_epoch=1, verbose=0)
    for expected, actual in zip(_state(reference), _state(loaded)):
        np.testing.assert_array_equal(expected, actual)


def test_model_checkpoint_writes_loadable_keras_files(tmp_path):
    """Catches `ModelCheckpoint('*.keras')` failing (it calls `model.save`) or
    leaving a 0-byte file: the best and last files load and hold the chains."""
    model = _model("emc2")
    path = str(tmp_path / "epoch{epoch}.keras")
    model.fit(_dataset(), epochs=2, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(path, save_weights_only=False)])
    for epoch in (1, 2):
        file = tmp_path / f"epoch{epoch}.keras"
        assert file.stat().st_size > 0
    loaded = keras.models.load_model(str(tmp_path / "epoch2.keras"))
    np.testing.assert_array_equal(np.array(loaded.chain_index), np.array(model.chain_index))


def test_export_writes_the_serving_signature(tmp_path):
    """Catches `model.export` raising (Keras' default on a subclassed model with a
    two-view train_step) or serving something other than the encoder's embedding."""
    model = _model("sogclr")
    path = model.export(str(tmp_path / "served"))
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    served = tf.saved_model.load(path).signatures["serving_default"]
    output = served(images=tf.constant(HELD_OUT))
    assert list(output) == ["embedding"]
    np.testing.assert_allclose(output["embedding"].numpy(), model.encoder(HELD_OUT).numpy(),
                               atol=1e-6)
    with pytest.raises(ValueError, match="already exists"):
        model.export(path)


def test_predict_returns_embeddings():
    """Catches `predict` returning anything but the encoder's L2-normalised embedding."""
    model = _model("simclr")
    predicted = model.predict(HELD_OUT, batch_size=5, verbose=0)
    np.testing.assert_allclose(predicted, model.encoder(HELD_OUT).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(predicted, axis=1), 1.0, atol=1e-5)


def _held_out_batches():
    return emc2_tf.make_two_view_dataset(HELD_OUT, BATCH, seed=5)


def test_evaluate_simclr_is_the_in_batch_loss():
    """Catches `evaluate` failing with Keras' "No loss to compute" or reporting a
    value other than the method's loss: SimCLR's evaluate equals NT-Xent of the
    held-out batches' embeddings, averaged over batches."""
    model = _model("simclr")
    expected = []
    for batch in _held_out_batches():
        view1 = model.encoder(batch["view1"]).numpy()
        view2 = model.encoder(batch["view2"]).numpy()
        expected.append(float(emc2_tf.losses.nt_xent_loss(view1, view2, temperature=0.2)))
    result = model.evaluate(_held_out_batches(), verbose=0, return_dict=True)
    np.testing.assert_allclose(result["loss"], np.mean(expected), rtol=1e-5)


def test_evaluate_sogclr_uses_the_batch_estimate_and_keeps_u():
    """Catches SogCLR's evaluate reading or writing the u-table: on held-out data
    it is the surrogate loss with u = the batch estimate g (first visit), and
    `log_u` is unchanged."""
    model = _model("sogclr")
    model.fit(_dataset(), epochs=1, verbose=0)
    log_u = np.array(model.log_u)
    expected = []
    for batch in _held_out_batches():
        view1, view2 = model.encoder(batch["view1"]), model.encoder(batch["view2"])
        log_g = emc2_tf.losses.sogclr_batch_estimate(view1, view2, 0.2)
        expected.append(float(emc2_tf.losses.sogclr_surrogate_loss(view1, view2, log_g, 0.2)))
    result = model.evaluate(_held_out_batches(), verbose=0, return_dict=True)
    np.testing.assert_allclose(result["loss"], np.mean(expected), rtol=1e-5, atol=1e-6)
    assert abs(np.mean(expected)) > 1e-4  # the value is not trivially zero
    np.testing.assert_array_equal(np.array(model.log_u), log_u)


@pytest.mark.parametrize("variant", ["emc2", "emc2_drop"])
def test_evaluate_emc2_runs_fresh_chains_and_touches_no_state(variant):
    """Catches EMC²'s evaluate reading the training chains (held-out indices
    address other images), writing them, or consuming training draws.

    The held-out loss must equal the training-mode loss of the same batch with
    all chains empty and the same draws, be the same on a second call, and
    leave the chains, scores and seed generator unchanged.
    """
    model = _model(variant)
    model.fit(_dataset(), epochs=1, verbose=0)
    before = _state(model)
    first = model.evaluate(_held_out_batches(), verbose=0, return_dict=True)
    second = model.evaluate(_held_out_batches(), verbose=0, return_dict=True)
    assert first == second
    for expected, actual in zip(before, _state(model)):
        np.testing.assert_array_equal(expected, actual)

    fresh = _model(variant)
    fresh.set_weights(model.get_weights())
    fresh.chain_index.assign(np.full(N, -1, np.int32))
    fresh.chain_log_score.assign(np.full(N, -np.inf, np.float32))
    losses, rates = [], []
    for batch in _held_out_batches():
        index = tf.cast(batch["index"], tf.int32)
        fresh.random_uniform = lambda shape, index=index: fresh.evaluation_uniform(index, shape)
        views = tf.concat([batch["view1"], batch["view2"]], axis=0)
        loss, scalars = fresh.contrastive_loss(index, fresh.encoder(views), training=True)
        losses.append(float(loss))
        rates.append(float(scalars["acceptance_rate"]))
    np.testing.assert_allclose(first["loss"], np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(first["acceptance_rate"], np.mean(rates), rtol=1e-5)


def test_validation_data_changes_nothing_in_training():
    """Catches validation consuming the MH draws or touching the chains:
    `fit(validation_data=...)` must train bit-identically to `fit` without it,
    and report a finite `val_loss` per epoch."""
    plain = _model("emc2")
    plain.fit(_dataset(), epochs=2, verbose=0)
    validated = _model("emc2")
    history = validated.fit(_dataset(), epochs=2, verbose=0,
                            validation_data=_held_out_batches())
    assert len(history.history["val_loss"]) == 2
    assert np.all(np.isfinite(history.history["val_loss"]))
    for expected, actual in zip(_state(plain), _state(validated)):
        np.testing.assert_array_equal(expected, actual)


def test_drop_variant_trains_without_an_image_table():
    """Catches `out_of_batch='drop'` (no exact ratio) still requiring the image
    table it never reads, and the re-encoding variants training without one."""
    model = _model("emc2_drop", images=None)
    model.fit(_dataset(), epochs=1, verbose=0)
    assert int(np.sum(np.array(model.chain_index) >= 0)) > 0
    with pytest.raises(ValueError, match="needs `images`"):
        _model("emc2", images=None).fit(_dataset(), epochs=1, verbose=0)


def test_load_weights_into_a_fresh_model_restores_everything(tmp_path):
    """Catches `load_weights` refusing a fresh model ("has not yet been built")
    or skipping the optimizer slots and the MH seed: after loading, every model
    and optimizer variable equals the saved model's."""
    trained = _model("emc2")
    trained.fit(_dataset(), epochs=1, verbose=0)
    path = str(tmp_path / "w.weights.h5")
    trained.save_weights(path)
    fresh = _model("emc2", seed=3)
    fresh.load_weights(path)
    for expected, actual in zip(_state(trained), _state(fresh)):
        np.testing.assert_array_equal(expected, actual)
    np.testing.assert_array_equal(np.array(fresh.seed_generator.state),
                                  np.array(trained.seed_generator.state))


UINT8_IMAGES = np.random.default_rng(2).integers(0, 256, (N, 6, 6, 1)).astype(np.uint8)


def test_uint8_image_table_trains_like_the_float_table():
    """Catches a uint8 table converted wrongly (not /255, or left as 0..255):
    EMC² with `image_table(images)` (uint8) ends bit-identical to EMC² with the
    float table `images / 255`, re-encoding out-of-batch negatives every step."""
    floats = UINT8_IMAGES.astype(np.float32) / np.float32(255.0)
    table = emc2_tf.image_table(floats)
    assert table.dtype == np.uint8
    np.testing.assert_array_equal(table, UINT8_IMAGES)
    runs = []
    for images in (floats, table):
        model = _model("emc2", images=images)
        assert model.images.dtype == (tf.uint8 if images is table else tf.float32)
        model.fit(_dataset(floats), epochs=2, verbose=0)
        runs.append(_state(model))
    for expected, actual in zip(*runs):
        np.testing.assert_array_equal(expected, actual)
    index = tf.constant([3, 0, 47])
    gathered = emc2_tf.models.emc2.gather_images(tf.constant(table), index)
    np.testing.assert_array_equal(gathered.numpy(), floats[[3, 0, 47]])


def test_image_table_keeps_floats_that_are_not_8_bit():
    """Catches `image_table` quantising images that are not exactly k/255 (a lossy
    table would re-encode different negatives than the views show)."""
    images = np.full((2, 2, 2, 1), 0.3, np.float32)
    assert emc2_tf.image_table(images).dtype == np.float32


def test_a_data_set_over_the_table_limit_trains_with_drop_or_uint8():
    """Catches the limit refusing what fits: with a limit between the uint8 and the
    float32 size, the float table is refused (naming uint8 and 'drop'), the uint8
    table trains, and out_of_batch='drop' trains with no table at all."""
    floats = UINT8_IMAGES.astype(np.float32) / np.float32(255.0)
    limit = UINT8_IMAGES.nbytes + 1  # the float32 table is 4x larger
    encoder = emc2_tf.build_small_cnn_encoder((6, 6, 1), representation_dim=16,
                                              projection_dim=8, width=4)
    with pytest.raises(ValueError, match="uint8.*out_of_batch='drop'"):
        emc2_tf.EMC2Model(encoder, N, images=floats, max_image_table_bytes=limit)
    model = emc2_tf.EMC2Model(encoder, N, images=emc2_tf.image_table(floats),
                              max_image_table_bytes=limit, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(_dataset(floats), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    dropped = emc2_tf.EMC2Model(encoder, N, out_of_batch="drop", max_image_table_bytes=1, seed=0)
    dropped.compile(optimizer=keras.optimizers.Adam(1e-2))
    dropped.fit(_dataset(floats), epochs=1, verbose=0)
    assert dropped.images is None and np.sum(np.array(dropped.chain_index) >= 0) > 0


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
