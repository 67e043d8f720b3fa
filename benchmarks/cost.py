r"""Cost per step: EMC² (and its variants) against SimCLR and SogCLR, per B,
scan, compilation, encoder and data-set size, with a breakdown of one step.

    python -m benchmarks.cost                      # every table below (13.4 min on a 2-core CPU)
    python -m benchmarks.cost --batch_sizes=8,32 --encoders=small_cnn --scan_modes= \
        --breakdown_batch_sizes= --scaling_sizes=     # table 1 only, two B

The models of a table are built in one process and timed round-robin
(blocks of `--block` steps, `--rounds` rounds, after 3 warm-up steps), so
ratios compare runs on the same machine state: median seconds per step of
the compiled `train_function`, data included. A method variant is written
`method/key=value/...` (as in `benchmarks.quality`), e.g.
`emc2/exact_ratio=true/out_of_batch=drop`. EMC²'s chains start filled with
random states (steady state: every step re-encodes its out-of-batch
negatives); a variant that needs no image table (`out_of_batch=drop`
without `exact_ratio`) runs without one.

1. **Per method and B** (`--methods`, `--batch_sizes`; digits, small CNN),
   ratio to SimCLR at the same B; with `resnet18` in `--encoders` also on
   synthetic 32x32x3 images (`--resnet_methods`, `--resnet_batch_sizes`,
   `--resnet_rounds` blocks of one step). Memory per row: on a GPU the
   allocator's peak (`tf.config.experimental.get_memory_info`); on a CPU
   with `--memory` each small-CNN row runs again in its own process for its
   peak resident memory (`VmHWM`) and the rise over its memory before
   the first step.
2. **Scan and compilation** (`--scan_modes` × `--jit`): EMC² (default
   options) with `scan=sequential|parallel` (or blocked), as a TensorFlow graph or under
   XLA (`compile(jit_compile=True)`), ratio to SimCLR in the same mode. A
   parallel scan over more than `PARALLEL_SCAN_MAX_ELEMENTS` comparisons
   (B ≥ 256) is skipped (noted in the table).
3. **Breakdown of one EMC² step** (`--breakdown_variants` at
   `--breakdown_batch_sizes`, with table 1's models): the step's pieces, each
   a `tf.function` of the model's own code run alone on one batch: encoder
   forward + backward of the 2B views; `mh_scan` on the `[2, B, 2B]` logits;
   the re-encode of the B out-of-batch negatives (`_out_of_batch_logits`,
   forward + backward); the write-back (`update_sample_state` of B rows);
   the next two-view batch (overlapped with the step by prefetching); and
   the full step. Milliseconds and % of the full step.
4. **EMC² against N** (`--scaling_sizes`, `--scaling_methods`, B =
   `--scaling_batch_size`): synthetic 8x8x1 uint8-valued images, a uint8
   image table (`emc2_tf.image_table`), all N timed in one round-robin;
   ratio to the smallest N and to SimCLR at the same N. The step must not
   grow with N (tables are indexed, never scanned).

Prints Markdown tables and writes `benchmarks/results/<name>.json` (after
every table, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable, NamedTuple

from absl import app, flags

from benchmarks import common

#: `emc2` is the default variant (drop + waste recycling); PAPER_EMC2 the paper's
#: statement of the algorithm (and the default before issue 11).
PAPER_EMC2 = "emc2/out_of_batch=reencode/waste_recycling=false"
DEFAULT_METHODS = ["simclr", "sogclr", "emc2", PAPER_EMC2, "emc2/exact_ratio=true",
                   "emc2/exact_ratio=true/out_of_batch=reencode"]
ENCODERS = ("small_cnn", "resnet18")
JIT_MODES = ("graph", "xla")
WARMUP_STEPS = 3

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", DEFAULT_METHODS,
                  "Methods or variants method/key=value/... of table 1 (must include simclr).")
flags.DEFINE_list("batch_sizes", ["8", "32", "128", "512"], "Batch sizes B of tables 1 and 2.")
flags.DEFINE_list("encoders", list(ENCODERS),
                  "Encoders of table 1: small_cnn (digits), resnet18 (synthetic 32x32x3).")
flags.DEFINE_list("resnet_methods", ["simclr", "emc2", PAPER_EMC2],
                  "Methods or variants of the ResNet-18 rows (must include simclr).")
flags.DEFINE_list("resnet_batch_sizes", ["8", "32"], "Batch sizes of the ResNet-18 rows.")
flags.DEFINE_integer("resnet_rounds", 3, "Timed rounds of one step each for ResNet-18.")
flags.DEFINE_list("scan_modes", ["sequential", "parallel"],
                  "EMC² scan= values of table 2 (empty: no table 2).")
flags.DEFINE_list("jit", list(JIT_MODES), "Compilation modes of table 2: graph, xla.")
flags.DEFINE_list("breakdown_batch_sizes", ["8", "32", "128", "512"],
                  "B of the step breakdown, among --batch_sizes (empty: no breakdown).")
flags.DEFINE_list("breakdown_variants", ["emc2", PAPER_EMC2, "emc2/exact_ratio=true"],
                  "EMC² variants broken down.")
flags.DEFINE_list("scaling_sizes", ["2000", "200000", "1280000"],
                  "Data-set sizes N of table 4 (empty: no table 4).")
flags.DEFINE_list("scaling_methods", ["simclr", "emc2", PAPER_EMC2],
                  "Methods or variants of table 4.")
flags.DEFINE_integer("scaling_batch_size", 64, "B of table 4.")
flags.DEFINE_integer("block", 10, "Steps per timed block.")
flags.DEFINE_integer("rounds", 5, "Timed rounds (each runs every model of a table once).")
flags.DEFINE_bool("memory", True,
                  "Peak memory per row: the GPU allocator's, or on a CPU one process per "
                  "small-CNN (variant, B) of table 1.")
flags.DEFINE_bool("mixed_precision", False, "mixed_float16 on a GPU, mixed_bfloat16 on a CPU.")
flags.DEFINE_string("name", "cost", "Results file name under --results_dir.")
flags.DEFINE_string("results_dir", common.RESULTS_DIR, "Where the JSON goes.")
flags.DEFINE_string("memory_probe", None, "Internal: 'variant,B' measured in this process.")


def fail(message: str):
    print(f"cost: error: {message}", file=sys.stderr)
    sys.exit(2)


def first_line(error: Exception) -> str:
    """An error's first line (at most 200 characters), for one-line messages."""
    return (str(error).splitlines() or [""])[0][:200]


# ----------------------------------------------------------------------------- variants


class Variant(NamedTuple):
    """A method with constructor options, labelled `method/key=value/...`."""

    label: str
    method: str
    options: dict


def parse_variant(entry: str, flag: str = "methods") -> Variant:
    """`'emc2/exact_ratio=true'` → `Variant(that string, 'emc2', {'exact_ratio': True})`."""
    try:
        method, options = common.split_variant(entry)
    except ValueError as error:
        fail(f"--{flag}: {error} (in {entry!r}).")
    return Variant(entry.strip(), method, options)


def parse_variants(flag: str, entries: list[str], need_simclr: bool = False) -> list[Variant]:
    """The variants of `--flag`, checked: known methods, accepted options, no duplicates."""
    import emc2_tf

    variants = [parse_variant(entry, flag) for entry in entries]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        fail(f"--{flag}: duplicate entries in {','.join(labels)}.")
    for variant in variants:
        if variant.method not in emc2_tf.METHODS:
            fail(f"--{flag}: unknown method {variant.method!r} in {variant.label!r}; accepted: "
                 f"{','.join(sorted(emc2_tf.METHODS))}.")
        accepted = set(emc2_tf.models.method_options(variant.method)) - {"images", "seed"}
        unknown = sorted(set(variant.options) - accepted)
        if unknown:
            fail(f"--{flag}: {variant.method} takes no option {unknown} (in {variant.label!r}).")
    if need_simclr and "simclr" not in labels:
        fail(f"--{flag} must include simclr (the reference of the ratios).")
    return variants


def check_builds(flag: str, variants: list[Variant]) -> None:
    """Builds every variant once on a tiny data set: a bad option value fails now, in one line."""
    import numpy as np

    import emc2_tf

    tiny = emc2_tf.from_arrays(np.zeros((8, 8, 8, 1), np.uint8), np.zeros(8), np.zeros(
        (2, 8, 8, 1), np.uint8), np.zeros(2), name="tiny")
    for variant in variants:
        try:
            build_model(variant, tiny, 4)
        except (ValueError, TypeError) as error:
            fail(f"--{flag}: {variant.label}: {first_line(error)}")


# ----------------------------------------------------------------------------- steppers


def build_model(variant: Variant, data, batch_size: int, jit: bool = False, seed: int = 0):
    """`common.build`'s compiled model; no image table where none is needed; XLA if `jit`."""
    import emc2_tf

    _, model = common.build(variant.method, data, batch_size, seed, **variant.options)
    if not getattr(model, "needs_image_table", True):
        model.set_image_table(None)
    if jit:
        model.compile(optimizer=emc2_tf.build_optimizer("adam", 1e-3, 0.0), jit_compile=True)
    return model


def two_view_stream(data, batch_size: int, seed: int = 0):
    """The endless two-view dataset of `data` (digits' augmentations for 1 channel)."""
    import emc2_tf

    augment = (emc2_tf.AugmentConfig.for_dataset("digits") if data.image_shape[-1] == 1
               else emc2_tf.AugmentConfig())
    return emc2_tf.make_two_view_dataset(data.train_images, batch_size, augment,
                                         seed=seed).repeat()


def fill_chains(model, seed: int = 0) -> None:
    """Random valid chain states (≠ self) with finite scores: EMC² in steady state."""
    import numpy as np

    if not hasattr(model, "chain_index"):
        return
    n = model.dataset_size
    rng = np.random.default_rng(seed)
    states = (np.arange(n) + rng.integers(1, n, n)) % n
    model.chain_index.assign(states.astype(np.int32))
    model.chain_log_score.assign(np.zeros(n, np.float32))


class Stepper:
    """One model's compiled train step, fed from its own two-view stream."""

    def __init__(self, variant: Variant, data, batch_size: int, dataset=None,
                 jit: bool = False, seed: int = 0):
        self.variant = variant
        self.batch_size = batch_size
        self.model = build_model(variant, data, batch_size, jit, seed)
        fill_chains(self.model, seed)
        self.model.optimizer.build(self.model.trainable_variables)
        self.iterator = iter(dataset if dataset is not None
                             else two_view_stream(data, batch_size, seed))
        self.model.make_train_function()
        self.step_function = self.model.train_function

    def run(self, steps: int) -> float:
        """Runs `steps` steps; returns the seconds they took (synchronised)."""
        started = time.perf_counter()
        for _ in range(steps):
            logs = self.step_function(self.iterator)
            if hasattr(logs, "get_value"):  # a tf.experimental.Optional in some Keras versions
                logs = logs.get_value()
        float(logs["loss"])  # wait for the last step
        return time.perf_counter() - started


def time_round_robin(runners: dict[str, Callable[[int], float]], block: int, rounds: int,
                     warmup: int = WARMUP_STEPS) -> dict[str, float]:
    """Median seconds per step of each runner (`run(steps) -> seconds`), round-robin."""
    import numpy as np

    for run in runners.values():  # trace and warm up
        run(warmup)
    samples = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            samples[name].append(run(block) / block)
    return {name: float(np.median(values)) for name, values in samples.items()}


def gpu_peaks_mib(steppers: dict, steps: int) -> dict:
    """The GPU allocator's peak MiB while each stepper runs `steps` steps ({} without a GPU)."""
    import tensorflow as tf

    if not FLAGS.memory or not tf.config.list_physical_devices("GPU"):
        return {}
    peaks = {}
    for key, stepper in steppers.items():
        tf.config.experimental.reset_memory_stats("GPU:0")
        stepper.run(steps)
        peaks[key] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return peaks


def synthetic_data(num_images: int, shape: tuple, seed: int = 0):
    """`num_images` random uint8-valued images of `shape` (float k/255, as a data set loads)."""
    import numpy as np

    import emc2_tf

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_images, *shape), dtype=np.uint8)
    return emc2_tf.from_arrays(images, np.zeros(num_images), images[:8], np.zeros(8),
                               name=f"synthetic-{num_images}")


# ----------------------------------------------------------------------------- table 1


def per_method_table(payload: dict, encoder: str, data, batch_sizes: list[int],
                     variants: list[Variant], block: int, rounds: int, warmup: int,
                     breakdown: dict | None = None) -> None:
    """Table 1 rows of one encoder into `payload["per_method"]` (and the breakdown at its B)."""
    for batch_size in batch_sizes:
        steppers = {v.label: Stepper(v, data, batch_size) for v in variants}
        medians = time_round_robin({k: s.run for k, s in steppers.items()}, block, rounds, warmup)
        peaks = gpu_peaks_mib(steppers, block)
        for variant in variants:
            row = {"encoder": encoder, "variant": variant.label, "method": variant.method,
                   "options": variant.options, "batch_size": batch_size,
                   "seconds_per_step": medians[variant.label],
                   "ratio_to_simclr": medians[variant.label] / medians["simclr"]}
            if variant.label in peaks:
                row["gpu_peak_mib"] = peaks[variant.label]
            payload["per_method"].append(row)
        print(f"{encoder} B={batch_size}: " + ", ".join(
            f"{k} {1000 * v:.1f} ms" for k, v in medians.items()), flush=True)
        if breakdown and batch_size in breakdown["batch_sizes"]:
            payload["breakdown"] += breakdown_rows(steppers, breakdown["variants"], data,
                                                   batch_size, block, rounds)
        common.write_json(FLAGS.name, payload, FLAGS.results_dir)


# ----------------------------------------------------------------------------- table 2


def too_large_for_parallel(batch_size: int) -> bool:
    """Whether the parallel scan's `B·(2B + 1)·2B` comparisons exceed the library's bound."""
    from emc2_tf.samplers.metropolis_hastings import (
        PARALLEL_SCAN_MAX_ELEMENTS,
        parallel_scan_elements,
    )

    return parallel_scan_elements(batch_size, 2 * batch_size) > PARALLEL_SCAN_MAX_ELEMENTS


def scan_mode_steppers(data, batch_size: int, scan_modes: list[str], jit_modes: list[str]):
    """`({(label, jit mode): Stepper}, {(label, jit mode): why skipped})`: SimCLR and EMC²
    per scan, per compilation mode; a model that fails to compile is skipped, not fatal."""
    steppers, skipped = {}, {}
    for mode in jit_modes:
        for variant in [Variant("simclr", "simclr", {})] + [
                Variant(f"emc2/scan={scan}", "emc2", {"scan": scan}) for scan in scan_modes]:
            key = variant.label, mode
            if variant.options.get("scan") == "parallel" and too_large_for_parallel(batch_size):
                skipped[key] = "parallel scan above PARALLEL_SCAN_MAX_ELEMENTS"
                continue
            try:
                steppers[key] = Stepper(variant, data, batch_size, jit=mode == "xla")
                steppers[key].run(1)  # compiles here: a failure skips this row only
            except Exception as error:  # noqa: BLE001 (e.g. an op XLA cannot compile here)
                steppers.pop(key, None)
                skipped[key] = f"failed: {type(error).__name__}: {first_line(error)}"
                print(f"scan modes B={batch_size}: {key} {skipped[key]}", flush=True)
    if "simclr" not in {label for label, _ in steppers}:
        fail(f"scan modes B={batch_size}: SimCLR did not compile: {skipped}")
    return steppers, skipped


def scan_mode_table(payload: dict, data, batch_sizes: list[int], scan_modes: list[str],
                    jit_modes: list[str], block: int, rounds: int) -> None:
    """Table 2 rows into `payload["scan_modes"]`."""
    for batch_size in batch_sizes:
        steppers, skipped = scan_mode_steppers(data, batch_size, scan_modes, jit_modes)
        medians = time_round_robin({f"{k[0]} {k[1]}": s.run for k, s in steppers.items()},
                                   block, rounds)
        peaks = gpu_peaks_mib(steppers, block)
        for label in ["simclr", *(f"emc2/scan={scan}" for scan in scan_modes)]:
            for mode in jit_modes:
                row = {"variant": label, "scan": label.partition("=")[2] or None, "jit": mode,
                       "batch_size": batch_size}
                if (label, mode) in skipped:
                    row["skipped"] = skipped[label, mode]
                elif f"simclr {mode}" not in medians:
                    row["skipped"] = "no SimCLR reference in this mode"
                else:
                    seconds = medians[f"{label} {mode}"]
                    row.update(seconds_per_step=seconds,
                               ratio_to_simclr=seconds / medians[f"simclr {mode}"])
                    if (label, mode) in peaks:
                        row["gpu_peak_mib"] = peaks[label, mode]
                payload["scan_modes"].append(row)
        print(f"scan modes B={batch_size}: " + ", ".join(
            f"{k} {1000 * v:.1f} ms" for k, v in medians.items()), flush=True)
        common.write_json(FLAGS.name, payload, FLAGS.results_dir)


# ----------------------------------------------------------------------------- breakdown


def repeat(function, *arguments) -> Callable[[int], float]:
    """`run(steps)`: calls `function(*arguments)` `steps` times; seconds, synchronised."""
    import tensorflow as tf

    def run(steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            outputs = function(*arguments)
        for tensor in tf.nest.flatten(outputs):
            tensor.numpy()
        return time.perf_counter() - started

    return run


def encode_part(model):
    """Encoder forward + backward of the 2B views (gradients of a fixed linear read-out)."""
    import tensorflow as tf

    variables = model.encoder.trainable_variables

    @tf.function
    def encode(views, cotangent):
        with tf.GradientTape() as tape:
            embeddings = tf.cast(model.encoder(views, training=True), tf.float32)
            loss = tf.reduce_sum(embeddings * cotangent)
        return [loss, *tape.gradient(loss, variables)]

    return encode


def scan_part(model, batch_size: int):
    """`mh_scan` as the model calls it (its scan, burn-in, exact-ratio refresh)."""
    import tensorflow as tf

    from emc2_tf.samplers import default_burn_in, mh_scan

    burn_in = default_burn_in(batch_size) if model.burn_in is None else model.burn_in

    @tf.function
    def scan(anchor_logits, valid, log_uniforms, initial_log_score, out_of_batch_logits):
        result = mh_scan(anchor_logits, valid, log_uniforms, initial_log_score, burn_in,
                         refresh_log_score_between_passes=model.exact_ratio,
                         out_of_batch_logits=out_of_batch_logits, scan=model.scan,
                         scan_compile=model.scan_compile)
        return result.states, result.accepted, result.final_state, result.final_log_score

    return scan


def reencode_part(model):
    """`_out_of_batch_logits` of the B chains' stored negatives, with its backward pass."""
    import tensorflow as tf

    variables = model.encoder.trainable_variables
    beta = model.inverse_temperature

    @tf.function
    def reencode(view1, view2, old_index):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model._out_of_batch_logits(tf.stack([view1, view2]), old_index,
                                                            beta, True))
        gradients = [g for g in tape.gradient(loss, variables) if g is not None]
        return [loss, *gradients]

    return reencode


def write_back_part(model):
    """`update_sample_state` of the B rows of `chain_index` and `chain_log_score`."""
    import tensorflow as tf

    @tf.function
    def write_back(index, new_index, new_log_score):
        model.update_sample_state(index, [(model.chain_index, new_index),
                                          (model.chain_log_score, new_log_score)])
        return tf.gather(model.chain_index.value, index[:1])

    return write_back


def breakdown_inputs(model, batch) -> dict:
    """One batch's tensors for the parts: views, embeddings, logits, uniforms, chain states."""
    import tensorflow as tf

    index = tf.cast(batch["index"], tf.int32)
    b = int(index.shape[0])
    views = tf.concat([tf.cast(batch["view1"], tf.float32),
                       tf.cast(batch["view2"], tf.float32)], axis=0)
    z = tf.cast(model.encoder(views, training=False), tf.float32)
    logits = model.inverse_temperature * tf.matmul(z, z, transpose_b=True)
    old_index = tf.gather(model.chain_index.value, index)
    out_of_batch = model._out_of_batch_logits(tf.stack([z[:b], z[b:]]), old_index,
                                              model.inverse_temperature, False)
    initial = (out_of_batch[0] if model.exact_ratio
               else tf.gather(model.chain_log_score.value, index))
    return {"index": index, "views": views, "z": z, "old_index": old_index,
            "anchor_logits": tf.stack([logits[:b], logits[b:]]),
            "log_uniforms": tf.math.log(tf.random.stateless_uniform([2, 2 * b, b], [0, 1])),
            "initial": initial, "out_of_batch": out_of_batch,
            "cotangent": tf.random.stateless_normal(z.shape, [0, 2])}


def breakdown_runners(stepper: Stepper) -> dict[str, Callable[[int], float]]:
    """Each part of one EMC² step as a runner, plus the data and the full step."""
    import tensorflow as tf

    from emc2_tf.samplers import candidate_mask

    model, b = stepper.model, stepper.batch_size
    x = breakdown_inputs(model, next(stepper.iterator))
    runners = {
        "data (next batch, prefetched)": lambda steps: _next_batches(stepper.iterator, steps),
        "encode 2B views (fwd+bwd)": repeat(encode_part(model), x["views"], x["cotangent"]),
        "MH scan": repeat(scan_part(model, b), x["anchor_logits"], candidate_mask(x["index"]),
                          x["log_uniforms"], x["initial"], x["out_of_batch"]),
    }
    if x["out_of_batch"] is not None:
        runners["re-encode B negatives (fwd+bwd)"] = repeat(
            reencode_part(model), x["z"][:b], x["z"][b:], x["old_index"])
    runners["write-back B rows"] = repeat(write_back_part(model), x["index"], x["old_index"],
                                          tf.zeros([b], tf.float32))
    runners["full step"] = stepper.run
    return runners


def _next_batches(iterator, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        batch = next(iterator)
    batch["view1"].numpy()
    return time.perf_counter() - started


def breakdown_rows(steppers: dict, variants: list[Variant], data, batch_size: int,
                   block: int, rounds: int) -> list[dict]:
    """Breakdown rows of each variant at `batch_size` (table 1's models where they exist)."""
    rows = []
    for variant in variants:
        stepper = steppers.get(variant.label) or Stepper(variant, data, batch_size)
        medians = time_round_robin(breakdown_runners(stepper), block, rounds)
        full = medians["full step"]
        parts = [k for k in medians if k != "full step" and not k.startswith("data")]
        medians["rest (full − parts)"] = full - sum(medians[k] for k in parts)
        for part, seconds in medians.items():
            rows.append({"variant": variant.label, "batch_size": batch_size, "part": part,
                         "seconds": seconds, "fraction_of_step": seconds / full})
        print(f"breakdown {variant.label} B={batch_size}: " + ", ".join(
            f"{k} {1000 * v:.2f} ms" for k, v in medians.items()), flush=True)
    return rows


# ----------------------------------------------------------------------------- table 4


def scaling_table(payload: dict, sizes: list[int], variants: list[Variant], batch_size: int,
                  block: int, rounds: int) -> None:
    """Table 4 rows into `payload["scaling"]`: every (variant, N) in one round-robin."""
    steppers = {}
    for n in sizes:
        data = synthetic_data(n, (8, 8, 1), seed=n)
        dataset = two_view_stream(data, batch_size)  # one image constant, one iterator each
        for variant in variants:
            steppers[variant.label, n] = Stepper(variant, data, batch_size, dataset=dataset)
        print(f"N={n}: built", flush=True)
    medians = time_round_robin({f"{k[0]} N={k[1]}": s.run for k, s in steppers.items()},
                               block, rounds)
    peaks = gpu_peaks_mib(steppers, block)
    for (label, n), stepper in steppers.items():
        seconds = medians[f"{label} N={n}"]
        row = {"variant": label, "num_images": n, "batch_size": batch_size,
               "seconds_per_step": seconds,
               "ratio_to_smallest_n": seconds / medians[f"{label} N={sizes[0]}"],
               "image_table": image_table_dtype(stepper.model)}
        if "simclr" in (v.label for v in variants):
            row["ratio_to_simclr"] = seconds / medians[f"simclr N={n}"]
        if (label, n) in peaks:
            row["gpu_peak_mib"] = peaks[label, n]
        payload["scaling"].append(row)
    print("scaling: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in medians.items()),
          flush=True)
    common.write_json(FLAGS.name, payload, FLAGS.results_dir)


def image_table_dtype(model) -> str | None:
    """'uint8' / 'float32' for a model's image table, None without one."""
    images = getattr(model, "images", None)
    return None if images is None else images.dtype.name


# ----------------------------------------------------------------------------- CPU memory


def memory_probe(spec: str) -> None:
    """Subprocess body: one small-CNN (variant, B) on digits; prints its memory as JSON.

    The peak is the process's `VmHWM` (high-water resident set of its own
    address space), not `ru_maxrss`: on Linux a child's `ru_maxrss` starts
    from its parent's resident set at `fork` and survives `exec`, so every
    probe would read the parent's peak (measured: 2,867 MiB for every row).
    """
    import emc2_tf

    label, batch_size = spec.rsplit(",", 1)
    stepper = Stepper(parse_variant(label), emc2_tf.load_digits(), int(batch_size))
    before = _status_kib("VmRSS")
    stepper.run(FLAGS.block * 2)
    peak = _status_kib("VmHWM")
    print("memory: " + json.dumps({"peak_rss_mib": peak / 1024,
                                   "rise_mib": (peak - before) / 1024}))


def _status_kib(field: str) -> int:
    """A `/proc/self/status` memory field (`VmRSS`, `VmHWM`) in KiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (not Linux?)")


def cpu_memory(label: str, batch_size: int, block: int) -> dict:
    """Peak and rise of resident memory of one (variant, B), in a process of its own."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.cost", f"--memory_probe={label},{batch_size}",
         f"--block={block}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    for line in result.stdout.splitlines():
        if line.startswith("memory: "):
            return json.loads(line[len("memory: "):])
    raise RuntimeError(f"memory probe {label} B={batch_size} failed: {result.stderr[-2000:]}")


def add_cpu_memory(payload: dict) -> None:
    for row in payload["per_method"]:
        if row["encoder"] == "small_cnn":
            row.update(cpu_memory(row["variant"], row["batch_size"], FLAGS.block))
    print("memory measured", flush=True)
    common.write_json(FLAGS.name, payload, FLAGS.results_dir)


# ----------------------------------------------------------------------------- flags


def integers(flag: str, values: list[str], minimum: int = 2, empty: bool = True) -> list[int]:
    if not values and not empty:
        fail(f"--{flag} must not be empty.")
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        fail(f"--{flag} must be integers; got {','.join(values)}.")
    if any(n < minimum for n in numbers):
        fail(f"--{flag}: every value must be ≥ {minimum}; got {','.join(values)}.")
    return numbers


def subset(flag: str, values: list[str], accepted) -> list[str]:
    unknown = [v for v in values if v not in accepted]
    if unknown:
        fail(f"--{flag}: unknown {unknown}; accepted: {','.join(accepted)}.")
    return values


def check_numbers(s: dict) -> None:
    """The integer flags: positive counts, B within the data, breakdown B among table 1's."""
    for flag in ("block", "rounds", "resnet_rounds"):
        if getattr(FLAGS, flag) < 1:
            fail(f"--{flag} must be ≥ 1.")
    if FLAGS.scaling_batch_size < 2:
        fail("--scaling_batch_size must be ≥ 2.")
    if max(s["batch_sizes"]) > 1797:
        fail("--batch_sizes: digits has 1797 training images; every B must be ≤ 1797.")
    if not set(s["breakdown_batch_sizes"]) <= set(s["batch_sizes"]):
        fail("--breakdown_batch_sizes must be among --batch_sizes (it reuses their models).")
    if s["scaling_sizes"] and min(s["scaling_sizes"]) < FLAGS.scaling_batch_size:
        fail(f"--scaling_sizes: every N must be ≥ --scaling_batch_size "
             f"({FLAGS.scaling_batch_size}).")


def parse_settings() -> dict:
    """Every flag checked (one-line errors), as the values the tables use."""
    from emc2_tf.samplers import SCAN_IMPLEMENTATIONS

    s = {"batch_sizes": integers("batch_sizes", FLAGS.batch_sizes, empty=False),
         "resnet_batch_sizes": integers("resnet_batch_sizes", FLAGS.resnet_batch_sizes,
                                        empty=False),
         "breakdown_batch_sizes": integers("breakdown_batch_sizes", FLAGS.breakdown_batch_sizes),
         "scaling_sizes": integers("scaling_sizes", FLAGS.scaling_sizes),
         "encoders": subset("encoders", FLAGS.encoders, ENCODERS),
         "scan_modes": subset("scan_modes", FLAGS.scan_modes, SCAN_IMPLEMENTATIONS),
         "jit": subset("jit", FLAGS.jit, JIT_MODES)}
    check_numbers(s)
    s["methods"] = parse_variants("methods", FLAGS.methods,
                                  need_simclr="small_cnn" in s["encoders"])
    s["resnet_methods"] = parse_variants("resnet_methods", FLAGS.resnet_methods,
                                         need_simclr="resnet18" in s["encoders"])
    s["breakdown_variants"] = parse_variants("breakdown_variants", FLAGS.breakdown_variants)
    s["scaling_methods"] = parse_variants("scaling_methods", FLAGS.scaling_methods)
    if any(v.method != "emc2" for v in s["breakdown_variants"]):
        fail("--breakdown_variants must be emc2 variants.")
    for flag in ("methods", "resnet_methods", "breakdown_variants", "scaling_methods"):
        check_builds(flag, s[flag])
    return s


# ----------------------------------------------------------------------------- report


MEMORY_COLUMNS = {"gpu_peak_mib": "GPU peak MiB", "peak_rss_mib": "peak RSS MiB",
                  "rise_mib": "RSS rise MiB"}


def print_per_method(payload: dict) -> None:
    rows = payload["per_method"]
    memory = [k for k in MEMORY_COLUMNS if any(k in row for row in rows)]
    print(f"\n1. per step (median of blocks; small CNN: {FLAGS.rounds} × {FLAGS.block} steps, "
          f"ResNet-18: {FLAGS.resnet_rounds} × 1)")
    print(common.markdown_table(
        ["encoder", "variant", "B", "ms / step", "ratio to SimCLR",
         *(MEMORY_COLUMNS[k] for k in memory)],
        [[r["encoder"], r["variant"], r["batch_size"], f"{1000 * r['seconds_per_step']:.2f}",
          f"{r['ratio_to_simclr']:.2f}", *(f"{r[k]:.0f}" if k in r else "–" for k in memory)]
         for r in rows]))


def print_scan_modes(payload: dict) -> None:
    rows = [[r["batch_size"], r["variant"], r["jit"],
             *(["skipped", r["skipped"]] if "skipped" in r else
               [f"{1000 * r['seconds_per_step']:.2f}", f"{r['ratio_to_simclr']:.2f}"])]
            for r in payload["scan_modes"]]
    print("\n2. EMC² scan × compilation (ratio to SimCLR in the same mode)")
    print(common.markdown_table(["B", "variant", "mode", "ms / step", "ratio to SimCLR"], rows))


def print_breakdown(payload: dict) -> None:
    rows = [[r["variant"], r["batch_size"], r["part"], f"{1000 * r['seconds']:.2f}",
             f"{100 * r['fraction_of_step']:.0f}%"] for r in payload["breakdown"]]
    print("\n3. one EMC² step, part by part (each part alone on the same batch)")
    print(common.markdown_table(["variant", "B", "part", "ms", "% of step"], rows))


def print_scaling(payload: dict) -> None:
    rows = [[r["variant"], r["num_images"], r["image_table"] or "none",
             f"{1000 * r['seconds_per_step']:.2f}", f"{r['ratio_to_smallest_n']:.2f}",
             f"{r['ratio_to_simclr']:.2f}" if "ratio_to_simclr" in r else "–"]
            for r in payload["scaling"]]
    smallest = payload["scaling"][0]["num_images"]
    print(f"\n4. step time against N (B={FLAGS.scaling_batch_size}, chains filled)")
    print(common.markdown_table(["variant", "N", "image table", "ms / step",
                                 f"ratio to N={smallest}", "ratio to SimCLR"], rows))


def report(payload: dict) -> None:
    for key, printer in (("per_method", print_per_method), ("scan_modes", print_scan_modes),
                         ("breakdown", print_breakdown), ("scaling", print_scaling)):
        if payload[key]:
            printer(payload)


# ----------------------------------------------------------------------------- main


def run_tables(payload: dict, s: dict) -> None:
    import emc2_tf

    if "small_cnn" in s["encoders"]:
        breakdown = {"batch_sizes": s["breakdown_batch_sizes"],
                     "variants": s["breakdown_variants"]}
        per_method_table(payload, "small_cnn", emc2_tf.load_digits(), s["batch_sizes"],
                         s["methods"], FLAGS.block, FLAGS.rounds, WARMUP_STEPS, breakdown)
    if "resnet18" in s["encoders"]:
        data = synthetic_data(max(256, 4 * max(s["resnet_batch_sizes"])), (32, 32, 3))
        per_method_table(payload, "resnet18", data, s["resnet_batch_sizes"],
                         s["resnet_methods"], 1, FLAGS.resnet_rounds, 1)
    if FLAGS.memory and not payload["machine"]["gpus"] and "small_cnn" in s["encoders"]:
        add_cpu_memory(payload)
    if s["scan_modes"] and s["jit"]:
        scan_mode_table(payload, emc2_tf.load_digits(), s["batch_sizes"], s["scan_modes"],
                        s["jit"], FLAGS.block, FLAGS.rounds)
    if s["scaling_sizes"]:
        scaling_table(payload, s["scaling_sizes"], s["scaling_methods"],
                      FLAGS.scaling_batch_size, FLAGS.block, FLAGS.rounds)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpfull).")
    if FLAGS.memory_probe:
        memory_probe(FLAGS.memory_probe)
        return
    settings = parse_settings()
    policy = common.set_mixed_precision(FLAGS.mixed_precision)
    machine = common.device_description()
    print(f"cost: {machine['device']} ({policy}), TensorFlow {machine['tensorflow']}", flush=True)
    payload = {"benchmark": "cost", "machine": machine, "policy": policy,
               "settings": {k: [v.label if isinstance(v, Variant) else v for v in value]
                            for k, value in settings.items()},
               "block": FLAGS.block, "rounds": FLAGS.rounds, "resnet_rounds": FLAGS.resnet_rounds,
               "per_method": [], "scan_modes": [], "breakdown": [], "scaling": []}
    started = time.time()
    run_tables(payload, settings)
    payload["seconds"] = time.time() - started
    path = common.write_json(FLAGS.name, payload, FLAGS.results_dir)
    print(f"\ncost on {machine['device']}")
    report(payload)
    print(f"\nwrote {path} in {payload['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    app.run(main)
