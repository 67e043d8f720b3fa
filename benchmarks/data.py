r"""Data at size (issue 18): host memory, time to the first step and input
throughput of training from a folder of image files.

    python -m benchmarks.data                         # the whole plan below: 15 min on a
                                                      # 2-core CPU, + 5 min writing the folders
    python -m benchmarks.data --parts=throughput      # one part
    python -m benchmarks.data --redo                  # measure again what data.json holds
    python -m benchmarks.data --memory_folders=2000:8:png --parts=memory \
        --results_dir=/tmp/bench                      # a quick check

The images are synthetic and on disk: smooth-ish random RGB images (noise at
1/8 of the size, bilinearly upsampled, plus Gaussian noise of σ = 8), written
by this benchmark as PNG or JPEG (quality 90) into 10 class folders under
`--data_root` (default /tmp/emc2-bench-data), with a pool of `--workers`
processes. A folder is named `n<N>_<size>px_<format>`; a finished one holds
`.complete.json` and is reused by the next run (delete it to rewrite it). A
folder is written as `N:size:format`, e.g. `1000000:8:png`.

Each probe runs in its own process, one at a time (the machine has 2 cores):

1. **memory** (`--memory_folders` × `--methods`): peak resident set
   (`VmHWM`) of `--steps` training steps (`model.fit(steps_per_epoch=...)`)
   of EMC² (default options) and SimCLR, small CNN, B = `--batch_size`, from
   `ImageFolderSource` through `make_two_view_dataset`, as the trainer builds
   them (EMC² gets the source as its image table). Also the resident set
   after importing TensorFlow (the baseline), after the folder scan, the
   model's N-sized state, and the seconds of the steps after the first
   (training from the folder, input included). The growth per image between
   two N of the same image size is the memory that scales with N.
2. **first_step** (`--first_step_folder`, `--first_step_encoders`): the
   command line `python -m trainers.train --dataset=folder --data_dir=...
   --epochs=1 --checkpoint_every_steps=1 ...` timed from launch until its
   first checkpoint (`ckpt-1.index`) appears, then killed; and the folder
   scan alone (`benchmarks.image_sources`' folder probe, which also times
   read + decode without augmentation).
3. **throughput** (`--throughput_folders`, `--throughput_encoders`): source
   images per second of read + decode + two augmentations (iterating
   `make_two_view_dataset` over an `ImageFolderSource`, nothing else), of the
   two augmentations alone (the same over an in-memory uint8 array) and of
   read + decode alone; against the images per second one compiled training
   step of EMC² (default, B = `--batch_size`, graph mode, no XLA) consumes,
   measured on batches cached in memory so no input is included.

Resumable: every probe is added to `<results_dir>/<name>.json` as it ends,
keyed by its parameters, with the share of the machine's CPU that other
work took meanwhile (`others_cpu_share`: it slows the probe) and the load
average at its start; a rerun skips the probes already there, `--redo`
measures them again. Prints Markdown tables at the end.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import flags

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = ".complete.json"  # hidden: ImageFolderSource ignores it
CLASSES = 10
CHUNK = 500  # images per task of the writing pool
SEED = 18

#: This module's own flags, apart from absl's global ones: `benchmarks.cost`
#: (imported for its helpers) defines global flags of the same names.
FLAGS = flags.FlagValues()
_DEFINE = {"list": flags.DEFINE_list, "string": flags.DEFINE_string,
           "integer": flags.DEFINE_integer, "float": flags.DEFINE_float,
           "bool": flags.DEFINE_bool}
for _kind, _name, _default, _help in (
        ("list", "parts", ["throughput", "memory", "first_step"], "Parts of the plan to run."),
        ("string", "data_root", "/tmp/emc2-bench-data", "Where the image folders are kept."),
        ("integer", "workers", 2, "Processes writing the images."),
        ("list", "memory_folders", ["10000:8:png", "100000:8:png", "1000000:8:png",
                                    "10000:32:png", "100000:32:png", "105000:96:jpg"],
         "Folders N:size:format of the memory probes."),
        ("list", "methods", ["emc2", "simclr"], "Methods of the memory probes."),
        ("integer", "steps", 50, "Training steps of a memory probe."),
        ("integer", "batch_size", 64, "B of every probe."),
        ("string", "first_step_folder", "105000:96:jpg",
         "Folder of the first-step probe (empty: none)."),
        ("list", "first_step_encoders", ["small_cnn", "resnet18"],
         "--encoder of the first-step command lines."),
        ("integer", "first_step_timeout", 300, "Seconds before a first-step probe gives up."),
        ("list", "throughput_folders", ["10000:32:png", "10000:32:jpg", "10000:96:png",
                                        "105000:96:jpg"],
         "Folders N:size:format of the input-throughput probes."),
        ("list", "throughput_encoders", ["small_cnn", "resnet18"],
         "Encoders of the training-step rates (at each image size of the folders)."),
        ("float", "seconds", 5.0, "Seconds each rate is measured for (after warm-up)."),
        ("bool", "redo", False, "Measure again the probes the results file already holds."),
        ("string", "name", "data", "Results file name under --results_dir."),
        ("string", "results_dir", common.RESULTS_DIR, "Where the JSON goes."),
        ("string", "child", None, "Internal: the JSON spec of a probe run in this process.")):
    _DEFINE[_kind](_name, _default, _help, flag_values=FLAGS)


def code_version() -> str:
    """The commit the measured code is at, `+modified` when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                              check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+modified" if git("status", "--porcelain", "--untracked-files=no") else "")


def cpu_seconds() -> tuple[float, float]:
    """`(busy CPU seconds of the whole machine since boot, CPU seconds of this
    process and of its children that ended)`: their difference over a probe is
    what other work on the machine took from it."""
    import resource

    with open("/proc/stat") as handle:
        ticks = [int(x) for x in handle.readline().split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
    own = sum(usage.ru_utime + usage.ru_stime for usage in (
        resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))
    return busy, own


def fail(message: str):
    print(f"data: error: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- folders


def parse_folder(text: str) -> tuple[int, int, str]:
    """`'105000:96:jpg'` → `(105000, 96, 'jpg')`; one-line `ValueError` otherwise."""
    parts = text.strip().split(":")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or (
            parts[2] not in ("png", "jpg")) or int(parts[0]) < 1 or int(parts[1]) < 2:
        raise ValueError(f"{text!r} is not N:size:format (N ≥ 1, size ≥ 2, format png or jpg)")
    return int(parts[0]), int(parts[1]), parts[2]


def folder_path(root: str, n: int, size: int, fmt: str) -> str:
    return os.path.join(root, f"n{n}_{size}px_{fmt}")


def _upsampling(low: int, size: int):
    """`[size, low]` weights of linear interpolation from `low` to `size` samples."""
    import numpy as np

    position = np.clip((np.arange(size) + 0.5) * low / size - 0.5, 0, low - 1)
    left = np.floor(position).astype(int)
    right = np.minimum(left + 1, low - 1)
    weights = np.zeros((size, low))
    weights[np.arange(size), left] += 1 - (position - left)
    weights[np.arange(size), right] += position - left
    return weights


def synthetic_images(rng, count: int, size: int):
    """`count` smooth-ish random RGB images, uint8 `[count, size, size, 3]`: noise
    at 1/8 of the size, linearly upsampled, plus Gaussian noise of σ = 8."""
    import numpy as np

    low = max(2, size // 8)
    coarse = rng.integers(0, 256, (count, low, low, 3)).astype(np.float32)
    weights = _upsampling(low, size).astype(np.float32)
    smooth = np.einsum("yi,nijc,xj->nyxc", weights, coarse, weights, optimize=True)
    noise = rng.normal(0.0, 8.0, smooth.shape).astype(np.float32)
    return np.clip(np.rint(smooth + noise), 0, 255).astype(np.uint8)


def _write_chunk(task) -> int:
    """Writes images `start … stop − 1` of a folder; returns the bytes written."""
    import numpy as np
    from PIL import Image

    directory, start, stop, size, fmt = task
    images = synthetic_images(np.random.default_rng([SEED, start]), stop - start, size)
    written = 0
    for i, pixels in zip(range(start, stop), images):
        buffer = io.BytesIO()
        image = Image.fromarray(pixels)
        if fmt == "jpg":
            image.save(buffer, format="JPEG", quality=90)
        else:
            image.save(buffer, format="PNG")
        data = buffer.getvalue()
        with open(os.path.join(directory, f"class_{i % CLASSES}", f"{i:07d}.{fmt}"), "wb") as f:
            f.write(data)
        written += len(data)
    return written


def write_folder(root: str, n: int, size: int, fmt: str, workers: int = 2) -> dict:
    """The folder of `n` synthetic `size`×`size` images in `CLASSES` class
    folders, written unless a finished one is there (its `MARKER`).

    Returns the marker's record: `n`, `size`, `format`, `write_s`, `bytes`,
    and `reused` (True when nothing was written). Images are a function of
    their index only: an interrupted folder is rewritten to the same files.
    """
    directory = folder_path(root, n, size, fmt)
    marker = os.path.join(directory, MARKER)
    if os.path.exists(marker):
        with open(marker) as handle:
            return {**json.load(handle), "reused": True}
    started = time.perf_counter()
    for label in range(CLASSES):
        os.makedirs(os.path.join(directory, f"class_{label}"), exist_ok=True)
    tasks = [(directory, start, min(n, start + CHUNK), size, fmt) for start in range(0, n, CHUNK)]
    if workers > 1 and len(tasks) > 1:
        import multiprocessing

        # spawn: the parent may hold TensorFlow's threads, which fork would copy badly.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            written = sum(pool.imap_unordered(_write_chunk, tasks))
    else:
        written = sum(map(_write_chunk, tasks))
    record = {"n": n, "size": size, "format": fmt, "directory": directory,
              "write_s": round(time.perf_counter() - started, 1), "bytes": written,
              "workers": workers}
    with open(marker, "w") as handle:
        json.dump(record, handle)
    return {**record, "reused": False}


# ----------------------------------------------------------------------------- results


def probe_key(kind: str, **params) -> str:
    """`'memory/method=emc2/n=10000/...'`: the probe's kind and sorted parameters."""
    return "/".join([kind] + [f"{key}={params[key]}" for key in sorted(params)])


def load_results(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    return {"probes": {}, "folders": {}}


def run_probes(probes, path: str, redo: bool = False, log=print) -> dict:
    """Runs `probes` (`[(key, function returning a row dict)]`) one at a time.

    Each finished probe is saved to the JSON file at `path` (under
    `"probes"`, by its key, with the load average at its start and its
    seconds) before the next starts; a probe whose key is already there is
    skipped unless `redo`. A probe that raises loses only itself: the
    finished ones stay saved. Returns the results.
    """
    payload = load_results(path)
    for key, probe in probes:
        if key in payload["probes"] and not redo:
            log(f"skipped (in {os.path.basename(path)}): {key}")
            continue
        load = [round(x, 2) for x in os.getloadavg()]
        started = time.perf_counter()
        row = probe()
        row.update(loadavg_at_start=load, probe_s=round(time.perf_counter() - started, 1))
        payload = load_results(path)  # what other probes (or runs) saved meanwhile
        payload["probes"][key] = row
        common.write_json(os.path.splitext(os.path.basename(path))[0], payload,
                          os.path.dirname(path))
        log(f"{key}: {json.dumps(row)}")
    return payload


def save_folder_record(path: str, record: dict) -> None:
    payload = load_results(path)
    name = os.path.basename(record["directory"])
    if not record.get("reused") or name not in payload["folders"]:
        payload["folders"][name] = {k: v for k, v in record.items() if k != "reused"}
        common.write_json(os.path.splitext(os.path.basename(path))[0], payload,
                          os.path.dirname(path))


# ----------------------------------------------------------------------------- children


def _kib(field: str) -> int:
    from benchmarks.cost import _status_kib

    return _status_kib(field)


def run_child(spec: dict, timeout: int = 3600) -> dict:
    """Runs `spec` in a fresh process of this module; its last output line is the row."""
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.data", f"--child={json.dumps(spec)}"],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if completed.returncode:
        raise RuntimeError(f"probe {spec} failed: {completed.stderr.strip()[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _baseline_kib() -> int:
    """Resident KiB after importing TensorFlow, Keras and emc2_tf and running one op."""
    import tensorflow as tf

    import emc2_tf  # noqa: F401

    common.quiet_tensorflow()
    float(tf.reduce_sum(tf.ones([4])))
    return _kib("VmRSS")


def _model(method: str, encoder_name: str, source, batch_size: int, jit: bool = False):
    """The compiled model the trainer builds: seeded encoder, the method's
    default options, the source as EMC²'s image table, Adam 1e-3."""
    import keras

    import emc2_tf

    keras.utils.set_random_seed(0)
    encoder = emc2_tf.build_encoder(encoder_name, source.image_shape)
    arguments = {"seed": 0}
    if "images" in emc2_tf.models.method_options(method):
        arguments["images"] = emc2_tf.image_table(source)
    model = emc2_tf.build_model(method, encoder=encoder, dataset_size=source.num_images,
                                **arguments)
    model.compile(optimizer=emc2_tf.build_optimizer("adam", 1e-3, 0.0), jit_compile=jit)
    return model


def memory_child(spec: dict) -> dict:
    """Peak resident set of `steps` training steps from a folder."""
    import keras
    import numpy as np

    import emc2_tf

    baseline = _baseline_kib()
    started = time.perf_counter()
    source = emc2_tf.ImageFolderSource(spec["directory"])
    scan_s = time.perf_counter() - started
    after_scan = _kib("VmRSS")
    n = source.num_images
    model = _model(spec["method"], spec["encoder"], source, spec["batch_size"])
    dataset = emc2_tf.make_two_view_dataset(source, spec["batch_size"], emc2_tf.AugmentConfig(),
                                            seed=0)
    times = []

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter())

    model.fit(dataset, epochs=1, steps_per_epoch=spec["steps"], verbose=0,
              callbacks=[StepTimes()])
    peak = _kib("VmHWM")
    state = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                for v in model.variables if len(v.shape) and v.shape[0] == n)
    path_bytes = sum(len(os.fsencode(source.path(i))) for i in range(n))
    return {"n": n, "image_shape": list(source.image_shape), "method": spec["method"],
            "encoder": spec["encoder"], "batch_size": spec["batch_size"], "steps": len(times),
            "baseline_rss_mib": round(baseline / 1024, 1),
            "after_scan_rss_mib": round(after_scan / 1024, 1),
            "peak_rss_mib": round(peak / 1024, 1),
            "peak_over_baseline_mib": round((peak - baseline) / 1024, 1),
            "scan_s": round(scan_s, 2),
            "n_sized_state_bytes": state, "path_bytes": path_bytes,
            "steps_after_first_s": round(times[-1] - times[0], 2),
            "images_per_s_from_folder": round(
                spec["batch_size"] * (len(times) - 1) / (times[-1] - times[0]), 1)}


def _rate(iterator, batch_size: int, seconds: float, warmup: int = 3, minimum: int = 5,
          wait=None) -> dict:
    """Source images per second of pulling batches from `iterator` for ≥ `seconds`."""
    for _ in range(warmup):
        value = next(iterator)
    if wait is not None:
        wait(value)
    count, started = 0, time.perf_counter()
    while count < minimum or time.perf_counter() - started < seconds:
        value = next(iterator)
        count += 1
    if wait is not None:
        wait(value)
    elapsed = time.perf_counter() - started
    return {"images_per_s": round(count * batch_size / elapsed, 1), "batches": count,
            "seconds": round(elapsed, 2)}


def input_child(spec: dict) -> dict:
    """Read + decode + two augmentations from a folder, and the augmentations
    alone from the same images in memory (uint8)."""
    import numpy as np

    import emc2_tf

    source = emc2_tf.ImageFolderSource(spec["directory"])
    batch, seconds = spec["batch_size"], spec["seconds"]
    augment = emc2_tf.AugmentConfig()
    folder = emc2_tf.make_two_view_dataset(source, batch, augment, seed=0).repeat()
    row = {"n": source.num_images, "image_shape": list(source.image_shape),
           "folder_two_views": _rate(iter(folder), batch, seconds)}
    images = np.random.default_rng(0).integers(0, 256, (4096, *source.image_shape), np.uint8)
    memory = emc2_tf.make_two_view_dataset(images, batch, augment, seed=0).repeat()
    row["memory_two_views"] = _rate(iter(memory), batch, seconds)
    return row


def step_child(spec: dict) -> dict:
    """Images per second one compiled training step consumes, on cached batches
    (4 batches of random uint8 images), and the process's peak resident set:
    the memory of training itself, with no data set."""
    import numpy as np

    import emc2_tf
    from benchmarks.cost import fill_chains

    baseline = _baseline_kib()
    size, batch = spec["size"], spec["batch_size"]
    images = np.random.default_rng(0).integers(0, 256, (4 * batch, size, size, 3), np.uint8)
    source = emc2_tf.ArraySource(images)
    model = _model(spec["method"], spec["encoder"], source, batch)
    fill_chains(model)
    model.optimizer.build(model.trainable_variables)
    dataset = emc2_tf.make_two_view_dataset(source, batch, emc2_tf.AugmentConfig(), seed=0)
    dataset = dataset.take(4).cache().repeat()  # served from memory after the first pass
    model.make_train_function()
    step, iterator = model.train_function, iter(dataset)

    def pull(_):
        logs = step(iterator)
        return logs.get_value() if hasattr(logs, "get_value") else logs

    class Steps:
        def __next__(self):
            return pull(None)

    # Warm-up: the first step traces and compiles; ResNet-18 at 96 px takes ~40 s a step here.
    rate = _rate(Steps(), batch, spec["seconds"], warmup=2, minimum=2,
                 wait=lambda logs: float(logs["loss"]))
    return {"method": spec["method"], "encoder": spec["encoder"], "size": size,
            "batch_size": batch, "jit_compile": False, **rate,
            "baseline_rss_mib": round(baseline / 1024, 1),
            "peak_rss_mib": round(_kib("VmHWM") / 1024, 1)}


def scan_probe(directory: str, batch_size: int, read_images: int) -> dict:
    """`benchmarks.image_sources`' folder probe in its own process: scan time,
    memory of the source, read + decode throughput (no augmentation)."""
    from benchmarks.image_sources import _run_child

    return _run_child(["child=folder", f"directory={directory}", f"batch={batch_size}",
                       f"read_images={read_images}"])


def first_step_probe(directory: str, encoder: str, batch_size: int, timeout: int) -> dict:
    """Seconds from launching the trainer until its first checkpoint is on disk,
    and until it announces the run ("Pre-training ...": data loaded, model built;
    the rest is tracing, the first step and the checkpoint's write)."""
    work = tempfile.mkdtemp(prefix="emc2_first_step_")
    checkpoints = os.path.join(work, "checkpoints")
    command = [sys.executable, "-m", "trainers.train", "--dataset=folder",
               f"--data_dir={directory}", f"--encoder={encoder}", f"--batch_size={batch_size}",
               "--epochs=1", f"--checkpoint_dir={checkpoints}", "--checkpoint_every_steps=1",
               "--eval_every=0", "--export=false", "--tensorboard_dir=",
               f"--export_dir={os.path.join(work, 'export')}"]
    target = os.path.join(checkpoints, "ckpt-1.index")
    log_path = os.path.join(work, "log.txt")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                                            PYTHONUNBUFFERED="1"),
                                   start_new_session=True)
    seconds = announced = None
    try:
        while time.perf_counter() - started < timeout:
            if os.path.exists(target):
                seconds = time.perf_counter() - started
                break
            if announced is None:
                with open(log_path, errors="replace") as handle:
                    if "Pre-training " in handle.read():  # data loaded, model built
                        announced = time.perf_counter() - started
            if process.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the trainer only
        process.wait()
    with open(log_path) as handle:
        log_tail = handle.read()[-2000:]
    shutil.rmtree(work, ignore_errors=True)
    if seconds is None:
        raise RuntimeError(f"no {target} after {time.perf_counter() - started:.0f} s "
                           f"(exit {process.returncode}): {log_tail}")
    return {"encoder": encoder, "batch_size": batch_size, "command": " ".join(command[1:]),
            "first_checkpoint_s": round(seconds, 1),
            "announced_s": None if announced is None else round(announced, 1)}


CHILDREN = {"memory": memory_child, "input": input_child, "step": step_child}


# ----------------------------------------------------------------------------- the plan


def plan(results_path: str) -> list:
    """`[(key, probe)]` of the parts in `--parts`, cheap ones first."""
    batch, probes = FLAGS.batch_size, []

    def folder(text: str) -> str:
        n, size, fmt = parse_folder(text)
        record = write_folder(FLAGS.data_root, n, size, fmt, FLAGS.workers)
        save_folder_record(results_path, record)
        return record["directory"]

    if "throughput" in FLAGS.parts:
        sizes = []
        for text in FLAGS.throughput_folders:
            n, size, fmt = parse_folder(text)
            sizes.append(size)
            probes.append((probe_key("input", n=n, size=size, format=fmt, batch_size=batch),
                           lambda text=text: run_child({
                               "kind": "input", "directory": folder(text),
                               "batch_size": batch, "seconds": FLAGS.seconds})))
            probes.append((probe_key("read", n=n, size=size, format=fmt, batch_size=batch),
                           lambda text=text: scan_probe(folder(text), batch, 5000)))
        for size in sorted(set(sizes)):
            for encoder in FLAGS.throughput_encoders:
                probes.append((probe_key("step", method="emc2", encoder=encoder, size=size,
                                         batch_size=batch),
                               lambda size=size, encoder=encoder: run_child({
                                   "kind": "step", "method": "emc2", "encoder": encoder,
                                   "size": size, "batch_size": batch,
                                   "seconds": FLAGS.seconds})))
    if "memory" in FLAGS.parts:
        for text in FLAGS.memory_folders:
            n, size, fmt = parse_folder(text)
            for method in FLAGS.methods:
                probes.append((probe_key("memory", method=method, n=n, size=size, format=fmt,
                                         encoder="small_cnn", batch_size=batch,
                                         steps=FLAGS.steps),
                               lambda text=text, method=method: run_child({
                                   "kind": "memory", "directory": folder(text),
                                   "method": method, "encoder": "small_cnn",
                                   "batch_size": batch, "steps": FLAGS.steps})))
    if "first_step" in FLAGS.parts and FLAGS.first_step_folder:
        n, size, fmt = parse_folder(FLAGS.first_step_folder)
        text = FLAGS.first_step_folder
        probes.append((probe_key("scan", n=n, size=size, format=fmt),
                       lambda: scan_probe(folder(text), batch, 2000)))
        for encoder in FLAGS.first_step_encoders:
            probes.append((probe_key("first_step", n=n, size=size, format=fmt, encoder=encoder,
                                     batch_size=batch),
                           lambda encoder=encoder: first_step_probe(
                               folder(text), encoder, batch, FLAGS.first_step_timeout)))
    return probes


# ----------------------------------------------------------------------------- tables


def _rows(payload: dict, kind: str) -> list[tuple[dict, dict]]:
    """`[(parameters, row)]` of the probes of `kind`, in key order."""
    rows = []
    for key in sorted(payload["probes"]):
        head, *items = key.split("/")
        if head == kind:
            rows.append(({k: common.parse_value(v) for k, v in
                          (item.split("=", 1) for item in items)}, payload["probes"][key]))
    return rows


def memory_growth(payload: dict) -> list[dict]:
    """Per method and image size: bytes per image of peak growth between the
    smallest and the largest N measured."""
    groups = {}
    for params, row in _rows(payload, "memory"):
        groups.setdefault((params["method"], params["size"], params["format"]), []).append(row)
    growth = []
    for (method, size, fmt), rows in sorted(groups.items()):
        rows.sort(key=lambda r: r["n"])
        if len(rows) < 2:
            continue
        small, large = rows[0], rows[-1]
        extra = large["n"] - small["n"]
        per_image = (large["peak_rss_mib"] - small["peak_rss_mib"]) * 2**20 / extra
        expected = ((large["path_bytes"] - small["path_bytes"])
                    + (large["n_sized_state_bytes"] - small["n_sized_state_bytes"])) / extra
        growth.append({"method": method, "size": size, "format": fmt, "from_n": small["n"],
                       "to_n": large["n"], "peak_growth_mib": round(
                           large["peak_rss_mib"] - small["peak_rss_mib"], 1),
                       "bytes_per_image": round(per_image, 1),
                       "paths_and_state_bytes_per_image": round(expected, 1)})
    return growth


def _others(row: dict) -> str:
    """The share of the machine's CPU other work took during a probe (older
    rows: the load average at its start, which also counts the previous probe)."""
    if "others_cpu_share" in row:
        return f"{row['others_cpu_share']:.0%}"
    return f"load {row['loadavg_at_start'][0]}"


def report(payload: dict) -> str:
    lines = []
    memory = _rows(payload, "memory")
    if memory:
        lines += ["", "Host memory: peak resident set over the training steps (small CNN)", ""]
        lines.append(common.markdown_table(
            ["method", "N", "image", "baseline (MiB)", "after scan", "peak (MiB)",
             "peak − baseline", "scan (s)", "img/s from folder", "others' CPU"],
            [[p["method"], p["n"], f"{p['size']}px {p['format']}", r["baseline_rss_mib"],
              r["after_scan_rss_mib"], r["peak_rss_mib"], r["peak_over_baseline_mib"],
              r["scan_s"], r["images_per_s_from_folder"], _others(r)]
             for p, r in sorted(memory, key=lambda pr: (pr[0]["size"], pr[0]["n"],
                                                       pr[0]["method"]))]))
        growth = memory_growth(payload)
        payload["memory_growth"] = growth
        if growth:
            lines += ["", common.markdown_table(
                ["method", "image", "N", "peak growth (MiB)", "bytes/image",
                 "paths + chain state (bytes/image)"],
                [[g["method"], f"{g['size']}px {g['format']}", f"{g['from_n']} → {g['to_n']}",
                  g["peak_growth_mib"], g["bytes_per_image"],
                  g["paths_and_state_bytes_per_image"]] for g in growth])]
    first = _rows(payload, "first_step")
    scans = _rows(payload, "scan")
    if first or scans:
        lines += ["", "Time to the first step from the command line (seconds from launch)", ""]
        rows = [[f"scan alone ({p['n']} files, {p['size']}px {p['format']})", "", "",
                 r["scan_s"], _others(r)] for p, r in scans]
        rows += [[f"train --encoder={p['encoder']} ({p['n']} files, {p['size']}px "
                  f"{p['format']}, B={p['batch_size']})", r["announced_s"],
                  r["first_checkpoint_s"], "", _others(r)] for p, r in first]
        lines.append(common.markdown_table(
            ["", "run announced (data loaded, model built)", "first checkpoint on disk",
             "scan", "others' CPU"], rows))
    inputs, reads, steps = (_rows(payload, kind) for kind in ("input", "read", "step"))
    if inputs or steps:
        lines += ["", "Input throughput (source images/s) against what a training step consumes",
                  ""]
        read_rate = {(p["n"], p["size"], p["format"]): r["read_images_per_s"] for p, r in reads}
        lines.append(common.markdown_table(
            ["folder", "read + decode", "augment ×2 (in memory)", "read + decode + augment ×2",
             "others' CPU"],
            [[f"{p['n']} × {p['size']}px {p['format']}",
              read_rate.get((p["n"], p["size"], p["format"]), "–"),
              r["memory_two_views"]["images_per_s"], r["folder_two_views"]["images_per_s"],
              _others(r)] for p, r in inputs]))
        if steps:
            lines += ["", common.markdown_table(
                ["training step (EMC², graph)", "image", "images/s consumed", "s/step",
                 "peak RSS (MiB)", "others' CPU"],
                [[p["encoder"], f"{p['size']}px", r["images_per_s"],
                  round(p["batch_size"] / r["images_per_s"], 3), r.get("peak_rss_mib", "–"),
                  _others(r)]
                 for p, r in steps])]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags.")
    if FLAGS.child is not None:
        spec = json.loads(FLAGS.child)
        print(json.dumps(CHILDREN[spec["kind"]](spec)), flush=True)
        return
    unknown = sorted(set(FLAGS.parts) - {"throughput", "memory", "first_step"})
    if unknown:
        fail(f"--parts: unknown {unknown}; accepted: throughput, memory, first_step.")
    try:
        for text in [*FLAGS.memory_folders, *FLAGS.throughput_folders,
                     *([FLAGS.first_step_folder] if FLAGS.first_step_folder else [])]:
            parse_folder(text)
    except ValueError as error:
        fail(str(error))
    path = os.path.join(FLAGS.results_dir, f"{FLAGS.name}.json")
    payload = load_results(path)
    if "device" not in payload:
        payload["device"] = common.device_description()
        common.write_json(FLAGS.name, payload, FLAGS.results_dir)
    version = code_version()

    def measured(probe):
        def run():
            busy, own = cpu_seconds()
            started = time.perf_counter()
            row = probe()
            wall = time.perf_counter() - started
            busy_after, own_after = cpu_seconds()
            others = max(0.0, (busy_after - busy) - (own_after - own))
            return {**row, "code": version,
                    "others_cpu_share": round(others / (wall * os.cpu_count()), 3)}
        return run

    probes = [(key, measured(probe)) for key, probe in plan(path)]
    payload = run_probes(probes, path, redo=FLAGS.redo)
    text = report(payload)
    common.write_json(FLAGS.name, payload, FLAGS.results_dir)  # with memory_growth
    print(f"\n{payload['device']['device']}, TensorFlow {payload['device']['tensorflow']}")
    print(text)


if __name__ == "__main__":
    if "--help" in sys.argv[1:] or "--helpfull" in sys.argv[1:]:
        print(__doc__ + "\n" + FLAGS.get_help())
        sys.exit(0)
    try:
        arguments = FLAGS(sys.argv)
    except flags.Error as error:
        fail(str(error))
    main(arguments)
