r"""The EMC² chains over training: acceptance rate, and total-variation distance
to the exact softmax the chains target.

    python -m benchmarks.chains                    # digits subset N=128, B=16, τ=0.07
    python -m benchmarks.chains --num_images=64 --temperature=0.5

EMC² trains on the first `--num_images` digits (small enough for the exact
softmax `π_i(j) ∝ exp(β s_ij)`, j ≠ i, to be computed). At snapshots of the
encoder it freezes the encoder and runs the sampler alone: `--probe_steps`
steps of the training kernel (uniform random batches of B, the in-batch MH
scan, un-augmented views), recording each anchor's chain state after every
step its image was in the batch. The TV distance between those states'
histogram and `π_i`, averaged over anchors, is compared with

- the same distance for as many i.i.d. draws from `π_i` (the Monte-Carlo
  noise floor: a perfect sampler cannot do better with this many samples);
- uniform negatives (what an in-batch method without reweighting gets).

Writes `benchmarks/results/<name>.json` and `<name>.png`, prints the table.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 128, "N: the first N digits training images.")
flags.DEFINE_integer("batch_size", 16, "B of training and of the probe.")
flags.DEFINE_float("temperature", 0.07, "τ (EMC²'s default).")
flags.DEFINE_integer("epochs", 30, "Training epochs.")
flags.DEFINE_list("snapshots", ["0", "1", "3", "10", "30"], "Epochs at which the chains are probed.")
flags.DEFINE_integer("probe_steps", 8000, "Sampler steps per probe.")
flags.DEFINE_integer("warmup_visits", 20, "Visits per anchor dropped at the start of a probe.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("name", "chains", "Results file name under --results_dir.")
flags.DEFINE_string("results_dir", common.RESULTS_DIR, "Where the JSON and PNG go.")


def fail(message: str):
    print(f"chains: error: {message}", file=sys.stderr)
    sys.exit(2)


def exact_softmax_rows(embeddings, temperature: float):
    """`π_i(j) ∝ exp(s_ij / τ)` over j ≠ i, float64 `[N, N]` (zero diagonal)."""
    import numpy as np

    z = np.asarray(embeddings, np.float64)
    logits = z @ z.T / temperature
    np.fill_diagonal(logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def probe(encoder, images, batch_size: int, temperature: float, steps: int, seed: int):
    """Runs the frozen-encoder sampler; returns per-step `(batch index [S, B], states [S, B])`
    and the probe's acceptance rate."""
    import numpy as np
    import tensorflow as tf

    import emc2_tf

    n = len(images)
    sampler = emc2_tf.EMC2Model(encoder=encoder, dataset_size=n, images=images,
                                temperature=temperature, seed=seed)
    rng = np.random.default_rng(seed)
    batches = np.stack([rng.choice(n, batch_size, replace=False) for _ in range(steps)])
    table = tf.constant(images, tf.float32)

    @tf.function(jit_compile=True)
    def run(batches):
        def body(i, states, rates):
            index = batches[i]
            x = tf.gather(table, index)
            _, scalars = sampler.contrastive_loss(index, encoder(tf.concat([x, x], 0)))
            return (i + 1, states.write(i, tf.gather(sampler.chain_index, index)),
                    rates.write(i, scalars["acceptance_rate"]))

        _, states, rates = tf.while_loop(
            lambda i, *_: i < steps, body,
            (0, tf.TensorArray(tf.int32, steps), tf.TensorArray(tf.float32, steps)))
        return states.stack(), rates.stack()

    states, rates = run(tf.constant(batches, tf.int32))
    return batches, states.numpy(), float(np.mean(rates.numpy()))


def tv_distances(batches, states, target, warmup: int, seed: int) -> dict[str, float]:
    """Mean over anchors of TV(chain histogram, π_i), of the i.i.d. noise floor and of uniform."""
    import numpy as np

    n = len(target)
    rng = np.random.default_rng(seed + 7)
    chain_tv, floor_tv, uniform_tv, counts = [], [], [], []
    uniform = np.full(n, 1.0 / (n - 1))
    for anchor in range(n):
        visits = states[batches == anchor][warmup:]
        visits = visits[visits >= 0]
        if len(visits) < 10:
            continue
        empirical = np.bincount(visits, minlength=n) / len(visits)
        chain_tv.append(0.5 * np.abs(empirical - target[anchor]).sum())
        draws = rng.choice(n, size=len(visits), p=target[anchor])
        floor_tv.append(0.5 * np.abs(np.bincount(draws, minlength=n) / len(draws)
                                     - target[anchor]).sum())
        row = uniform.copy(); row[anchor] = 0
        uniform_tv.append(0.5 * np.abs(row - target[anchor]).sum())
        counts.append(len(visits))
    return {"tv_chain": float(np.mean(chain_tv)), "tv_iid_floor": float(np.mean(floor_tv)),
            "tv_uniform": float(np.mean(uniform_tv)), "anchors": len(chain_tv),
            "samples_per_anchor": float(np.mean(counts))}


def plot(payload, path: str) -> None:
    figure, (left, right) = common.pyplot().subplots(1, 2, figsize=(11, 4.2))
    rates = payload["training_acceptance_rate"]
    left.plot(range(1, len(rates) + 1), rates, marker=".", color="black")
    left.set_xlabel("epoch")
    left.set_ylabel("MH acceptance rate (training)")
    left.grid(alpha=0.3)
    epochs = [p["epoch"] for p in payload["probes"]]
    for key, label, style in (("tv_chain", "EMC² chains", dict(color="black", linewidth=2.5)),
                              ("tv_iid_floor", "i.i.d. draws from π (noise floor)",
                               dict(linestyle="--")),
                              ("tv_uniform", "uniform negatives", dict(linestyle=":"))):
        right.plot(epochs, [p[key] for p in payload["probes"]], marker="o", label=label, **style)
    right.set_xlabel("epoch of the frozen encoder")
    right.set_ylabel("mean TV distance to the exact softmax π")
    right.set_ylim(0, 1)
    right.grid(alpha=0.3)
    right.legend()
    figure.suptitle(f"EMC² chains on digits: N={payload['num_images']}, "
                    f"B={payload['batch_size']}, τ={payload['temperature']}")
    common.save_figure(figure, path)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpfull).")
    import keras
    import tensorflow as tf

    import emc2_tf

    tf.get_logger().setLevel("ERROR")  # one sampler function is traced per probe, on purpose
    try:
        snapshots = sorted({int(e) for e in FLAGS.snapshots})
    except ValueError:
        fail("--snapshots must be integers (epochs).")
    if not 2 <= FLAGS.batch_size <= FLAGS.num_images <= 1437:
        fail("need 2 ≤ --batch_size ≤ --num_images ≤ 1437 (the digits training images).")
    if not 0 < FLAGS.temperature < float("inf"):  # NaN fails both comparisons
        fail(f"--temperature must be a finite number > 0; got {FLAGS.temperature}.")
    if snapshots[0] < 0 or snapshots[-1] > FLAGS.epochs:
        fail(f"--snapshots must lie in [0, --epochs={FLAGS.epochs}].")
    digits = emc2_tf.load_digits()
    images = digits.train_images[: FLAGS.num_images]
    machine = common.device_description()
    print(f"chains: N={FLAGS.num_images}, B={FLAGS.batch_size}, τ={FLAGS.temperature}, "
          f"{FLAGS.epochs} epochs, probes of {FLAGS.probe_steps} steps on {machine['device']}",
          flush=True)
    keras.utils.set_random_seed(FLAGS.seed)
    encoder = emc2_tf.build_small_cnn_encoder(digits.image_shape)
    model = emc2_tf.EMC2Model(encoder=encoder, dataset_size=FLAGS.num_images, images=images,
                              temperature=FLAGS.temperature, seed=FLAGS.seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    augment = emc2_tf.AugmentConfig.for_dataset("digits")
    dataset = emc2_tf.make_two_view_dataset(images, FLAGS.batch_size, augment, seed=FLAGS.seed)
    payload = {"benchmark": "chains", "machine": machine, "num_images": FLAGS.num_images,
               "batch_size": FLAGS.batch_size, "temperature": FLAGS.temperature,
               "epochs": FLAGS.epochs, "probe_steps": FLAGS.probe_steps,
               "training_acceptance_rate": [], "probes": []}
    started, trained = time.time(), 0
    for epoch in snapshots:
        if epoch > trained:
            history = model.fit(dataset, initial_epoch=trained, epochs=epoch, verbose=0)
            payload["training_acceptance_rate"] += [float(r) for r in
                                                    history.history["acceptance_rate"]]
            trained = epoch
        z = emc2_tf.embed(encoder, images, features="embedding")
        target = exact_softmax_rows(z, FLAGS.temperature)
        batches, states, probe_rate = probe(encoder, images, FLAGS.batch_size, FLAGS.temperature,
                                            FLAGS.probe_steps, FLAGS.seed + epoch)
        result = tv_distances(batches, states, target, FLAGS.warmup_visits, FLAGS.seed)
        result.update(epoch=epoch, probe_acceptance_rate=probe_rate,
                      target_max_probability=float(target.max(axis=1).mean()))
        payload["probes"].append(result)
        print(f"epoch {epoch:3d}: TV chain {result['tv_chain']:.3f}, i.i.d. floor "
              f"{result['tv_iid_floor']:.3f}, uniform {result['tv_uniform']:.3f}, probe acceptance "
              f"{probe_rate:.3f} ({result['samples_per_anchor']:.0f} samples per anchor)",
              flush=True)
        common.write_json(FLAGS.name, payload, FLAGS.results_dir)
    if trained < FLAGS.epochs:
        history = model.fit(dataset, initial_epoch=trained, epochs=FLAGS.epochs, verbose=0)
        payload["training_acceptance_rate"] += [float(r) for r in history.history["acceptance_rate"]]
    payload["seconds"] = time.time() - started
    path = common.write_json(FLAGS.name, payload, FLAGS.results_dir)
    png = common.os.path.join(FLAGS.results_dir, f"{FLAGS.name}.png")
    plot(payload, png)
    rates = payload["training_acceptance_rate"]
    print("\n" + common.markdown_table(
        ["epoch", "training acceptance", "probe acceptance", "TV chains", "TV i.i.d. floor",
         "TV uniform", "mean max π_i"],
        [[p["epoch"], f"{rates[p['epoch'] - 1]:.3f}" if p["epoch"] else "–",
          f"{p['probe_acceptance_rate']:.3f}", f"{p['tv_chain']:.3f}", f"{p['tv_iid_floor']:.3f}",
          f"{p['tv_uniform']:.3f}", f"{p['target_max_probability']:.3f}"]
         for p in payload["probes"]]))
    print(f"\nwrote {path} and {png} in {payload['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    app.run(main)
