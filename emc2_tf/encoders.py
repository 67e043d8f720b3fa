"""Encoders: a backbone, a projection head, L2-normalised embeddings.

Every encoder is a functional `keras.Model` with one input named `images`
(float32 `[batch, H, W, C]` in [0, 1]) and one output, the L2-normalised
`embedding` `[batch, D]`; its sub-model `backbone` gives the representation
used for linear probes and k-NN (`encoder.get_layer("backbone")`).

- `build_small_cnn_encoder`: a small CNN suited to 8x8 digits and 28x28
  Fashion-MNIST.
- `build_resnet18_encoder`: the paper's CIFAR-style ResNet-18 (3x3 stem, no
  max-pool) with GroupNorm in place of BatchNorm (as in the EMC² runs: no
  batch statistics couple the views or the re-encoded negatives) and a
  512→512→D projection head.
"""

from __future__ import annotations

import keras

BACKBONE_NAME = "backbone"


def _projection_head(features, hidden_dim: int, projection_dim: int):
    x = keras.layers.Dense(hidden_dim, activation="relu", name="projection_hidden")(features)
    x = keras.layers.Dense(projection_dim, name="projection")(x)
    return keras.layers.UnitNormalization(axis=-1, name="embedding")(x)


def _wrap(images, backbone: keras.Model, hidden_dim, projection_dim, name) -> keras.Model:
    features = backbone(images)
    embedding = _projection_head(features, hidden_dim, projection_dim)
    return keras.Model(images, embedding, name=name)


def build_small_cnn_encoder(
    input_shape: tuple[int, int, int] = (8, 8, 1),
    representation_dim: int = 128,
    projection_dim: int = 64,
    width: int = 32,
) -> keras.Model:
    """A small CNN: conv blocks halving resolution down to ≤ 4 px, then GAP.

    Args:
        input_shape: `(H, W, C)` of the images.
        representation_dim: size of the backbone's output representation.
        projection_dim: size D of the L2-normalised embedding.
        width: channels of the first block (doubling per downsampling).
    """
    images = keras.Input(shape=input_shape, name="images")
    inputs = keras.Input(shape=input_shape, name="backbone_images")
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    size, channels = min(input_shape[:2]), width
    while size > 4:
        channels *= 2
        x = keras.layers.Conv2D(channels, 3, strides=2, padding="same", activation="relu")(x)
        size = (size + 1) // 2
    x = keras.layers.Conv2D(channels * 2, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    features = keras.layers.Dense(representation_dim, activation="relu")(x)
    backbone = keras.Model(inputs, features, name=BACKBONE_NAME)
    return _wrap(images, backbone, representation_dim, projection_dim, "small_cnn_encoder")


def _group_norm(channels: int, groups: int):
    return keras.layers.GroupNormalization(groups=min(groups, channels))


def _basic_block(x, channels: int, stride: int, groups: int):
    shortcut = x
    y = keras.layers.Conv2D(channels, 3, strides=stride, padding="same", use_bias=False)(x)
    y = _group_norm(channels, groups)(y)
    y = keras.layers.ReLU()(y)
    y = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)(y)
    y = _group_norm(channels, groups)(y)
    if stride != 1 or x.shape[-1] != channels:
        shortcut = keras.layers.Conv2D(channels, 1, strides=stride, use_bias=False)(x)
        shortcut = _group_norm(channels, groups)(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))


def build_resnet18_encoder(
    input_shape: tuple[int, int, int] = (32, 32, 3),
    projection_dim: int = 128,
    groups: int = 32,
) -> keras.Model:
    """CIFAR-style ResNet-18 (GroupNorm) with a 512→512→D projection head."""
    images = keras.Input(shape=input_shape, name="images")
    inputs = keras.Input(shape=input_shape, name="backbone_images")
    x = keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(_group_norm(64, groups)(x))
    for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = _basic_block(x, channels, stride, groups)
        x = _basic_block(x, channels, 1, groups)
    features = keras.layers.GlobalAveragePooling2D()(x)
    backbone = keras.Model(inputs, features, name=BACKBONE_NAME)
    return _wrap(images, backbone, 512, projection_dim, "resnet18_encoder")


ENCODERS = {
    "small_cnn": build_small_cnn_encoder,
    "resnet18": build_resnet18_encoder,
}


def default_encoder_name(image_shape: tuple[int, ...]) -> str:
    """The encoder for images of `image_shape`: `small_cnn` up to 28 px, `resnet18` above."""
    return "small_cnn" if max(image_shape[:2]) <= 28 else "resnet18"


def build_encoder(name: str, input_shape: tuple[int, int, int], **kwargs) -> keras.Model:
    """Builds a registered encoder by name (`small_cnn` | `resnet18`)."""
    if name not in ENCODERS:
        raise ValueError(f"Unknown encoder {name!r}; accepted: {', '.join(sorted(ENCODERS))}.")
    return ENCODERS[name](input_shape=input_shape, **kwargs)
