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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
