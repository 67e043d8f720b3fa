r"""Image sources at size: folder scan and read throughput, memory of the sources.

    python -m benchmarks.image_sources                       # the default plan below
    python -m benchmarks.image_sources folder_n=10000,100000 array_mib=1024

Each probe runs in its own process (its own peak resident set, `VmHWM`):

- **folder** (`folder_n`, `size`): N random `size`×`size` RGB PNGs in 10
  class folders, written to a temporary folder (deleted after). Reports the
  time to build `ImageFolderSource` (scan + quick check of every file), the
  resident memory it adds, and the read + decode throughput (images/s) of
  `read` in `tf.data` (random batches of `batch`, `num_parallel_calls` and
  prefetch AUTOTUNE) over at most `read_images` images.
- **array** (`array_mib`): a float32 array of 96×96×3 images of that size,
  50 batches of B = 32 read through `tf.data` either by `ArraySource.read`
  (`source`) or by gathering from a `tf.constant` of the array (`constant`,
  how the pipeline embedded data before). Reports the peak resident set
  against the array's size; `source` must stay below baseline + array +
  512 MiB (the check fails the run otherwise).

Prints one JSON line per probe and writes `benchmarks/results/<name>.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import common
from benchmarks.cost import _status_kib

DEFAULTS = {"folder_n": "10000,100000", "size": 32, "batch": 256, "read_images": 20000,
            "array_mib": 1024, "modes": "source,constant", "name": "image_sources",
            "results_dir": common.RESULTS_DIR}

#: `source` may exceed baseline + array by at most this much (TensorFlow's own
#: buffers, B-row batches, prefetch).
ARRAY_MARGIN_MIB = 512


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def write_folder(directory: str, count: int, size: int) -> float:
    """`count` random RGB PNGs in 10 class folders; returns the seconds taken."""
    import numpy as np
    from PIL import Image

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for label in range(10):
        os.makedirs(os.path.join(directory, f"class_{label}"), exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(directory, f"class_{i % 10}", f"{i:07d}.png"))
    return time.perf_counter() - start


def folder_probe(directory: str, batch: int, read_images: int) -> dict:
    """Child process: build the source, then time `read` in `tf.data`."""
    import numpy as np
    import tensorflow as tf

    from emc2_tf.data.folder import ImageFolderSource

    before = _status_kib("VmRSS")
    start = time.perf_counter()
    source = ImageFolderSource(directory)
    scan_s = time.perf_counter() - start
    after = _status_kib("VmRSS")
    steps = max(2, min(read_images, source.num_images) // batch)
    index = np.random.default_rng(0).integers(0, source.num_images, (steps + 2, batch))
    dataset = (tf.data.Dataset.from_tensor_slices(index)
               .map(source.read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .prefetch(tf.data.AUTOTUNE))
    iterator = iter(dataset)
    for _ in range(2):  # warm-up: tracing, thread pools
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    read_s = time.perf_counter() - start
    return {"probe": "folder", "n": source.num_images, "image_shape": list(source.image_shape),
            "scan_s": round(scan_s, 2), "scan_us_per_file": round(1e6 * scan_s / source.num_images, 1),
            "source_rss_mib": _mib(after - before),
            "read_images_per_s": round(steps * batch / read_s),
            "peak_rss_mib": _mib(_status_kib("VmHWM"))}


def array_probe(mib: int, mode: str) -> dict:
    """Child process: peak memory of 50 batches read from a float32 array."""
    import numpy as np
    import tensorflow as tf

    from emc2_tf.data.image_source import ArraySource

    baseline = _status_kib("VmRSS")
    count = mib * 1024**2 // (96 * 96 * 3 * 4)
    images = np.random.default_rng(0).random((count, 96, 96, 3), dtype=np.float32)
    array_kib = images.nbytes // 1024
    source = ArraySource(images)
    if mode == "source":
        read = lambda index: source.to_float(source.read(index))  # noqa: E731
    else:
        table = tf.constant(images)
        read = lambda index: tf.gather(table, index)  # noqa: E731
    index = np.random.default_rng(1).integers(0, count, (50, 32))
    dataset = (tf.data.Dataset.from_tensor_slices(index)
               .map(read, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
    for _ in dataset:
        pass
    peak = _status_kib("VmHWM")
    result = {"probe": "array", "mode": mode, "images": count, "array_mib": _mib(array_kib),
              "baseline_rss_mib": _mib(baseline), "peak_rss_mib": _mib(peak),
              "peak_over_baseline_mib": _mib(peak - baseline),
              "peak_over_baseline_per_array": round((peak - baseline) / array_kib, 2)}
    if mode == "source" and peak - baseline > array_kib + ARRAY_MARGIN_MIB * 1024:
        raise SystemExit(f"ArraySource copied the array: peak {result}")
    return result


def _run_child(arguments: list[str]) -> dict:
    """Runs this module with `arguments` in a fresh process; its last output line is JSON."""
    completed = subprocess.run([sys.executable, "-m", "benchmarks.image_sources", *arguments],
                               capture_output=True, text=True, check=False)
    if completed.returncode:
        raise SystemExit(f"probe {arguments} failed: {completed.stderr.strip()[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    options = {**DEFAULTS, **common.parse_options(argv)}
    if "child" in options:  # a probe, in its own process
        kind = options["child"]
        result = (folder_probe(options["directory"], int(options["batch"]),
                               int(options["read_images"]))
                  if kind == "folder" else array_probe(int(options["array_mib"]), options["mode"]))
        print(json.dumps(result))
        return
    recorded = {key: value for key, value in options.items() if key != "results_dir"}
    results = {"device": common.device_description(), "options": recorded, "rows": []}
    for count in (int(n) for n in str(options["folder_n"]).split(",") if n):
        directory = tempfile.mkdtemp(prefix="emc2_folder_")
        try:
            write_s = write_folder(directory, count, int(options["size"]))
            row = _run_child([f"child=folder", f"directory={directory}",
                              f"batch={options['batch']}", f"read_images={options['read_images']}"])
            row["write_s"] = round(write_s, 1)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    for mode in (m for m in str(options["modes"]).split(",") if m):
        row = _run_child(["child=array", f"array_mib={options['array_mib']}", f"mode={mode}"])
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(options["results_dir"], exist_ok=True)
    with open(os.path.join(options["results_dir"], f"{options['name']}.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
