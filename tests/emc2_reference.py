"""Plain float64 NumPy references of EMC² (algorithms.md §2) for the tests.

Written from the algorithm's statement, one chain and one step at a time,
with no vectorisation, so that `emc2_tf`'s vectorised sampler and loss can
be checked against them draw for draw. `official_main_mcmc_loss` restates
the estimator of the authors' `main_mcmc.py` / `sampler.py`
(amazon-science/contrastive_emc2) in the same plain form: exp-space scores,
raw-column burn-in `j > P`, out-of-batch steps dropped from the sum but kept
in the normaliser `2(B − 1) − P`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OUT_OF_BATCH = -1


@dataclass
class ReferenceScan:
    """Per pass p, chain i and step c (shapes `[2, b, 2B]`), and the final chain."""

    states: np.ndarray
    previous_states: np.ndarray
    accepted: np.ndarray
    accept_probability: np.ndarray
    recorded: np.ndarray
    valid: np.ndarray
    final_state: np.ndarray
    final_log_score: np.ndarray


def valid_candidates(index: np.ndarray, candidate_index: np.ndarray | None = None) -> np.ndarray:
    """`[b, 2B]`: candidate c is a view of another image than chain i's."""
    candidate_index = index if candidate_index is None else candidate_index
    columns = np.concatenate([candidate_index, candidate_index])
    return np.array([[index[i] != columns[c] for c in range(len(columns))]
                     for i in range(len(index))])


def reference_scan(logits, valid, log_uniforms, initial_log_score, burn_in,
                   refresh=False, out_of_batch_logits=None) -> ReferenceScan:
    """The two-pass in-batch MH scan, one chain and one candidate at a time.

    Args:
        logits: `[2, b, 2B]` β S[anchor of pass p, candidate]; or `[1, A, 2B]`,
            one pass per chain (the finite-augmentation layout).
        valid: bool `[b, 2B]`.
        log_uniforms: `[2, 2B, b]` log U per pass, step, chain.
        initial_log_score: `[b]` (−inf = empty chain).
        burn_in: P, counted in valid steps of each pass.
        refresh: exact ratio: before pass 1 the current state's score is
            recomputed against the view-2 anchor.
        out_of_batch_logits: `[2, b]` the stored state's β s per anchor.
    """
    logits = np.asarray(logits, np.float64)
    passes, b, k = logits.shape
    shape = (passes, b, k)
    out = ReferenceScan(np.zeros(shape, int), np.zeros(shape, int), np.zeros(shape, bool),
                        np.zeros(shape), np.zeros(shape, bool), np.asarray(valid, bool),
                        np.zeros(b, int), np.zeros(b))
    for i in range(b):
        state, score = OUT_OF_BATCH, float(initial_log_score[i])
        for p in range(passes):
            if p == 1 and refresh:
                if state >= 0:
                    score = logits[1, i, state]
                elif np.isfinite(score):
                    score = float(out_of_batch_logits[1][i])
            valid_steps = 0
            for c in range(k):
                out.previous_states[p, i, c] = state
                if valid[i, c]:
                    valid_steps += 1
                    out.accept_probability[p, i, c] = min(1.0, np.exp(logits[p, i, c] - score))
                    if log_uniforms[p, c, i] < logits[p, i, c] - score:
                        out.accepted[p, i, c] = True
                        state, score = c, logits[p, i, c]
                    out.recorded[p, i, c] = valid_steps > burn_in
                out.states[p, i, c] = state
        out.final_state[i], out.final_log_score[i] = state, score
    return out


def negative_term(logits, out_of_batch_logits, scan: ReferenceScan, has_state,
                  out_of_batch="reencode", waste_recycling=False) -> np.ndarray:
    """`[P, b]`: each anchor's weighted mean of β s over its recorded steps
    (P = 2 passes, or 1 for the one-pass finite-augmentation layout).

    A step on the chain's stored out-of-batch negative adds its re-encoded
    score ("reencode", chains with a stored state only) or nothing while
    still counting ("drop"). Waste recycling replaces f(state after step k)
    by α_k f(candidate k) + (1 − α_k) f(state before step k).
    """
    passes, b, k = scan.states.shape
    result = np.zeros((passes, b))
    for p in range(passes):
        for i in range(b):
            total = count = 0.0
            for c in range(k):
                if not scan.recorded[p, i, c]:
                    continue
                if waste_recycling:
                    alpha = scan.accept_probability[p, i, c]
                    parts = [(alpha, c), (1.0 - alpha, scan.previous_states[p, i, c])]
                else:
                    parts = [(1.0, scan.states[p, i, c])]
                for weight, state in parts:
                    if state >= 0:
                        total += weight * logits[p, i, state]
                        count += weight
                    elif out_of_batch == "drop":
                        count += weight
                    elif has_state[i]:
                        total += weight * out_of_batch_logits[p, i]
                        count += weight
            result[p, i] = total / count if count else 0.0
    return result


def dense_unit_encoder(params, images) -> np.ndarray:
    """float64 twin of Flatten → Dense(kernel, bias) → UnitNormalization."""
    kernel, bias = params
    h = np.asarray(images, np.float64).reshape(len(images), -1) @ kernel + bias
    return h / np.linalg.norm(h, axis=1, keepdims=True)


@dataclass
class ReferenceStep:
    loss: float
    scan: ReferenceScan


def emc2_step(params, images, index, view1, view2, chain_index, chain_log_score,
              uniforms, temperature, burn_in=None, exact_ratio=False,
              out_of_batch="reencode", waste_recycling=False, scan=None) -> ReferenceStep:
    """One EMC² step (algorithms.md §2) on one device, float64.

    `scan` given: reuse its decisions (to differentiate the loss at fixed
    draws and fixed accept decisions by finite differences).
    """
    beta = 1.0 / temperature
    b = len(index)
    z1, z2 = dense_unit_encoder(params, view1), dense_unit_encoder(params, view2)
    views = np.concatenate([z1, z2])
    logits = beta * views @ views.T
    anchor_logits = np.stack([logits[:b], logits[b:]])
    old = chain_index[index]
    has_state = old >= 0
    z_old = dense_unit_encoder(params, images[np.maximum(old, 0)])
    out_of_batch_logits = beta * np.stack([(z1 * z_old).sum(1), (z2 * z_old).sum(1)])
    current = out_of_batch_logits[0] if exact_ratio else chain_log_score[index]
    initial = np.where(has_state, current, -np.inf)
    if scan is None:
        scan = reference_scan(anchor_logits, valid_candidates(index), np.log(uniforms), initial,
                              b - 1 if burn_in is None else burn_in, refresh=exact_ratio,
                              out_of_batch_logits=out_of_batch_logits)
    negative = negative_term(anchor_logits, out_of_batch_logits, scan, has_state,
                             out_of_batch, waste_recycling)
    loss = negative.mean() - beta * (z1 * z2).sum(1).mean()
    return ReferenceStep(loss, scan)


def official_main_mcmc_loss(views, index, chain_index, chain_log_score, uniforms, beta):
    """The official `main_mcmc` estimator at `--mcmc_burn_in 0.5`, without finite_aug.

    Restated from amazon-science/contrastive_emc2 (`sampler.py`:
    `MCMC_BatchController.mh_step` lines 85–113, `negative_sample_img` lines
    116–207; `main_mcmc.py`: `metropolis_hasting_sampling_loss` lines 20–163,
    the in-batch term at line 52 and the `freq > mcmc_burn_in` test at line
    68), one device:
    scores `exp(β s)` with self/positive columns set to 0 (never accepted,
    never recorded), accept iff `U < new / old`, record raw column `j > P`
    with `P = int(0.5 · 2(B − 1))`, out-of-batch steps (chain state −1) left
    out of the sum, and the normaliser `(2(B − 1) − P) · 2 · B`.

    Returns `(loss, coefficients)`: the loss is `Σ C[r, c] s(r, c)` over the
    2B × 2B similarity, so its gradient with respect to the views is
    `(C + Cᵀ) views`.
    """
    views = np.asarray(views, np.float64)
    n2 = len(views)
    b = n2 // 2
    similarity = views @ views.T
    positive = np.tile(np.eye(b, dtype=bool), (2, 2))
    scores = np.where(positive, 0.0, np.exp(beta * similarity))
    burn_in = int(0.5 * 2 * (b - 1))
    stored = np.where(chain_index[index] >= 0, np.exp(chain_log_score[index]),
                      np.finfo(np.float32).smallest_normal)
    coefficients = np.zeros((n2, n2))
    counter = np.full(b, -1)
    for j in range(2):
        rows = np.arange(j * b, (j + 1) * b)
        for col in range(n2):
            new = scores[rows, col]
            accepted = uniforms[j, col] < new / stored
            stored = np.where(accepted, new, stored)
            counter = np.where(accepted, col, counter)
            if col > burn_in:
                for i in range(b):
                    if new[i] != 0 and counter[i] != -1:
                        coefficients[rows[i], counter[i]] += beta
    normaliser = (2 * (b - 1) - burn_in) * 2 * b
    coefficients /= normaliser
    for i in range(b):
        coefficients[i, b + i] -= beta / b
    loss = float((coefficients * similarity).sum())
    return loss, coefficients


def finite_emc2_step(params, table, num_views, index, view_index, chain_index, chain_log_score,
                     uniforms, temperature, burn_in=None, exact_ratio=False,
                     out_of_batch="reencode", waste_recycling=False, scan=None) -> ReferenceStep:
    """One EMC² step with finite augmentations, float64, one chain at a time.

    Restates the official `--finite_aug` path (amazon-science/contrastive_emc2,
    `sampler.py`: `finite_state_mh_step`, `negative_sample_img_finite_aug`;
    `main_mcmc.py`) as the paper's theory intends it: one chain per stored
    view (image i, view k), key row `i·K + k` of the N·K `table`; each of the
    2B anchor views of the batch (view 1 block, then view 2 block) advances
    its own chain by ONE pass over the 2B candidate views, whose identities
    are their view rows; a candidate of the anchor's own image is skipped.
    With `exact_ratio` the chain's current score is `β s(anchor, table row
    of its state)` with the current weights (the official
    `init_similarity_scores`, dead code there: docs/algorithms.md §2), else the
    stored score. Draws: chain `p·b + i` (view p + 1 of batch image i) uses
    `uniforms[p, c, i]` at candidate c.

    Returns the step's loss (positive term `−β s(view 1, view 2)` averaged
    over the b images, negative term averaged over the 2b anchors) and a
    one-pass `ReferenceScan` `[1, 2b, 2b]`.
    """
    beta = 1.0 / temperature
    b = len(index)
    rows = np.concatenate([index * num_views + view_index[:, 0],
                           index * num_views + view_index[:, 1]])
    images = np.concatenate([index, index])
    pixels = np.asarray(table, np.float64) / 255.0
    z = dense_unit_encoder(params, pixels[rows])  # the 2b anchor = candidate views
    logits = beta * z @ z.T  # [2b anchors, 2b candidates]
    old = chain_index[rows]
    has_state = old >= 0
    z_old = dense_unit_encoder(params, pixels[np.maximum(old, 0)])
    out_of_batch_logits = beta * (z * z_old).sum(1)  # [2b]
    burn_in = b - 1 if burn_in is None else burn_in
    if scan is None:
        chains = 2 * b
        shape = (1, chains, 2 * b)
        scan = ReferenceScan(np.zeros(shape, int), np.zeros(shape, int), np.zeros(shape, bool),
                             np.zeros(shape), np.zeros(shape, bool),
                             np.zeros((chains, 2 * b), bool), np.zeros(chains, int),
                             np.zeros(chains))
        for a in range(chains):
            p, i = divmod(a, b)
            state = OUT_OF_BATCH
            if not has_state[a]:
                score = -np.inf
            elif exact_ratio:
                score = out_of_batch_logits[a]
            else:
                score = float(chain_log_score[rows[a]])
            valid_steps = 0
            for c in range(2 * b):
                scan.previous_states[0, a, c] = state
                if images[c] != images[a]:
                    scan.valid[a, c] = True
                    valid_steps += 1
                    scan.accept_probability[0, a, c] = min(1.0, np.exp(logits[a, c] - score))
                    if np.log(uniforms[p, c, i]) < logits[a, c] - score:
                        scan.accepted[0, a, c] = True
                        state, score = c, logits[a, c]
                    scan.recorded[0, a, c] = valid_steps > burn_in
                scan.states[0, a, c] = state
            scan.final_state[a], scan.final_log_score[a] = state, score
    negative = negative_term(logits[None], out_of_batch_logits[None], scan, has_state,
                             out_of_batch, waste_recycling)
    loss = negative.mean() - beta * (z[:b] * z[b:]).sum(1).mean()
    return ReferenceStep(loss, scan)


def numeric_gradient(fixture, scan, options, h=1e-6):
    """Central differences of the float64 reference at fixed draws and accept decisions."""
    params = fixture.params
    gradients = []
    for which, value in enumerate(params):
        grad = np.zeros_like(value)
        for position in np.ndindex(value.shape):
            shifted = []
            for sign in (1, -1):
                moved = [p.copy() for p in params]
                moved[which][position] += sign * h
                shifted.append(fixture.reference(moved, decisions=scan, **options).loss)
            grad[position] = (shifted[0] - shifted[1]) / (2 * h)
        gradients.append(grad)
    return gradients
