"""The README's smaller snippets, run as written, and its links inside the repository."""

import json
import os
import re

import numpy as np
import pytest

from helpers import ROOT, run_python


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def _python_block_after(marker: str) -> str:
    """The first ```python block after `marker` in the README."""
    return re.search(re.escape(marker) + r".*?```python\n(.*?)```", _readme(), re.S).group(1)


def test_readme_links_stay_inside_the_repository():
    """Bug caught: the README sending users to `shared/docs/algorithms.md`, a file
    outside the repository that no user has. Every relative Markdown link must
    name a file of the checkout, and the formulas' page must be one of them."""
    readme = _readme()
    assert "shared/" not in readme
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme)
    assert "docs/algorithms.md" in links
    missing = [link for link in links if not os.path.exists(os.path.join(ROOT, link))]
    assert not missing, missing


def test_readme_held_out_pairs_are_fixed():
    """Bug caught: the README's `held_out` example re-augmented on every pass, so
    two `model.evaluate(held_out)` calls on the same model returned different
    values (2.654, then 2.819). The snippet's `held_out` lines, run as written,
    must give the same loss twice, and its views must be the un-augmented
    held-out images in order."""
    import keras

    import emc2_tf

    snippet = _python_block_after("**Keras conventions.**")
    definition = re.search(r"^held_out = .*?\)\n", snippet, re.S | re.M).group(0)
    data = emc2_tf.load_digits()
    keras.utils.set_random_seed(0)
    encoder = emc2_tf.build_small_cnn_encoder(data.image_shape)
    model = emc2_tf.EMC2Model(encoder, dataset_size=data.num_train, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    scope = {"emc2_tf": emc2_tf, "data": data}
    exec(definition, scope)  # noqa: S102 (the README's own line)
    held_out = scope["held_out"]
    first = next(iter(held_out))
    np.testing.assert_array_equal(first["view1"].numpy(), data.test_images[:64])
    np.testing.assert_array_equal(first["view2"].numpy(), data.test_images[:64])
    values = [model.evaluate(held_out, verbose=0, return_dict=True) for _ in range(2)]
    assert values[0] == values[1], values


def test_readme_distributed_example_runs_on_two_replicas(tmp_path):
    """Bug caught: the README's distributed snippet used `data` and `keras`
    without defining them and trained without the digits augmentation. Run as
    written (1 epoch instead of 30), it must train on 2 replicas, fill one chain
    per image it visited (22 steps × 64 images) and leave both replicas with
    identical chain tables."""
    snippet = _python_block_after("## Distributed training")
    assert "AugmentConfig.for_dataset(\"digits\")" in snippet
    assert "epochs=30" in snippet
    script = snippet.replace("epochs=30", "epochs=1, verbose=0") + (
        "\nimport numpy as np\n"
        "tables = [np.asarray(v) for v in model.chain_index.value.values]\n"
        "print('replicas', strategy.num_replicas_in_sync, len(tables))\n"
        "print('filled', [int((t >= 0).sum()) for t in tables])\n"
        "print('identical', all(np.array_equal(tables[0], t) for t in tables))\n")
    result = run_python(["-c", script], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "replicas 2 2" in lines, lines
    steps = 1437 // 64
    assert f"filled [{steps * 64}, {steps * 64}]" in lines, lines
    assert "identical True" in lines, lines


def _recipes() -> list[list[str]]:
    """The two ```bash commands after "The paper's two recipes" in the README, as
    argument lists (continuation lines joined)."""
    import shlex

    text = _readme()[_readme().index("**The paper's two recipes.**"):]
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)[:2]
    return [shlex.split(block.replace("\\\n", " ")) for block in blocks]


def _jpeg_folder(root, classes, per_class, seed):
    """`classes` class folders of `per_class` 40×30 RGB JPEGs (sizes vary: 30×40 too)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            size = (40, 30) if i % 2 else (30, 40)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), np.uint8)
            Image.fromarray(pixels).save(root / f"n{c:08d}" / f"{i}.JPEG", quality=90)
    return str(root)


def _flag_value(line: str) -> tuple[str, str]:
    """`--name=value` → (name, value); a boolean `--name` / `--noname` → (name, "true"/"false")."""
    name, equals, value = line[2:].partition("=")
    if equals:
        return name, value
    return (name[2:], "false") if name.startswith("no") else (name, "true")


def _same_value(recorded, given) -> bool:
    """Flag values equal as numbers (1e-4 is recorded as 0.0001) or as text."""
    try:
        return float(recorded) == float(given)
    except (TypeError, ValueError):
        return recorded == given


@pytest.mark.parametrize("name", ["stl10", "in100"])
def test_readme_paper_recipes_run_with_every_flag_kept(name, tmp_path):
    """Bug caught: the README's STL-10 and ImageNet-100 commands not running as
    written (a flag misspelt or refused, a split expression TFDS rejects, a folder
    layout the trainer does not read). Each command runs with its own flags;
    only the data paths point at stand-ins (a fake STL-10 under TFDS' `stl10`
    name, JPEG class folders of mixed sizes) and the run is shrunk (--epochs=1,
    --batch_size=8, --image_size=32): the recorded flags must be the README's."""
    from fake_data import store_tfds, tfds_examples

    stl10, imagenet = _recipes()
    assert stl10[:3] == [".venv/bin/python", "-m", "trainers.train"] == imagenet[:3]
    tfds_dir = tmp_path / "tfds"
    store_tfds(tfds_dir, "stl10", {
        split: tfds_examples(count, (96, 96, 3), split != "unlabelled", seed)
        for seed, (split, count) in enumerate({"train": 8, "test": 6, "unlabelled": 8}.items())
    }, file_format="array_record")
    folders = {"/data/imagenet100/train": _jpeg_folder(tmp_path / "in100" / "train", 3, 6, 1),
               "/data/imagenet100/val": _jpeg_folder(tmp_path / "in100" / "val", 3, 2, 2),
               "/data/tfds": str(tfds_dir)}
    shrink = {"epochs": "1", "batch_size": "8", "image_size": "32"}
    # One recipe per test case: two ResNet-18 runs of ~45 s each, so that
    # pytest-xdist can put them on different workers.
    command = {"stl10": stl10, "in100": imagenet}[name]
    args, readme_flags = [], {}
    for arg in command[3:]:
        flag, _, value = arg[2:].partition("=")
        readme_flags[flag] = value
        value = shrink.get(flag, folders.get(value, value))
        args.append(f"--{flag}={value}" if _ else f"--{flag}")
    outputs = [f"--checkpoint_dir={tmp_path / name}", f"--export_dir={tmp_path / 'sm'}",
               f"--tensorboard_dir={tmp_path / 'tb'}"]
    result = run_python(["-m", "trainers.train", *args, *outputs])
    assert result.returncode == 0, (name, result.stderr[-3000:])
    recorded = dict(_flag_value(line) for line in
                    (tmp_path / name / "flags.txt").read_text().splitlines())
    for flag, value in readme_flags.items():
        if flag not in shrink and "data_dir" not in flag:
            assert _same_value(recorded.get(flag), value or "true"), (name, flag, recorded)
    summary = json.loads(re.search(r"^summary: (.*)$", result.stdout, re.M).group(1))
    assert summary["held_out_size"] == {"stl10": 6, "in100": 6}[name]
    assert summary["train_size"] == {"stl10": 16, "in100": 18}[name]


def test_readme_finite_augmentation_example_runs(tmp_path):
    """Bug caught: the README's finite-augmentation snippet (finite views, EMC² over
    stored views with exact_ratio, the gradient-error monitor) out of date with
    the API. Run as written, its last record must be step 10 of 15 with finite
    positive numbers, and F below log(1 + N·K − K) = log(999) plus slack."""
    snippet = _python_block_after("### Finite augmentations and the exact gradient error")
    script = snippet + (
        "\nimport json, math\nrecord = monitor.records[-1]\n"
        "print('RECORD', json.dumps({k: record[k] for k in "
        "('step', 'gradient_error', 'gradient_norm', 'global_loss')}))\n")
    result = run_python(["-c", script], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(re.search(r"^RECORD (.*)$", result.stdout, re.M).group(1))
    assert record["step"] == 10
    assert record["gradient_error"] > 0 and record["gradient_norm"] > 0
    assert 0 < record["global_loss"] < np.log(999) + 0.1


if __name__ == "__main__":
    import sys

    import pytest

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
