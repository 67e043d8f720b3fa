r"""The EMC² MH scan alone: sequential against parallel, graph against XLA, per B.

    python -m benchmarks.scan                          # B = 8, 32, 128, 512
    python -m benchmarks.scan --batch_sizes=8,32 --seconds=0.5

Both scans give the same states and decisions draw for draw
(`tests/test_emc2_reference.py`); this measures which is faster where, to
choose `EMC2Model(scan="auto")`. Times the two passes of one step
(`mh_scan` on `[2, B, 2B]` logits, B chains), compiled with `tf.function`
(graph) and with `jit_compile=True` (XLA), round-robin over the variants so
they share the machine's state. Also prints each variant's dependent depth
(sequential: 2 · 2B steps; parallel: 2 · (2⌈log₂(2B + 2)⌉ − 1) gathers) and the
parallel scan's comparison size `B · (2B + 1) · 2B`. Writes
`benchmarks/results/<name>.json`.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["8", "32", "128", "512"], "Batch sizes B.")
flags.DEFINE_float("seconds", 1.0, "Timed seconds per variant and round.")
flags.DEFINE_integer("rounds", 3, "Rounds (each times every variant once).")
flags.DEFINE_string("name", "scan", "Results file name under --results_dir.")
flags.DEFINE_string("results_dir", common.RESULTS_DIR, "Where the JSON goes.")

VARIANTS = [("sequential", False), ("parallel", False), ("sequential", True), ("parallel", True)]


def fail(message: str):
    print(f"scan: error: {message}", file=sys.stderr)
    sys.exit(2)


def depth(scan: str, batch_size: int) -> int:
    """Dependent steps of one EMC² step's two passes (`emc2_tf.samplers.scan_depth`)."""
    from emc2_tf.samplers.metropolis_hastings import scan_depth

    return scan_depth(scan, 2 * batch_size)


def scan_function(batch_size: int, scan: str, jit_compile: bool, seed: int = 0):
    """A compiled call of `mh_scan` on fixed random inputs, returning the final states."""
    import numpy as np
    import tensorflow as tf

    from emc2_tf.samplers import candidate_mask, mh_scan

    rng = np.random.default_rng(seed)
    index = tf.constant(rng.permutation(10 * batch_size)[:batch_size].astype(np.int32))
    logits = tf.constant(rng.normal(scale=3.0, size=(2, batch_size, 2 * batch_size)), tf.float32)
    log_u = tf.constant(np.log(rng.random((2, 2 * batch_size, batch_size))), tf.float32)
    initial = tf.constant(rng.normal(size=batch_size), tf.float32)
    compiled = tf.function(
        lambda: mh_scan(logits, candidate_mask(index), log_u, initial, batch_size - 1,
                        scan=scan).final_state, jit_compile=jit_compile)
    compiled().numpy()  # trace and compile outside the timing
    return compiled


def time_call(function, seconds: float) -> float:
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or calls < 3:
        function().numpy()
        calls += 1
    return (time.perf_counter() - started) / calls


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags.")
    try:
        batch_sizes = sorted(int(b) for b in FLAGS.batch_sizes)
    except ValueError:
        fail(f"--batch_sizes must be integers; got {','.join(FLAGS.batch_sizes)}.")
    if min(batch_sizes) < 2 or FLAGS.seconds <= 0 or FLAGS.rounds < 1:
        fail("every batch size must be ≥ 2, --seconds > 0 and --rounds ≥ 1.")
    machine = common.device_description()
    print(f"scan: B = {batch_sizes} on {machine['device']}", flush=True)
    rows, payload = [], {"benchmark": "scan", "machine": machine, "results": []}
    for batch_size in batch_sizes:
        functions = {v: scan_function(batch_size, *v) for v in VARIANTS}
        times = {v: [] for v in VARIANTS}
        for _ in range(FLAGS.rounds):
            for variant, function in functions.items():
                times[variant].append(time_call(function, FLAGS.seconds))
        best = {v: min(t) * 1e3 for v, t in times.items()}
        for (scan, xla), milliseconds in best.items():
            payload["results"].append({"batch_size": batch_size, "scan": scan, "xla": xla,
                                       "milliseconds": milliseconds,
                                       "depth": depth(scan, batch_size)})
        elements = batch_size * (2 * batch_size + 1) * 2 * batch_size
        rows.append([batch_size, *[f"{best[v]:.2f}" for v in VARIANTS],
                     depth("sequential", batch_size), depth("parallel", batch_size),
                     f"{elements / 1e6:.1f} M"])
        common.write_json(FLAGS.name, payload, FLAGS.results_dir)
    print("\nms per EMC² step's scan (two passes), best of rounds")
    print(common.markdown_table(
        ["B", "sequential graph", "parallel graph", "sequential XLA", "parallel XLA",
         "sequential depth", "parallel depth", "parallel comparisons"], rows))
    path = common.write_json(FLAGS.name, payload, FLAGS.results_dir)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    app.run(main)
