"""emc2-tf: contrastive pre-training with EMC² (Yau et al., ICML 2024) in TensorFlow/Keras.

Everything a user needs is re-exported here; see README.md for examples.
"""

from emc2_tf.batch_selection import (
    BATCH_SELECTIONS,
    RandomBatchOrder,
    SpectralBatchSelection,
    spectral_affinity,
    spectral_batches,
)
from emc2_tf.data import (
    DEFAULT_FASHION_MNIST_DIR,
    ArraySource,
    FiniteViews,
    AugmentConfig,
    ImageDataset,
    ImageFolderSource,
    ImageSource,
    SimCLRAugment,
    SourceReadError,
    SubsetSource,
    TFDSSource,
    from_arrays,
    finite_views,
    from_sources,
    holdout_split,
    labelled_part,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    load_tfds,
    load_tfds_splits,
    make_two_view_dataset,
    prepare_tfds,
    subset_train,
)
from emc2_tf.distribute import (
    STRATEGIES,
    is_chief,
    make_strategy,
    split_cpu,
)
from emc2_tf.encoders import (
    build_encoder,
    build_resnet18_encoder,
    build_small_cnn_encoder,
    default_encoder_name,
)
from emc2_tf.evaluation import (
    KNNAccuracyCallback,
    alignment,
    effective_rank,
    embed,
    evaluate_encoder,
    evaluation_unavailable,
    knn_accuracy,
    linear_probe_accuracy,
    representation_metrics,
    uniformity,
)
from emc2_tf.checkpoint import (
    CheckpointError,
    CheckpointStateError,
    TrainingCheckpoint,
    fit_with_checkpoints,
    latest_checkpoint,
    list_checkpoints,
)
from emc2_tf.run_lock import FolderInUseError, RunLock, lock_run_folder
from emc2_tf.export import export_encoder
from emc2_tf.gradient_monitor import GlobalObjective, GlobalObjectiveMonitor
from emc2_tf.losses import (
    dcl_loss,
    dhel_loss,
    exact_global_contrastive_loss,
    finite_global_loss,
    global_contrastive_loss,
    kcl_loss,
    nt_xent_loss,
    sogclr_batch_estimate,
    sogclr_moving_average,
    sogclr_surrogate_loss,
)
from emc2_tf.models import (
    METHODS,
    CacheModel,
    ContrastiveModel,
    EMC2Model,
    InBatchContrastiveModel,
    SogCLRModel,
    build_model,
    image_table,
)
from emc2_tf.optimizers import (
    LARS,
    OPTIMIZERS,
    build_optimizer,
    epoch_learning_rate,
    learning_rate_schedule,
)
from emc2_tf.tensorboard import TrainingScalars, export_projector, read_scalars
from emc2_tf.safety import NonFiniteError, StopOnNonFinite
from emc2_tf.samplers import emc2_negative_term, metropolis_hastings_accept_probability, mh_scan

__version__ = "0.1.0"
