r"""Cost per step: every method at several batch sizes, and EMC² as the data set grows.

    python -m benchmarks.cost                      # digits; N-scaling with synthetic images
    python -m benchmarks.cost --batch_sizes=64,256 --scaling_sizes=2000,20000,200000

1. **Step time per method and B**, all methods built in one process and
   timed round-robin (blocks of `--block` steps, `--rounds` rounds), so the
   ratio to SimCLR compares runs on the same machine state. Median seconds
   per step (the compiled `train_function`, data included).
2. **Peak memory per method and B**: on a GPU the allocator's peak
   (`tf.config.experimental.get_memory_info`) around the timed steps; on a
   CPU each (method, B) runs in its own process and reports its peak
   resident memory (`ru_maxrss`) and the rise over its resident memory
   before the first step.
3. **EMC² step time against N** (synthetic 8x8 images, N = 2k, 20k, 200k):
   the chains start filled with random states, as in steady state, so
   every step re-encodes its out-of-batch negatives; SimCLR alongside.
   The per-step cost must not grow with N (the chain tables and the image
   table are indexed, never scanned).

Prints the tables and writes `benchmarks/results/<name>.json`.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", ["simclr", "sogclr", "dcl", "dhel", "kcl", "emc2"], "Methods.")
flags.DEFINE_list("batch_sizes", ["8", "32", "128"], "Batch sizes B.")
flags.DEFINE_list("scaling_sizes", ["2000", "20000", "200000"], "Data-set sizes N for EMC².")
flags.DEFINE_integer("scaling_batch_size", 64, "B of the N-scaling runs.")
flags.DEFINE_integer("block", 10, "Steps per timed block.")
flags.DEFINE_integer("rounds", 5, "Timed rounds (each runs every method once).")
flags.DEFINE_bool("memory", True, "Measure peak memory (CPU: one process per method and B).")
flags.DEFINE_bool("mixed_precision", False, "mixed_float16 on a GPU, mixed_bfloat16 on a CPU.")
flags.DEFINE_string("name", "cost", "Results file name under --results_dir.")
flags.DEFINE_string("results_dir", common.RESULTS_DIR, "Where the JSON goes.")
flags.DEFINE_string("memory_probe", None, "Internal: 'method,B' measured in this process.")


def fail(message: str):
    print(f"cost: error: {message}", file=sys.stderr)
    sys.exit(2)


class Stepper:
    """One model's compiled train step, fed from its own two-view stream."""

    def __init__(self, method: str, data, batch_size: int, seed: int = 0):
        import emc2_tf

        self.method = method
        self.encoder, self.model = common.build(method, data, batch_size, seed)
        self.model.optimizer.build(self.model.trainable_variables)
        dataset = emc2_tf.make_two_view_dataset(
            data.train_images, batch_size, emc2_tf.AugmentConfig.for_dataset("digits"),
            seed=seed).repeat()
        self.iterator = iter(dataset)
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


def time_methods(steppers: list[Stepper], block: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each stepper, measured round-robin."""
    import numpy as np

    for stepper in steppers:  # trace and warm up
        stepper.run(3)
    samples = {stepper.method: [] for stepper in steppers}
    for _ in range(rounds):
        for stepper in steppers:
            samples[stepper.method].append(stepper.run(block) / block)
    return {method: float(np.median(values)) for method, values in samples.items()}


def gpu_peak_bytes(stepper: Stepper, steps: int) -> int | None:
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    tf.config.experimental.reset_memory_stats("GPU:0")
    stepper.run(steps)
    return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])


def memory_probe(spec: str) -> None:
    """Subprocess body: one (method, B) on the CPU; prints its memory as JSON."""
    import emc2_tf

    method, batch_size = spec.split(",")
    data = emc2_tf.load_digits()
    stepper = Stepper(method, data, int(batch_size))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    current = _current_rss_kib()
    stepper.run(FLAGS.block * 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("memory: " + json.dumps({"peak_rss_mib": peak / 1024,
                                   "rise_mib": (peak - min(before, current)) / 1024}))


def _current_rss_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_memory(method: str, batch_size: int) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.cost", f"--memory_probe={method},{batch_size}",
         f"--block={FLAGS.block}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    for line in result.stdout.splitlines():
        if line.startswith("memory: "):
            return json.loads(line[len("memory: "):])
    raise RuntimeError(f"memory probe {method} B={batch_size} failed: {result.stderr[-2000:]}")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpfull).")
    if FLAGS.memory_probe:
        memory_probe(FLAGS.memory_probe)
        return
    import numpy as np

    import emc2_tf

    try:
        batch_sizes = [int(b) for b in FLAGS.batch_sizes]
        sizes = [int(n) for n in FLAGS.scaling_sizes]
    except ValueError:
        fail("--batch_sizes and --scaling_sizes must be integers.")
    unknown = [m for m in FLAGS.methods if m not in emc2_tf.METHODS]
    if unknown:
        fail(f"--methods: unknown {unknown}; accepted: {','.join(sorted(emc2_tf.METHODS))}.")
    if "simclr" not in FLAGS.methods:
        fail("--methods must include simclr (the reference of the ratios).")
    policy = common.set_mixed_precision(FLAGS.mixed_precision)
    machine = common.device_description()
    gpu = machine["gpus"] > 0
    print(f"cost: {machine['device']} ({policy})", flush=True)
    data = emc2_tf.load_digits()
    payload = {"benchmark": "cost", "machine": machine, "policy": policy, "block": FLAGS.block,
               "rounds": FLAGS.rounds, "per_method": [], "scaling": []}
    started = time.time()

    for batch_size in batch_sizes:
        steppers = [Stepper(method, data, batch_size) for method in FLAGS.methods]
        medians = time_methods(steppers, FLAGS.block, FLAGS.rounds)
        for stepper in steppers:
            row = {"method": stepper.method, "batch_size": batch_size,
                   "seconds_per_step": medians[stepper.method],
                   "ratio_to_simclr": medians[stepper.method] / medians["simclr"]}
            if FLAGS.memory and gpu:
                row["gpu_peak_mib"] = gpu_peak_bytes(stepper, FLAGS.block) / 2**20
            payload["per_method"].append(row)
        del steppers
        print(f"B={batch_size}: " + ", ".join(
            f"{m} {1000 * medians[m]:.1f} ms" for m in FLAGS.methods), flush=True)
    if FLAGS.memory and not gpu:
        for row in payload["per_method"]:
            row.update(cpu_memory(row["method"], row["batch_size"]))
        print("memory measured", flush=True)
    common.write_json(FLAGS.name, payload, FLAGS.results_dir)

    for n in sizes:
        rng = np.random.default_rng(n)
        synthetic = emc2_tf.from_arrays(rng.random((n, 8, 8, 1), np.float32), np.zeros(n, int),
                                        rng.random((8, 8, 8, 1), np.float32), np.zeros(8, int),
                                        name=f"synthetic-{n}")
        steppers = [Stepper(method, synthetic, FLAGS.scaling_batch_size)
                    for method in ("simclr", "emc2")]
        fill_chains(steppers[1].model)
        medians = time_methods(steppers, FLAGS.block, FLAGS.rounds)
        payload["scaling"].append({"num_images": n, "batch_size": FLAGS.scaling_batch_size,
                                   "emc2_seconds_per_step": medians["emc2"],
                                   "simclr_seconds_per_step": medians["simclr"]})
        del steppers
        print(f"N={n}: emc2 {1000 * medians['emc2']:.1f} ms, "
              f"simclr {1000 * medians['simclr']:.1f} ms", flush=True)
    payload["seconds"] = time.time() - started
    path = common.write_json(FLAGS.name, payload, FLAGS.results_dir)

    memory_header = ["GPU peak MiB"] if gpu else ["peak RSS MiB", "RSS rise MiB"]
    rows = []
    for row in payload["per_method"]:
        memory = ([f"{row['gpu_peak_mib']:.0f}"] if gpu else
                  [f"{row['peak_rss_mib']:.0f}", f"{row['rise_mib']:.0f}"]) if FLAGS.memory else []
        rows.append([row["method"], row["batch_size"], f"{1000 * row['seconds_per_step']:.2f}",
                     f"{row['ratio_to_simclr']:.2f}", *memory])
    print(f"\nper step on {machine['device']} (median of {FLAGS.rounds} blocks of {FLAGS.block})")
    print(common.markdown_table(["method", "B", "ms / step", "× SimCLR",
                                 *(memory_header if FLAGS.memory else [])], rows))
    print(f"\nEMC² step time against N (B={FLAGS.scaling_batch_size}, chains filled)")
    print(common.markdown_table(
        ["N", "emc2 ms / step", "simclr ms / step", "emc2 / simclr"],
        [[r["num_images"], f"{1000 * r['emc2_seconds_per_step']:.2f}",
          f"{1000 * r['simclr_seconds_per_step']:.2f}",
          f"{r['emc2_seconds_per_step'] / r['simclr_seconds_per_step']:.2f}"]
         for r in payload["scaling"]]))
    print(f"\nwrote {path} in {payload['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    app.run(main)
