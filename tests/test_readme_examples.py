"""The README's smaller snippets, run as written, and its links inside the repository."""

import os
import re

import numpy as np

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


if __name__ == "__main__":
    import sys

    import pytest

    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
