"""Batch selection: which images share a mini-batch (the epoch's batch order).

`random` is the pipeline's own uniform shuffle (`make_two_view_dataset`);
`spectral` is `SpectralBatchSelection`. A batch order is any object with
`batch_size`, `num_batches` and `epoch_batches() -> int [num_batches, B]`,
called once per epoch by `make_two_view_dataset(..., batch_order=...)`.
"""

from emc2_tf.batch_selection.spectral import (
    DEFAULT_MAX_DATASET_SIZE,
    DEFAULT_MAX_GROUP_SIZE,
    SpectralBatchSelection,
    equal_size_clusters,
    spectral_affinity,
    spectral_batches,
)

#: Accepted values of `--batch_selection`.
BATCH_SELECTIONS = ("random", "spectral")
