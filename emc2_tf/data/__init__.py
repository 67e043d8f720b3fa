"""Data: image sources (arrays, folders, TFDS), SimCLR augmentations, the two-view pipeline."""

from emc2_tf.data.augment import AugmentConfig, SimCLRAugment
from emc2_tf.data.batch import unpack_two_view_batch
from emc2_tf.data.catalog import (
    holdout_split,
    labelled_part,
    load_dataset,
    load_image_folder,
    load_tfds_splits,
)
from emc2_tf.data.finite import FiniteViews, finite_views
from emc2_tf.data.folder import IMAGE_EXTENSIONS, ImageFolderSource
from emc2_tf.data.image_source import (
    ArraySource,
    ImageSource,
    SourceReadError,
    SubsetSource,
    as_source,
)
from emc2_tf.data.order import EpochSchedule, RandomBatchOrder
from emc2_tf.data.pipeline import make_two_view_dataset
from emc2_tf.data.tfds_source import TFDSSource, prepare_tfds
from emc2_tf.data.sources import (
    DEFAULT_FASHION_MNIST_DIR,
    ImageDataset,
    from_arrays,
    from_sources,
    load_digits,
    load_fashion_mnist,
    load_tfds,
    read_idx,
    subset_train,
)
