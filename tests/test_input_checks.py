"""Issue 19, item 4: inputs checked where they enter, settings honoured or refused.

Images: one rule (`emc2_tf.checks.check_images`) at every entry, uint8 scaled
by 1/255; the serving signature answers NaN for an invalid image. Flags: every
training flag that configures a model is, for each method, either refused in
one line or changes what the method trains.
"""

import re
import sys
import tracemalloc

import numpy as np
import pytest
import tensorflow as tf

import emc2_tf
from emc2_tf.checks import check_images

from helpers import run_python


def _float_images(n=16, seed=0):
    """Float32 images `[n, 8, 8, 1]` that are exactly k/255 (like an 8-bit data set)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    return pixels, pixels.astype(np.float32) / np.float32(255.0)


def _encoder():
    import keras

    keras.utils.set_random_seed(0)
    return emc2_tf.build_small_cnn_encoder((8, 8, 1))


ENTRIES = {  # every place images enter, called with `images`
    "make_two_view_dataset": lambda images: emc2_tf.make_two_view_dataset(images, 4),
    "from_arrays": lambda images: emc2_tf.from_arrays(images, np.zeros(len(images)),
                                                      images[:2], np.zeros(2)),
    "image_table": emc2_tf.image_table,
    "EMC2Model(images=)": lambda images: emc2_tf.EMC2Model(
        _encoder(), len(images), images=images, out_of_batch="reencode"),
}


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_float_images_outside_0_1_are_refused_in_one_line(entry):
    """Bug caught: float images in 0..255 (an 8-bit data set not divided by 255) were
    accepted without a word by `make_two_view_dataset` (and the image table), which
    then trained a worse encoder (1-NN 0.875 against 0.94-0.96 after one epoch)."""
    pixels, images = _float_images()
    for bad, found in ((pixels.astype(np.float32), r"\[0, 255\]"),
                       (images - np.float32(0.5), r"\[-0.5, 0.5\]")):
        with pytest.raises(ValueError) as error:
            ENTRIES[entry](bad)
        message = str(error.value)
        assert "\n" not in message
        assert "images" in message and "must have values in [0, 1]" in message
        assert "divide by 255" in message
        assert re.search(found, message), message
    broken = images.copy()
    broken[3, 1, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"images.*1 image\(s\) hold NaN or inf .*index 3"):
        ENTRIES[entry](broken)
    ENTRIES[entry](images)  # k/255 floats: accepted
    ENTRIES[entry](pixels)  # uint8: accepted


def test_uint8_images_are_scaled_by_1_over_255_and_stay_uint8():
    """Bug caught: uint8 images reached the model as floats 0..255 (the pipeline cast
    them to float32 without scaling); and an image table converted to float32 (four
    times the memory) instead of staying uint8."""
    pixels, images = _float_images()
    for augment in (None, emc2_tf.AugmentConfig.for_dataset("digits")):
        from_uint8 = next(iter(emc2_tf.make_two_view_dataset(pixels, 4, augment, seed=1)))
        from_float = next(iter(emc2_tf.make_two_view_dataset(images, 4, augment, seed=1)))
        for view in ("view1", "view2"):
            assert from_uint8[view].dtype == tf.float32
            np.testing.assert_array_equal(from_uint8[view].numpy(), from_float[view].numpy())
        if augment is None:  # the views are the images themselves, scaled
            np.testing.assert_array_equal(from_uint8["view1"].numpy(),
                                          images[from_uint8["index"].numpy()])
    data = emc2_tf.from_arrays(pixels, np.zeros(16), pixels[:2], np.zeros(2))
    assert data.train_images.dtype == np.float32
    np.testing.assert_array_equal(data.train_images, images)
    assert emc2_tf.image_table(pixels).dtype == np.uint8
    model = emc2_tf.EMC2Model(_encoder(), 16, images=pixels, out_of_batch="reencode")
    assert model.images.dtype == tf.uint8
    np.testing.assert_array_equal(
        emc2_tf.models.emc2.gather_images(model.images, tf.constant([3, 5])).numpy(),
        images[[3, 5]])


def test_image_check_makes_no_full_size_copy():
    """Bug caught: an image check that converts or copies the whole array (e.g.
    `np.asarray(images, np.float64)`, `np.isfinite(images)` at once): 3 GiB of images
    then need another 3-6 GiB just to be checked."""
    images = np.full((400, 256, 256, 1), 0.5, np.float32)  # 100 MiB
    tracemalloc.start()
    try:
        check_images(images, "images")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < images.nbytes / 50, peak


def test_serving_answers_nan_for_an_invalid_image_and_the_others_unchanged(tmp_path):
    """Bug caught: the served signature checked nothing: an image with a NaN pixel got
    a finite, unit-norm embedding (oneDNN dropped the NaN), and 0..255 pixels a
    plausible one. The rule: any pixel NaN, inf or outside [0, 1] → that image's
    embedding is all NaN; the other images of the request are embedded as alone."""
    encoder = _encoder()
    serve = tf.saved_model.load(emc2_tf.export_encoder(encoder, str(tmp_path), "m")).signatures[
        "serving_default"]
    _, images = _float_images(6, seed=2)
    batch = images.copy()
    batch[1, 4, 4, 0] = np.nan
    batch[2] *= 255.0  # not divided by 255
    batch[3, 0, 0, 0] = -0.01
    batch[4, 7, 7, 0] = np.inf
    embedding = serve(images=tf.constant(batch))["embedding"].numpy()
    invalid = [1, 2, 3, 4]
    assert np.isnan(embedding[invalid]).all()
    good = [0, 5]
    assert np.isfinite(embedding[good]).all()
    np.testing.assert_allclose(embedding[good], encoder(images[good], training=False).numpy(),
                               atol=1e-6)
    alone = serve(images=tf.constant(images[good]))["embedding"].numpy()
    np.testing.assert_allclose(embedding[good], alone, atol=1e-6)
    edges = np.zeros((2, 8, 8, 1), np.float32)
    edges[1] = 1.0  # the range's ends are valid
    assert np.isfinite(serve(images=tf.constant(edges))["embedding"].numpy()).all()


#: Training flags that configure no model: each is used outside the model, the
#: same way for every method (by `trainers.train` and `trainers.common`). Every
#: other training flag is audited per method below; a new flag must be listed
#: here (with why) or pass that audit.
METHOD_INDEPENDENT = {
    "dataset": "the data set", "data_dir": "the data set", "train_size": "the data set",
    # The data flags act on the data set, each only for some kinds of --dataset:
    # trainers.common.check_data_flags refuses them elsewhere (test_cli_data.py).
    "test_data_dir": "the data set", "test_fraction": "the data set",
    "image_size": "the data set", "skip_corrupt": "the data set",
    "train_split": "the data set", "test_split": "the data set", "download": "the data set",
    "epochs": "fit's length", "batch_size": "the pipeline's batches",
    "learning_rate": "the optimizer", "optimizer": "the optimizer",
    "weight_decay": "the optimizer", "warmup_epochs": "the optimizer's schedule",
    "seed": "initial weights, order, augmentations, the model's seed",
    "encoder": "the encoder", "jit_compile": "compile()",
    "batch_selection": "the pipeline's batch order", "spectral_every": "the batch order",
    "spectral_groups": "the batch order", "strategy": "the devices",
    "cpu_devices": "the devices", "worker_timeout": "the cluster",
    "eval_every": "a callback", "model_name": "output names", "checkpoint_dir": "output",
    "checkpoint_every_steps": "output", "keep_checkpoints": "output", "resume": "resuming",
    "resume_from": "resuming", "overwrite": "output", "tensorboard_dir": "output",
    "log_every_steps": "output", "projector": "output", "export_dir": "output",
    "export": "output",
    # The pipeline's K stored views (and K for the methods that take it: cache, whose
    # finite path tests/test_cache.py runs through the trainer); a monitor.
    "finite_augmentations": "the pipeline's stored views",
    "gradient_error_every": "a monitor (training bit-identical)",
}
#: A value other than the default for each non-boolean, non-enum audited flag.
ALTERNATIVE = {"temperature": "0.5", "burn_in": "0", "gamma": "0.5", "kcl_t": "0.5",
               "kcl_gamma": "4", "cache_refresh": "0.5", "cache_negatives": "2"}
#: Flags whose values give identical results by design: they must reach the
#: model's config instead (EMC²'s scan implementations agree draw for draw).
RESULT_NEUTRAL = ("scan",)


def _train_flags(*argv):
    from absl import flags

    from trainers.run_flags import define_train_flags

    run_flags = flags.FlagValues()
    define_train_flags(run_flags)
    run_flags(["train", "--batch_size=4", *argv])
    return run_flags


def _alternative(flag) -> str | None:
    """A value of `flag` other than its default, as a command-line string."""
    if flag.flag_type() == "bool":
        return str(not flag.default).lower()
    enum_values = getattr(flag.parser, "enum_values", None)
    if enum_values:
        return next(value for value in enum_values if value != flag.default)
    return ALTERNATIVE.get(flag.name)


def _built(run_flags, data):
    """The model `run_flags` describe, from the trainer's own `method_arguments`,
    on a tiny encoder (Dense 4, unit norm; same initial weights every time)."""
    import keras

    from trainers.common import method_arguments

    keras.utils.set_random_seed(0)
    encoder = keras.Sequential([keras.Input(data.image_shape), keras.layers.Flatten(),
                                keras.layers.Dense(4), keras.layers.UnitNormalization()])
    model = emc2_tf.build_model(run_flags.method, encoder=encoder, dataset_size=data.num_train,
                                **method_arguments(run_flags, data))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model


def _trained_state(run_flags, data) -> np.ndarray:
    """The weights and per-sample state after 3 eager training steps on fixed batches
    (the third revisits images 0 and 2, so chains and `u` start from stored state)."""
    model = _built(run_flags, data)
    images = data.train_images
    for index in ([0, 1, 2, 3], [4, 5, 6, 7], [2, 5, 0, 7]):
        model.train_step({"index": tf.constant(index, tf.int32),
                          "view1": tf.constant(images[index]),
                          "view2": tf.constant(images[index][:, :, ::-1])})
    return np.concatenate([np.ravel(np.asarray(w, np.float64)) for w in model.weights])


def _config(run_flags, data) -> dict:
    """The built model's config, without the (auto-named) encoder."""
    config = _built(run_flags, data).get_config()
    return {key: value for key, value in config.items() if key not in ("encoder", "name")}


def test_every_method_flag_is_honoured_or_refused(capsys):
    """Bug caught: a flag a method ignores, recorded in flags.txt and printed, with no
    effect: `--method=kcl --temperature=0.5` trained bit-identically to the default
    (KCL has no temperature). Mechanical: for every method of `METHODS` and every
    training flag not declared method-independent, the flag's non-default value is
    either refused by `check_method_flags` in one line, or changes the trained
    weights and state (the config, for result-neutral flags)."""
    from trainers.common import check_method_flags

    from emc2_tf.models import METHODS

    definitions = _train_flags()
    audited = sorted(name for name in definitions if name not in METHOD_INDEPENDENT
                     and name != "method")
    assert "temperature" in audited and "burn_in" in audited
    missing = [name for name in audited if _alternative(definitions[name]) is None]
    assert not missing, f"give these flags a test value in ALTERNATIVE: {missing}"
    _, images = _float_images(8, seed=4)
    data = emc2_tf.from_arrays(images, np.arange(8) % 2, images[:4], np.arange(4) % 2)
    ignored, refused = [], []
    for method in sorted(METHODS):
        baseline = {}
        for name in audited:
            argv = [f"--method={method}", f"--{name}={_alternative(definitions[name])}"]
            run_flags = _train_flags(*argv)
            try:
                check_method_flags("train", run_flags)
            except SystemExit:
                error = capsys.readouterr().err
                assert error.count("\n") == 1 and error.startswith(
                    f"train: error: --{name} is not an option of --method={method}"), error
                refused.append((method, name))
                continue
            probe = _config if name in RESULT_NEUTRAL else _trained_state
            if probe not in baseline:
                baseline[probe] = probe(_train_flags(f"--method={method}"), data)
            value = probe(run_flags, data)
            if (np.array_equal(value, baseline[probe]) if isinstance(value, np.ndarray)
                    else value == baseline[probe]):
                ignored.append(" ".join(argv))
    assert not ignored, f"accepted but without effect: {ignored}"
    assert ("kcl", "temperature") in refused and ("emc2", "gamma") in refused

def test_flags_made_void_by_another_flag_are_refused(capsys):
    """Bug caught: `--spectral_every=3` / `--spectral_groups=5` with
    `--batch_selection=random`, and `--cpu_devices=2` with `--strategy=default`, were
    accepted, recorded in flags.txt and changed nothing (same state digest). Each
    is refused in one line naming both flags; under the governing value, and at
    its default value (a `--flagfile` repeat), it passes."""
    from trainers.common import DEPENDENT_FLAGS, check_flag_combinations

    void = {"spectral_every": ("3", "random"), "spectral_groups": ("5", "random"),
            "cpu_devices": ("2", "default")}
    assert set(void) == set(DEPENDENT_FLAGS)
    for name, (value, governing_value) in void.items():
        governing, acting = DEPENDENT_FLAGS[name]
        with pytest.raises(SystemExit):
            check_flag_combinations(
                "train", _train_flags(f"--{name}={value}", f"--{governing}={governing_value}"))
        error = capsys.readouterr().err
        assert error == (f"train: error: --{name}={value} has no effect with --{governing}="
                         f"{governing_value}; it acts under --{governing}={'|'.join(acting)}: "
                         "drop it, or pass one of those.\n"), error
        check_flag_combinations(
            "train", _train_flags(f"--{name}={value}", f"--{governing}={acting[0]}"))
        default = _train_flags()[name].default
        check_flag_combinations("train", _train_flags(f"--{name}={default}",
                                                      f"--{governing}={governing_value}"))
    assert capsys.readouterr().err == ""


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
