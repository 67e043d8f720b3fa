r"""Quality of every method across batch sizes and seeds (the paper's small-batch claim).

    python -m benchmarks.quality                        # digits, defaults below
    python -m benchmarks.quality --methods=emc2,simclr --batch_sizes=8,64 --seeds=5
    python -m benchmarks.quality --dataset=cifar10 --data_dir=~/tensorflow_datasets --epochs=100

Every run trains the same encoder with the same augmentations for the same
number of epochs, each method at its default temperature (emc2 0.07, sogclr,
simclr, dcl 0.1, dhel 0.3, kcl none), Adam 1e-3 (`--optimizer`,
`--learning_rate`, `--weight_decay`, `--warmup_epochs` change the recipe for
every run; `--train_size` trains on a stratified subset); then evaluates the frozen
backbone on the held-out split (1-NN, linear probe) and the embedding's
alignment, uniformity and effective rank. Prints the mean ± std over seeds,
writes `benchmarks/results/<name>.json` (after every run, so an interrupted
benchmark keeps what it measured) and `<name>.png` (accuracy against batch
size, one line per method).
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", ["simclr", "sogclr", "dcl", "dhel", "kcl", "emc2"],
                  "Methods, or method variants written method/key=value/key=value (e.g. "
                  "emc2/exact_ratio=true/out_of_batch=drop): one row each.")
flags.DEFINE_list("batch_sizes", ["8", "16", "32", "64", "128"], "Batch sizes B.")
flags.DEFINE_integer("seeds", 3, "Seeds per (method, B): 0, 1, …")
flags.DEFINE_integer("epochs", 10, "Training epochs of every run.")
flags.DEFINE_string("dataset", "digits", "digits | fashion_mnist | a tfds data set under --data_dir.")
flags.DEFINE_string("data_dir", None, "Data folder (fashion_mnist idx files, tfds data_dir).")
flags.DEFINE_integer("max_train", 0, "Use only the first N training images (0 = all).")
flags.DEFINE_integer("train_size", 0,
                     "Use a stratified subset of N training images (0 = all), drawn once with "
                     "seed 0 and shared by every run; after --max_train.")
flags.DEFINE_enum("optimizer", "adam", ["adam", "adamw", "sgd", "lars"],
                  "Optimizer of every run (emc2_tf.build_optimizer).")
flags.DEFINE_float("learning_rate", 1e-3, "Learning rate (the peak with --warmup_epochs).")
flags.DEFINE_float("weight_decay", 0.0,
                   "Weight decay: L2 in the gradient for adam/sgd/lars, decoupled for adamw.")
flags.DEFINE_integer("warmup_epochs", 0,
                     "> 0: linear warm-up over these epochs, then cosine decay to 0; 0: constant.")
flags.DEFINE_list("options", [],
                  "Constructor options key=value for the methods that take them, e.g. "
                  "temperature=0.1,burn_in=0,exact_ratio=true (an ablation; the default is "
                  "each method's own).")
flags.DEFINE_bool("floors", True,
                  "Also score raw pixels and the untrained encoder of each seed: the floors "
                  "every run must beat.")
flags.DEFINE_bool("mixed_precision", False, "mixed_float16 on a GPU, mixed_bfloat16 on a CPU.")
flags.DEFINE_string("name", "quality", "Results file name under --results_dir.")
flags.DEFINE_list("overlay", [],
                  "Other results names under --results_dir (e.g. an ablation) whose runs join "
                  "the tables and the plot, labelled with their --options.")
flags.DEFINE_bool("plot_only", False,
                  "Train nothing: re-print the tables and redraw the plot of <name>.json "
                  "(with --overlay).")
flags.DEFINE_string("results_dir", common.RESULTS_DIR, "Where the JSON and PNG go.")


def fail(message: str):
    print(f"quality: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_variant(entry: str) -> tuple[str, dict]:
    """`'emc2/exact_ratio=true/out_of_batch=drop'` → `('emc2', {...})`, or a one-line error."""
    try:
        return common.split_variant(entry)
    except ValueError as error:
        fail(f"--methods: {error} (in {entry!r}).")


def summarize(runs: list[dict], methods: list[str], batch_sizes: list[int], key: str):
    """`{(method, B): (mean, std, count)}` of `key` over seeds."""
    import numpy as np

    table = {}
    for method in methods:
        for batch_size in batch_sizes:
            values = [r[key] for r in runs if r["method"] == method and r["batch_size"] == batch_size]
            if values:
                table[method, batch_size] = (float(np.mean(values)), float(np.std(values)), len(values))
    return table


def plot(runs, methods, batch_sizes, path: str, title: str, floors=None) -> None:
    figure, axes = common.pyplot().subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for axis, key, label in zip(axes, ("knn_accuracy", "linear_probe_accuracy"),
                                ("held-out 1-NN accuracy", "held-out linear-probe accuracy")):
        table = summarize(runs, methods, batch_sizes, key)
        for method in methods:
            points = [(b, *table[method, b][:2]) for b in batch_sizes if (method, b) in table]
            if not points:
                continue
            xs, means, stds = zip(*points)
            style = dict(linewidth=1.3)
            if method.startswith("emc2"):
                style = dict(linewidth=2.5, color="black")
                if method != "emc2":  # a variant: its own colour, dashed
                    style = dict(linewidth=2.0, linestyle="--")
            axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method, **style)
        for (name, value), line in zip(floor_table(floors), (":", "-.")):
            if key in value:
                axis.axhline(float(value[key].split(" ")[0]), color="gray", linestyle=line,
                             linewidth=1, label=name)
        axis.set_xscale("log", base=2)
        axis.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        axis.set_xlabel("batch size B")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    common.save_figure(figure, path)


def variant_label(method: str, options: dict) -> str:
    """`emc2` or, for an ablation, `emc2 (exact_ratio=True)`."""
    if not options:
        return method
    return f"{method} ({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})"


def load_runs(name: str) -> tuple[dict, list[dict]]:
    """A results file's payload and its runs, each labelled with its method variant."""
    import json

    path = common.os.path.join(FLAGS.results_dir, f"{name}.json")
    try:
        with open(path) as handle:
            payload = json.load(handle)
    except (OSError, ValueError) as error:
        fail(f"cannot read {path}: {error}")
    runs = []
    for run in payload["runs"]:
        label = run.get("variant") or variant_label(
            run["method"], payload.get("options", {}).get(run["method"], {}))
        runs.append({**run, "method": label})
    return payload, runs


def floor_table(floors: dict | None) -> list[tuple[str, dict]]:
    """Rows `(name, {key: 'mean ± std'})` for raw pixels and the untrained encoder."""
    import numpy as np

    if not floors:
        return []
    # Raw pixels are one representation: the floor of the backbone and of the embedding.
    raw = {prefix + k: f"{v:.4f}" for k, v in floors["raw_pixels"].items()
           for prefix in ("", "embedding_")}
    untrained = floors["untrained"]
    keys = untrained[0].keys() if untrained else []
    return [("raw pixels (floor)", raw),
            ("untrained encoder (floor)",
             {k: f"{np.mean([u[k] for u in untrained]):.4f} ± "
                 f"{np.std([u[k] for u in untrained]):.4f}" for k in keys})]


def report(payload: dict, runs: list[dict], methods: list[str], png: str) -> None:
    """Prints the mean ± std tables and draws the plot."""
    batch_sizes = sorted({run["batch_size"] for run in runs})
    seeds = payload["seeds"]
    floor_rows = floor_table(payload.get("floors"))
    for key, label in (("knn_accuracy", "backbone 1-NN accuracy"),
                       ("linear_probe_accuracy", "backbone linear-probe accuracy"),
                       ("embedding_knn_accuracy", "embedding 1-NN accuracy"),
                       ("embedding_linear_probe_accuracy", "embedding linear-probe accuracy")):
        table = summarize(runs, methods, batch_sizes, key)
        if not table:
            continue  # results written before the embedding was scored
        rows = [[method] + [f"{table[method, b][0]:.4f} ± {table[method, b][1]:.4f}"
                            if (method, b) in table else "–" for b in batch_sizes]
                for method in methods]
        rows += [[name] + [value.get(key, "–")] * len(batch_sizes)
                 for name, value in floor_rows]
        print(f"\nheld-out {label}, mean ± std over {seeds} seeds")
        print(common.markdown_table(["method"] + [f"B={b}" for b in batch_sizes], rows))
    smallest = min(batch_sizes)
    representation = []
    for method in methods:
        row = [method]
        for key in ("alignment", "uniformity", "effective_rank"):
            table = summarize(runs, [method], [smallest], key)
            row.append(f"{table[method, smallest][0]:.3f}" if (method, smallest) in table else "–")
        representation.append(row)
    print(f"\nrepresentation at B={smallest} (held-out, mean over seeds)")
    print(common.markdown_table(["method", "alignment", "uniformity", "effective rank"],
                                representation))
    for batch_size in batch_sizes:
        per_epoch_table(runs, methods, batch_size)
    plot(runs, methods, batch_sizes, png,
         f"{payload['dataset']}: {payload['epochs']} epochs, mean ± std over {seeds} seeds",
         payload.get("floors"))


#: Per-epoch series a run records (`common.train_and_evaluate`), in table order.
EPOCH_SERIES = (("acceptance_rate", "acceptance"), ("out_of_batch_fraction", "out-of-batch"),
                ("uniformity", "uniformity"), ("effective_rank", "eff. rank"))


def per_epoch_table(runs: list[dict], methods: list[str], batch_size: int) -> None:
    """Prints, per method at `batch_size`, each epoch's series as `first → … → last`
    (means over seeds): the analysis of why a method falls behind."""
    import numpy as np

    rows = []
    for method in methods:
        chosen = [r for r in runs if r["method"] == method and r["batch_size"] == batch_size
                  and "per_epoch" in r]
        if not chosen:
            continue
        row = [method]
        for key, _ in EPOCH_SERIES:
            series = [r["per_epoch"][key] for r in chosen if key in r["per_epoch"]]
            if not series:
                row.append("–")
                continue
            mean = np.mean(np.array(series, dtype=np.float64), axis=0)
            row.append(" → ".join(f"{v:.2f}" for v in mean))
        rows.append(row)
    if rows:
        print(f"\nper epoch at B={batch_size} (held-out sample of 2,000; mean over seeds)")
        print(common.markdown_table(["method", *(label for _, label in EPOCH_SERIES)], rows))


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpfull).")
    png = common.os.path.join(FLAGS.results_dir, f"{FLAGS.name}.png")
    if FLAGS.plot_only:
        payload, runs = load_runs(FLAGS.name)
        methods = list(dict.fromkeys(run["method"] for run in runs))
        for name in FLAGS.overlay:
            overlay_runs = load_runs(name)[1]
            runs += overlay_runs
            methods += [m for m in dict.fromkeys(r["method"] for r in overlay_runs)
                        if m not in methods]
        report(payload, runs, methods, png)
        print(f"\nredrew {png}")
        return
    import emc2_tf

    try:
        batch_sizes = sorted(int(b) for b in FLAGS.batch_sizes)
    except ValueError:
        fail(f"--batch_sizes must be integers; got {','.join(FLAGS.batch_sizes)}.")
    variants = [parse_variant(entry) for entry in FLAGS.methods]
    unknown = [m for m, _ in variants if m not in emc2_tf.METHODS]
    if unknown:
        fail(f"--methods: unknown {unknown}; accepted: {','.join(sorted(emc2_tf.METHODS))}.")
    for method, own in variants:
        refused = [k for k in own if k not in emc2_tf.models.method_options(method)]
        if refused:
            fail(f"--methods: {method} takes no option {refused}.")
    if FLAGS.seeds < 1 or FLAGS.epochs < 1 or min(batch_sizes) < 2:
        fail("--seeds and --epochs must be ≥ 1 and every batch size ≥ 2.")
    if not 0 <= FLAGS.warmup_epochs < FLAGS.epochs:
        fail(f"--warmup_epochs must be in [0, --epochs={FLAGS.epochs}); got {FLAGS.warmup_epochs}.")
    try:  # --learning_rate and --weight_decay: finite, > 0 and ≥ 0
        emc2_tf.build_optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.weight_decay)
    except ValueError as error:
        fail(f"--{error}")  # the message starts with the argument's name
    try:
        data = emc2_tf.load_dataset(FLAGS.dataset, FLAGS.data_dir)
    except (FileNotFoundError, ValueError) as error:
        fail(f"--dataset={FLAGS.dataset}: {error}")
    if FLAGS.max_train:
        data = emc2_tf.from_arrays(data.train_images[: FLAGS.max_train],
                                   data.train_labels[: FLAGS.max_train], data.test_images,
                                   data.test_labels, name=data.name)
    try:
        data = emc2_tf.subset_train(data, FLAGS.train_size, seed=0)
    except ValueError as error:
        fail(f"--train_size={FLAGS.train_size}: {error}")
    if max(batch_sizes) > data.num_train:
        fail(f"--batch_sizes: {max(batch_sizes)} exceeds the {data.num_train} training images.")
    try:
        options = common.parse_options(FLAGS.options)
    except ValueError as error:
        fail(f"--options: {error}.")
    method_options = {}  # variant label → (method, its options)
    for method, own in variants:
        accepted = emc2_tf.models.method_options(method)
        merged = {**{k: v for k, v in options.items() if k in accepted}, **own}
        method_options[variant_label(method, merged)] = (method, merged)
    unused = [k for k in options if not any(k in o for _, o in method_options.values())]
    if unused:
        fail(f"--options: no method of --methods={','.join(FLAGS.methods)} takes {unused}.")
    policy = common.set_mixed_precision(FLAGS.mixed_precision)
    machine = common.device_description()
    print(f"quality: {data.name}, N={data.num_train}, {FLAGS.epochs} epochs, "
          f"{len(FLAGS.methods)} methods × {len(batch_sizes)} batch sizes × {FLAGS.seeds} seeds "
          f"on {machine['device']} ({policy})", flush=True)
    payload = {"benchmark": "quality", "dataset": data.name, "num_train": data.num_train,
               "epochs": FLAGS.epochs, "methods": FLAGS.methods, "batch_sizes": batch_sizes,
               "seeds": FLAGS.seeds, "policy": policy, "machine": machine,
               "options": {label: o for label, (_, o) in method_options.items()},
               "optimizer": FLAGS.optimizer, "train_size": FLAGS.train_size,
               "learning_rate": FLAGS.learning_rate, "weight_decay": FLAGS.weight_decay,
               "warmup_epochs": FLAGS.warmup_epochs, "runs": []}
    started = time.time()
    if FLAGS.floors:
        payload["floors"] = common.floors(data, FLAGS.seeds)
        print("floors: " + ", ".join(
            f"{name} 1-NN {value.get('knn_accuracy', '–')} probe "
            f"{value.get('linear_probe_accuracy', '–')}"
            for name, value in floor_table(payload["floors"])), flush=True)
    total = len(method_options) * len(batch_sizes) * FLAGS.seeds
    for seed in range(FLAGS.seeds):
        for batch_size in batch_sizes:
            for label, (method, own) in method_options.items():
                result = common.train_and_evaluate(
                    method, data, FLAGS.dataset, batch_size, seed, FLAGS.epochs,
                    learning_rate=FLAGS.learning_rate, warmup_epochs=FLAGS.warmup_epochs,
                    optimizer=FLAGS.optimizer, weight_decay=FLAGS.weight_decay, **own)
                result["variant"] = label
                payload["runs"].append(result)
                payload["seconds"] = time.time() - started
                common.write_json(FLAGS.name, payload, FLAGS.results_dir)
                print(f"[{len(payload['runs'])}/{total}] {label} B={batch_size:<4d} "
                      f"seed={seed}  1-NN {result['knn_accuracy']:.4f}  probe "
                      f"{result['linear_probe_accuracy']:.4f}  ({result['train_seconds']:.1f} s)",
                      flush=True)
    labels = list(method_options)
    runs = [{**run, "method": run["variant"]} for run in payload["runs"]]
    report(payload, runs, labels, png)
    payload["seconds"] = time.time() - started
    path = common.write_json(FLAGS.name, payload, FLAGS.results_dir)
    print(f"\nwrote {path} and {png} in {payload['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    app.run(main)
