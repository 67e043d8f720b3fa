"""SimCLR-style augmentations as a Keras layer that runs inside the graph.

SimCLR's recipe (Chen et al. 2020): random resized crop (random area and
aspect ratio, resized back), horizontal flip, colour jitter (brightness,
contrast; saturation and hue on colour images), random greyscale. Keras core
has no RandomResizedCrop and keras-cv's RandomCropAndResize reaches into
`keras.src` internals, so the crop is written here with
`tf.image.crop_and_resize`. Every op is stateless and vectorised over the
batch with per-image parameters, and takes its seed as an input: the
augmentation of a batch is reproducible, and different batches and views get
independent draws.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the SimCLR augmentations (0 or False disables one)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    horizontal_flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    color_jitter_probability: float = 0.8
    grayscale_probability: float = 0.2

    @classmethod
    def for_dataset(cls, name: str) -> "AugmentConfig":
        """Defaults per data set: digits are tiny and not mirror-symmetric."""
        if name == "digits":
            return cls(crop_scale=(0.5, 1.0), horizontal_flip=False, brightness=0.3,
                       contrast=0.3, grayscale_probability=0.0)
        return cls()


def _uniform(shape, seed, low, high):
    return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


class SimCLRAugment(keras.layers.Layer):
    """Augments a batch `[B, H, W, C]` (float in [0, 1]) given a seed `[2]`."""

    def __init__(self, config: AugmentConfig = AugmentConfig(), **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def call(self, images, seed, rows=None):
        """`rows=(first, total)`: `images` are rows `first …` of a batch of `total`;
        every per-image parameter is computed for the whole batch and these
        rows' kept, so a part of a batch (one worker's share) is augmented
        bit for bit as inside it."""
        config = self.config
        images = tf.convert_to_tensor(images, tf.float32)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 10)
        batch = tf.shape(images)[0]
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        channels = images.shape[-1]
        first, total = (0, batch) if rows is None else rows

        def own(parameters):  # this part's rows of the whole batch's parameters
            return parameters if rows is None else parameters[first : first + batch]

        # Random resized crop: area fraction and log-uniform aspect ratio.
        area = _uniform([total], seeds[0], *config.crop_scale)
        log_ratio = _uniform([total], seeds[1], tf.math.log(config.crop_ratio[0]),
                             tf.math.log(config.crop_ratio[1]))
        ratio = tf.exp(log_ratio)
        crop_h = tf.clip_by_value(tf.sqrt(area / ratio), 0.0, 1.0)
        crop_w = tf.clip_by_value(tf.sqrt(area * ratio), 0.0, 1.0)
        top = _uniform([total], seeds[2], 0.0, 1.0) * (1.0 - crop_h)
        left = _uniform([total], seeds[3], 0.0, 1.0) * (1.0 - crop_w)
        boxes = own(tf.stack([top, left, top + crop_h, left + crop_w], axis=1))
        images = tf.image.crop_and_resize(
            images, boxes, tf.range(batch), tf.stack([height, width])
        )

        if config.horizontal_flip:
            flip = own(_uniform([total, 1, 1, 1], seeds[4], 0.0, 1.0)) < 0.5
            images = tf.where(flip, tf.reverse(images, axis=[2]), images)

        jitter = own(_uniform([total, 1, 1, 1], seeds[5], 0.0, 1.0)) < (
            config.color_jitter_probability)
        jittered = images
        if config.brightness:
            factor = own(_uniform([total, 1, 1, 1], seeds[6], 1 - config.brightness,
                                  1 + config.brightness))
            jittered = jittered * factor
        if config.contrast:
            factor = own(_uniform([total, 1, 1, 1], seeds[7], 1 - config.contrast,
                                  1 + config.contrast))
            mean = tf.reduce_mean(jittered, axis=[1, 2, 3], keepdims=True)
            jittered = (jittered - mean) * factor + mean
        if channels == 3 and config.saturation:
            grey = tf.image.rgb_to_grayscale(jittered)
            factor = own(_uniform([total, 1, 1, 1], seeds[8], 1 - config.saturation,
                                  1 + config.saturation))
            jittered = (jittered - grey) * factor + grey
        images = tf.where(jitter, tf.clip_by_value(jittered, 0.0, 1.0), images)

        if channels == 3 and config.grayscale_probability:
            to_grey = own(_uniform([total, 1, 1, 1], seeds[9], 0.0, 1.0)) < (
                config.grayscale_probability)
            images = tf.where(to_grey, tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(images)),
                              images)
        return images

    def compute_output_shape(self, input_shape):
        return input_shape
