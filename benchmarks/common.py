"""What the benchmarks share: the device line, mixed precision, one training
run with the library's own pieces, and the results files.

Every benchmark runs unchanged on a GPU: TensorFlow places the ops on the
first GPU when one is visible, `--mixed_precision` sets Keras'
`mixed_float16` policy there (`mixed_bfloat16` on a CPU), and the JSON
records the device the numbers came from.
"""

from __future__ import annotations

import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_value(text: str):
    """'true' → True, '3' → 3, '0.5' → 0.5, anything else the stripped string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_options(items: list[str]) -> dict:
    """`['burn_in=0', 'exact_ratio=true']` → `{'burn_in': 0, 'exact_ratio': True}`.

    Raises:
        ValueError: naming the first item that is not `key=value`.
    """
    options = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"{item!r} is not key=value")
        options[key.strip()] = parse_value(text)
    return options


def split_variant(entry: str) -> tuple[str, dict]:
    """`'emc2/exact_ratio=true/out_of_batch=drop'` → `('emc2', {'exact_ratio': True,
    'out_of_batch': 'drop'})`: a method and its constructor options, one label.

    Raises:
        ValueError: naming the first option that is not `key=value`.
    """
    method, *items = [part.strip() for part in entry.strip().split("/")]
    return method, parse_options(items)


def quiet_tensorflow() -> None:
    """Benchmarks build many models, each with its own traced functions: that is
    expected, so TensorFlow's retracing warnings are silenced."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")


def device_description() -> dict:
    """The machine the numbers come from: CPU cores, GPUs, TensorFlow and Keras versions."""
    import keras
    import tensorflow as tf

    quiet_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
    return {
        "device": ", ".join(names) if names else f"CPU only ({os.cpu_count()} cores)",
        "gpus": len(gpus),
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def set_mixed_precision(enabled: bool) -> str:
    """Sets Keras' global dtype policy: float32, or mixed precision for the device."""
    import keras
    import tensorflow as tf

    policy = "float32"
    if enabled:
        policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def build(method: str, data, batch_size: int, seed: int, learning_rate=1e-3,
          temperature: float | None = None, optimizer: str = "adam", weight_decay: float = 0.0,
          **options):
    """A compiled model of `method` on `data` with the small CNN (or ResNet-18 above 28 px).

    `optimizer`, `learning_rate` (a float or a schedule) and `weight_decay`
    go to `emc2_tf.build_optimizer` (default: Adam 1e-3, as before).
    """
    import keras

    import emc2_tf

    keras.utils.set_random_seed(seed)
    name = emc2_tf.encoders.default_encoder_name(data.image_shape)
    encoder = emc2_tf.build_encoder(name, data.image_shape)
    accepted = emc2_tf.models.method_options(method)
    arguments = {"seed": seed, **options}
    if "images" in accepted:
        arguments["images"] = emc2_tf.image_table(data.train_images)
    if temperature is not None:
        arguments["temperature"] = temperature
    model = emc2_tf.build_model(method, encoder=encoder, dataset_size=data.num_train, **arguments)
    model.compile(optimizer=emc2_tf.build_optimizer(optimizer, learning_rate, weight_decay))
    return encoder, model


def train_and_evaluate(method: str, data, dataset_name: str, batch_size: int, seed: int,
                       epochs: int, learning_rate: float = 1e-3, warmup_epochs: int = 0,
                       **options) -> dict:
    """Trains one (method, B, seed) run; returns its accuracies, representation metrics, time.

    `warmup_epochs > 0`: linear warm-up then cosine decay of `learning_rate`
    over the run's steps (`emc2_tf.epoch_learning_rate`); `optimizer=` and
    `weight_decay=` go to `build`.
    """
    import emc2_tf

    learning_rate = emc2_tf.epoch_learning_rate(
        learning_rate, epochs, data.num_train // batch_size, warmup_epochs)
    encoder, model = build(method, data, batch_size, seed, learning_rate=learning_rate,
                           **options)
    augment = emc2_tf.AugmentConfig.for_dataset(dataset_name)
    dataset = emc2_tf.make_two_view_dataset(data.train_images, batch_size, augment, seed=seed)
    tracker = epoch_representation(encoder, data.test_images)
    started = time.perf_counter()
    history = model.fit(dataset, epochs=epochs, verbose=0, callbacks=[tracker])
    seconds = time.perf_counter() - started - tracker.seconds
    results = emc2_tf.evaluate_encoder(encoder, data)
    # Alignment, uniformity and effective rank on a fixed held-out sample of
    # 2,000 images: the full 10k split of Fashion-MNIST costs 20 s per run here.
    results.update(emc2_tf.representation_metrics(encoder, data.test_images[:2000], augment))
    results.update(embedding_metrics(encoder, data))
    results["per_epoch"] = {**tracker.values, **{
        key: [float(x) for x in history.history[key]]
        for key in ("loss", "acceptance_rate", "out_of_batch_fraction") if key in history.history}}
    results.update(method=method, batch_size=batch_size, seed=seed, epochs=epochs,
                   train_seconds=seconds, temperature=model.temperature,
                   final_loss=float(history.history["loss"][-1]),
                   optimizer=type(model.optimizer).__name__,
                   final_learning_rate=float(model.optimizer.learning_rate))
    if "acceptance_rate" in history.history:
        results["acceptance_rate"] = [float(x) for x in history.history["acceptance_rate"]]
    return results


def embedding_metrics(encoder, data) -> dict:
    """1-NN and linear-probe accuracy of the served, L2-normalised `embedding`
    (`evaluate_encoder` scores the backbone representation)."""
    import emc2_tf

    train = emc2_tf.embed(encoder, data.train_images, features="embedding")
    test = emc2_tf.embed(encoder, data.test_images, features="embedding")
    return {
        "embedding_knn_accuracy": emc2_tf.knn_accuracy(
            train, data.train_labels, test, data.test_labels),
        "embedding_linear_probe_accuracy": emc2_tf.linear_probe_accuracy(
            train, data.train_labels, test, data.test_labels),
    }


def floors(data, seeds: int) -> dict:
    """What a run must beat: raw pixels, and the untrained encoder of each seed.

    Returns `{"raw_pixels": {...}, "untrained": [{...} per seed]}` with the
    backbone's and the embedding's 1-NN and linear-probe accuracy (the same
    keys as a run's).
    """
    import keras

    import emc2_tf

    flat = lambda images: images.reshape(len(images), -1)  # noqa: E731
    raw = (flat(data.train_images), data.train_labels, flat(data.test_images), data.test_labels)
    result = {"raw_pixels": {"knn_accuracy": emc2_tf.knn_accuracy(*raw),
                             "linear_probe_accuracy": emc2_tf.linear_probe_accuracy(*raw)},
              "untrained": []}
    for seed in range(seeds):
        keras.utils.set_random_seed(seed)
        name = emc2_tf.encoders.default_encoder_name(data.image_shape)
        encoder = emc2_tf.build_encoder(name, data.image_shape)
        scores = emc2_tf.evaluate_encoder(encoder, data)
        scores.update(embedding_metrics(encoder, data))
        result["untrained"].append(scores)
    return result


def epoch_representation(encoder, images, sample: int = 2000):
    """A Keras callback: uniformity and effective rank of the embedding of a fixed
    held-out sample after every epoch (the collapse analysis); its own time is
    kept in `.seconds`, apart from training."""
    import keras

    import emc2_tf

    class EpochRepresentation(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.values = {"uniformity": [], "effective_rank": []}
            self.seconds = 0.0

        def on_epoch_end(self, epoch, logs=None):
            started = time.perf_counter()
            z = emc2_tf.embed(encoder, images[:sample], features="embedding")
            self.values["uniformity"].append(emc2_tf.uniformity(z))
            self.values["effective_rank"].append(emc2_tf.effective_rank(z))
            self.seconds += time.perf_counter() - started

    return EpochRepresentation()


def write_json(name: str, payload: dict, results_dir: str = RESULTS_DIR) -> str:
    """Writes `<results_dir>/<name>.json` atomically; returns its path."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.json")
    staging = path + ".tmp"
    with open(staging, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
    os.replace(staging, path)
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str) -> str:
    """Writes a figure as PNG and closes it; returns the path."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (what the README's Results section pastes)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
