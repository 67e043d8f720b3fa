"""The benchmark scripts at tiny sizes: they run, write their files, and their
numbers mean what they say."""

import json
import os
import sys

import numpy as np
import pytest

from helpers import run_python


def test_quality_writes_table_json_and_plot(tmp_path):
    result = run_python(["-m", "benchmarks.quality", "--methods=simclr,emc2",
                         "--batch_sizes=16,64", "--seeds=2", "--epochs=1", "--max_train=512",
                         f"--results_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "quality.json").read_text())
    assert len(payload["runs"]) == 2 * 2 * 2 and payload["num_train"] == 512
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    for run in payload["runs"]:
        assert 0.5 < run["knn_accuracy"] <= 1 and 0.5 < run["linear_probe_accuracy"] <= 1
        assert 0 <= run["alignment"] <= 4 and run["uniformity"] < 0
        assert 1 <= run["effective_rank"] <= 64
    # The printed mean ± std is the JSON's.
    emc2 = [r["knn_accuracy"] for r in payload["runs"]
            if r["method"] == "emc2" and r["batch_size"] == 16]
    assert f"{np.mean(emc2):.4f} ± {np.std(emc2):.4f}" in result.stdout


    # An ablation (--options) overlaid on the main results (--plot_only --overlay).
    common = ["-m", "benchmarks.quality", f"--results_dir={tmp_path}", "--max_train=512",
              "--epochs=1"]
    variant = run_python([*common, "--methods=emc2", "--batch_sizes=16", "--seeds=1",
                          "--options=exact_ratio=true", "--name=variant"])
    assert variant.returncode == 0, variant.stderr[-3000:]
    assert json.loads((tmp_path / "variant.json").read_text())["options"] == {
        "emc2": {"exact_ratio": True}}
    replot = run_python([*common, "--plot_only", "--overlay=variant"])
    assert replot.returncode == 0, replot.stderr[-3000:]
    assert "| emc2 (exact_ratio=True) |" in replot.stdout and "| simclr |" in replot.stdout


def test_quality_rejects_bad_flags():
    result = run_python(["-m", "benchmarks.quality", "--methods=nope"])
    assert result.returncode == 2 and "--methods: unknown ['nope']" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_python(["-m", "benchmarks.quality", "--methods=simclr", "--options=gamma=0.5"])
    assert result.returncode == 2 and "no method of --methods=simclr takes ['gamma']" in (
        result.stderr)


def test_cost_ratios_and_scaling(tmp_path):
    result = run_python(["-m", "benchmarks.cost", "--methods=simclr,emc2", "--batch_sizes=16",
                         "--scaling_sizes=500,5000", "--rounds=2", "--block=3", "--nomemory",
                         f"--results_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "cost.json").read_text())
    rows = {row["method"]: row for row in payload["per_method"]}
    assert rows["simclr"]["ratio_to_simclr"] == 1.0
    assert rows["emc2"]["ratio_to_simclr"] == pytest.approx(
        rows["emc2"]["seconds_per_step"] / rows["simclr"]["seconds_per_step"])
    assert all(0 < row["seconds_per_step"] < 5 for row in payload["per_method"])
    assert [r["num_images"] for r in payload["scaling"]] == [500, 5000]


def test_chains_tv_near_the_noise_floor_on_a_flat_target(tmp_path):
    """At τ = 0.5 with an untrained encoder the target is flat: the chains' TV is
    the i.i.d. floor's, far below uniform's only when π is peaked (not here)."""
    result = run_python(["-m", "benchmarks.chains", "--num_images=32", "--batch_size=8",
                         "--temperature=0.5", "--epochs=1", "--snapshots=0,1",
                         "--probe_steps=1500", f"--results_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "chains.json").read_text())
    assert [p["epoch"] for p in payload["probes"]] == [0, 1]
    for probe in payload["probes"]:
        assert probe["anchors"] == 32
        assert probe["tv_chain"] <= probe["tv_iid_floor"] + 0.05, probe
        assert 0 < probe["probe_acceptance_rate"] <= 1
    assert (tmp_path / "chains.png").is_file()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
