r"""Waste recycling's effect on the variance of EMC²'s gradient, computed exactly.

    python -m benchmarks.recycling_variance                 # B = 3, 4, 5; τ = 0.5, 0.2, 0.1
    python -m benchmarks.recycling_variance --batch_sizes=3 --seeds=4

For one EMC² step on a fixed batch (fixed embeddings of the 2B views and of
each chain's stored out-of-batch negative), the only randomness is the MH
uniforms. Each chain's two passes take `2(2B − 2)` accept/reject decisions,
so all of a chain's paths (at most `2^(4B−4)`: 4,096 at B = 4) are
enumerated with their exact probabilities, in float64. For every path the
surrogate loss's gradient with respect to the embeddings (the 2B views and
the B stored negatives: what the encoder's gradient is built from) is
linear in the path's per-column weights, so its exact mean and per-coordinate
variance follow; chains are independent, so their variances add.

Both estimators are computed on the same paths: without recycling a
recorded step adds `f(state after the step)`; with it, `α f(candidate) +
(1 − α) f(state before)`, its conditional expectation given the state
before (same mean: checked to 1e-12). The burn-in is the default `B − 1`
valid steps per pass, each chain starts on its stored negative with that
negative's score against view 1 (`out_of_batch="reencode"` counts those
steps with the re-encoded negative, `"drop"` counts them as zero).

Prints, per (B, τ, out_of_batch) over `--seeds` random cases: the total
variance (the trace: sum over coordinates) without and with recycling, and
the largest per-coordinate increase, separately for the views' and the
stored negatives' coordinates. Writes `benchmarks/results/<name>.json`.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when run as a program: the tests import
    this module beside other benchmarks that define flags of the same names."""
    flags.DEFINE_list("batch_sizes", ["3", "4", "5"],
                      "Batch sizes B (paths per chain ≤ 2^(4B−4)).")
    flags.DEFINE_list("temperatures", ["0.5", "0.2", "0.1"], "Temperatures τ.")
    flags.DEFINE_integer("seeds", 10, "Random cases (embeddings) per (B, τ).")
    flags.DEFINE_integer("dim", 4, "Embedding dimension D.")
    flags.DEFINE_float("view_noise", 0.5, "Spread of an image's two views around its direction.")
    flags.DEFINE_string("name", "recycling_variance", "Results file name under --results_dir.")
    flags.DEFINE_string("results_dir", common.RESULTS_DIR, "Where the JSON goes.")

#: Largest batch enumerated exactly (2^(4B−4) paths per chain: 2^16 at B = 5).
MAX_BATCH_SIZE = 5

#: Other images of the data set, from which each chain's stored negative is drawn.
POOL_SIZE = 32

#: out_of_batch modes compared (`EMC2Model(out_of_batch=...)`).
MODES = ("reencode", "drop")


def fail(message: str):
    print(f"recycling_variance: error: {message}", file=sys.stderr)
    sys.exit(2)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_case(batch_size: int, dim: int, view_noise: float, temperature: float, seed: int):
    """`(views [2B, D], stored [B, D])`: two noisy views per image; each chain's stored
    negative drawn from its target `π_i ∝ exp(β s(view 1, z))` over `POOL_SIZE` other
    images, as a chain near stationarity holds (a hard negative, often hard to leave)."""
    rng = np.random.default_rng(seed)
    directions = unit(rng.normal(size=(batch_size, dim)))
    views = unit(np.concatenate([directions, directions])
                 + view_noise * rng.normal(size=(2 * batch_size, dim)))
    pool = unit(rng.normal(size=(POOL_SIZE, dim)))
    logits = views[:batch_size] @ pool.T / temperature
    target = np.exp(logits - logits.max(axis=1, keepdims=True))
    target /= target.sum(axis=1, keepdims=True)
    return views, pool[[rng.choice(POOL_SIZE, p=row) for row in target]]


def enumerate_paths(logits: np.ndarray, out_of_batch_logit: np.ndarray, valid: np.ndarray,
                    burn_in: int):
    """Every MH path of one chain over its two passes, with the weights each estimator
    gives the candidate columns.

    Args:
        logits: `[2, K]` β s(anchor of pass p, candidate c).
        out_of_batch_logit: `[2]` β s(anchor of pass p, stored negative).
        valid: bool `[K]`.
        burn_in: valid steps per pass not recorded.

    Returns:
        `(probability [P], plain [P, 2, K + 1], recycled [P, 2, K + 1], recorded [2])`:
        column K is the stored negative; `recorded[p]` is the normaliser of pass p.
    """
    num_candidates = logits.shape[1]
    probability = np.ones(1)
    state = np.full(1, num_candidates)  # column of the current state: K = the stored negative
    score = np.full(1, out_of_batch_logit[0])
    plain = np.zeros((1, 2, num_candidates + 1))
    recycled = np.zeros((1, 2, num_candidates + 1))
    recorded = np.zeros(2, int)
    rows = None
    for p in range(2):
        steps = 0
        for c in np.flatnonzero(valid):
            steps += 1
            alpha = np.minimum(1.0, np.exp(logits[p, c] - score))
            rows = np.arange(len(state))
            if steps > burn_in:
                recorded[p] += 1
                recycled[rows, p, c] += alpha
                recycled[rows, p, state] += 1.0 - alpha
            accept_plain, reject_plain = plain.copy(), plain
            if steps > burn_in:
                accept_plain[rows, p, c] += 1.0
                reject_plain[rows, p, state] += 1.0
            keep = alpha < 1.0  # a certain acceptance has no rejection branch
            probability = np.concatenate([probability * alpha, (probability * (1 - alpha))[keep]])
            state = np.concatenate([np.full(len(state), c), state[keep]])
            score = np.concatenate([np.full(len(score), logits[p, c]), score[keep]])
            plain = np.concatenate([accept_plain, reject_plain[keep]])
            recycled = np.concatenate([recycled, recycled[keep]])
    return probability, plain, recycled, recorded


def gradient_map(views: np.ndarray, stored: np.ndarray, chain: int, beta: float,
                 recorded: np.ndarray, mode: str) -> np.ndarray:
    """`[2 (K + 1), (2B + B) D]`: column weights of chain `chain` → the gradient of
    `(1/2B) Σ_p (1/n_p) Σ_c w_pc β s(anchor_p, z_c)` with respect to every view and
    stored negative (flattened). The positive term is fixed: it has no variance."""
    b, dim = len(stored), views.shape[1]
    vectors = np.concatenate([views, stored])  # the gradient's blocks
    result = np.zeros((2, 2 * b + 1, 3 * b, dim))
    for p in range(2):
        anchor = p * b + chain
        scale = beta / (2 * b * recorded[p])
        for column in range(2 * b + 1):
            if column == 2 * b and mode == "drop":
                continue  # "drop": the stored negative adds nothing
            other = column if column < 2 * b else 2 * b + chain
            result[p, column, anchor] += scale * vectors[other]
            result[p, column, other] += scale * vectors[anchor]
    return result.reshape(2 * (2 * b + 1), 3 * b * dim)


def exact_moments(views: np.ndarray, stored: np.ndarray, temperature: float, mode: str) -> dict:
    """Exact mean and per-coordinate variance of the gradient, without and with recycling."""
    b = len(stored)
    beta = 1.0 / temperature
    logits = beta * views @ views.T
    positions = np.concatenate([np.arange(b), np.arange(b)])
    moments = {"plain": [0.0, 0.0], "recycled": [0.0, 0.0]}
    for chain in range(b):
        anchors = [chain, b + chain]
        chain_logits = logits[anchors]
        stored_logit = beta * views[anchors] @ stored[chain]
        probability, plain, recycled, recorded = enumerate_paths(
            chain_logits, stored_logit, positions != chain, burn_in=b - 1)
        mapping = gradient_map(views, stored, chain, beta, recorded, mode)
        for name, weights in (("plain", plain), ("recycled", recycled)):
            gradient = weights.reshape(len(weights), -1) @ mapping
            mean = probability @ gradient
            variance = probability @ (gradient - mean) ** 2
            moments[name][0] += mean
            moments[name][1] += variance  # independent chains: variances add
        assert abs(probability.sum() - 1.0) < 1e-12
    return {name: {"mean": m, "variance": v} for name, (m, v) in moments.items()}


def summarise(moments: dict, batch_size: int, dim: int) -> dict:
    """Total variances and the largest per-coordinate increase, for views and stored negatives."""
    plain, recycled = moments["plain"]["variance"], moments["recycled"]["variance"]
    mean_gap = np.abs(moments["plain"]["mean"] - moments["recycled"]["mean"]).max()
    views = slice(0, 2 * batch_size * dim)
    stored = slice(2 * batch_size * dim, 3 * batch_size * dim)
    floor = 1e-12 * plain.max()  # coordinates without variance (e.g. "drop"'s stored ones)

    def increase(part):  # None: no coordinate of `part` varies (the chains left it)
        moved = plain[part] > floor
        if not moved.any():
            return None, 0
        change = recycled[part][moved] / plain[part][moved] - 1.0
        return float(change.max()), int((change > 1e-9).sum())

    view_increase, views_rose = increase(views)
    stored_increase, stored_rose = increase(stored)
    rise = np.maximum(recycled - plain, 0.0).sum() / plain.sum()
    return {"total_plain": float(plain.sum()), "total_recycled": float(recycled.sum()),
            "rise_share": float(rise),
            "max_increase_views": view_increase, "views_rose": views_rose,
            "max_increase_stored": stored_increase, "stored_rose": stored_rose,
            "coordinates": int((plain > floor).sum()), "mean_gap": float(mean_gap)}


def largest(cases: list[dict], key: str) -> float | None:
    """The largest `key` over the cases that have one (None if none has)."""
    values = [case[key] for case in cases if case[key] is not None]
    return max(values) if values else None


def percent(value: float | None) -> str:
    return "no variance" if value is None else f"{100 * value:+.1f} %"


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpfull).")
    try:
        batch_sizes = [int(b) for b in FLAGS.batch_sizes]
        temperatures = [float(t) for t in FLAGS.temperatures]
    except ValueError:
        fail("--batch_sizes must be integers and --temperatures numbers.")
    if not all(2 <= b <= MAX_BATCH_SIZE for b in batch_sizes):
        fail(f"--batch_sizes must lie in [2, {MAX_BATCH_SIZE}] (2^(4B−4) paths per chain).")
    if not all(0 < t < float("inf") for t in temperatures):
        fail("--temperatures must be finite numbers > 0.")
    if FLAGS.seeds < 1 or FLAGS.dim < 2:
        fail("--seeds must be ≥ 1 and --dim ≥ 2.")
    started = time.time()
    rows = []
    for batch_size in batch_sizes:
        for temperature in temperatures:
            for mode in MODES:
                cases = [summarise(exact_moments(*random_case(batch_size, FLAGS.dim,
                                                              FLAGS.view_noise, temperature,
                                                              seed),
                                                 temperature, mode), batch_size, FLAGS.dim)
                         for seed in range(FLAGS.seeds)]
                worst = max(c["mean_gap"] / max(abs(c["total_plain"]), 1e-300) for c in cases)
                if worst > 1e-9:
                    fail(f"the two estimators' means differ ({worst:.2e}) at B={batch_size}, "
                         f"τ={temperature}, {mode}: the enumeration is wrong.")
                ratios = [c["total_recycled"] / c["total_plain"] for c in cases]
                rows.append({"batch_size": batch_size, "temperature": temperature,
                             "out_of_batch": mode, "cases": cases,
                             "total_ratio_min": min(ratios), "total_ratio_max": max(ratios),
                             "total_ratio_mean": float(np.mean(ratios)),
                             "max_increase_views": largest(cases, "max_increase_views"),
                             "max_increase_stored": largest(cases, "max_increase_stored"),
                             "max_rise_share": max(c["rise_share"] for c in cases),
                             "cases_with_a_rise": sum(c["views_rose"] + c["stored_rose"] > 0
                                                      for c in cases)})
                print(f"B={batch_size} τ={temperature} {mode}: done", flush=True)
    payload = {"benchmark": "recycling_variance", "dim": FLAGS.dim, "seeds": FLAGS.seeds,
               "view_noise": FLAGS.view_noise, "rows": rows,
               "seconds": time.time() - started}
    path = common.write_json(FLAGS.name, payload, FLAGS.results_dir)
    print("\n" + common.markdown_table(
        ["B", "τ", "out_of_batch", "total variance, recycled / plain (mean; min–max)",
         "cases with a coordinate that rose", "largest rise: views", "largest rise: stored",
         "rises' sum / total (largest)"],
        [[r["batch_size"], r["temperature"], r["out_of_batch"],
          f"{r['total_ratio_mean']:.3f}; {r['total_ratio_min']:.3f}–{r['total_ratio_max']:.3f}",
          f"{r['cases_with_a_rise']} / {FLAGS.seeds}",
          percent(r["max_increase_views"]),
          "–" if r["out_of_batch"] == "drop" else percent(r["max_increase_stored"]),
          f"{100 * r['max_rise_share']:.1f} %"]
         for r in rows]))
    print(f"\nwrote {path} in {payload['seconds']:.0f} s")


if __name__ == "__main__":
    define_flags()
    app.run(main)
