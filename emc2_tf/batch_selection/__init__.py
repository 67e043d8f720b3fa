"""Batch selection: which images share a mini-batch (the epoch's batch order).

`random` is `RandomBatchOrder`, the pipeline's default uniform shuffle;
`spectral` is `SpectralBatchSelection`. A batch order is any object with
`batch_size`, `num_batches` and `epoch_batches(epoch) -> int [num_batches, B]`,
a function of the epoch number, called once per epoch by
`make_two_view_dataset(..., batch_order=...)`.
"""

from emc2_tf.batch_selection.spectral import (
    DEFAULT_MAX_DATASET_SIZE,
    DEFAULT_MAX_GROUP_SIZE,
    SpectralBatchSelection,
    equal_size_clusters,
    spectral_affinity,
    spectral_batches,
)
from emc2_tf.data.order import RandomBatchOrder

#: Accepted values of `--batch_selection`.
BATCH_SELECTIONS = ("random", "spectral")
