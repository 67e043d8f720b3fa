"""tf.distribute on CPU: 2 logical devices (MirroredStrategy) and 2 local worker processes.

Each run happens in a subprocess (`tests/distributed_worker.py`): splitting
the CPU or joining a cluster must precede TensorFlow's initialisation.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, run_python

WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")


def _train(tmp_path, name, *args):
    out = tmp_path / f"{name}.npz"
    result = run_python([WORKER, str(out), *args], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(out))


def _state(run, suffix):
    (key,) = [k for k in run if k.endswith(suffix)]
    return run[key]


def _assert_replicas_identical(run):
    for key, copies in run.items():
        if key.endswith(".copies"):
            for copy in copies[1:]:
                np.testing.assert_array_equal(copy, copies[0], err_msg=key)


@pytest.mark.parametrize("method, extra", [
    ("simclr", []),
    ("sogclr", []),
    # τ = 0.1 with the same MH draws per image (each replica takes its chains'
    # columns of one fixed table): chains, scores and weights must equal the
    # 1-replica run's, which needs the global batch's candidates, the
    # replica's own chains and an all-gathered write-back.
    ("emc2", ["--fixed_draws"]),
])
def test_two_replicas_match_one_replica(tmp_path, method, extra):
    """Two mirrored replicas = one device, weight for weight (and state for state).

    Catches: an in-batch loss or EMC² scan over the replica's batch only
    (local candidates), a loss not divided by the replica count, a chain
    write-back that keeps only one replica's rows, a replica scanning the
    wrong chains' draws.
    """
    one = _train(tmp_path, "one", "--strategy=default", f"--method={method}", *extra)
    two = _train(tmp_path, "two", "--strategy=mirrored", f"--method={method}", *extra)
    assert int(one["replicas"]) == 1 and int(two["replicas"]) == 2
    _assert_replicas_identical(two)
    for key in one:
        if key.endswith(".copies") or key in ("replicas", "mh_draws_per_replica"):
            continue
        if one[key].dtype.kind == "f":
            finite = np.isfinite(one[key])
            np.testing.assert_array_equal(finite, np.isfinite(two[key]), err_msg=key)
            np.testing.assert_allclose(two[key][finite], one[key][finite], rtol=1e-5, atol=1e-5,
                                       err_msg=key)
        else:
            np.testing.assert_array_equal(two[key], one[key], err_msg=key)
    assert np.isfinite(one["loss"]) and float(one["loss"]) == pytest.approx(float(two["loss"]), abs=1e-5)


def test_parallel_and_blocked_scans_equal_sequential_scan_under_mirrored(tmp_path):
    """Two mirrored replicas, the same fixed MH draws: `scan="parallel"` and
    `scan="blocked"` (blocks of 5 of the 32 candidates, the last one padded) end
    with the same chains, scores and weights as `scan="sequential"`.

    Catches: a parallel or blocked scan that differs from the sequential one
    only where a replica's chains scan the global batch (b = B/2 chains over 2B
    candidates).
    """
    runs = {scan: _train(tmp_path, scan, "--strategy=mirrored", "--method=emc2",
                         "--fixed_draws", f"--scan={scan}", "--scan_block_size=5")
            for scan in ("sequential", "parallel", "blocked")}
    sequential = runs["sequential"]
    assert (_state(sequential, "chain_index") >= 0).sum() > 0
    for scan in ("parallel", "blocked"):
        np.testing.assert_array_equal(_state(runs[scan], "chain_index"),
                                      _state(sequential, "chain_index"), err_msg=scan)
        np.testing.assert_array_equal(_state(runs[scan], "chain_log_score"),
                                      _state(sequential, "chain_log_score"), err_msg=scan)
        for key in sequential:
            if sequential[key].dtype.kind == "f" and not key.endswith(".copies"):
                np.testing.assert_allclose(runs[scan][key], sequential[key], rtol=1e-6,
                                           atol=1e-7, err_msg=f"{scan}: {key}")


def test_emc2_chain_tables_identical_across_replicas_and_valid(tmp_path):
    """τ = 0.1 with the model's own draws: each replica draws its own uniforms, and
    every replica ends with the same, valid chain table.

    Catches: the same MH draws on every replica (the replica id not folded
    into the seed: replicas' chains would be driven by identical uniforms),
    replicas whose tables diverge.
    """
    one = _train(tmp_path, "one", "--strategy=default", "--method=emc2")
    two = _train(tmp_path, "two", "--strategy=mirrored", "--method=emc2")
    _assert_replicas_identical(two)
    draws = two["mh_draws_per_replica"]
    assert draws.shape == (2, 2, 4, 3)
    assert np.abs(draws[0] - draws[1]).min() > 0  # independent streams, not one shared
    assert ((draws > 0) & (draws < 1)).all()
    index_one, index_two = _state(one, "chain_index"), _state(two, "chain_index")
    score_two = _state(two, "chain_log_score")
    n = len(index_two)
    np.testing.assert_array_equal(index_one >= 0, index_two >= 0)  # same updated rows
    updated = index_two >= 0
    assert 3 * 16 >= updated.sum() > 0
    assert ((index_two[updated] < n) & (index_two[updated] != np.arange(n)[updated])).all()
    assert np.isfinite(score_two[updated]).all() and np.isneginf(score_two[~updated]).all()
    assert np.abs(score_two[updated]).max() <= 10.0 + 1e-4  # |β s| ≤ β = 10


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def _start(args, tf_config):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=tf_config)
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_worker_processes_hold_identical_chains_and_weights(tmp_path):
    ports = [_free_port(), _free_port()]
    workers = [_start([WORKER, str(tmp_path / f"w{i}.npz"), "--strategy=multi_worker",
                       "--method=emc2", "--worker_timeout=60"], _tf_config(ports, i))
               for i in range(2)]
    try:
        outputs = [w.communicate(timeout=240) for w in workers]
    finally:
        for w in workers:  # always stopped, even on failure or timeout
            w.kill()
            w.wait()
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    first, second = (dict(np.load(tmp_path / f"w{i}.npz")) for i in range(2))
    assert int(first["replicas"]) == 2
    for key in first:
        if key != "mh_draws_per_replica":
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    # Each worker holds its own replica's MH draws: independent streams, as in mirrored.
    assert np.abs(first["mh_draws_per_replica"] - second["mh_draws_per_replica"]).min() > 0
    assert (_state(first, "chain_index") >= 0).sum() > 0
    # And the cluster computes what 2 mirrored replicas compute (same seeds, same split).
    mirrored = _train(tmp_path, "mirrored", "--strategy=mirrored", "--method=emc2")
    np.testing.assert_array_equal(_state(first, "chain_index"), _state(mirrored, "chain_index"))


def test_bad_distribution_input_fails_fast_with_a_clear_line():
    result = run_python(["-m", "trainers.train", "--strategy=mirrored", "--cpu_devices=2",
                         "--batch_size=63", "--epochs=1"], timeout=120)
    assert result.returncode != 0
    assert ("--batch_size=63 (the global batch) is not divisible by the 2 replicas of "
            "--strategy=mirrored") in result.stderr
    assert "Traceback" not in result.stderr

    # XLA over logical CPU devices (test_jit_compile_on_split_cpu_is_refused_before_the_first_step).
    result = run_python(["-m", "trainers.train", "--strategy=mirrored", "--cpu_devices=2",
                         "--jit_compile", "--epochs=1"], timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("train: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("train: error: --jit_compile with --strategy=mirrored "
                                "--cpu_devices=2: XLA compiles"), errors[0]
    assert "Drop --jit_compile" in errors[0] and "Traceback" not in result.stderr

    ports = [_free_port(), _free_port()]  # nobody listens on the second one
    started = time.monotonic()
    worker = _start(["-m", "trainers.train", "--strategy=multi_worker", "--worker_timeout=5",
                     "--epochs=1"], _tf_config(ports, 0))
    try:
        _, err = worker.communicate(timeout=90)
    finally:
        worker.kill()
        worker.wait()
    assert worker.returncode == 2, err[-2000:]  # a one-line error, not SIGKILL (137)
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and lines[0].startswith(  # the trainer's `train: error:` prefix
        f"train: error: --strategy=multi_worker: worker 1 at 127.0.0.1:{ports[1]} (from "
        "TF_CONFIG) did not join the cluster within 5 s"), err[-2000:]
    assert time.monotonic() - started < 60

    bad = _start(["-m", "trainers.train", "--strategy=multi_worker", "--epochs=1"], "{not json")
    _, err = bad.communicate(timeout=120)
    assert bad.returncode != 0 and "TF_CONFIG is not valid" in err and "Traceback" not in err


_JIT_ON_SPLIT_CPU = """
import numpy as np, keras, tensorflow as tf, emc2_tf
emc2_tf.split_cpu(2)
strategy = emc2_tf.make_strategy("mirrored")
images = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
dataset = emc2_tf.make_two_view_dataset(images, 8, emc2_tf.AugmentConfig.for_dataset("digits"),
                                        seed=0)
for method, jit in (("emc2", True), ("simclr", True), ("emc2", False)):
    with strategy.scope():
        model = emc2_tf.build_model(method, encoder=emc2_tf.build_small_cnn_encoder((8, 8, 1)),
                                    dataset_size=16, seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
    try:
        model.fit(dataset, epochs=1, verbose=0)
        print(method, jit, "trained", model.optimizer.iterations.numpy())
    except ValueError as error:
        print(method, jit, "ValueError:", error)
"""


def test_jit_compile_on_split_cpu_is_refused_before_the_first_step():
    """Bug caught: `model.compile(jit_compile=True)` under MirroredStrategy over 2
    logical CPU devices died at the first step with TensorFlow's raw "Trying to
    access resource .../replica_1 located in device CPU:1 from device CPU:0" (any
    Keras model: SimCLR too). `fit` must refuse it in one ValueError line before a
    step runs, and still train with `jit_compile=False`."""
    result = run_python(["-c", _JIT_ON_SPLIT_CPU], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    refusal = ("ValueError: jit_compile=True under MirroredStrategy over 2 logical CPU "
               "devices: XLA compiles")
    assert len(lines) == 3, result.stdout
    assert lines[0].startswith(f"emc2 True {refusal}"), lines[0]
    assert lines[1].startswith(f"simclr True {refusal}"), lines[1]
    assert lines[2] == "emc2 False trained 2", lines[2]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
