r"""EMC²'s central claim on this CPU: the paper's finite-augmentation convergence experiment.

    python -m benchmarks.convergence                       # the full grid below (resumable)
    python -m benchmarks.convergence --datasets=digits --batch_sizes=4 --seeds=1
    python -m benchmarks.convergence --plot_only           # tables and plots from the results

The paper (Yau et al., ICML 2024, "ResNet-18 on STL-10 subset with SGD") trains
on N = 500 images, each with a fixed set of K = 2 pre-computed augmentations,
so that the global contrastive loss F(θ) over all N·K views and its exact
gradient ∇F(θ) are computable. Every few steps it logs the gradient error
‖g_t − ∇F(θ_t)‖² of the step's actual gradient estimate g_t, the gradient norm
‖∇F(θ_t)‖² (→ 0 at a stationary point of F) and F(θ_t).

Here: N = 500 images (stratified, fixed) of digits and of Fashion-MNIST, K = 2
views drawn once with seed 0 (the same stored views for every run, so every
run optimises the same F), the small CNN, plain SGD (no momentum, no weight
decay) at 1e-3, β = 5 (τ = 0.2), B = 4 and 32, 10 epochs, 3 seeds, and the
methods: SimCLR, SogCLR, the embedding cache (Gumbel-max) and EMC² (the
library default, the paper's variant, and `exact_ratio`).

Resumable: each finished run is appended to `<results_dir>/<name>.jsonl`; a
rerun skips the runs already there (`--redo` measures them again). Then it
prints the table of values after the last epoch (mean ± std over seeds),
writes `<name>.json` (the summary) and `<name>.png` (curves against
iterations and against training seconds).

Wall-clock axis: the seconds of training only. The steps on which the monitor
measured (an exact gradient over all N·K views inside the step) count at the
median time of the run's other steps.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS
DEFAULT_METHODS = [
    "simclr",
    "sogclr",
    "cache",
    "emc2",
    "emc2/out_of_batch=reencode/waste_recycling=false",
    "emc2/exact_ratio=true",
]
flags.DEFINE_list("datasets", ["digits", "fashion_mnist"], "digits | fashion_mnist.")
flags.DEFINE_string("data_dir", None, "Fashion-MNIST idx folder (default: Debian's).")
flags.DEFINE_list("methods", DEFAULT_METHODS,
                  "Methods or variants written method/key=value/... (one row each).")
flags.DEFINE_list("batch_sizes", ["4", "32"], "Batch sizes B.")
flags.DEFINE_integer("seeds", 3, "Seeds per (data set, method, B): 0, 1, …")
flags.DEFINE_integer("epochs", 10, "Epochs of every run.")
flags.DEFINE_integer("train_size", 500, "N: a stratified subset of the training images.")
flags.DEFINE_integer("finite_augmentations", 2, "K stored views per image.")
flags.DEFINE_float("learning_rate", 1e-3, "Plain SGD's learning rate.")
flags.DEFINE_float("temperature", 0.2, "τ of every method (β = 1/τ = 5, the paper's run).")
flags.DEFINE_integer("points", 50,
                     "Measurements per run: the monitor runs every max(1, steps // points) "
                     "steps, and after the last step.")
flags.DEFINE_bool("redo", False, "Measure again the runs already in the results file.")
flags.DEFINE_bool("plot_only", False, "Train nothing: tables and plots from the results file.")
flags.DEFINE_string("name", "convergence", "Results file name under --results_dir.")
flags.DEFINE_string("results_dir", common.RESULTS_DIR, "Where the JSONL, JSON and PNG go.")

#: Metrics the monitor logs, as the paper's figure names them, and the relative
#: error ‖g − ∇F‖² / ‖∇F‖² (scale-free: robust to the spikes of ‖∇F‖²).
METRICS = ("gradient_error", "gradient_norm", "global_loss", "relative_error")
#: Per-step scalars of the methods worth keeping (EMC²'s chain statistics, the cache's).
STEP_SCALARS = ("acceptance_rate", "out_of_batch_fraction", "positive_weight",
                "cache_staleness")


def fail(message: str):
    print(f"convergence: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_key(run: dict) -> tuple:
    return (run["dataset"], int(run["batch_size"]), run["variant"], int(run["seed"]))


def load_runs(path: str) -> list[dict]:
    """The finished runs of the results file, the last line of each run kept (a
    `--redo` appends a newer one); a torn last line, from a crash, is ignored."""
    if not os.path.exists(path):
        return []
    runs = {}
    with open(path) as handle:
        for line in handle:
            try:
                run = json.loads(line)
            except json.JSONDecodeError:
                continue
            runs[run_key(run)] = run
    return list(runs.values())


def append_run(path: str, run: dict) -> None:
    """Appends one finished run as a JSON line, flushed to disk (on a line of its own
    after a torn last line that a crash left)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torn = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
    with open(path, "a") as handle:
        handle.write(("\n" if torn else "") + json.dumps(run, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def load_data(name: str):
    """N = --train_size stratified training images of `name` (fixed: seed 0)."""
    import emc2_tf

    data = emc2_tf.load_dataset(name, FLAGS.data_dir)
    return emc2_tf.subset_train(data, FLAGS.train_size, seed=0)


def stored_views(data, dataset_name: str):
    """The K views of every image, drawn once with seed 0 (shared by every run)."""
    import emc2_tf

    augment = emc2_tf.AugmentConfig.for_dataset(dataset_name)
    return emc2_tf.finite_views(data.train_images, FLAGS.finite_augmentations,
                                augment=augment, seed=0)


class StepTimer:
    """A Keras callback recording each training step's wall-clock seconds."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.seconds = []
                self._started = None

            def on_train_batch_begin(self, batch, logs=None):
                self._started = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                self.seconds.append(time.perf_counter() - self._started)

        return _Timer()


def training_seconds(step_seconds: list[float], measured_steps: list[int]) -> list[float]:
    """Cumulative training seconds after each step, a measured step counted at the
    median of the unmeasured ones (its own time includes the error's bookkeeping;
    the exact gradient itself runs before the step's timer starts)."""
    measured = set(measured_steps)  # optimizer steps t, 0 first: step_seconds[t]
    plain = [s for t, s in enumerate(step_seconds) if t not in measured]
    median = float(np.median(plain)) if plain else float(np.median(step_seconds))
    adjusted = [median if t in measured else s for t, s in enumerate(step_seconds)]
    return np.cumsum(adjusted).tolist()


def build_model(method: str, options: dict, data, views, seed: int):
    import keras

    import emc2_tf

    keras.utils.set_random_seed(seed)
    encoder = emc2_tf.build_encoder("small_cnn", data.image_shape)
    accepted = emc2_tf.models.method_options(method)
    arguments = {"seed": seed, **options}
    if "temperature" in accepted:
        arguments["temperature"] = FLAGS.temperature
    if "finite_augmentations" in accepted:  # chains / cache rows over the N·K stored views
        arguments["finite_augmentations"] = views.num_views
        if "images" in accepted:
            arguments["images"] = views.table
    model = emc2_tf.build_model(method, encoder=encoder, dataset_size=data.num_train,
                                **arguments)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=FLAGS.learning_rate,
                                                 momentum=0.0))
    return model


def one_run(dataset_name: str, data, views, variant: str, batch_size: int, seed: int) -> dict:
    """Trains one run with the monitor; returns its curves and statistics."""
    import emc2_tf

    method, options = common.split_variant(variant)
    model = build_model(method, options, data, views, seed)
    dataset = emc2_tf.make_two_view_dataset(views, batch_size, seed=seed)
    steps = (data.num_train // batch_size) * FLAGS.epochs
    every = max(1, steps // FLAGS.points)
    monitor = emc2_tf.GlobalObjectiveMonitor(views, every_n_steps=every)
    timer = StepTimer()
    started = time.perf_counter()
    history = model.fit(dataset, epochs=FLAGS.epochs, verbose=0, callbacks=[monitor, timer])
    wall = time.perf_counter() - started
    records = [dict(record) for record in monitor.records]
    measured_steps = [int(r["step"]) for r in records]
    cumulative = training_seconds(timer.seconds, measured_steps)
    for record in records:
        record["monitor_seconds"] = record["seconds"]
        record["seconds"] = cumulative[int(record["step"]) - 1] if int(record["step"]) else 0.0
        record["relative_error"] = record["gradient_error"] / max(record["gradient_norm"], 1e-30)
    scalars = {name: float(np.mean(history.history[name]))
               for name in STEP_SCALARS if name in history.history}
    return {"dataset": dataset_name, "variant": variant, "method": method,
            "options": options, "batch_size": batch_size, "seed": seed,
            "steps": steps, "every_n_steps": every, "records": records,
            "seconds_per_step": float(np.median(timer.seconds)),
            "training_seconds": cumulative[-1], "wall_seconds": wall, **scalars}


# ---------------------------------------------------------------- the report


def final_values(run: dict) -> dict:
    """The values after the last epoch: the mean of the run's measurements in its
    last epoch (the monitor measures every few steps; one measurement is noisy)."""
    steps_per_epoch = run["steps"] // FLAGS.epochs if FLAGS.epochs else run["steps"]
    last = [r for r in run["records"] if r["step"] > run["steps"] - steps_per_epoch]
    last = last or run["records"][-1:]
    return {name: float(np.mean([r[name] for r in last])) for name in METRICS}


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (data set, B, variant): mean ± std over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["batch_size"], run["variant"]), []).append(run)
    rows = []
    for (dataset, batch_size, variant), members in groups.items():
        finals = [final_values(run) for run in members]
        row = {"dataset": dataset, "batch_size": batch_size, "variant": variant,
               "seeds": len(members)}
        for name in METRICS:
            values = [f[name] for f in finals]
            row[name] = [float(np.mean(values)), float(np.std(values))]
        row["seconds_per_step"] = float(np.mean([r["seconds_per_step"] for r in members]))
        for name in STEP_SCALARS:
            values = [r[name] for r in members if name in r]
            if values:
                row[name] = float(np.mean(values))
        rows.append(row)
    return rows


def _pm(pair, digits=3) -> str:
    mean, std = pair
    return f"{mean:.{digits}g} ± {std:.1g}"


def print_table(rows: list[dict]) -> str:
    header = ["data", "B", "method", "seeds", "‖g − ∇F‖²", "‖∇F‖²", "F", "‖g − ∇F‖²/‖∇F‖²",
              "ms/step",
              "acceptance", "out-of-batch"]
    table = [[r["dataset"], r["batch_size"], r["variant"], r["seeds"],
              _pm(r["gradient_error"]), _pm(r["gradient_norm"]), _pm(r["global_loss"], 4),
              _pm(r["relative_error"]),
              f"{1000 * r['seconds_per_step']:.1f}",
              f"{r['acceptance_rate']:.3f}" if "acceptance_rate" in r else "–",
              f"{r['out_of_batch_fraction']:.3f}" if "out_of_batch_fraction" in r else "–"]
             for r in rows]
    text = common.markdown_table(header, table)
    print(text)
    return text


def smooth(values: np.ndarray, window: int = 5) -> np.ndarray:
    """A centred running mean over `window` measurements (shorter at the ends):
    one measurement of ‖∇F‖² swings by orders of magnitude from one step to the
    next at this learning rate."""
    values = np.asarray(values, np.float64)
    half = window // 2
    return np.array([values[max(0, i - half): i + half + 1].mean() for i in range(len(values))])


def plot(runs: list[dict], path: str) -> None:
    """Rows: (data set, B) against iterations, then against training seconds;
    columns: the metrics; one line per variant, the mean over seeds, smoothed
    over 5 measurements."""
    plt = common.pyplot()
    panels = sorted({(run["dataset"], run["batch_size"]) for run in runs})
    figure, axes = plt.subplots(2 * len(panels), len(METRICS),
                                figsize=(5 * len(METRICS), 3.4 * 2 * len(panels)),
                                squeeze=False)
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["batch_size"], run["variant"]), []).append(run)
    variants = list(dict.fromkeys(run["variant"] for run in runs))
    for (dataset, batch_size, variant), members in groups.items():
        colour = f"C{variants.index(variant) % 10}"
        length = min(len(r["records"]) for r in members)
        panel = panels.index((dataset, batch_size))
        for axis_kind, x_key in enumerate(("step", "seconds")):
            row = 2 * panel + axis_kind
            x = np.mean([[rec[x_key] for rec in r["records"][:length]] for r in members], axis=0)
            for column, name in enumerate(METRICS):
                y = np.mean([[rec[name] for rec in r["records"][:length]] for r in members],
                            axis=0)
                axis = axes[row][column]
                axis.plot(x, smooth(y), color=colour, label=f"{variant} ({len(members)} seeds)")
                axis.set_title(f"{dataset}, B={batch_size}: {name}", fontsize=9)
                axis.set_xlabel("iteration" if x_key == "step" else "training seconds")
                if name != "global_loss":
                    axis.set_yscale("log")
    for row in range(0, 2 * len(panels), 2):
        axes[row][0].legend(fontsize=6)
    common.save_figure(figure, path)


def report(runs: list[dict]) -> None:
    rows = summarize(runs)
    rows.sort(key=lambda r: (r["dataset"], r["batch_size"],
                             [run_variant for run_variant in FLAGS.methods].index(r["variant"])
                             if r["variant"] in FLAGS.methods else 99))
    table = print_table(rows)
    png = os.path.join(FLAGS.results_dir, f"{FLAGS.name}.png")
    plot(runs, png)
    payload = {"benchmark": "convergence", "rows": rows, "table": table,
               "machine": common.device_description(),
               "settings": {"train_size": FLAGS.train_size, "epochs": FLAGS.epochs,
                            "finite_augmentations": FLAGS.finite_augmentations,
                            "learning_rate": FLAGS.learning_rate,
                            "temperature": FLAGS.temperature, "points": FLAGS.points},
               "runs": len(runs)}
    path = common.write_json(FLAGS.name, payload, FLAGS.results_dir)
    print(f"\nwrote {path} and {png}")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpfull).")
    results = os.path.join(FLAGS.results_dir, f"{FLAGS.name}.jsonl")
    if FLAGS.plot_only:
        runs = load_runs(results)
        if not runs:
            fail(f"--plot_only: no runs in {results}.")
        report(runs)
        return
    import emc2_tf

    common.quiet_tensorflow()
    try:
        batch_sizes = sorted(int(b) for b in FLAGS.batch_sizes)
    except ValueError:
        fail(f"--batch_sizes must be integers; got {','.join(FLAGS.batch_sizes)}.")
    for entry in FLAGS.methods:
        method, options = common.split_variant(entry)
        if method not in emc2_tf.METHODS:
            fail(f"--methods: unknown {method!r}; accepted: {','.join(sorted(emc2_tf.METHODS))}.")
        refused = [k for k in options if k not in emc2_tf.models.method_options(method)]
        if refused:
            fail(f"--methods: {method} takes no option {refused}.")
    if FLAGS.seeds < 1 or FLAGS.epochs < 1 or min(batch_sizes) < 2:
        fail("--seeds and --epochs must be ≥ 1 and every batch size ≥ 2.")
    done = {run_key(run) for run in load_runs(results)}
    started = time.time()
    planned = [(d, b, v, s) for d in FLAGS.datasets for b in batch_sizes
               for s in range(FLAGS.seeds) for v in FLAGS.methods]
    todo = [key for key in planned if FLAGS.redo or key not in done]
    print(f"convergence: {len(planned)} runs planned, {len(planned) - len(todo)} already in "
          f"{results}", flush=True)
    cache = {}
    for number, (dataset_name, batch_size, variant, seed) in enumerate(todo, start=1):
        if dataset_name not in cache:
            try:
                data = load_data(dataset_name)
            except (FileNotFoundError, ValueError) as error:
                fail(f"--datasets={dataset_name}: {error}")
            cache[dataset_name] = (data, stored_views(data, dataset_name))
        data, views = cache[dataset_name]
        run = one_run(dataset_name, data, views, variant, batch_size, seed)
        append_run(results, run)
        final = final_values(run)
        print(f"[{number}/{len(todo)}] {dataset_name} B={batch_size:<3d} {variant:<50s} "
              f"seed={seed}  ‖g−∇F‖² {final['gradient_error']:.4g}  ‖∇F‖² "
              f"{final['gradient_norm']:.4g}  F {final['global_loss']:.4f}  "
              f"({run['wall_seconds']:.0f} s, {(time.time() - started) / 60:.1f} min in all)",
              flush=True)
    report(load_runs(results))


if __name__ == "__main__":
    app.run(main)
