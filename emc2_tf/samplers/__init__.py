"""Negative-sampling strategies (one module each)."""

from emc2_tf.samplers.metropolis_hastings import (
    OUT_OF_BATCH,
    SCAN_IMPLEMENTATIONS,
    MHScanResult,
    candidate_mask,
    candidate_weights,
    default_burn_in,
    emc2_negative_term,
    metropolis_hastings_accept_probability,
    mh_scan,
    out_of_batch_weight,
)
