"""A smoke-sized bench of the study's grid (tiny model, seconds): cells, learning-rate selection on
dev, resume without re-running, a refused changed grid, an extended one, the summary and the plots."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hybridft.study.bench import run_bench
from hybridft.study.grid import Cell, best_point, cell_config, cells, count, finished as finished_cells, group_runs, load_bench, lr_points
from hybridft.cli import main
from hybridft.study.plots import group_label, smooth
from hybridft.run.zo_log import LOG, read, rms_move
from hybridft.study.report import grid_edge, steps_to


@pytest.fixture(scope="module")
def bench_file(tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    spec = {
        "output_dir": str(root / "out"), "models": [str(tiny_bert_dir)], "tasks": ["rotten_tomatoes"],
        "methods": ["hybrid", "fo-lora", "fo-full", "zo-full", "zo-lora"], "seeds": [0, 1], "isolate": False,
        "train": {"train-size": 32, "dev-size": 16, "batch-size": 8, "steps": 4, "eval-every": 2, "threads": 1},
        "lr_grid": {"hybrid": {"zo-lr": [1e-3, 1e-2]}},
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def finished(bench_file):
    bench = load_bench(bench_file)
    return bench, run_bench(bench, progress=False)


def test_grid_runs_every_cell_and_picks_the_best_point_on_dev(finished):
    bench, root = finished
    grid = [Cell(bench.models[0], "rotten_tomatoes", "hybrid", 0, lrs) for lrs in lr_points(bench, "hybrid")]
    scores = [json.loads((root / "cells" / c.name / "eval.json").read_text())["dev_accuracy_after"] for c in grid]
    ran = list(cells(bench, root))
    assert len(ran) == 2 + 1 + 4 * 2  # hybrid: 2 grid points + seed 1; the others: 1 point + seed 1
    chosen = next(c for c in ran if c.method == "hybrid" and c.seed == 1).lrs
    assert chosen == grid[scores.index(max(scores))].lrs
    assert all((root / "cells" / c.name / "eval.json").exists() for c in ran)


def test_summary_and_plots_are_written(finished):
    _, root = finished
    rows = {r["method"]: r for r in json.loads((root / "results.json").read_text())}
    assert set(rows) == {"hybrid", "fo-lora", "fo-full", "zo-full", "zo-lora"} and all(r["seeds"] == 2 for r in rows.values())
    assert rows["fo-lora"]["zo_parameters"] == 0 < rows["hybrid"]["zo_parameters"]
    assert rows["fo-lora"]["steps_ratio"] in (None, 1.0)
    assert "| hybrid |" in (root / "results.md").read_text()
    hybrid = next(r for r in json.loads((root / "results.json").read_text()) if r["method"] == "hybrid")
    assert [p["zo_lr"] for p in hybrid["grid"]] == [1e-3, 1e-2] and all(p["dev_accuracy"] is not None for p in hybrid["grid"])
    grid_line = next(line for line in (root / "results.md").read_text().splitlines() if "| hybrid |" in line and "zo-lr 0.01: " in line)
    assert grid_line.count("**") == 2 and f"**zo-lr {hybrid['learning_rates']['zo_lr']:g}: " in grid_line
    assert grid_line.endswith(f"| {grid_edge(hybrid)} |") and grid_edge(hybrid)  # a 2-point grid: always an edge
    assert (root / "plots" / "accuracy.png").stat().st_size > 0


def test_summary_says_how_far_the_zo_rule_moved_the_weights(finished):
    bench, root = finished
    rows = {r["method"]: r for r in json.loads((root / "results.json").read_text())}
    assert rows["fo-lora"]["zo_rms_move"] is None and rows["fo-full"]["zo_rms_move"] is None
    for method in ("hybrid", "zo-full", "zo-lora"):
        runs = group_runs(bench, root, bench.models[0], "rotten_tomatoes", method)
        moves = [rms_move(read(run / LOG)) for run in runs]
        assert len(runs) == 2 and rows[method]["zo_rms_move"] == pytest.approx(sum(moves) / 2) and min(moves) > 0
    line = next(line for line in (root / "results.md").read_text().splitlines() if "| zo-full |" in line)
    assert line.endswith(f"| {rows['zo-full']['zo_rms_move']:.2e} |")
    assert len(list((root / "plots").glob("*rotten_tomatoes.png"))) == 1


def test_grid_edge_names_the_chosen_rates_at_their_grids_ends():
    def row(zo_lr, fo_lr):
        grid = [{"zo_lr": z, "fo_lr": f, "dev_accuracy": 0.5} for z in (1e-7, 1e-6, 1e-5) for f in (1e-4, 1e-3)]
        return {"learning_rates": {"zo_lr": zo_lr, "fo_lr": fo_lr}, "grid": grid}

    assert grid_edge(row(1e-7, 1e-3)) == "zo-lr smallest, fo-lr largest"
    assert grid_edge(row(1e-6, 1e-4)) == "fo-lr smallest"
    fo_lora = {"learning_rates": {"zo_lr": 1e-6, "fo_lr": 1e-3}, "grid": [{"fo_lr": 1e-3, "dev_accuracy": 0.5}]}
    assert grid_edge(fo_lora) == ""  # one value is no choice; zo_lr is not in its grid


def test_rerun_resumes_without_rerunning_finished_cells(finished, bench_file):
    bench, root = finished
    stamps = {p: p.stat().st_mtime_ns for p in (root / "cells").glob("**/eval.json")}
    run_bench(load_bench(bench_file), progress=False)
    assert {p: p.stat().st_mtime_ns for p in (root / "cells").glob("**/eval.json")} == stamps


@pytest.mark.parametrize("change, message", [({"seeds": [1, 0]}, "different seeds"),
                                             ({"train": {"steps": 3}}, "different train"),
                                             ({"lr_grid": {}}, "different lr_grid"),
                                             ({"isolate": True}, "with isolate False: cells run in the bench's own process")])
def test_changed_grid_in_the_same_directory_is_refused(finished, bench_file, tmp_path, capsys, change, message):
    spec = yaml.safe_load(bench_file.read_text()) | change
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec))
    assert main(["bench", "--config", str(changed), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_keep_models_may_change_in_the_same_directory(finished, bench_file, tmp_path):
    bench, root = finished
    stamps = {p: p.stat().st_mtime_ns for p in (root / "cells").glob("**/eval.json")}
    spec = yaml.safe_load(bench_file.read_text()) | {"keep_models": True}
    changed = tmp_path / "keep.yaml"
    changed.write_text(yaml.safe_dump(spec))
    assert main(["bench", "--config", str(changed), "--no-progress"]) == 0  # no finished cell read it
    assert {p: p.stat().st_mtime_ns for p in (root / "cells").glob("**/eval.json")} == stamps
    assert json.loads((root / "bench.json").read_text())["keep_models"] is True


def test_a_new_reference_reruns_nothing_and_pairs_against_it(finished, bench_file, tmp_path):
    root = shutil.copytree(finished[1], tmp_path / "reference")
    stamps = {p: p.stat().st_mtime_ns for p in (root / "cells").glob("**/eval.json")}
    spec = yaml.safe_load(bench_file.read_text()) | {"output_dir": str(root), "reference": "fo-full"}
    changed = tmp_path / "reference.yaml"
    changed.write_text(yaml.safe_dump(spec))
    run_bench(load_bench(changed), progress=False)
    assert {p: p.stat().st_mtime_ns for p in (root / "cells").glob("**/eval.json")} == stamps
    assert "Paired by seed against fo-full:" in (root / "results.md").read_text()
    assert json.loads((root / "bench.json").read_text())["reference"] == "fo-full"


def test_extended_grid_runs_only_the_new_cells(finished, bench_file, tmp_path):
    root = shutil.copytree(finished[1], tmp_path / "copy")
    stamps = {p: p.stat().st_mtime_ns for p in (root / "cells").glob("**/eval.json")}
    spec = yaml.safe_load(bench_file.read_text()) | {"output_dir": str(root)}
    spec["seeds"] = [*spec["seeds"], 7]
    extended = tmp_path / "extended.yaml"
    extended.write_text(yaml.safe_dump(spec))
    bench = load_bench(extended)
    run_bench(bench, progress=False)
    after = {p: p.stat().st_mtime_ns for p in (root / "cells").glob("**/eval.json")}
    assert {p: after[p] for p in stamps} == stamps  # finished cells untouched
    assert len(after) == len(stamps) + len(bench.models) * len(bench.tasks) * len(bench.methods)
    assert all("seed7" in str(p) for p in set(after) - set(stamps))


def test_what_only_a_method_without_cells_reads_may_change_and_nothing_else(finished, bench_file, tmp_path, capsys):
    root = shutil.copytree(finished[1], tmp_path / "unrun")
    stamps = {p: p.stat().st_mtime_ns for p in (root / "cells").glob("**/eval.json")}
    spec = yaml.safe_load(bench_file.read_text()) | {"output_dir": str(root)}
    for lr in (1e-2, 3e-2):  # lomo and the variant are not among the methods: no cell read their settings
        spec |= {"lr_grid": {**spec["lr_grid"], "lomo": {"fo-lr": [lr]}}, "per_method": {"lomo": {"fo-weight-decay": lr}},
                 "variants": {"lomo-long": {"method": "lomo", "steps": int(lr * 300)}}}
        run_bench(load_bench_spec(spec, tmp_path), progress=False)
    assert {p: p.stat().st_mtime_ns for p in (root / "cells").glob("**/eval.json")} == stamps
    saved = json.loads((root / "bench.json").read_text())
    assert saved["lr_grid"]["lomo"] == {"fo_lr": [3e-2]} and saved["variants"]["lomo-long"]["steps"] == 9
    spec["per_method"] = {"hybrid": {"fo-weight-decay": 0.1}}  # hybrid's cells ran without it
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec))
    assert main(["bench", "--config", str(changed), "--no-progress"]) == 2
    assert "different per_method" in capsys.readouterr().err


def test_progress_counts_only_cells_the_bench_will_run(finished, tmp_path):
    bench, done = finished
    root = shutil.copytree(done, tmp_path / "copy")
    assert finished_cells(bench, root) == count(bench)
    model, task = bench.models[0], bench.tasks[0]
    best = best_point(bench, root, model, task, "hybrid")
    other = next(lrs for lrs in lr_points(bench, "hybrid") if lrs != best)
    kept = root / "cells" / Cell(model, task, "hybrid", bench.seeds[1], other).name  # a seed at a point no longer chosen
    shutil.copytree(root / "cells" / Cell(model, task, "hybrid", bench.seeds[1], best).name, kept)
    assert len(list((root / "cells").glob("**/eval.json"))) == count(bench) + 1
    assert finished_cells(bench, root) == count(bench)
    shutil.rmtree(root / "cells" / Cell(model, task, "fo-lora", bench.seeds[1], best_point(bench, root, model, task, "fo-lora")).name)
    assert finished_cells(bench, root) == count(bench) - 1


def test_per_method_fields_reach_only_that_methods_cells_and_an_older_directory_stays_valid(finished, bench_file, tmp_path):
    root = shutil.copytree(finished[1], tmp_path / "copy")
    saved = json.loads((root / "bench.json").read_text())
    (root / "bench.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "per_method"}))  # before the field
    spec = yaml.safe_load(bench_file.read_text()) | {"output_dir": str(root)}
    run_bench(load_bench_spec(spec, tmp_path), progress=False)  # the same grid: accepted, nothing to run
    spec["per_method"] = {"zo-full": {"z-cache": True}}
    bench = load_bench_spec(spec, tmp_path)
    configs = {m: cell_config(bench, Cell(bench.models[0], "rotten_tomatoes", m, 0, ()), root) for m in bench.methods}
    assert configs["zo-full"].z_cache and not configs["hybrid"].z_cache
    assert main(["bench", "--config", str(tmp_path / "bench.yaml"), "--no-progress"]) == 2  # finished cells differ
    spec["per_method"] = {"zo-ful": {"z-cache": True}}
    with pytest.raises(ValueError, match="per_method: unknown method"):
        load_bench_spec(spec, tmp_path)


def load_bench_spec(spec, where):
    path = where / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_bench(path)


def test_plot_command_redraws_bench_and_run(finished, capsys):
    _, root = finished
    (root / "plots" / "accuracy.png").unlink()
    assert main(["plot", str(root)]) == 0
    assert (root / "plots" / "accuracy.png").exists()
    run_dir = next((root / "cells").glob("**/eval.json")).parent
    assert main(["plot", str(run_dir)]) == 0 and (run_dir / "loss.png").exists()
    assert main(["plot", str(root / "cells")]) == 2


def test_a_killed_cell_continues_from_its_checkpoint(bench_file, tmp_path):
    from hybridft.study.grid import cell_config
    from hybridft.run.train import train

    spec = yaml.safe_load(bench_file.read_text())
    spec.update(output_dir=str(tmp_path / "killed"), methods=["hybrid"], seeds=[0], lr_grid={})
    spec["train"].update({"checkpoint-every": 2, "keep-checkpoints": 2})
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(spec))
    bench = load_bench(path)
    cell = next(cells(bench, tmp_path / "killed"))
    out = tmp_path / "killed" / "cells" / cell.name
    train(cell_config(bench, cell, tmp_path / "killed"))
    (out / "eval.json").unlink()  # now it is what a cell killed after its step-2 checkpoint leaves
    shutil.rmtree(sorted((out / "checkpoints").iterdir())[-1])
    run_bench(bench, progress=False)
    assert "resuming" in (out / "log.txt").read_text()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (out / "checkpoints").exists() and not (out / "model").exists()  # keep_models is off


def test_isolated_cell_runs_in_its_own_process(bench_file, tmp_path):
    spec = yaml.safe_load(bench_file.read_text())
    spec.update(output_dir=str(tmp_path / "iso"), methods=["fo-lora"], seeds=[0], isolate=True, lr_grid={})
    path = tmp_path / "iso.yaml"
    path.write_text(yaml.safe_dump(spec))
    root = run_bench(load_bench(path), progress=False)
    row = json.loads((root / "results.json").read_text())[0]
    assert row["method"] == "fo-lora" and row["peak_memory_mib"] > 0


def test_unknown_bench_fields_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("output_dir: x\nmodels: [minilm]\ntasks: [rotten_tomatoes]\ntrain: {lerning_rate: 1}\n")
    assert main(["bench", "--config", str(path)]) == 2
    assert "lerning_rate" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_steps_to_target_and_smoothing():
    points = [(0, 0.0, 0.5), (10, 1.0, 0.7), (20, 2.0, 0.8)]
    assert steps_to(points, 0.7) == 10 and steps_to(points, 0.81) is None
    assert steps_to(points, 0.7, start=0.6) == 10 and steps_to(points, 0.7, start=0.7) is None  # nothing to reach
    assert smooth([1.0, 3.0, 5.0], 2).tolist() == [1.0, 2.0, 4.0]


def test_a_bar_group_measured_on_dev_says_so():
    rows = [{"model": "minilm", "task": "sst2", "method": "hybrid", "split": "test"},
            {"model": "minilm", "task": "rotten_tomatoes", "method": "hybrid", "split": "dev"},
            {"model": "minilm", "task": "rotten_tomatoes", "method": "fo-lora", "split": "dev"}]
    assert group_label(rows, "minilm", "sst2") == "minilm\nsst2"
    assert group_label(rows, "minilm", "rotten_tomatoes") == "minilm\nrotten_tomatoes (dev)"


@pytest.mark.parametrize("name", ["study-minilm.yaml", "study-smollm2.yaml"])
def test_the_study_configs_are_valid_grids(name):
    from pathlib import Path

    bench = load_bench(Path(__file__).parent.parent / "benchmarks" / name)
    assert set(bench.methods) == {"hybrid", "fo-lora", "fo-full", "zo-full", "zo-lora"} and len(bench.seeds) >= 3
    assert {"sst2", "wsc", "winogrande"} <= set(bench.tasks)
    assert all(len(lr_points(bench, m)) >= 2 for m in bench.methods)  # a grid per method, chosen on dev


@pytest.mark.parametrize("name", ["study-minilm.yaml", "study-smollm2.yaml"])
def test_the_committed_study_results_are_the_whole_grid_of_their_config(name):
    """BENCHMARKS.md reads the committed results as the finished study: every cell the config asks
    for has its eval.json, and the directory's bench.json records this very grid."""
    repo = Path(__file__).parent.parent
    bench = load_bench(repo / "benchmarks" / name)
    root = repo / bench.output_dir
    assert finished_cells(bench, root) == count(bench)
    saved = json.loads((root / "bench.json").read_text())
    assert (saved["models"], saved["tasks"], saved["methods"], saved["seeds"]) == \
        (list(bench.models), list(bench.tasks), list(bench.methods), list(bench.seeds))


def processes_running(needle: str) -> list[int]:
    """The pids whose command line contains ``needle`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
        except OSError:
            continue  # ended meanwhile
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the cell's process through /proc")
def test_sigterm_to_the_bench_stops_the_running_cell_at_a_checkpoint_then_the_bench(bench_file, tmp_path):
    spec = yaml.safe_load(bench_file.read_text()) | {"output_dir": str(tmp_path / "out"), "isolate": True}
    spec["train"] = spec["train"] | {"steps": 10_000}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(spec))
    bench = subprocess.Popen([sys.executable, "-m", "hybridft", "bench", "--config", str(tmp_path / "bench.yaml"),
                              "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    needle = f"{tmp_path}/out/cells/"
    try:
        deadline = time.monotonic() + 120
        while not (logs := list((tmp_path / "out" / "cells").rglob("metrics.jsonl"))) and time.monotonic() < deadline \
                and bench.poll() is None:
            time.sleep(0.1)
        assert logs and processes_running(needle), "no cell started training"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while processes_running(needle) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not processes_running(needle), "the cell kept training after its bench was terminated"
    finally:
        for pid in processes_running(needle):
            os.kill(pid, signal.SIGKILL)
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    cell = logs[0].parent
    steps = len(logs[0].read_text().splitlines())
    assert (cell / "checkpoints" / f"step-{steps:08d}").is_dir()  # the cell stopped at a checkpoint of its last step
    assert (cell / "log.txt").read_text().splitlines()[-1] == \
        f"stopped at step {steps} by SIGTERM; resume with hybridft train --resume {cell}"
    assert bench.stderr.read().strip().splitlines()[-1] == (f"bench stopped: cell {cell.relative_to(needle)} stopped by SIGTERM at its "
                                                            "last checkpoint; run the same hybridft bench command to continue")
    assert not (tmp_path / "out" / ".lock").exists() and not (cell / ".lock").exists()


def test_variants_run_as_their_method_with_their_settings_and_pair_against_the_reference(bench_file, tmp_path):
    spec = yaml.safe_load(bench_file.read_text()) | {
        "output_dir": str(tmp_path / "out"), "methods": ["fo-lora", "hybrid", "hybrid-lowrank"], "reference": "fo-lora",
        "variants": {"hybrid-lowrank": {"method": "hybrid", "zo-directions": "low-rank", "zo-rank": 1}},
        "per_method": {"hybrid": {"z-cache": True}}}
    spec["train"] |= {"steps": 2, "eval-every": 0}
    bench = load_bench_spec(spec, tmp_path)
    variant = cell_config(bench, Cell(bench.models[0], "rotten_tomatoes", "hybrid-lowrank", 0, ((("zo_lr", 1e-3),))), tmp_path)
    plain = cell_config(bench, Cell(bench.models[0], "rotten_tomatoes", "hybrid", 0, ()), tmp_path)
    assert (variant.method, variant.zo_directions, variant.zo_rank, variant.z_cache) == ("hybrid", "low-rank", 1, True)
    assert (plain.zo_directions, plain.z_cache) == ("dense", True)
    assert lr_points(bench, "hybrid-lowrank") == lr_points(bench, "hybrid")  # a variant without a grid uses its method's
    root = run_bench(bench, progress=False)
    ran = json.loads((root / "cells" / Cell(bench.models[0], "rotten_tomatoes", "hybrid-lowrank", 1,
                                             best_point(bench, root, bench.models[0], "rotten_tomatoes", "hybrid-lowrank")).name
                      / "config.json").read_text())
    assert (ran["method"], ran["zo_directions"], ran["zo_rank"]) == ("hybrid", "low-rank", 1)
    rows = {r["method"]: r for r in json.loads((root / "results.json").read_text())}
    assert rows["fo-lora"]["paired"] is None and set(rows) == {"fo-lora", "hybrid", "hybrid-lowrank"}
    for method in ("hybrid", "hybrid-lowrank"):
        p = rows[method]["paired"]
        expected = [rows[method]["per_seed"][str(s)] - rows["fo-lora"]["per_seed"][str(s)] for s in (0, 1)]
        assert p["against"] == "fo-lora" and p["seeds"] == [0, 1] and p["differences"] == pytest.approx(expected)
    assert "Paired by seed against fo-lora" in (root / "results.md").read_text()
    spec["variants"]["hybrid-lowrank"]["zo-rank"] = 2  # a variant whose cells ran may not change
    load_bench_spec(spec, tmp_path)
    assert main(["bench", "--config", str(tmp_path / "bench.yaml"), "--no-progress"]) == 2


@pytest.mark.parametrize("change, message", [
    ({"variants": {"hybrid": {"method": "hybrid"}}}, "variants.hybrid: a variant needs"),
    ({"variants": {"h2": {"method": "hybrd"}}}, "variants.h2: a variant needs"),
    ({"variants": {"h2": {"method": "hybrid", "zo-rnk": 2}}}, "variants.h2: unknown"),
    ({"reference": "fo-full"}, "reference: fo-full is not among"),
    ({"reference": "nope"}, "reference: unknown method"),
])
def test_bad_variants_and_references_are_refused(bench_file, tmp_path, change, message):
    spec = yaml.safe_load(bench_file.read_text()) | {"methods": ["hybrid", "fo-lora"]} | change
    with pytest.raises(ValueError, match=message):
        load_bench_spec(spec, tmp_path)


def test_interval95_is_the_t_interval():
    from hybridft.study.report import interval95

    low, high = interval95([1.0, 2.0, 3.0])  # mean 2, standard error 1/sqrt(3), t(2) = 4.303
    assert (low, high) == pytest.approx((2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5))
    assert interval95([0.5]) is None
