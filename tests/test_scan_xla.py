"""The MH scan compiled by XLA inside a graph step (`scan_compile`), and the dense
negative term (issue 20, steps 1 and 2).

`mh_scan(scan_compile="auto")` runs the two passes in a nested
`tf.function(jit_compile=True)` while a graph is traced; the MH probabilities
are computed after the compiled loop by the same TensorFlow op in every mode,
so every output is bit-identical to the eager scan. The negative term is
`Σ_c W[a, c] β s(a, c) / n`, W the recorded steps' weights summed per column by
one segment sum: pinned to a float64 loop, value and gradient.
"""

import json
import logging
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import emc2_tf
from emc2_tf.samplers import candidate_mask
from emc2_tf.samplers import metropolis_hastings as mh

from helpers import run_python

SCANS = ["sequential", "parallel", "blocked"]


@pytest.fixture(autouse=True)
def fresh_compile_caches(monkeypatch):
    """Each test traces, compiles and probes its own scans (blocks of 5 candidates,
    so the blocked scan crosses several blocks and pads the last one)."""
    monkeypatch.setattr(mh, "_COMPILED_CORES", {})
    monkeypatch.setattr(mh, "_XLA_PROBES", {})
    monkeypatch.setattr(mh, "SCAN_BLOCK_SIZE", 5)


def _inputs(b, seed):
    rng = np.random.default_rng(seed)
    index = rng.integers(0, 2 * b, b).astype(np.int32)  # repeated images too
    logits = rng.normal(scale=3.0, size=(2, b, 2 * b)).astype(np.float32)
    log_u = np.log(rng.random((2, 2 * b, b))).astype(np.float32)
    initial = rng.normal(size=b).astype(np.float32)
    initial[0] = -np.inf  # an empty chain
    initial[1] = 1e3  # a sticky one
    out_of_batch = rng.normal(size=(2, b)).astype(np.float32)
    return (tf.constant(logits), candidate_mask(tf.constant(index)), tf.constant(log_u),
            tf.constant(initial), b - 1), tf.constant(out_of_batch)


def _assert_identical(got, want):
    for field in (f for f in want._fields if f != "compiled"):  # the one Python flag
        np.testing.assert_array_equal(getattr(got, field).numpy(), getattr(want, field).numpy(),
                                      err_msg=field)


@pytest.mark.parametrize("refresh", [False, True])
@pytest.mark.parametrize("scan", SCANS)
# b = 12: 24 candidates, one full block of 16 and a partial one for the blocked scan.
@pytest.mark.parametrize("b", [6, 12])
def test_xla_compiled_scan_in_a_graph_is_bit_identical_to_eager(b, scan, refresh):
    """`scan_compile="auto"` in a `tf.function` = the eager scan, every output bit for
    bit (states, states before each step, decisions, probabilities, recorded steps,
    final state and score); and the passes really ran compiled.

    Catches: the compiled core not used in a graph (`auto` compiling nothing),
    the MH probabilities computed inside the XLA loop (XLA's `exp` differs from
    TensorFlow's in the last bit), a refresh or a pass-1 start state that differs
    between the compiled and the uncompiled core.
    """
    args, out_of_batch = _inputs(b, seed=b + 3 * refresh)
    options = dict(refresh_log_score_between_passes=refresh, out_of_batch_logits=out_of_batch,
                   scan=scan)
    eager = mh.mh_scan(*args, **options, scan_compile="auto")  # eager: uncompiled
    assert not mh._COMPILED_CORES
    graph = tf.function(lambda: mh.mh_scan(*args, **options, scan_compile="auto"))()
    _assert_identical(graph, eager)
    assert list(mh._XLA_PROBES.values()) == [True]
    # Two compiled functions (the probe's shapes, the graph's), each traced once.
    assert [core.experimental_get_tracing_count() for core in mh._COMPILED_CORES.values()] == [
        1, 1]
    # "xla" compiles eagerly too, with the same result.
    _assert_identical(mh.mh_scan(*args, **options, scan_compile="xla"), eager)
    # The case is not vacuous: chains accept, and the empty chain moves.
    assert eager.accepted.numpy().any() and eager.final_state.numpy()[0] >= 0


def test_whole_step_under_xla_runs_the_scan_inline_with_the_same_decisions():
    """Inside a `jit_compile=True` function the scan is not nested again (no probe,
    no second compiled function) and its decisions equal the eager scan's; only the
    probabilities may differ, by XLA's `exp` (≤ 1 ulp).

    Catches: a probe run from inside an XLA trace, or a scan whose decisions
    change under XLA (a float rewrite flipping `log U < β s − score`).
    """
    args, out_of_batch = _inputs(24, seed=1)
    options = dict(refresh_log_score_between_passes=True, out_of_batch_logits=out_of_batch)
    eager = mh.mh_scan(*args, **options, scan="parallel", scan_compile="none")
    xla = tf.function(lambda: mh.mh_scan(*args, **options, scan="auto", scan_compile="auto"),
                      jit_compile=True)()
    assert not mh._XLA_PROBES and not mh._COMPILED_CORES
    for field in ("states", "previous_states", "accepted", "recorded", "valid", "final_state",
                  "final_log_score"):
        np.testing.assert_array_equal(getattr(xla, field).numpy(), getattr(eager, field).numpy(),
                                      err_msg=field)
    np.testing.assert_allclose(xla.accept_probability.numpy(), eager.accept_probability.numpy(),
                               rtol=2e-7, atol=0)


def test_auto_scan_under_xla_is_sequential_on_a_cpu(monkeypatch):
    """A compiled scan on a CPU is sequential at every B (the fused loop is as fast
    or faster there, benchmarks/scan.py); on a GPU the choice stays by size.

    Catches: the O(B³) parallel scan picked under XLA on a CPU.
    """
    valid = tf.TensorSpec([8, 16], tf.bool)
    assert mh._pass_name("auto", valid) == "parallel"
    assert mh._pass_name("auto", valid, compiled=True) == "sequential"
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert mh._pass_name("auto", valid, compiled=True) == "parallel"
    with pytest.raises(ValueError, match="scan_compile must be one of auto, xla, none"):
        mh.mh_scan(*_inputs(4, 0)[0], scan_compile="jit")


def test_a_scan_xla_cannot_compile_falls_back_with_one_logged_line(monkeypatch, caplog):
    """The passes made uncompilable (a `tf.numpy_function` inside, which XLA
    rejects): the graph scan runs uncompiled, equals the eager one bit for bit, and
    one line says so, once however often the graph is traced.

    Catches: a step that fails where XLA cannot compile the scan (no probe, or
    the error not caught), a silent fallback, a line per trace.
    """
    original = mh._scan_passes

    def uncompilable(key, *inputs):
        states, log_scores, accepted, start, recorded = original(key, *inputs)
        states = tf.numpy_function(lambda x: x, [states], tf.int32, stateful=False)
        return tf.ensure_shape(states, log_scores.shape), log_scores, accepted, start, recorded

    monkeypatch.setattr(mh, "_scan_passes", uncompilable)
    args, _ = _inputs(6, seed=2)
    eager = mh.mh_scan(*args, scan="sequential", scan_compile="none")
    with caplog.at_level(logging.WARNING, logger=mh.__name__):
        for _ in range(2):
            graph = tf.function(lambda: mh.mh_scan(*args, scan="sequential",
                                                   scan_compile="auto"))()
            _assert_identical(graph, eager)
    lines = [r.getMessage() for r in caplog.records if r.name == mh.__name__]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "runs uncompiled: XLA could not compile it" in lines[0]
    assert list(mh._XLA_PROBES.values()) == [False]


# ---- The model's step: graph, XLA and MirroredStrategy -----------------------------------


def _trained(scan_compile, jit_compile=False, batch_size=8, seed=0):
    """`(weights, chain_index, chain_log_score, losses)` after 3 steps of `fit`."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    images = rng.random((32, 4, 4, 1)).astype(np.float32)
    encoder = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(6), keras.layers.UnitNormalization()])
    model = emc2_tf.EMC2Model(encoder=encoder, dataset_size=32, images=images, temperature=0.2,
                              seed=seed, scan_compile=scan_compile, exact_ratio=True)
    model.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=jit_compile)
    dataset = emc2_tf.make_two_view_dataset(images, batch_size, seed=seed).take(3)
    history = model.fit(dataset, epochs=2, verbose=0)
    return ([w.numpy() for w in encoder.weights], model.chain_index.numpy(),
            model.chain_log_score.numpy(), history.history["loss"])


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla-step"])
def test_fit_with_the_compiled_scan_equals_fit_without(jit_compile):
    """Two epochs of `fit` (exact ratio: every re-encode and refresh path) with the scan
    compiled (`scan_compile="auto"`, the default) and uncompiled (`"none"`): identical
    weights, chains, scores and losses, bit for bit; in a graph step the scan was
    compiled, in a `jit_compile=True` step it was not nested again.

    Catches: a compiled scan drawing or deciding differently from the graph one,
    the default not compiling in a graph step.
    """
    compiled = _trained("auto", jit_compile)
    probes = dict(mh._XLA_PROBES)
    plain = _trained("none", jit_compile)
    for got, want in zip(compiled[0], plain[0]):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(compiled[1:], plain[1:]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert (compiled[1] >= 0).any()  # chains moved
    assert list(probes.values()) == ([] if jit_compile else [True])


MIRRORED_SCRIPT = r"""
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
import emc2_tf
from emc2_tf.samplers import metropolis_hastings as mh

def run(scan_compile, jit_compile):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.random((32, 4, 4, 1)).astype(np.float32)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        encoder = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                                    keras.layers.Dense(6), keras.layers.UnitNormalization()])
        model = emc2_tf.EMC2Model(encoder=encoder, dataset_size=32, images=images,
                                  temperature=0.2, seed=0, scan_compile=scan_compile,
                                  out_of_batch="reencode")
        model.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=jit_compile)
    dataset = emc2_tf.make_two_view_dataset(images, 8, seed=0).take(3)
    model.fit(dataset, epochs=2, verbose=0)
    return [np.asarray(w).tolist() for w in encoder.weights] + [
        model.chain_index.numpy().tolist(), model.chain_log_score.numpy().tolist()]

compiled = run("auto", False)
devices = sorted(key[1] for key, compiles in mh._XLA_PROBES.items() if compiles)
print(json.dumps({"identical": compiled == run("none", False), "probed_on": devices}))
"""


def test_mirrored_strategy_fit_with_the_compiled_scan_equals_fit_without(tmp_path):
    """MirroredStrategy over 2 logical CPUs: `fit` with the scan compiled per replica
    (nested XLA, probed on each replica's device) = uncompiled, bit for bit.
    (`jit_compile=True` on the whole step fails under MirroredStrategy before and
    after this change: XLA's "Trying to access resource ... located in device
    CPU:1 from device CPU:0", TensorFlow's known issue with distributed variables.)

    Catches: a replica's compiled scan drawing or deciding differently from the
    uncompiled one, one probe shared by both replicas' devices (the device
    left out of the probe's key), a replica's scan not compiled.
    """
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    result = run_python([str(script)])
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["identical"], out
    assert [d.split("device:")[-1] for d in out["probed_on"]] == ["CPU:0", "CPU:1"], out


# ---- The dense negative term against a float64 loop --------------------------------------


def _loop_negative_term(extended, states, weights, normaliser):
    """float64 reference: Σ_k w_k extended[a, column(s_k)] / n, one anchor at a time."""
    rows, k1 = extended.reshape(-1, extended.shape[-1]), extended.shape[-1]
    states, weights = states.reshape(len(rows), -1), weights.reshape(len(rows), -1)
    out = np.zeros(len(rows))
    for a in range(len(rows)):
        total = sum(w * rows[a, s if s >= 0 else k1 - 1] for s, w in zip(states[a], weights[a]))
        out[a] = total / normaliser.reshape(-1)[a] if normaliser.reshape(-1)[a] else 0.0
    return out.reshape(extended.shape[:-1])


def test_dense_negative_term_equals_the_float64_gather_loop():
    """`emc2_negative_term` (weights summed per column by one segment sum, then one dense
    product) = the per-step loop in float64: value to 1e-12 and gradient with respect
    to the logits (= the weights per column / n, out-of-batch column included).

    Catches: the out-of-batch state mapped to another column, rows' segments
    overlapping (a missing row offset), weights that carry a gradient or a gradient
    stopped at the logits, a normaliser of 0 giving NaN instead of 0.
    """
    rng = np.random.default_rng(5)
    shape, k = (2, 3), 7
    extended = tf.Variable(rng.normal(size=(*shape, k + 1)))
    states = rng.integers(-1, k, size=(*shape, 11)).astype(np.int32)
    states[0, 0] = -1  # every step out of batch
    weights = rng.random((*shape, 11)) * (rng.random((*shape, 11)) < 0.7)
    weights[1, 2] = 0.0  # normaliser 0
    normaliser = weights.sum(-1) + 0.5 * (weights.sum(-1) > 0)
    weights_t = tf.Variable(weights)
    with tf.GradientTape(persistent=True) as tape:
        term = emc2_tf.emc2_negative_term(extended, tf.constant(states), weights_t,
                                          tf.constant(normaliser))
        total = tf.reduce_sum(term)
    want = _loop_negative_term(extended.numpy(), states, weights, normaliser)
    np.testing.assert_allclose(term.numpy(), want, rtol=1e-12, atol=1e-12)
    assert term.numpy()[1, 2] == 0.0
    gradient = tape.gradient(total, extended).numpy()
    expected = np.zeros_like(gradient)
    for index in np.ndindex(shape):
        for s, w in zip(states[index], weights[index]):
            if normaliser[index]:
                expected[index][s if s >= 0 else k] += w / normaliser[index]
    np.testing.assert_allclose(gradient, expected, rtol=1e-12, atol=1e-15)
    assert tape.gradient(total, weights_t) is None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
