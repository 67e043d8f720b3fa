"""Metropolis–Hastings negative chains of EMC² (algorithms.md, section 2).

EMC² keeps one Markov chain per data-set image `i` whose target is the softmax
over the image's negatives,

    π_i(j) = exp(β s(a_i, z_j)) / Σ_{k ≠ i} exp(β s(a_i, z_k)),

and estimates the log-partition gradient of the global contrastive loss with
the ergodic average of the chain's states. Each training step runs, for every
image of the batch, an independence-proposal MH scan over the batch's 2B
views (the batch is a uniform draw from the data set, so scanning it is a
uniform proposal):

    accept candidate c  iff  U < exp(β S[a, c] − log_score_i),  U ~ U(0, 1)

first with view 1 of `i` as anchor, then continuing the same chain with view 2
as anchor, 4B MH steps in all. Chains of different images are independent, so
the scan is vectorised over images and loops (compiled, `tf.scan`) over the
candidates only.

This module holds the pure tensor functions; `emc2_tf.models.EMC2Model` owns
the chain state variables and calls them inside `train_step`.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import tensorflow as tf
from tensorflow.python.ops import control_flow_util

# Candidate position used for "the chain's out-of-batch state from an earlier
# step" inside a scan (its current state is not one of this batch's views).
OUT_OF_BATCH = -1


class MHScanResult(NamedTuple):
    """What one EMC² scan over a batch produced.

    Shapes are those of the two-pass scan; a one-pass scan (`mh_scan` with
    logits `[1, A, 2B]`) has a leading axis of 1 and A chains instead.

    Attributes:
        states: int32 `[2, B, 2B]`: the chain's state after the MH step at
            each candidate, per pass (pass 0 anchors view 1, pass 1 anchors
            view 2). A state is a candidate position in `[0, 2B)` or
            `OUT_OF_BATCH`.
        recorded: bool `[2, B, 2B]`: which steps are recorded in the ergodic
            average (valid candidates after the burn-in).
        accepted: bool `[2, B, 2B]`: which MH steps accepted their candidate.
        accept_probability: float `[2, B, 2B]`: the MH acceptance probability
            `α = min(1, exp(β S[a, c] − log_score))` of each step, from the
            score held before the step (0 for an invalid candidate): the
            weights of waste recycling.
        previous_states: int32 `[2, B, 2B]`: the chain's state before each
            step (`OUT_OF_BATCH` before the first acceptance).
        valid: bool `[B, 2B]`: which candidates may be proposed to each chain.
        final_state: int32 `[B]`: the chain's state after the last step.
        final_log_score: float32 `[B]`: `β s` of that state, as accepted.
        compiled: whether the passes ran in a nested XLA function (then
            `candidate_weights(..., compiled=True)` scatters with XLA too).
    """

    states: tf.Tensor
    recorded: tf.Tensor
    accepted: tf.Tensor
    accept_probability: tf.Tensor
    previous_states: tf.Tensor
    valid: tf.Tensor
    final_state: tf.Tensor
    final_log_score: tf.Tensor
    compiled: bool = False


def metropolis_hastings_accept_probability(
    proposal_log_score: tf.Tensor, current_log_score: tf.Tensor
) -> tf.Tensor:
    """MH acceptance probability of an independence proposal under uniform q.

        α = min(1, exp(β s_new − β s_old))

    With a uniform proposal distribution the proposal densities cancel and
    only the ratio of the target's unnormalised densities remains. An empty
    chain has `current_log_score = −inf` and accepts with probability 1.
    """
    return tf.exp(tf.minimum(0.0, proposal_log_score - current_log_score))


def candidate_mask(batch_index: tf.Tensor, candidate_index: tf.Tensor | None = None) -> tf.Tensor:
    """Which of the 2B candidate views may become image b's negative.

    A candidate is valid iff it is a view of a *different* data-set image:
    the anchor itself, its positive and any repeated copy of the same image in
    the batch are never proposed, so a sample is never its own negative.

    Args:
        batch_index: int `[b]`, the data-set indices of the chains' images.
        candidate_index: int `[B]`, the data-set indices of the candidate
            images (under a distribution strategy: the global batch); default
            `batch_index`.

    Returns:
        bool `[b, 2B]`; column c refers to view `c // B + 1` of candidate image `c % B`.
    """
    if candidate_index is None:
        candidate_index = batch_index
    columns = tf.concat([candidate_index, candidate_index], axis=0)
    return tf.not_equal(batch_index[:, None], columns[None, :])


def default_burn_in(batch_size) -> tf.Tensor:
    """Burn-in of the official implementation: `P = B − 1` steps per pass."""
    return batch_size - 1


def mh_scan(
    logits: tf.Tensor,
    valid: tf.Tensor,
    log_uniforms: tf.Tensor,
    initial_log_score: tf.Tensor,
    burn_in,
    refresh_log_score_between_passes: bool = False,
    out_of_batch_logits: tf.Tensor | None = None,
    scan: str = "sequential",
    scan_compile: str = "none",
) -> MHScanResult:
    """Runs the two-pass in-batch MH scan of EMC² for every chain of a batch.

    Args:
        logits: float `[2, B, 2B]`, `β S[anchor, candidate]` with pass 0 using
            view 1 of each image as anchor and pass 1 view 2. Only values are
            used (no gradient flows through the sampler). Or `[1, A, 2B]`:
            one pass per chain, each chain with its own fixed anchor (the
            finite-augmentation layout, one chain per stored view: A = 2B
            anchor views); every output then has a leading axis of 1.
        valid: bool `[B, 2B]` from `candidate_mask`.
        log_uniforms: float `[2, 2B, B]` (`[1, 2B, A]` for one pass), `log U`
            per pass, step and chain.
        initial_log_score: float `[B]`, the log score of each chain's state
            before the step (`−inf` for an empty chain).
        burn_in: int scalar `P`: the first `P` *valid* steps of each pass are
            not recorded. At the official default `P = B − 1` this equals the
            official rule (raw candidate column `j > P`). For other `P` the
            official rule records a number of steps that differs from its own
            normaliser `2(B − 1) − P` (at `P = 0`: `2B − 3` recorded steps for
            most anchors, divided by `2B − 2`); counting valid steps records
            exactly `2(B − 1) − P` steps per pass for a batch of distinct
            images, the count the normaliser assumes.
        refresh_log_score_between_passes: exact-ratio variant: before pass 1
            the current state's score is recomputed against the view-2
            anchor (from `logits`, or `out_of_batch_logits[1]` while the chain
            is still on its out-of-batch state).
        out_of_batch_logits: float `[2, B]`, `β s(anchor_p, z_state)` for the
            chain's out-of-batch state, required by the refresh.
        scan: "sequential", "parallel", "blocked" or "auto"
            (`SCAN_IMPLEMENTATIONS`): the same result draw for draw, computed
            in 2B dependent steps per pass, in O(log B) rounds, or in 2B/k
            blocks of O(log k) rounds.
        scan_compile: "auto", "xla" or "none" (`SCAN_COMPILE_MODES`): whether
            the two passes run in a nested `tf.function(jit_compile=True)`,
            one fused XLA loop instead of TensorFlow's per-op cost at each
            of the 4B dependent steps of the sequential scan. "auto": while
            tracing a graph (`tf.function`, Keras' compiled `train_step`),
            not eagerly; "xla": also eagerly; "none": never. Where XLA
            cannot compile the scan on the device, one line is logged and
            it runs uncompiled. Identical results in every mode.

    Returns:
        An `MHScanResult`.
    """
    logits = tf.stop_gradient(logits)
    log_uniforms = tf.convert_to_tensor(log_uniforms, dtype=logits.dtype)
    if scan_compile not in SCAN_COMPILE_MODES:
        raise ValueError(f"scan_compile must be one of {', '.join(SCAN_COMPILE_MODES)}; "
                         f"got {scan_compile!r}.")
    passes = logits.shape[0]
    if passes not in (1, 2):
        raise ValueError(f"mh_scan: logits must be [2, B, 2B] (two passes) or [1, A, 2B] "
                         f"(one pass per chain); got shape {logits.shape}.")
    if refresh_log_score_between_passes and passes == 1:
        raise ValueError("mh_scan(refresh_log_score_between_passes=True) needs two passes "
                         "(logits [2, B, 2B]); a one-pass scan has nothing to refresh between.")
    if refresh_log_score_between_passes and out_of_batch_logits is None:
        raise ValueError(
            "mh_scan(refresh_log_score_between_passes=True) needs "
            "out_of_batch_logits for chains still on an out-of-batch state."
        )
    log_score0 = tf.cast(initial_log_score, logits.dtype)
    # Only the refresh before pass 1 reads them (a one-pass scan has none).
    refresh_logits = (tf.zeros_like(log_score0) if out_of_batch_logits is None or passes == 1
                      else tf.cast(tf.stop_gradient(out_of_batch_logits)[1], logits.dtype))
    in_xla = _in_xla_context()
    compile_now = _compile_scan(scan_compile, in_xla)
    pass_name = _pass_name(scan, valid, compiled=compile_now or in_xla)
    key = (pass_name, SCAN_BLOCK_SIZE, bool(refresh_log_score_between_passes), passes)
    inputs = (logits, valid, log_uniforms, log_score0, refresh_logits,
              tf.cast(burn_in, tf.int32))
    if compile_now and not in_xla and not _xla_compiles(key, inputs):
        compile_now = False
    core = _compiled_core(key, inputs) if compile_now else _core(key)
    states, log_scores, accepted, start_scores, recorded_one = (
        tf.stop_gradient(x) for x in core(*inputs))

    # The MH probabilities (waste recycling's weights) from the score before each
    # step, one op for every scan outside the compiled loop: the same float
    # operations on the same inputs, so every scan and mode gives the same bits.
    before_scores = tf.concat([start_scores[..., None], log_scores[..., :-1]], axis=-1)
    probability = tf.where(valid[None], metropolis_hastings_accept_probability(
        logits, before_scores), tf.zeros_like(logits))
    state0 = tf.fill(tf.shape(log_score0), tf.constant(OUT_OF_BATCH, tf.int32))
    start_states = tf.concat([state0[None], states[:-1, :, -1]], axis=0)  # [passes, b]
    previous = tf.concat([start_states[..., None], states[..., :-1]], axis=-1)
    recorded = tf.stack([recorded_one] * passes)
    return MHScanResult(
        states=states,
        recorded=recorded,
        accepted=accepted,
        accept_probability=probability,
        previous_states=previous,
        valid=valid,
        final_state=states[-1, :, -1],
        final_log_score=log_scores[-1, :, -1],
        compiled=bool(compile_now or in_xla),
    )


#: Scan implementations: "sequential" (`tf.scan`, 2B dependent steps per
#: pass), "parallel" (pointer doubling, 2⌈log₂(2B + 2)⌉ dependent rounds per
#: pass, O(B·(2B)²) memory and work), "blocked" (blocks of
#: `SCAN_BLOCK_SIZE` candidates in order, each by pointer doubling: O(B·2B·k)
#: work and O(B·k²) memory; the parallel scan chunked, for where its memory
#: does not fit), "auto" (parallel while that size stays under
#: `PARALLEL_SCAN_MAX_ELEMENTS` on a GPU, `PARALLEL_SCAN_CPU_MAX_ELEMENTS` on
#: a CPU, else sequential: on a 2-core CPU the blocked scan measured as slow
#: as the sequential one at B = 128 and 2× slower at B = 512).
SCAN_IMPLEMENTATIONS = ("auto", "sequential", "parallel", "blocked")

#: Candidates per block of the blocked scan (of 8, 16 and 32, the fastest at
#: B = 128 and 512 on a 2-core CPU, within 2 % as a graph at B = 512 where 8
#: won: benchmarks/scan.py).
SCAN_BLOCK_SIZE = 16

#: Largest `b · (2B + 1) · 2B` comparison the parallel scan builds in "auto"
#: mode (int32 and bool temporaries of that size: ≈ 5 bytes each).
PARALLEL_SCAN_MAX_ELEMENTS = 2**26

#: The same bound on a CPU, where the parallel scan's O(B³) work only pays up
#: to B ≈ 32 (measured; the bound 2^18 admits B ≤ 40).
PARALLEL_SCAN_CPU_MAX_ELEMENTS = 2**18


def _pass_name(scan: str, valid: tf.Tensor, compiled: bool = False) -> str:
    """The one-pass implementation `scan` names, "auto" resolved statically when shapes allow.

    `compiled`: the pass runs under XLA (a compiled scan, or a step compiled
    with `jit_compile=True`)."""
    if scan not in SCAN_IMPLEMENTATIONS:
        raise ValueError(f"scan must be one of {', '.join(SCAN_IMPLEMENTATIONS)}; got {scan!r}.")
    if scan != "auto":
        return scan
    # Measured on a 2-core CPU (benchmarks/scan.py, README Results): as a
    # TensorFlow graph the parallel scan is 2–3× faster up to B = 32 and
    # 3× slower from B = 128 (O(B³) work); under XLA the sequential one
    # is as fast or faster at every B. On a GPU each sequential step is a
    # kernel launch, so the parallel scan runs wherever its memory fits.
    chains, candidates = valid.shape
    if chains is None or candidates is None:
        return "sequential"  # the only one without a static 2B
    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    if compiled and not on_gpu:
        return "sequential"
    limit = PARALLEL_SCAN_MAX_ELEMENTS if on_gpu else PARALLEL_SCAN_CPU_MAX_ELEMENTS
    return "parallel" if parallel_scan_elements(chains, candidates) <= limit else "sequential"


def _pass_function(scan: str, valid: tf.Tensor, compiled: bool = False):
    """The one-pass function `scan` names (`_pass_name`)."""
    return {"sequential": _sequential_pass, "parallel": _parallel_pass,
            "blocked": _blocked_pass}[_pass_name(scan, valid, compiled)]


#: How `mh_scan` compiles its passes: "auto" (XLA inside a graph, uncompiled
#: eagerly), "xla" (also eagerly), "none" (never).
SCAN_COMPILE_MODES = ("auto", "xla", "none")

_logger = logging.getLogger(__name__)


def _in_xla_context() -> bool:
    """Whether the ops being built are already compiled by XLA (a `jit_compile=True` function)."""
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _compile_scan(scan_compile: str, in_xla: bool) -> bool:
    """Whether `mh_scan` runs its passes in a nested XLA function."""
    if in_xla or scan_compile == "none":
        return False
    return scan_compile == "xla" or not tf.executing_eagerly()


def _scan_passes(key, logits, valid, log_uniforms, log_score0, refresh_logits, burn_in):
    """The passes: `(states, log_scores, accepted)` `[P, b, K]`, the score
    each pass starts from `[P, b]` (the exact-ratio refresh between them) and
    which steps of a pass are recorded `[b, K]`; P = 2, or 1 for a one-pass scan."""
    recorded = _recorded_steps(valid, burn_in)
    pass_name, _, refresh, passes = key
    run_pass = {"sequential": _sequential_pass, "parallel": _parallel_pass,
                "blocked": _blocked_pass}[pass_name]
    state0 = tf.fill(tf.shape(log_score0), tf.constant(OUT_OF_BATCH, tf.int32))
    states_a, scores_a, accepted_a = run_pass(
        logits[0], valid, tf.transpose(log_uniforms[0]), state0, log_score0)
    if passes == 1:
        return states_a[None], scores_a[None], accepted_a[None], log_score0[None], recorded
    state1, log_score1 = states_a[:, -1], scores_a[:, -1]
    if refresh:
        # The current state's score against the view-2 anchor (from `logits`, or
        # the re-encoded out-of-batch negative's); an empty chain stays −inf.
        in_batch = tf.gather(logits[1], tf.maximum(state1, 0), axis=1, batch_dims=1)
        refreshed = tf.where(state1 >= 0, in_batch, refresh_logits)
        log_score1 = tf.where((state1 < 0) & tf.math.is_inf(log_score1), log_score1, refreshed)
    states_b, scores_b, accepted_b = run_pass(
        logits[1], valid, tf.transpose(log_uniforms[1]), state1, log_score1)
    return (tf.stack([states_a, states_b]), tf.stack([scores_a, scores_b]),
            tf.stack([accepted_a, accepted_b]), tf.stack([log_score0, log_score1]), recorded)


def _recorded_steps(valid: tf.Tensor, burn_in: tf.Tensor) -> tf.Tensor:
    """bool `[b, K]`: step c of a pass is recorded iff it is valid and more than
    P = `burn_in` valid steps have been taken up to and including c.

    An integer cumulative sum, exact in every mode; inside the compiled passes
    it costs a fraction of TensorFlow's `Cumsum` (4-7 ms at B = 512 on a CPU)."""
    valid_count = tf.cumsum(tf.cast(valid, tf.int32), axis=1)
    return valid & (valid_count > burn_in)


def _core(key):
    """The passes, uncompiled (ops of the caller's graph, or eager)."""
    return lambda *inputs: _scan_passes(key, *inputs)


_COMPILED_CORES: dict = {}
_XLA_PROBES: dict = {}


def _compiled_core(key, inputs):
    """The passes in a `tf.function(jit_compile=True)`, one per scan, block size,
    refresh and input signature (module-level: each is traced once, so no
    function retraces however many models and shapes call it)."""
    signature = (key, *_input_signature(inputs))
    if signature not in _COMPILED_CORES:
        _COMPILED_CORES[signature] = tf.function(
            lambda *inputs: _scan_passes(key, *inputs), jit_compile=True, autograph=False)
    return _COMPILED_CORES[signature]


def _input_signature(inputs) -> tuple:
    """`(shape, dtype name)` of each input: the key of a nested XLA function (one
    function per signature, each traced once)."""
    return tuple((tuple(x.shape.as_list()) if x.shape.rank is not None else None, x.dtype.name)
                 for x in inputs)


def _xla_compiles(key, inputs) -> bool:
    """Whether XLA compiles and runs the passes on the device the graph places them on.

    Tried once per device, scan and dtype, eagerly (`tf.init_scope`) on 2 chains
    while the graph is traced: a failure inside the graph would only surface
    when the step runs, too late to fall back. On failure one line is logged.
    """
    logits = inputs[0]
    device = "" if tf.executing_eagerly() else logits.device
    probe_key = (key, device, logits.dtype.name)
    if probe_key not in _XLA_PROBES:
        pass_name, block_size, refresh, passes = key
        with tf.init_scope(), tf.device(device or None):
            chains, candidates = 2, 4
            probe = (tf.zeros([passes, chains, candidates], logits.dtype),
                     tf.ones([chains, candidates], tf.bool),
                     tf.zeros([passes, candidates, chains], logits.dtype),
                     tf.fill([chains], tf.constant(-math.inf, logits.dtype)),
                     tf.zeros([chains], logits.dtype),
                     tf.constant(1, tf.int32))
            try:
                _compiled_core(key, probe)(*probe)
                _XLA_PROBES[probe_key] = True
            except (tf.errors.OpError, ValueError, TypeError, NotImplementedError) as error:
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                _logger.warning(
                    "emc2_tf: the MH scan (%s) runs uncompiled: XLA could not compile it on "
                    "%s (%s: %s).", pass_name, device or "the default device",
                    type(error).__name__, first[:200])
                _XLA_PROBES[probe_key] = False
    return _XLA_PROBES[probe_key]


def parallel_scan_elements(chains: int, num_candidates: int) -> int:
    """Size `b · (K + 1) · K` of the parallel scan's comparison of b chains over K
    candidates (every node against every candidate), what its memory scales with."""
    return chains * (num_candidates + 1) * num_candidates


def _doubling_levels(num_candidates: int) -> int:
    """Pointer-doubling levels of the parallel pass: jumps of 1, 2, …, 2^(L−1) hops
    cover the longest path, K + 1 hops (L = ⌈log₂(K + 2)⌉)."""
    return max(1, math.ceil(math.log2(num_candidates + 2)))


def scan_depth(scan: str, num_candidates: int, block_size: int | None = None) -> int:
    """Dependent steps of one EMC² step's two passes over K = 2B candidates:
    `2K` for the sequential scan; `2(2L − 1)` gathers for the parallel one
    (L − 1 doublings, then L lifting rounds, per pass); `2⌈K/k⌉(2L_k − 1)`
    for the blocked one (blocks of k, one after the other)."""
    if scan == "sequential":
        return 2 * num_candidates
    if scan == "blocked":
        block_size = min(block_size or SCAN_BLOCK_SIZE, num_candidates)
        blocks = -(-num_candidates // block_size)
        return 2 * blocks * (2 * _doubling_levels(block_size) - 1)
    return 2 * (2 * _doubling_levels(num_candidates) - 1)


def _sequential_pass(logits, valid, log_uniforms, state, log_score):
    """One pass of MH steps over the candidates, in order (`tf.scan`).

    Args:
        logits, valid, log_uniforms: `[b, K]` per chain and candidate.
        state, log_score: `[b]` the chains before the pass.
    Returns:
        `(states, log_scores, accepted)`, each `[b, K]`: after each step (the
        acceptance probabilities are computed after the pass, in `mh_scan`).
    """
    steps = tf.range(tf.shape(valid)[1], dtype=tf.int32)

    def mh_step(carry, elem):
        state, log_score, _ = carry
        candidate_logit, candidate_valid, log_u, position = elem
        accept = candidate_valid & (log_u < candidate_logit - log_score)
        state = tf.where(accept, position, state)
        log_score = tf.where(accept, candidate_logit, log_score)
        return state, log_score, accept

    elems = (tf.transpose(logits), tf.transpose(valid), tf.transpose(log_uniforms), steps)
    init = (state, log_score, tf.zeros_like(state, tf.bool))
    states, log_scores, accepted = tf.scan(mh_step, elems, initializer=init)
    return tuple(tf.transpose(x) for x in (states, log_scores, accepted))


def _parallel_pass(logits, valid, log_uniforms, state, log_score, offset=0):
    """The same pass as `_sequential_pass`, draw for draw, in O(log K) dependent rounds.

    Once a chain accepts candidate j, the rest of the pass depends only on j
    (its score is `logits[j]`), not on how it got there. So with node 0 = the
    chain before the pass (score `log_score`) and node j + 1 = "just accepted
    candidate j" (score `logits[j]`):

    1. `next[n]` = the node of the first candidate k ≥ n that node n accepts
       (`valid[k] & log U_k < logits[k] − score[n]`), or the sentinel K + 1;
       all `[b, K + 1, K]` comparisons at once;
    2. pointer doubling: `jump_r = next^(2^r)`, ⌈log₂(K + 2)⌉ rounds;
    3. the chain's node after step k is the last node on node 0's path that
       is ≤ k + 1, found for every k at once by binary lifting over the
       `jump_r` (as many rounds again).

    The comparisons are the same float operations as the sequential scan's,
    so the accept decisions are identical, not just equal in distribution.
    `offset` is the position of the first of these candidates in the batch
    (the blocked scan runs this on one block at a time).
    """
    num_candidates = valid.shape[1]
    if num_candidates is None:
        raise ValueError("scan='parallel' needs a static number of candidates 2B (batch the "
                         "dataset with drop_remainder=True); use scan='sequential'.")
    node_scores = tf.concat([log_score[:, None], logits], axis=1)  # [b, K + 1]
    candidate = tf.range(num_candidates, dtype=tf.int32)
    node = tf.range(num_candidates + 1, dtype=tf.int32)
    accepts = (
        valid[:, None, :]
        & (log_uniforms[:, None, :] < logits[:, None, :] - node_scores[:, :, None])
        & (candidate[None, None, :] >= node[None, :, None])
    )  # [b, K + 1 nodes, K candidates]
    sentinel = num_candidates + 1
    first = tf.reduce_min(tf.where(accepts, candidate[None, None, :] + 1, sentinel), axis=-1)
    jump = tf.concat([first, tf.fill([tf.shape(first)[0], 1], sentinel)], axis=1)  # [b, K + 2]

    # jumps[r] = next^(2^r); a path has at most K + 1 hops.
    rounds = _doubling_levels(num_candidates)
    jumps = [jump]
    for _ in range(1, rounds):
        jumps.append(tf.gather(jumps[-1], jumps[-1], batch_dims=1))

    # Binary lifting from node 0 towards "the last node ≤ k + 1", every k at once.
    limit = candidate[None, :] + 1  # [1, K]
    at = tf.zeros_like(logits, tf.int32)  # [b, K] node ids
    for jump in reversed(jumps):
        ahead = tf.gather(jump, at, batch_dims=1)
        at = tf.where(ahead <= limit, ahead, at)

    states = tf.where(at > 0, at - 1 + offset, state[:, None])
    log_scores = tf.gather(node_scores, at, batch_dims=1)
    accepted = tf.equal(at, limit)
    return states, log_scores, accepted


def _blocked_pass(logits, valid, log_uniforms, state, log_score, block_size=None):
    """The same pass as `_sequential_pass`, draw for draw: the candidates in
    blocks of `block_size`, one block after the other (`tf.scan`), each block
    by `_parallel_pass` from the state the previous block ended on.

    ⌈K/k⌉ dependent blocks of 2⌈log₂(k + 2)⌉ − 1 rounds each, O(b·K·k) work
    and O(b·k²) memory per block: the sequential scan's loop overhead cut by
    about k, without the parallel scan's O(b·K²) at large B.
    """
    num_candidates = valid.shape[1]
    if num_candidates is None:
        raise ValueError("scan='blocked' needs a static number of candidates 2B (batch the "
                         "dataset with drop_remainder=True); use scan='sequential'.")
    block_size = min(block_size or SCAN_BLOCK_SIZE, num_candidates)
    blocks = -(-num_candidates // block_size)
    padding = blocks * block_size - num_candidates  # invalid candidates: never accepted

    def to_blocks(x):  # [b, K] → [blocks, b, k]
        x = tf.pad(x, [[0, 0], [0, padding]])
        return tf.transpose(tf.reshape(x, [-1, blocks, block_size]), [1, 0, 2])

    def block_pass(previous_block, elem):
        block_logits, block_valid, block_log_u, offset = elem
        return _parallel_pass(block_logits, block_valid, block_log_u,
                              previous_block[0][:, -1], previous_block[1][:, -1], offset)

    def tiled(x):
        return tf.tile(x[:, None], [1, block_size])

    offsets = tf.range(blocks, dtype=tf.int32) * block_size
    elems = (to_blocks(logits), to_blocks(valid), to_blocks(log_uniforms), offsets)
    before = (tiled(state), tiled(log_score), tf.zeros_like(elems[1][0]))
    results = tf.scan(block_pass, elems, initializer=before)  # each [blocks, b, k]
    return tuple(tf.reshape(tf.transpose(x, [1, 0, 2]), [-1, blocks * block_size])
                 [:, :num_candidates] for x in results)


def candidate_weights(states: tf.Tensor, weights: tf.Tensor, num_candidates,
                      compiled: bool = False) -> tf.Tensor:
    """How much each in-batch candidate adds to each anchor's sum:
    `W[..., c] = Σ_k w_k [s_k = c]`, c in `[0, K)`; steps on `OUT_OF_BATCH` add nothing.

    `states` int `[..., T]` (candidate positions or `OUT_OF_BATCH`), `weights`
    `[..., T]`. One `unsorted_segment_sum` over all rows (an out-of-batch step's
    segment is −1: dropped), without gradient (the weights are the sampler's,
    not the loss's): float `[..., K]`. With `compiled=True` (the scan ran in a
    nested XLA function) the sum runs in one too: XLA's scatter took 3 ms where
    TensorFlow's segment sum took 7-10 ms for `[2, 512, 1024]` on a CPU; both
    add each segment's values in step order (the same sums).
    """
    weights = tf.stop_gradient(tf.cast(weights, tf.float32) if weights.dtype == tf.bool
                               else weights)
    states = tf.convert_to_tensor(states)
    if compiled:
        function = _compiled_weights(states, weights)
        return tf.stop_gradient(function(states, weights, tf.cast(num_candidates, states.dtype)))
    return tf.stop_gradient(_scatter_per_row(states, weights,
                                             tf.cast(num_candidates, states.dtype)))


def _scatter_per_row(states, weights, num_candidates):
    leading = tf.shape(states)[:-1]
    rows = tf.reduce_prod(leading)
    row_offsets = tf.range(rows, dtype=states.dtype)[:, None] * num_candidates
    flat = tf.reshape(states, [rows, -1])
    segments = tf.where(flat >= 0, flat + row_offsets, -1)
    summed = tf.math.unsorted_segment_sum(
        tf.reshape(weights, [-1]), tf.reshape(segments, [-1]), rows * num_candidates)
    return tf.reshape(summed, tf.concat([leading, [num_candidates]], axis=0))


_COMPILED_WEIGHTS: dict = {}


def _compiled_weights(states, weights):
    """`_scatter_per_row` in a `tf.function(jit_compile=True)`, one per input signature."""
    signature = _input_signature((states, weights))
    if signature not in _COMPILED_WEIGHTS:
        _COMPILED_WEIGHTS[signature] = tf.function(_scatter_per_row, jit_compile=True,
                                                   autograph=False)
    return _COMPILED_WEIGHTS[signature]


def out_of_batch_weight(states: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """`Σ_k w_k [s_k = OUT_OF_BATCH]` `[...]`: what the steps on the chain's
    out-of-batch state add, the weight of its re-encoded score (no gradient)."""
    return tf.stop_gradient(
        tf.reduce_sum(tf.where(states < 0, weights, tf.zeros_like(weights)), axis=-1))


def state_weights(states: tf.Tensor, weights: tf.Tensor, num_columns) -> tf.Tensor:
    """How much each column adds to each anchor's sum: `W[..., c] = Σ_k w_k [column(s_k) = c]`.

    `states` int `[..., T]` in `[0, num_columns − 1)` or `OUT_OF_BATCH` (the
    last column), `weights` `[..., T]`: `candidate_weights` for the in-batch
    columns, then the out-of-batch steps' sum; no gradient. Float
    `[..., num_columns]`.
    """
    weights = tf.stop_gradient(tf.cast(weights, tf.float32) if weights.dtype == tf.bool
                               else weights)
    in_batch = candidate_weights(states, weights, tf.cast(num_columns, tf.int32) - 1)
    out_of_batch = out_of_batch_weight(states, weights)
    return tf.stop_gradient(tf.concat([in_batch, out_of_batch[..., None]], axis=-1))


def emc2_negative_term(
    extended_logits: tf.Tensor,
    states: tf.Tensor,
    weights: tf.Tensor,
    normaliser: tf.Tensor | None = None,
) -> tf.Tensor:
    """Ergodic average `Σ_k w_k β s(a, z_k) / n` over each anchor's recorded states.

    This is the negative term of the EMC² surrogate loss (algorithms.md §2,
    step 5); its gradient, through both the anchor and the negatives, is the
    EMC² estimate of `∇ log Σ_{z ∈ Neg(i)} exp(β s(a, z))`. Computed densely,
    `Σ_c W[a, c] β s(a, c) / n` with `W` the steps' weights summed per
    column (`state_weights`, no gradient): the gradient flows through one
    product with the logits, not through a gather of the T states.

    Args:
        extended_logits: float `[..., A, K + 1]`, `β s(a, c)` for the K in-batch
            candidates followed by one column for the anchor's out-of-batch
            state. Carries the gradient.
        states: int `[..., A, T]`, candidate positions in `[0, K)` or
            `OUT_OF_BATCH` (mapped to the last column).
        weights: bool or float `[..., A, T]`: how much each of the T steps
            counts (the recorded steps; waste recycling's α or 1 − α).
        normaliser: float `[..., A]`, `n`; default `Σ_k w_k`.

    Returns:
        float `[..., A]`; 0 for an anchor whose normaliser is 0.
    """
    weights = tf.cast(weights, extended_logits.dtype)
    if normaliser is None:
        normaliser = tf.reduce_sum(weights, axis=-1)
    column_weights = state_weights(states, weights, tf.shape(extended_logits)[-1])
    return tf.math.divide_no_nan(
        tf.reduce_sum(column_weights * extended_logits, axis=-1), normaliser)
