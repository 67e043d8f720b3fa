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


def build(method: str, data, batch_size: int, seed: int, learning_rate: float = 1e-3,
          temperature: float | None = None, **options):
    """A compiled model of `method` on `data` with the small CNN (or ResNet-18 above 28 px)."""
    import keras

    import emc2_tf

    keras.utils.set_random_seed(seed)
    name = emc2_tf.encoders.default_encoder_name(data.image_shape)
    encoder = emc2_tf.build_encoder(name, data.image_shape)
    accepted = emc2_tf.models.method_options(method)
    arguments = {"seed": seed, **options}
    if "images" in accepted:
        arguments["images"] = data.train_images
    if temperature is not None:
        arguments["temperature"] = temperature
    model = emc2_tf.build_model(method, encoder=encoder, dataset_size=data.num_train, **arguments)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    return encoder, model


def train_and_evaluate(method: str, data, dataset_name: str, batch_size: int, seed: int,
                       epochs: int, **options) -> dict:
    """Trains one (method, B, seed) run; returns its accuracies, representation metrics, time."""
    import emc2_tf

    encoder, model = build(method, data, batch_size, seed, **options)
    augment = emc2_tf.AugmentConfig.for_dataset(dataset_name)
    dataset = emc2_tf.make_two_view_dataset(data.train_images, batch_size, augment, seed=seed)
    started = time.perf_counter()
    history = model.fit(dataset, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - started
    results = emc2_tf.evaluate_encoder(encoder, data, representation=True, augment=augment)
    results.update(method=method, batch_size=batch_size, seed=seed, epochs=epochs,
                   train_seconds=seconds, temperature=model.temperature,
                   final_loss=float(history.history["loss"][-1]))
    if "acceptance_rate" in history.history:
        results["acceptance_rate"] = [float(x) for x in history.history["acceptance_rate"]]
    return results


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
