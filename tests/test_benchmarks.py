"""The benchmark scripts at tiny sizes: they run, write their files, and their
numbers mean what they say."""

import json
import os
import sys

import numpy as np
import pytest

from helpers import run_python


def _untrained_quality(seed):
    """What `benchmarks.quality --max_train=512` scores with seed `seed` before training:
    its own `build` (seeded encoder) and evaluation on the same 512 images."""
    import emc2_tf
    from benchmarks import common

    data = emc2_tf.load_digits()
    data = emc2_tf.from_arrays(data.train_images[:512], data.train_labels[:512],
                               data.test_images, data.test_labels, name=data.name)
    encoder, _ = common.build("simclr", data, 16, seed)  # the initial weights depend on seed only
    return emc2_tf.evaluate_encoder(encoder, data)


def test_quality_writes_table_json_and_plot(tmp_path):
    """Bugs caught: the benchmark not writing its files, printing other numbers than
    its JSON, and (accuracies) reporting runs that did not train: every run must
    beat the untrained encoder of its seed. Measured (3 epochs, 512 images):
    untrained 1-NN 0.825 / 0.861 and probe 0.886 / 0.914 (seeds 0 / 1); the
    runs' 1-NN gains 0.025–0.103, probe gains 0.017–0.064. One epoch was too
    little (1-NN gains down to 0.008, probe 0.006)."""
    result = run_python(["-m", "benchmarks.quality", "--methods=simclr,emc2",
                         "--batch_sizes=16,64", "--seeds=2", "--epochs=3", "--max_train=512",
                         f"--results_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "quality.json").read_text())
    assert len(payload["runs"]) == 2 * 2 * 2 and payload["num_train"] == 512
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    untrained = {seed: _untrained_quality(seed) for seed in (0, 1)}
    for run in payload["runs"]:
        before = untrained[run["seed"]]
        assert before["knn_accuracy"] + 0.01 < run["knn_accuracy"] <= 1, (run, before)
        assert before["linear_probe_accuracy"] + 0.005 < run["linear_probe_accuracy"] <= 1, (
            run, before)
        assert 0 <= run["alignment"] <= 4 and run["uniformity"] < 0
        assert 1 <= run["effective_rank"] <= 64
        assert 0.5 < run["embedding_knn_accuracy"] <= 1
        assert 0.5 < run["embedding_linear_probe_accuracy"] <= 1
        assert len(run["per_epoch"]["uniformity"]) == len(run["per_epoch"]["loss"]) == 3
    # The floors the benchmark prints are the untrained encoder's of each seed, and raw pixels'.
    for seed in (0, 1):
        floor = payload["floors"]["untrained"][seed]
        assert floor["knn_accuracy"] == pytest.approx(untrained[seed]["knn_accuracy"])
        assert floor["linear_probe_accuracy"] == pytest.approx(
            untrained[seed]["linear_probe_accuracy"])
    assert payload["floors"]["raw_pixels"]["knn_accuracy"] > 0.9  # digits: raw 1-NN is strong
    assert "| raw pixels (floor) |" in result.stdout
    # The printed mean ± std is the JSON's.
    emc2 = [r["knn_accuracy"] for r in payload["runs"]
            if r["method"] == "emc2" and r["batch_size"] == 16]
    assert f"{np.mean(emc2):.4f} ± {np.std(emc2):.4f}" in result.stdout


    # An ablation (--options) overlaid on the main results (--plot_only --overlay).
    common = ["-m", "benchmarks.quality", f"--results_dir={tmp_path}", "--max_train=512",
              "--epochs=1"]
    variant = run_python([*common, "--methods=emc2/out_of_batch=drop", "--batch_sizes=16",
                          "--seeds=1", "--options=exact_ratio=true", "--name=variant",
                          "--nofloors"])
    assert variant.returncode == 0, variant.stderr[-3000:]
    label = "emc2 (exact_ratio=True, out_of_batch=drop)"  # a variant's own option + --options
    assert json.loads((tmp_path / "variant.json").read_text())["options"] == {
        label: {"exact_ratio": True, "out_of_batch": "drop"}}
    replot = run_python([*common, "--plot_only", "--overlay=variant"])
    assert replot.returncode == 0, replot.stderr[-3000:]
    assert f"| {label} |" in replot.stdout and "| simclr |" in replot.stdout


def test_quality_rejects_bad_flags():
    result = run_python(["-m", "benchmarks.quality", "--methods=nope"])
    assert result.returncode == 2 and "--methods: unknown ['nope']" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_python(["-m", "benchmarks.quality", "--methods=simclr", "--options=gamma=0.5"])
    assert result.returncode == 2 and "no method of --methods=simclr takes ['gamma']" in (
        result.stderr)
    result = run_python(["-m", "benchmarks.quality", "--methods=simclr/burn_in=0"])
    assert result.returncode == 2 and "--methods: simclr takes no option ['burn_in']" in (
        result.stderr)


def test_scan_benchmark_times_every_variant(tmp_path):
    """Bugs caught: a variant left out of the table, the depth column not the
    documented 2·2B (sequential), 2·(2⌈log₂(2B + 2)⌉ − 1) (parallel) and
    2⌈2B/k⌉·(2⌈log₂(k + 2)⌉ − 1) (blocked) for --block_sizes. (It cannot tell
    whether the timed blocked scan really ran with that k: a mutation that
    ignores --block_sizes while tracing survives it.)"""
    result = run_python(["-m", "benchmarks.scan", "--batch_sizes=4,16", "--seconds=0.05",
                         "--rounds=1", "--block_sizes=4", f"--results_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "scan.json").read_text())["results"]
    assert {(r["batch_size"], r["scan"], r["xla"]) for r in results} == {
        (b, s, x) for b in (4, 16) for s in ("sequential", "parallel", "blocked")
        for x in (False, True)}
    depths = {(r["batch_size"], r["scan"]): r["depth"] for r in results}
    assert depths == {(4, "sequential"): 16, (4, "parallel"): 14, (4, "blocked"): 2 * 2 * 5,
                      (16, "sequential"): 64, (16, "parallel"): 22, (16, "blocked"): 2 * 8 * 5}
    assert {r["comparisons"] for r in results if r["scan"] == "blocked"} == {4 * 5 * 4, 16 * 5 * 4}
    assert all(r["milliseconds"] > 0 for r in results)
    assert "| 16 | blocked k=4 |" in result.stdout


def test_cost_tables_ratios_breakdown_and_scaling(tmp_path):
    """Bugs caught: a (variant, B) row missing or repeated, a ratio that is not
    the row's time over SimCLR's at the same B (and mode), a breakdown part
    timed on something larger than the step it is a part of, the N-scaling
    losing its uint8 table (or the drop variant keeping one), and the printed
    tables not being the JSON's."""
    variants = ["simclr", "emc2", "emc2/exact_ratio=true/out_of_batch=drop"]
    result = run_python([
        "-m", "benchmarks.cost", f"--methods={','.join(variants)}", "--batch_sizes=8",
        "--breakdown_batch_sizes=8",
        "--breakdown_variants=emc2,emc2/out_of_batch=reencode,emc2/exact_ratio=true",
        "--encoders=small_cnn,resnet18", "--resnet_methods=simclr,emc2",
        "--resnet_batch_sizes=2", "--resnet_rounds=1", "--scan_modes=parallel",
        "--jit=graph,xla", "--scaling_sizes=300,3000", "--scaling_batch_size=16",
        "--scaling_methods=simclr,emc2/out_of_batch=reencode,emc2", "--rounds=2", "--block=3",
        "--nomemory", f"--results_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "cost.json").read_text())

    def finite_positive(value):
        return np.isfinite(value) and value > 0

    # Table 1: one row per (encoder, variant, B); ratio = time / SimCLR's at that B.
    rows = {(r["encoder"], r["variant"], r["batch_size"]): r for r in payload["per_method"]}
    assert len(rows) == len(payload["per_method"]) == 3 + 2
    assert set(rows) == {("small_cnn", v, 8) for v in variants} | {
        ("resnet18", v, 2) for v in ("simclr", "emc2")}
    for (encoder, variant, b), row in rows.items():
        assert finite_positive(row["seconds_per_step"]) and row["seconds_per_step"] < 20, row
        assert finite_positive(row["ratio_to_simclr"]), row
        assert row["ratio_to_simclr"] == pytest.approx(
            row["seconds_per_step"] / rows[encoder, "simclr", b]["seconds_per_step"])
    assert rows["small_cnn", variants[2], 8]["options"] == {
        "exact_ratio": True, "out_of_batch": "drop"}
    assert f"| small_cnn | {variants[2]} | 8 | " in result.stdout

    # Table 2: SimCLR and EMC² (scan=parallel) per mode; ratio to SimCLR in that mode.
    modes = {(r["variant"], r["jit"], r["batch_size"]): r for r in payload["scan_modes"]}
    assert set(modes) == {(v, j, b) for v in ("simclr", "emc2/scan=parallel")
                          for j in ("graph", "xla") for b in (8,)}
    for (variant, jit, b), row in modes.items():
        assert "skipped" not in row, row
        assert finite_positive(row["ratio_to_simclr"]), row
        assert row["ratio_to_simclr"] == pytest.approx(
            row["seconds_per_step"] / modes["simclr", jit, b]["seconds_per_step"])

    # Breakdown at B = 8: each part > 0 and within 1.5 × the full step it belongs to.
    # The default (drop, no exact ratio) re-encodes nothing, so it has no such part.
    for variant in ("emc2", "emc2/out_of_batch=reencode", "emc2/exact_ratio=true"):
        parts = {r["part"]: r for r in payload["breakdown"]
                 if r["variant"] == variant and r["batch_size"] == 8}
        expected = {"data (next batch, prefetched)", "encode 2B views (fwd+bwd)", "MH scan",
                    "re-encode B negatives (fwd+bwd)", "write-back B rows", "full step",
                    "rest (full − parts)"}
        if variant == "emc2":
            expected.discard("re-encode B negatives (fwd+bwd)")
        assert set(parts) == expected, parts
        full = parts["full step"]["seconds"]
        assert finite_positive(full) and parts["full step"]["fraction_of_step"] == 1.0
        for name, part in parts.items():
            if name in ("full step", "rest (full − parts)"):
                continue
            assert finite_positive(part["seconds"]), part
            assert part["seconds"] <= 1.5 * full, (part, full)
            assert part["fraction_of_step"] == pytest.approx(part["seconds"] / full)
    assert "| emc2 | 8 | MH scan | " in result.stdout

    # Table 4: every (variant, N); ratio to N = 300 of the same variant.
    scaling = {(r["variant"], r["num_images"]): r for r in payload["scaling"]}
    assert set(scaling) == {(v, n) for v in ("simclr", "emc2/out_of_batch=reencode", "emc2")
                            for n in (300, 3000)}
    for (variant, n), row in scaling.items():
        assert finite_positive(row["ratio_to_smallest_n"]), row
        assert row["ratio_to_smallest_n"] == pytest.approx(
            row["seconds_per_step"] / scaling[variant, 300]["seconds_per_step"])
        assert finite_positive(row["ratio_to_simclr"]), row
    assert scaling["emc2/out_of_batch=reencode", 3000]["image_table"] == "uint8"
    assert scaling["emc2", 3000]["image_table"] is None  # the default, drop, needs no table
    assert payload["machine"]["device"] in result.stdout


def test_cost_cpu_memory_probe_reads_its_own_peak_not_the_parents():
    """Bug caught: the per-row CPU memory read `ru_maxrss`, which on Linux a child
    inherits from its parent's resident set at fork: every row of the full run
    read the benchmark process's 2,867 MiB. Here the parent holds 1.5 GiB more
    than any probe needs; the probe of one small SimCLR step must not see it."""
    from benchmarks import cost

    ballast = np.ones(1536 * 2**20 // 8)  # 1.5 GiB, touched: resident in this process
    with open("/proc/self/status") as handle:
        parent = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
    memory = cost.cpu_memory("simclr", 8, block=1)
    assert ballast[-1] == 1.0
    assert 100 < memory["peak_rss_mib"] < parent / 1024 - 1000, (memory, parent / 1024)
    assert 0 <= memory["rise_mib"] < memory["peak_rss_mib"], memory


def test_cost_rejects_bad_flags():
    for flags, message in (
            (["--methods=emc2"], "--methods must include simclr"),
            (["--methods=simclr,emc2/out_of_batch=x"], "out_of_batch must be one of"),
            (["--batch_sizes=8", "--breakdown_batch_sizes=16"], "must be among --batch_sizes")):
        result = run_python(["-m", "benchmarks.cost", *flags])
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and last.startswith("cost: error: ") and message in last, (
            result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_chains_and_scan_refuse_non_finite_float_flags():
    """Bugs caught: `benchmarks.chains --temperature=nan` ended in a ValueError
    traceback, `benchmarks.scan --seconds=inf` timed forever."""
    for args, message in ((["-m", "benchmarks.chains", "--temperature=nan"],
                           "chains: error: --temperature must be a finite number > 0; got nan."),
                          (["-m", "benchmarks.scan", "--seconds=inf"],
                           "scan: error: every batch size must be ≥ 2, --seconds a finite")):
        result = run_python(args, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-500:]


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


def test_data_benchmark_reuses_its_folders_and_keeps_finished_probes(tmp_path):
    """Bugs caught in `benchmarks.data`'s helpers: a rerun rewriting a finished
    image folder (the 1M-file folder takes minutes) or measuring again a probe
    the results file already holds; a failing probe losing the probes finished
    before it; the synthetic writer writing other than N decodable images of
    the size asked, in class folders."""
    from PIL import Image

    from benchmarks import data

    root = str(tmp_path / "images")
    record = data.write_folder(root, 23, 8, "png", workers=1)
    files = sorted((tmp_path / "images").rglob("*.png"))
    assert not record["reused"] and record["n"] == 23 and len(files) == 23
    assert {f.parent.name for f in files} == {f"class_{k}" for k in range(data.CLASSES)}
    for file in files:
        with Image.open(file) as image:
            image.load()
            assert image.size == (8, 8) and image.mode == "RGB"
    stamps = [f.stat().st_mtime_ns for f in files]
    assert data.write_folder(root, 23, 8, "png", workers=1)["reused"]
    assert [f.stat().st_mtime_ns for f in files] == stamps

    path = str(tmp_path / "results" / "data.json")
    calls = []

    def probe(name, fails=False):
        def run():
            calls.append(name)
            if fails:
                raise RuntimeError("killed")
            return {"value": name}
        return run

    quiet = lambda message: None  # noqa: E731
    with pytest.raises(RuntimeError):
        data.run_probes([("a", probe("a")), ("b", probe("b", fails=True))], path, log=quiet)
    assert set(json.loads(open(path).read())["probes"]) == {"a"}
    payload = data.run_probes([("a", probe("a")), ("b", probe("b"))], path, log=quiet)
    assert calls == ["a", "b", "b"]  # a was not measured again
    assert {k: v["value"] for k, v in payload["probes"].items()} == {"a": "a", "b": "b"}
    assert len(payload["probes"]["b"]["loadavg_at_start"]) == 3
    data.run_probes([("a", probe("a"))], path, redo=True, log=quiet)
    assert calls == ["a", "b", "b", "a"]


def test_convergence_resumes_from_its_results_file_and_reports_its_runs(tmp_path):
    """Catches: a rerun that trains again the runs its results file holds (the grid is
    longer than a session), a torn last line (a crash mid-write) that breaks the
    rerun, and a table that is not the mean of the runs' last-epoch
    measurements; and a relative error that is not error / norm."""
    args = ["-m", "benchmarks.convergence", "--datasets=digits", "--train_size=40",
            "--batch_sizes=4", "--seeds=2", "--epochs=2", "--methods=simclr", "--points=4",
            f"--results_dir={tmp_path}"]
    first = run_python(args)
    assert first.returncode == 0, first.stderr[-3000:]
    results = tmp_path / "convergence.jsonl"
    lines = results.read_text().splitlines()
    assert len(lines) == 2
    kept = json.loads(lines[0])
    results.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # torn second run
    second = run_python(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 runs planned, 1 already in" in second.stdout
    runs = [json.loads(line) for line in results.read_text().splitlines()[1:] if line.startswith("{")
            and line.endswith("}")]
    assert json.loads(results.read_text().splitlines()[0]) == kept  # untouched
    assert [run["seed"] for run in runs] == [1]
    every = kept["every_n_steps"]
    assert kept["steps"] == 20 and every == 5
    assert [r["step"] for r in kept["records"]] == [0, 5, 10, 15]
    for record in kept["records"]:
        assert record["relative_error"] == pytest.approx(
            record["gradient_error"] / record["gradient_norm"])
    payload = json.loads((tmp_path / "convergence.json").read_text())
    (row,) = payload["rows"]
    finals = []
    for run in (kept, runs[0]):
        last = [r for r in run["records"] if r["step"] > 10]  # the second epoch's steps
        finals.append(np.mean([r["gradient_norm"] for r in last]))
    assert row["gradient_norm"][0] == pytest.approx(np.mean(finals))
    assert row["gradient_norm"][1] == pytest.approx(np.std(finals))
    assert (tmp_path / "convergence.png").stat().st_size > 10_000


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
