r"""The EMC² MH scan alone: sequential, parallel and blocked, graph against XLA, per B.

    python -m benchmarks.scan                          # B = 8, 32, 128, 512
    python -m benchmarks.scan --batch_sizes=8,32 --seconds=0.5 --block_sizes=16

The scans give the same states and decisions draw for draw
(`tests/test_emc2_reference.py`); this measures which is faster where, to
choose `EMC2Model(scan="auto")` and the blocked scan's block size. Times the two passes of one step
(`mh_scan` on `[2, B, 2B]` logits, B chains), compiled with `tf.function`
(graph) and with `jit_compile=True` (XLA), round-robin over the variants so
they share the machine's state. Also prints each variant's dependent depth
(sequential: 2 · 2B steps; parallel: 2 · (2⌈log₂(2B + 2)⌉ − 1) gathers;
blocked: 2⌈2B/k⌉ · (2⌈log₂(k + 2)⌉ − 1)) and the comparisons each builds at
once (`B · (K + 1) · K`, K = 2B for the parallel scan, k for a block). Writes
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
flags.DEFINE_list("block_sizes", ["8", "16", "32"], "Block sizes k of the blocked scan.")
flags.DEFINE_string("name", "scan", "Results file name under --results_dir.")
flags.DEFINE_string("results_dir", common.RESULTS_DIR, "Where the JSON goes.")


def variants(block_sizes: list[int]) -> list[tuple[str, int]]:
    """`(scan, block size)` pairs: the block size is 0 except for the blocked scan."""
    return [("sequential", 0), ("parallel", 0), *[("blocked", k) for k in block_sizes]]


def label(scan: str, block_size: int) -> str:
    return f"blocked k={block_size}" if block_size else scan


def fail(message: str):
    print(f"scan: error: {message}", file=sys.stderr)
    sys.exit(2)


def depth(scan: str, batch_size: int, block_size: int = 0) -> int:
    """Dependent steps of one EMC² step's two passes (`emc2_tf.samplers.scan_depth`)."""
    from emc2_tf.samplers.metropolis_hastings import scan_depth

    return scan_depth(scan, 2 * batch_size, block_size or None)


def comparisons(scan: str, batch_size: int, block_size: int = 0) -> int:
    """Comparisons built at once: `B · (K + 1) · K` for K candidates (a block's k)."""
    from emc2_tf.samplers.metropolis_hastings import parallel_scan_elements

    if scan == "sequential":
        return batch_size
    k = min(block_size, 2 * batch_size) if block_size else 2 * batch_size
    return parallel_scan_elements(batch_size, k)


def scan_function(batch_size: int, scan: str, block_size: int, jit_compile: bool,
                  seed: int = 0):
    """A compiled call of `mh_scan` on fixed random inputs, returning the final states."""
    import numpy as np
    import tensorflow as tf

    from emc2_tf.samplers import candidate_mask, metropolis_hastings, mh_scan

    rng = np.random.default_rng(seed)
    index = tf.constant(rng.permutation(10 * batch_size)[:batch_size].astype(np.int32))
    logits = tf.constant(rng.normal(scale=3.0, size=(2, batch_size, 2 * batch_size)), tf.float32)
    log_u = tf.constant(np.log(rng.random((2, 2 * batch_size, batch_size))), tf.float32)
    initial = tf.constant(rng.normal(size=batch_size), tf.float32)
    compiled = tf.function(
        lambda: mh_scan(logits, candidate_mask(index), log_u, initial, batch_size - 1,
                        scan=scan).final_state, jit_compile=jit_compile)
    library_block_size = metropolis_hastings.SCAN_BLOCK_SIZE
    metropolis_hastings.SCAN_BLOCK_SIZE = block_size or library_block_size  # read when tracing
    try:
        compiled().numpy()  # trace and compile outside the timing
    finally:
        metropolis_hastings.SCAN_BLOCK_SIZE = library_block_size
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
        block_sizes = sorted(int(k) for k in FLAGS.block_sizes)
    except ValueError:
        fail(f"--batch_sizes and --block_sizes must be integers; got "
             f"{','.join(FLAGS.batch_sizes)} and {','.join(FLAGS.block_sizes)}.")
    if min(batch_sizes) < 2 or not 0 < FLAGS.seconds < float("inf") or FLAGS.rounds < 1:
        fail(f"every batch size must be ≥ 2, --seconds a finite number > 0 and --rounds ≥ 1; "
             f"got --seconds={FLAGS.seconds}.")
    if block_sizes and min(block_sizes) < 1:
        fail(f"every block size must be ≥ 1; got {','.join(FLAGS.block_sizes)}.")
    machine = common.device_description()
    print(f"scan: B = {batch_sizes} on {machine['device']}", flush=True)
    rows, payload = [], {"benchmark": "scan", "machine": machine, "results": []}
    for batch_size in batch_sizes:
        timed = [(scan, k, xla) for scan, k in variants(block_sizes) for xla in (False, True)]
        functions = {v: scan_function(batch_size, *v) for v in timed}
        times = {v: [] for v in timed}
        for _ in range(FLAGS.rounds):
            for variant, function in functions.items():
                times[variant].append(time_call(function, FLAGS.seconds))
        best = {v: min(t) * 1e3 for v, t in times.items()}
        for (scan, block_size, xla), milliseconds in best.items():
            payload["results"].append({
                "batch_size": batch_size, "scan": scan, "block_size": block_size, "xla": xla,
                "milliseconds": milliseconds, "depth": depth(scan, batch_size, block_size),
                "comparisons": comparisons(scan, batch_size, block_size)})
        for scan, block_size in variants(block_sizes):
            rows.append([batch_size, label(scan, block_size),
                         f"{best[scan, block_size, False]:.2f}",
                         f"{best[scan, block_size, True]:.2f}",
                         depth(scan, batch_size, block_size),
                         f"{comparisons(scan, batch_size, block_size) / 1e6:.2f} M"])
        common.write_json(FLAGS.name, payload, FLAGS.results_dir)
    print("\nms per EMC² step's scan (two passes), best of rounds")
    print(common.markdown_table(
        ["B", "scan", "graph ms", "XLA ms", "depth", "comparisons at once"], rows))
    path = common.write_json(FLAGS.name, payload, FLAGS.results_dir)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    app.run(main)
