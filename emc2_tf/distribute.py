"""Distribution strategies for training: one name each, checked set-up, no silent hangs.

`make_strategy("default" | "mirrored" | "multi_worker")` returns the
`tf.distribute.Strategy` to build and compile the model under:

```python
strategy = emc2_tf.make_strategy("mirrored")
with strategy.scope():
    model = emc2_tf.build_model("emc2", encoder=..., dataset_size=n, images=...)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
model.fit(dataset, epochs=10)   # the dataset yields global batches
```

The model does the rest (`ContrastiveModel`): the global batch is split over
replicas, negatives are gathered across replicas, per-sample state is
updated identically everywhere, and each replica folds its id into its seed.

`multi_worker` reads the cluster from `TF_CONFIG` (see the README's recipe for
two workers on one machine or several hosts). If a worker does not answer
within `worker_timeout` seconds, the process ends with exit status 2 and a
one-line error naming it (TensorFlow's cluster start-up holds the GIL and
cannot be interrupted from Python), and collectives time out instead of
hanging.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from typing import Callable

import tensorflow as tf

#: Accepted values of `--strategy`.
STRATEGIES = ("default", "mirrored", "multi_worker")


def split_cpu(num_devices: int) -> None:
    """Splits the CPU into `num_devices` logical devices (before any op runs).

    Lets `mirrored` run 2+ replicas on a machine without GPUs (for tests and
    trying the distributed path).
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be ≥ 1; got {num_devices}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == num_devices:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError as error:
        raise RuntimeError(
            f"Cannot split the CPU into {num_devices} devices: TensorFlow is already "
            "initialised. Call emc2_tf.split_cpu first thing in the program."
        ) from error


def read_tf_config() -> tuple[list[str], int]:
    """The worker addresses and this task's index from `TF_CONFIG`, validated."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError(
            "--strategy=multi_worker needs the TF_CONFIG environment variable, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}.'
        )
    try:
        config = json.loads(raw)
        workers = list(config["cluster"]["worker"])
        task = config["task"]
        task_type, task_index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"TF_CONFIG is not valid ({type(error).__name__}: {error}); expected "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}.'
        ) from None
    if task_type not in ("worker", "chief"):
        raise ValueError(f"TF_CONFIG task type must be 'worker' (or 'chief'); got {task_type!r}.")
    if task_type == "worker" and not 0 <= task_index < len(workers):
        raise ValueError(
            f"TF_CONFIG task index {task_index} is outside the {len(workers)} workers listed."
        )
    for address in workers:
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"TF_CONFIG worker address {address!r} is not host:port.")
    return [str(w) for w in workers], task_index


#: Run in a separate process: TensorFlow holds the GIL while it joins the
#: cluster, so a thread of the training process could not fire. It prints the
#: line, then sends SIGINT, which `_exit_on_sigint` turns into exit status 2;
#: SIGKILL only if that handler is not installed or the process still lives 5 s on.
_WATCHDOG = r"""
import json, os, signal, socket, sys, time
parent, timeout, workers, task_index, exits_on_sigint, prefix = (
    int(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]),
    sys.argv[5] == "1", sys.argv[6])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    if os.getppid() != parent:
        sys.exit(0)
    time.sleep(0.2)
silent = []
for index, address in enumerate(workers):
    if index == task_index:
        continue
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2.0).close()
    except OSError:
        silent.append(f"worker {index} at {address}")
who = ", ".join(silent) or "a worker (its port is open)"
sys.stderr.write(
    f"{prefix}error: --strategy=multi_worker: {who} (from TF_CONFIG) did not join the cluster "
    f"within {timeout:g} s; start every worker listed in TF_CONFIG, check the addresses "
    "and firewall, or raise --worker_timeout.\n")
sys.stderr.flush()
if exits_on_sigint:
    os.kill(parent, signal.SIGINT)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and os.getppid() == parent:
        time.sleep(0.05)
if os.getppid() == parent:
    os.kill(parent, signal.SIGKILL)  # TensorFlow handles SIGTERM itself and keeps waiting
"""


def _exit_on_sigint() -> Callable[[], None] | None:
    """Until the returned function is called, SIGINT ends this process at once with
    exit status 2 (the status of a one-line error); None where that cannot be set up.

    While TensorFlow joins a cluster it holds the GIL, so Python's own SIGINT
    handler (KeyboardInterrupt) would never run. A C-level handler does: libc's
    `_exit` itself, which a signal calls with the signal number, and SIGINT is 2.
    The returned function puts the previous C-level handler back (Python's).
    """
    try:
        libc = ctypes.CDLL(None)
        exit_now = ctypes.cast(libc._exit, ctypes.c_void_p)
        install = libc.signal
    except (OSError, AttributeError):
        return None
    install.restype = ctypes.c_void_p
    install.argtypes = [ctypes.c_int, ctypes.c_void_p]
    previous = install(signal.SIGINT, exit_now)
    if previous == ctypes.c_void_p(-1).value:  # SIG_ERR
        return None
    return lambda: install(signal.SIGINT, previous)


def _multi_worker_strategy(worker_timeout: float, program: str | None) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy that gives up after `worker_timeout` seconds.

    Joining the cluster happens inside TensorFlow's C++ runtime (the eager
    context's initialisation, then a barrier), holds the GIL and waits for
    every worker forever: no Python exception or thread can interrupt it. A
    watchdog process therefore names the workers that did not answer, prints
    one line to stderr and kills this process (SIGKILL) if the strategy
    is not ready in time. During training, collectives time out after
    `worker_timeout` (`CommunicationOptions`) and the strategy's health check
    aborts them when a peer dies.

    Exit status 2 (issue 19: it was 137, a SIGKILL, which reads as a crash or the
    out-of-memory killer): during the join SIGINT exits with status 2
    (`_exit_on_sigint`), and the watchdog sends SIGINT; SIGKILL stays its
    fallback. A Ctrl-C during the join now ends it too. The line starts with
    `{program}: error:` (the trainer's `train: error:`), or `error:` without one.
    """
    workers, task_index = read_tf_config()
    restore_sigint = _exit_on_sigint()
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(worker_timeout),
         json.dumps(workers), str(task_index), "1" if restore_sigint else "0",
         f"{program}: " if program else ""],
        stdin=subprocess.DEVNULL,
    )
    try:
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=worker_timeout)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    finally:
        watchdog.kill()
        watchdog.wait()
        if restore_sigint:  # after the watchdog is gone: its SIGINT cannot come later
            restore_sigint()


def make_strategy(name: str = "default", worker_timeout: float = 120.0,
                  program: str | None = None) -> tf.distribute.Strategy:
    """The distribution strategy called `name` (`STRATEGIES`).

    Args:
        name: `default` (no distribution), `mirrored` (every local GPU, or
            every logical CPU device when there is no GPU), `multi_worker`
            (MultiWorkerMirroredStrategy over the workers of `TF_CONFIG`).
        worker_timeout: seconds to wait for the other workers to come up, and
            the timeout of each collective operation.
        program: the name that starts the one-line error of a worker that did
            not join (`train` gives `train: error: ...`, as the trainer's other
            errors); without it the line starts with `error:`.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy()
        cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(
            devices=cpus, cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    if name == "multi_worker":
        return _multi_worker_strategy(worker_timeout, program)
    raise ValueError(f"Unknown strategy {name!r}; accepted: {', '.join(STRATEGIES)}.")


def split_cpu_xla_reason(remedy: str = "Compile without it") -> str:
    """Why `jit_compile=True` cannot run with replicas on logical devices of one CPU,
    and the way out, starting with `remedy` (the trainer's: "Drop --jit_compile")."""
    return ("XLA compiles each replica's whole step for one device, but the replicas' "
            "variables live on other logical devices of the same CPU (TensorFlow's XLA known "
            f"issue 'tf.Variable on a different device'). {remedy} (the MH scan is still "
            "compiled with XLA on its own, scan_compile='auto'), or run the replicas on GPUs")


def check_jit_compile(strategy: tf.distribute.Strategy, jit_compile) -> None:
    """Refuses `jit_compile=True` under a strategy whose local replicas are 2+
    logical CPU devices (`split_cpu`), in one `ValueError` line.

    TensorFlow fails there at the first step with a raw error ("Trying to access
    resource .../replica_1 located in device CPU:1 from device CPU:0"), for any
    Keras model, SimCLR included. GPUs are not affected.
    """
    if jit_compile is not True or strategy.num_replicas_in_sync < 2:
        return  # (the default strategy has no `worker_devices`)
    devices = list(strategy.extended.worker_devices)
    if len(devices) > 1 and all(
            tf.DeviceSpec.from_string(device).device_type == "CPU" for device in devices):
        raise ValueError(
            f"jit_compile=True under {type(strategy).__name__} over {len(devices)} logical "
            f"CPU devices: {split_cpu_xla_reason()}.")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process should write files (exports, logs): worker 0 or no cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )
