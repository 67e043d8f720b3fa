"""EMC²: the global contrastive loss with MH negative chains (Yau et al., ICML 2024).

`EMC2Model.train_step` (the shared skeleton of `ContrastiveModel`) encodes the
2B views, and `contrastive_loss` here follows algorithms.md, section 2:

1. `S = Z Zᵀ` over the 2B views (the SimCLR cost);
2. every batch image's chain scans the 2B candidates twice (view 1, then view
   2 as anchor) with the MH test `U < exp(β S[a, c] − log_score_i)`,
   vectorised over images (`emc2_tf.samplers.mh_scan`);
3. the first `burn_in` valid steps of each pass are not recorded;
4. the EMC² surrogate loss

       L̂ = (1/2B) Σ_anchors [ −β s(a, p) + mean_k β s(a, z_k) ]

   whose gradient, through anchors and negatives, estimates the gradient of
   the global contrastive loss (its value is not the global loss: use
   `emc2_tf.exact_global_contrastive_loss` to monitor that);
5. a chain still on its out-of-batch negative from an earlier step is
   re-encoded from the un-augmented image with the current weights (read by
   index from the image table: an in-memory array, or an `ImageSource` such
   as a folder of files);
6. `chain_index` / `chain_log_score` are written back for the batch only.

With finite augmentations (`finite_augmentations=K`: K stored views per image,
a table of N·K views, row = image·K + k, batches carrying `view_index`) the
chains move over stored views, as in the official `--finite_aug` path: one
chain per stored view, each of the 2B anchor views advancing its own chain by
one pass over the 2B candidates (identities: view rows), the anchor's own image
excluded; re-encoding and the exact-ratio score read the stored view row.

Under a distribution strategy each replica runs the chains of its own b
images, over the candidates of the global batch (all replicas' 2B views,
all-gathered with gradient), with its own random stream (replica id folded
into the seed); the replicas' chain updates are all-gathered and written
identically everywhere (`ContrastiveModel.update_sample_state`). Evaluation
draws each held-out chain's uniforms from the seed and the global batch
(`ContrastiveModel.evaluation_uniform`), so `evaluate` gives the same value
on any number of replicas.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from emc2_tf.data.finite import check_num_views
from emc2_tf.data.image_source import ImageSource
from emc2_tf.models.contrastive_model import ContrastiveModel, all_gather
# The image table's holder, checks and reads live in image_store (shared with
# CacheModel); the public names are re-exported here, where they were first.
from emc2_tf.models.image_store import (  # noqa: F401  (re-exports)
    DEFAULT_MAX_IMAGE_TABLE_BYTES,
    IMAGE_TABLE_DEVICE,
    TableOwner,
    _ImageTable,
    check_image_table,
    gather_images,
    image_table,
)
from emc2_tf.samplers.metropolis_hastings import (
    OUT_OF_BATCH,
    SCAN_IMPLEMENTATIONS,
    SCAN_COMPILE_MODES,
    _in_xla_context,
    candidate_mask,
    candidate_weights,
    default_burn_in,
    mh_scan,
    out_of_batch_weight,
)

#: What a recorded step on a chain's out-of-batch negative contributes:
#: "reencode" = that negative re-encoded with the current weights, with
#: gradient (the algorithm as the paper states it); "drop" = nothing, while
#: still counting in the normaliser (the official main_mcmc estimator).
OUT_OF_BATCH_MODES = ("reencode", "drop")

MISSING_IMAGES_MESSAGE = (
    "EMC2Model needs `images` for out_of_batch='reencode' or exact_ratio=True: the "
    "data set's un-augmented images [N, H, W, C] (float, values in [0, 1]), indexed "
    "like the dataset's `index`, so a chain's out-of-batch negative can be re-encoded "
    "with the current weights. Pass images= to the constructor, or call "
    "model.set_image_table(images) on a loaded model (a .keras file does not store "
    "the data set); out_of_batch='drop' without exact_ratio needs no table."
)


MISSING_VIEW_TABLE_MESSAGE = (
    "EMC2Model(finite_augmentations={k}) needs `images` for out_of_batch='reencode' or "
    "exact_ratio=True: the stored-view table [N·K, H, W, C] = [{rows}, H, W, C] (row = "
    "image·K + k, the views the batches are cut from), so a chain's stored view can be "
    "re-encoded with the current weights. Pass images= to the constructor or call "
    "model.set_image_table(table); out_of_batch='drop' without exact_ratio needs no table."
)

#: A finite-augmentation batch without the numbers of its stored views.
MISSING_VIEW_INDEX_MESSAGE = (
    "EMC2Model(finite_augmentations={k}) trains on batches that carry 'view_index' [B, 2] "
    "(the stored views of each image: make_two_view_dataset(..., finite_augmentations={k})); "
    "this batch has none, so its chains' view rows are unknown."
)

#: Why an XLA-compiled step cannot re-encode from an `ImageSource`.
SOURCE_JIT_MESSAGE = (
    "EMC2Model: jit_compile=True cannot re-encode stored negatives from the image source "
    "{name!r} ({kind}): a source's read runs tf.numpy_function or tf.data ops, which XLA "
    "cannot compile inside the step; compile with jit_compile=False (on a GPU, 'auto' means "
    "True), give images= an in-memory array, or use out_of_batch='drop' without exact_ratio "
    "(nothing is re-encoded)."
)


#: What the byte-limit refusal of EMC²'s image table says EMC² needs it for.
TABLE_OWNER = TableOwner(
    reads="EMC² re-encodes out-of-batch negatives by index inside the compiled step",
    instead="use out_of_batch='drop' without exact_ratio (it needs no table)")


@keras.saving.register_keras_serializable(package="emc2_tf")
class EMC2Model(ContrastiveModel):
    """Contrastive pre-training with EMC² negative chains.

    Example:

    ```python
    data = emc2_tf.load_digits()
    encoder = emc2_tf.build_small_cnn_encoder(data.image_shape)
    model = emc2_tf.EMC2Model(
        encoder=encoder, dataset_size=data.num_train, images=data.train_images,
        temperature=0.1, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(emc2_tf.make_two_view_dataset(data.train_images, 64, seed=0), epochs=5)
    ```

    Args:
        encoder: images `[B, H, W, C]` → L2-normalised embeddings `[B, D]`.
        dataset_size: N; sample indices address `[0, N)`.
        images: the N un-augmented images, float `[N, H, W, C]` in [0, 1]
            or uint8 0..255, kept as uint8 and scaled by 1/255 per gathered
            row (`emc2_tf.image_table` makes one: a quarter of the memory);
            float values outside [0, 1] (divide 0..255 pixels by 255), NaN or
            inf are refused in one line. Kept in host memory and used to
            re-encode a chain's out-of-batch negative. Or an `ImageSource`
            (e.g. `emc2_tf.ImageFolderSource`, the one the dataset reads):
            nothing is held, each step reads its B stored negatives by index
            (bit-identical to the array it holds); not under
            `jit_compile=True` (XLA cannot compile a read: refused in one
            line; on a GPU `"auto"` means True: compile with False). Needed by
            `out_of_batch="reencode"` and by `exact_ratio`; optional
            otherwise (None: no table at all), and settable later with
            `set_image_table`.
        temperature: τ (paper default 0.07, i.e. β ≈ 14.3).
        burn_in: MH steps per pass not recorded; default `B − 1`, B the global batch.
        exact_ratio: recompute the current state's score with the current
            weights before each pass instead of the stored, stale score (the
            paper's theory; official `--finite_aug`). Proposing the current
            state itself is a self-transition, so it needs no extra candidate.
            The refresh is one forward pass of the batch chains' stored
            negatives, only of the chains that hold one (none in the first
            epoch).
        out_of_batch: `"reencode"` or `"drop"`, what a recorded step still on
            the chain's out-of-batch negative from an earlier step adds
            (algorithms.md §2, step 5): `"reencode"` adds that negative
            re-encoded with the current weights, with gradient, and counts
            the step; `"drop"` adds nothing but still counts the step in the
            normaliser, which is the official `main_mcmc` estimator (its
            out-of-batch term is never added at `--mcmc_burn_in 0.5`). With
            `"drop"` and no `exact_ratio` nothing is re-encoded. Default
            `"drop"` (with `waste_recycling`): on Fashion-MNIST it tied or
            beat the paper's `"reencode"` at half its step time, and needs no
            image table (README, Results).
        waste_recycling: each recorded step adds `α f(candidate) + (1 − α)
            f(current state)`, α its MH acceptance probability, instead of
            `f(state after the step)`: the same expectation and a lower
            total variance of the gradient (its sum over coordinates; single
            coordinates can rise, `benchmarks/recycling_variance.py`), at no
            extra compute (beyond the paper; default on).
        scan: how the MH scan runs, with identical results draw for draw:
            "sequential" (2B dependent steps per pass), "parallel" (pointer
            doubling: O(log B) rounds, O(B³) work and O(B·(2B)²) memory),
            "blocked" (blocks of `SCAN_BLOCK_SIZE` = 16 candidates in order,
            each by pointer doubling: B/8 blocks of 9 rounds per pass, O(B²)
            work, O(B·16²) memory: the parallel scan chunked), or "auto"
            (parallel on a GPU within a memory bound, and on a CPU up to
            B ≈ 32, where it measured faster; sequential beyond; under XLA on
            a CPU, sequential at every B).
        scan_compile: "auto" (default), "xla" or "none": whether the MH scan
            runs in a nested `tf.function(jit_compile=True)` inside the step,
            one fused loop instead of TensorFlow's per-op cost at each of its
            4B dependent steps, while the rest of the step stays as compiled
            by `compile()`. "auto": in a graph step (not with
            `run_eagerly=True`); "xla": also eagerly; "none": never. Where
            XLA cannot compile the scan on the device, one line is logged and
            it runs uncompiled. Identical draws and results in every mode.
        seed: seed of the MH uniforms.
        max_image_table_bytes: refuse an in-memory image table larger than
            this (a source has no limit: it holds no images).
        finite_augmentations: None (fresh augmentations every step), or K ≥ 2:
            each image has K stored views, rows `image·K + k` of a table of
            N·K views, and every training batch carries `view_index` `[B, 2]`
            (`make_two_view_dataset(..., finite_augmentations=K)`). The chains
            then move over stored VIEWS, as in the official `--finite_aug`
            path (sampler.py `negative_sample_img_finite_aug`): one chain per
            stored view (i, k), with the fixed target

                π_{i,k}(r) ∝ exp(β s(z_{i,k}, z_r)),  r a view row of another image,

            each of the 2B anchor views of a batch advancing its own chain by
            one pass over the 2B candidates (candidate c's identity is its
            view row; the anchor's own image, all its K views, is never
            proposed). `images` is then the N·K stored-view table (N rows are
            refused), from which `"reencode"` and `exact_ratio` re-encode a
            chain's stored view: with `exact_ratio` the current state's score
            is `β s(anchor, exact stored view)` under the current weights, so
            every MH ratio is exact for π_{i,k} (the in-batch scan's bias from
            correlated candidates, below, remains). The official code's
            refresh never runs (docs/algorithms.md §2). Held-out batches
            (`evaluate`) need no `view_index`: their chains are fresh.

    State (non-trainable, saved with the weights and checkpoints):
        chain_index: int32 `[N]`, each chain's current negative, −1 = empty
            (with `finite_augmentations=K`: `[N·K]`, chain `image·K + k`,
            each state a view row in `[0, N·K)`).
        chain_log_score: float32 `[N]` (`[N·K]`), `β s` of that negative when
            accepted.

    Logged per step: `loss` (surrogate), `acceptance_rate` (accepted / valid
    proposals), `out_of_batch_fraction` (chains ending the step on a negative
    that is not one of this batch's views).

    Stationary bias of the in-batch scan (measured with a frozen encoder, no
    augmentation, N = 64, D = 8; total-variation distance of a chain's state
    to the exact softmax): the scan proposes each batch image once per view
    and per pass, so identical views give four proposals of the same image per
    visit, which is not an exactly π-invariant kernel. TV ≈ 0.01 at τ = 0.5
    (B = 8..32, Monte-Carlo noise level); 0.05 / 0.018 at τ = 0.2 with
    B = 16 / 32; 0.14 / 0.026 at τ = 0.1 with B = 16 / 32; 0.21 at τ = 0.1,
    B = 8. The scan is the official implementation's (algorithms.md §2);
    larger batches shrink the bias.
    """

    step_metric_names = ("acceptance_rate", "out_of_batch_fraction")

    #: A finite-augmentation batch's `view_index` addresses the chains (used
    #: only with `finite_augmentations`; ignored otherwise).
    uses_view_index = True

    def __init__(
        self,
        encoder: keras.Model,
        dataset_size: int,
        images: Any = None,
        temperature: float = 0.07,
        burn_in: int | None = None,
        exact_ratio: bool = False,
        out_of_batch: str = "drop",
        waste_recycling: bool = True,
        scan: str = "auto",
        scan_compile: str = "auto",
        seed: int | None = None,
        max_image_table_bytes: int = DEFAULT_MAX_IMAGE_TABLE_BYTES,
        finite_augmentations: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(encoder, dataset_size, temperature, seed, **kwargs)
        self.finite_augmentations = check_num_views(finite_augmentations, allow_none=True)
        if burn_in is not None and (
            isinstance(burn_in, bool) or not isinstance(burn_in, (int, np.integer)) or burn_in < 0
        ):
            raise ValueError(f"burn_in must be None (B − 1) or an integer ≥ 0; got {burn_in!r}.")
        self.burn_in = None if burn_in is None else int(burn_in)
        self.exact_ratio = bool(exact_ratio)
        if out_of_batch not in OUT_OF_BATCH_MODES:
            raise ValueError(
                f"out_of_batch must be one of {', '.join(OUT_OF_BATCH_MODES)}; got {out_of_batch!r}."
            )
        self.out_of_batch = out_of_batch
        self.waste_recycling = bool(waste_recycling)
        if scan not in SCAN_IMPLEMENTATIONS:
            raise ValueError(
                f"scan must be one of {', '.join(SCAN_IMPLEMENTATIONS)}; got {scan!r}.")
        self.scan = scan
        if scan_compile not in SCAN_COMPILE_MODES:
            raise ValueError(f"scan_compile must be one of {', '.join(SCAN_COMPILE_MODES)}; "
                             f"got {scan_compile!r}.")
        self.scan_compile = scan_compile
        self.max_image_table_bytes = int(max_image_table_bytes)
        self._image_table = _ImageTable(None)
        self.set_image_table(images)
        self.chain_index = self.add_weight(
            shape=(self.num_chains,),
            dtype="int32",
            initializer=keras.initializers.Constant(OUT_OF_BATCH),
            trainable=False,
            aggregation="only_first_replica",
            name="chain_index",
        )
        self.chain_log_score = self.add_weight(
            shape=(self.num_chains,),
            dtype="float32",
            initializer=keras.initializers.Constant(-np.inf),
            trainable=False,
            aggregation="only_first_replica",
            name="chain_log_score",
        )

    @property
    def num_chains(self) -> int:
        """N chains, one per image; N·K with finite augmentations, one per stored view."""
        return self.dataset_size * (self.finite_augmentations or 1)

    @property
    def images(self) -> tf.Tensor | ImageSource | None:
        """The un-augmented image table the chains' negatives are read from: an
        in-memory tensor, an `ImageSource`, or None."""
        return self._image_table.images

    def image_sources(self) -> tuple:
        """The image table, when it is a source that training reads (for `fit`'s
        one-line read errors)."""
        if self.needs_image_table and isinstance(self.images, ImageSource):
            return (self.images,)
        return ()

    def _check_jit_for_source(self) -> None:
        """No XLA step when it would read the image table from a source."""
        if self.image_sources() and self.jit_compile:
            source = self.images
            raise ValueError(SOURCE_JIT_MESSAGE.format(name=source.name,
                                                       kind=type(source).__name__))

    @property
    def needs_image_table(self) -> bool:
        """Whether training re-encodes stored negatives: `"reencode"` or `exact_ratio`."""
        return self.out_of_batch == "reencode" or self.exact_ratio

    def set_image_table(self, images: Any) -> None:
        """Sets (or clears, with None) the un-augmented image table `[N, H, W, C]`
        (with `finite_augmentations=K`: the stored-view table `[N·K, H, W, C]`,
        row = image·K + k; a table of N rows is then refused).

        A model restored with `keras.models.load_model` has its chains but not
        the data set: give it the table before `fit`. `images` may be an
        `ImageSource` (nothing is held; see the constructor).
        """
        self._image_table.images = check_image_table(
            images, self.dataset_size, self.max_image_table_bytes, self.finite_augmentations,
            owner=TABLE_OWNER)

    def get_config(self):
        """The constructor arguments except `images` (data, not model state)."""
        return {**super().get_config(), "burn_in": self.burn_in,
                "exact_ratio": self.exact_ratio, "out_of_batch": self.out_of_batch,
                "waste_recycling": self.waste_recycling, "scan": self.scan,
                "scan_compile": self.scan_compile,
                "max_image_table_bytes": self.max_image_table_bytes,
                "finite_augmentations": self.finite_augmentations}

    def fit(self, *args, **kwargs):
        """`ContrastiveModel.fit`, after checking the image table is there if needed
        (and, for a source table, that the step is not compiled with XLA)."""
        if self.needs_image_table and self.images is None:
            if self.finite_augmentations is not None:
                raise ValueError(MISSING_VIEW_TABLE_MESSAGE.format(
                    k=self.finite_augmentations, rows=self.num_chains))
            raise ValueError(MISSING_IMAGES_MESSAGE)
        self._check_jit_for_source()
        return super().fit(*args, **kwargs)

    def contrastive_loss(self, index, embeddings, training=True, view_index=None):
        beta = tf.convert_to_tensor(self.inverse_temperature, dtype=embeddings.dtype)
        batch_size = tf.shape(index)[0]  # this replica's b images
        # [2, b, D] by a reshape, not two slices: a reshape's gradient is a reshape,
        # a slice's writes a zero-filled copy of the whole input (StridedSliceGrad).
        anchors = tf.reshape(embeddings, [2, batch_size, -1])
        view1, view2 = tf.unstack(anchors)
        # The candidates are the global batch's 2B views (all replicas').
        all_index, candidates = self.global_batch(index, embeddings)
        global_batch_size = tf.shape(all_index)[0]
        logits = beta * tf.matmul(embeddings, candidates, transpose_b=True)  # [2b, 2B]

        finite = self.finite_augmentations is not None
        if finite:
            # One chain per stored view: each of the 2b anchor views runs its own
            # chain (key: its view row) for one pass; states are view rows.
            if view_index is None and training:
                raise ValueError(MISSING_VIEW_INDEX_MESSAGE.format(k=self.finite_augmentations))
            passes = 1
            anchor_logits = logits[None]  # [1, 2b, 2B]
            anchors = embeddings[None]  # [1, 2b, D]
            valid = candidate_mask(tf.concat([index, index], axis=0), all_index)  # [2b, 2B]
            if training:
                chain_keys = self._view_rows(index, view_index)  # [2b]
                candidate_ids = self._view_rows(all_index, self._global_view_index(view_index))
            else:
                chain_keys = tf.concat([index, index], axis=0)  # only its shape is used
        else:
            # One chain per image: view 1 anchors pass 0, view 2 continues it in pass 1.
            passes = 2
            anchor_logits = tf.reshape(logits, [2, batch_size, -1])  # [2, b, 2B]
            valid = candidate_mask(index, all_index)  # [b, 2B]
            chain_keys = index
            candidate_ids = tf.concat([all_index, all_index], axis=0)  # [2B]
        num_chains = tf.shape(chain_keys)[0]

        if training:
            old_index = tf.gather(self.chain_index.value, chain_keys)
            old_log_score = tf.gather(self.chain_log_score.value, chain_keys)
            out_of_batch_logits = self._out_of_batch_logits(anchors, old_index, beta, training)
        else:  # held-out images: fresh, empty chains, nothing re-encoded or stored
            old_index = tf.fill(tf.shape(chain_keys), tf.constant(OUT_OF_BATCH, index.dtype))
            old_log_score = tf.fill(tf.shape(chain_keys),
                                    tf.constant(-np.inf, embeddings.dtype))
            # Empty chains never read these; the exact-ratio refresh wants a tensor.
            out_of_batch_logits = (tf.zeros([passes, num_chains], embeddings.dtype)
                                   if self.exact_ratio else None)
        has_state = old_index >= 0

        minus_inf = tf.fill(tf.shape(old_log_score), tf.constant(-np.inf, old_log_score.dtype))
        if self.exact_ratio:
            # β s(first anchor, the stored state re-encoded now): exact.
            current = tf.stop_gradient(out_of_batch_logits[0])
        else:
            current = old_log_score
        initial_log_score = tf.where(has_state, current, minus_inf)

        burn_in = default_burn_in(global_batch_size) if self.burn_in is None else self.burn_in
        draw_shape = [2, 2 * global_batch_size, batch_size]
        uniforms = (self.random_uniform(draw_shape) if training
                    else self.evaluation_uniform(all_index, draw_shape))
        if finite:  # draw [p, c, i] → chain p·b + i (anchor view p + 1 of image i), step c
            uniforms = tf.reshape(tf.transpose(uniforms, [1, 0, 2]),
                                  [1, 2 * global_batch_size, 2 * batch_size])
        scan = mh_scan(
            anchor_logits,
            valid,
            tf.math.log(uniforms),
            initial_log_score,
            burn_in,
            refresh_log_score_between_passes=self.exact_ratio and not finite,
            out_of_batch_logits=(
                None if out_of_batch_logits is None else tf.stop_gradient(out_of_batch_logits)
            ),
            scan=self.scan,
            scan_compile=self.scan_compile,
        )

        # Steps 5-6: ergodic average with gradient through anchors and negatives.
        negative_term = self._negative_term(anchor_logits, out_of_batch_logits, scan, has_state)
        positive_term = beta * tf.reduce_sum(view1 * view2, axis=-1)  # [b]
        loss = tf.reduce_mean(negative_term) - tf.reduce_mean(positive_term)

        # Step 7: write back the batch's chains (not for held-out data).
        final_state = scan.final_state
        if training:
            new_index = tf.where(
                final_state >= 0, tf.gather(candidate_ids, tf.maximum(final_state, 0)),
                old_index)
            self.update_sample_state(
                chain_keys,
                [(self.chain_index, new_index), (self.chain_log_score, scan.final_log_score)])

        valid_steps = float(passes) * tf.reduce_sum(tf.cast(scan.valid, tf.float32))
        acceptance_rate = tf.math.divide_no_nan(
            tf.reduce_sum(tf.cast(scan.accepted, tf.float32)), valid_steps
        )
        out_of_batch_fraction = tf.reduce_mean(tf.cast(final_state < 0, tf.float32))
        return loss, {
            "acceptance_rate": acceptance_rate,
            "out_of_batch_fraction": out_of_batch_fraction,
        }

    def _view_rows(self, index: tf.Tensor, view_index: tf.Tensor) -> tf.Tensor:
        """`[2b]` stored-view rows `index·K + view_index[:, 0]` (the view-1 block),
        then `index·K + view_index[:, 1]` (the view-2 block)."""
        view_index = tf.cast(view_index, index.dtype)
        k = tf.constant(self.finite_augmentations, index.dtype)
        tf.debugging.assert_less(
            view_index, k, message=f"emc2_tf: view_index must lie in [0, "
            f"finite_augmentations={self.finite_augmentations})")
        tf.debugging.assert_non_negative(
            view_index, message="emc2_tf: view_index must be ≥ 0")
        return tf.concat([index * k + view_index[:, 0], index * k + view_index[:, 1]], axis=0)

    def _global_view_index(self, view_index: tf.Tensor) -> tf.Tensor:
        """`view_index` of the global batch (every replica's, in replica order, like
        `global_batch`'s index)."""
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return view_index
        return all_gather(context, view_index)

    def _out_of_batch_logits(self, anchors, old_index, beta, training):
        """`β s(anchor_p, z_state)` `[P, c]` of each chain's stored negative, re-encoded now.

        `anchors` `[P, c, D]`: the anchor of each pass and chain (`[2, b, D]`,
        view 1 then view 2 of each image; `[1, 2b, D]` with finite
        augmentations, each anchor view its own chain, its state a view row).
        With gradient for `out_of_batch="reencode"` (the estimator uses it);
        forward-only for `"drop"` with `exact_ratio` (it only feeds the MH
        test); None for `"drop"` without `exact_ratio` (nothing needs it).
        """
        if self.out_of_batch == "drop" and not self.exact_ratio:
            return None
        old_embeddings = self._stored_embeddings(old_index, training, anchors)
        if self.out_of_batch == "drop":
            old_embeddings = tf.stop_gradient(old_embeddings)
        return beta * tf.reduce_sum(anchors * old_embeddings[None], axis=-1)

    def _stored_embeddings(self, old_index, training, anchors):
        """`[c, D]` the chains' stored negatives encoded with the current weights, in one
        encoder call: only the chains that hold one (a chain with none gets a row of
        zeros, which nothing reads: its score stays −inf and its steps weigh 0).

        In the first epoch every chain of a batch is empty, so this encodes
        nothing there instead of B placeholder images. Under XLA (a
        `jit_compile=True` step), which needs static shapes, all c rows are
        encoded, the empty chains' from image 0.
        """
        if _in_xla_context():
            images = gather_images(self.images, tf.maximum(old_index, 0))
            return tf.cast(self.encoder(images, training=training), anchors.dtype)
        held = tf.where(old_index >= 0)  # [n, 1] int64
        shape = tf.cast(tf.stack([tf.size(old_index), tf.shape(anchors)[-1]]), tf.int64)

        def encode_held():
            images = gather_images(self.images, tf.gather_nd(old_index, held))
            embedded = tf.cast(self.encoder(images, training=training), anchors.dtype)
            return tf.scatter_nd(held, embedded, shape)

        # No encoder call on an empty batch (oneDNN's convolutions refuse one).
        return tf.cond(tf.size(held) > 0, encode_held,
                       lambda: tf.zeros(shape, anchors.dtype))

    def _negative_term(self, anchor_logits, out_of_batch_logits, scan, has_state):
        """`[P, c]` negative term of each anchor (algorithms.md §2, step 5): `[2, b]`,
        or `[1, 2b]` with finite augmentations (one chain per anchor view).

        A step whose state is the chain's out-of-batch negative counts with
        that negative's re-encoded score (`"reencode"`, only if the chain has
        a stored state) or adds nothing while still counting in the
        normaliser (`"drop"`, the official estimator). With waste recycling
        step k adds `α_k f(candidate_k) + (1 − α_k) f(state before k)`
        instead of `f(state after k)`: the same expectation, a lower total
        variance (not per coordinate: `benchmarks/recycling_variance.py`).
        """
        recorded = tf.cast(scan.recorded, anchor_logits.dtype)
        stored = has_state[None, :, None]
        num_candidates = tf.shape(anchor_logits)[-1]
        reencode = self.out_of_batch == "reencode" and out_of_batch_logits is not None

        def value_weight(states):  # does the step's state add its score?
            usable = (states >= 0) | (stored if self.out_of_batch == "reencode" else False)
            return tf.cast(usable, recorded.dtype)

        def count_weight(states):  # does the step count in the normaliser?
            if self.out_of_batch == "drop":
                return tf.ones_like(recorded)
            return value_weight(states)

        # One weight per candidate column (no gradient), then one dense product
        # with the logits: Σ_c W[a, c] β s(a, c) / n; the out-of-batch steps'
        # weight multiplies the re-encoded negative's score ("reencode" only).
        if not self.waste_recycling:
            states = scan.states
            normaliser = tf.reduce_sum(recorded * count_weight(states), axis=-1)
            state_share = recorded * value_weight(states)
            weights = candidate_weights(states, state_share, num_candidates, scan.compiled)
        else:
            alpha = tf.cast(scan.accept_probability, recorded.dtype)
            states = scan.previous_states
            # Every recorded step counts once: a step before the first acceptance
            # of an empty chain has α = 1, so its (1 − α) share is always 0.
            normaliser = tf.reduce_sum(recorded, axis=-1)
            # Both shares in one matrix: step k's candidate is column k (α share),
            # its state before the step is scattered ((1 − α) share).
            state_share = recorded * (1.0 - alpha) * value_weight(states)
            weights = (candidate_weights(states, state_share, num_candidates, scan.compiled)
                       + tf.stop_gradient(recorded * alpha))
        total = tf.reduce_sum(weights * anchor_logits, axis=-1)
        if reencode:
            total += out_of_batch_weight(states, state_share) * out_of_batch_logits
        return tf.math.divide_no_nan(total, normaliser)
