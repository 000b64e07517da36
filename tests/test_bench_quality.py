"""bench quality: Δm by hand with mixed metric directions, the resumable cell store, the quick suite."""

import csv

import pytest

from polytask.bench import cells as store
from polytask.bench import quality
from polytask.bench.cells import Cell, CellKey
from polytask.core.errors import DataError, InvalidParameterError
from polytask.metrics.delta_m import delta_m


def test_delta_m_mixed_directions_by_hand():
    # accuracy 0.80 -> 0.90: +12.5 %; rmse 2.0 -> 1.8 (lower is better): +10 %;
    # mae 0.5 -> 0.6 (worse): -20 %; mean (12.5 + 10 - 20) / 3 = 0.8333... %
    stl = {"a": {"accuracy": 0.80}, "b": {"rmse": 2.0}, "c": {"mae": 0.5}}
    mtl = {"a": {"accuracy": 0.90}, "b": {"rmse": 1.8}, "c": {"mae": 0.6}}
    main = {"a": "accuracy", "b": "rmse", "c": "mae"}
    assert delta_m(mtl, stl, main) == pytest.approx(2.5 / 3)
    assert delta_m(stl, stl, main) == 0.0


def _cell(dataset, kind, method, seed, metrics, scope="all", architecture="hard_sharing"):
    return Cell(CellKey(dataset, kind, method, architecture, seed, scope), metrics, 3, 1.5, 60.0, tuple(metrics))


def test_summary_delta_m_against_same_seed_baselines(tmp_path):
    path = tmp_path / "cells.csv"
    main = {"income": "accuracy", "marital": "accuracy"}
    for seed, base in ((0, 0.8), (1, 0.5)):
        store.append(path, _cell("adult", "single_task", "equal", seed, {"income": {"accuracy": base}}, "income"))
        store.append(path, _cell("adult", "single_task", "equal", seed, {"marital": {"accuracy": base}}, "marital"))
        store.append(path, _cell("adult", "multi_task", "famo", seed,
                                 {"income": {"accuracy": base * 1.1}, "marital": {"accuracy": base}}))
    rows, baselines = quality.summarise(store.read(path), "adult", main)
    famo = next(r for r in rows if r.label == "famo")
    assert famo.delta_m == pytest.approx([5.0, 5.0])  # +10 % on one task of two, each seed against its own
    assert sorted(baselines) == [0, 1]
    table = quality.markdown(store.read(path), ["adult"], csv_name="cells.csv", suite=quality.FULL)
    assert "| adult | 2 | famo | 5 ± 0 |" in table and "| famo | losses | 5 ± 0 |" in table


def test_cells_read_back_torn_and_repeated(tmp_path):
    path = tmp_path / "cells.csv"
    first = _cell("yeast", "multi_task", "equal", 0, {"class1": {"accuracy": 0.7}, "class2": {"accuracy": 0.6}})
    store.append(path, first)
    with path.open("a") as handle:  # a second cell killed in the middle of its first row
        handle.write("yeast,multi_task,famo,hard_sharing,0,all,class1,accu")
    cells = store.read(path)
    assert list(cells) == [first.key] and cells[first.key].metrics == first.metrics
    again = _cell("yeast", "multi_task", "famo", 0, {"class1": {"accuracy": 0.5}, "class2": {"accuracy": 0.4}})
    store.append(path, again)  # continues on a new line, not on the torn one
    cells = store.read(path)
    assert cells[again.key].metrics == again.metrics and len(cells) == 2
    assert store.finished(cells, again.key, ["class1", "class2"])
    assert not store.finished(cells, again.key, ["class1", "class3"])
    rerun = _cell("yeast", "multi_task", "equal", 0, {"class1": {"accuracy": 0.71}, "class2": {"accuracy": 0.61}})
    store.append(path, rerun)  # the same cell written again: the last complete copy wins
    assert store.read(path)[first.key].metrics["class1"]["accuracy"] == 0.71


def test_cells_refuse_another_csv(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("dataset,method,heads,seed\nadult,mgda,weighted,0\n")
    with pytest.raises(DataError, match="not a bench quality CSV"):
        store.read(path)


def test_plan_checks_names(tmp_path):
    with pytest.raises(InvalidParameterError, match="no data set 'qm8'.*qm9"):
        quality.plan("quick", ["qm8"], None, None, tmp_path / "x.csv")
    with pytest.raises(InvalidParameterError, match="--suite must be one of quick, full"):
        quality.plan("medium", None, None, None, tmp_path / "x.csv")
    p = quality.plan("full", ["qm9"], None, 3, tmp_path / "x.csv")
    keys = quality._keys(p)
    # 12 single-task baselines, the LightGBM reference, 15 methods, MMoE and a wider trunk, for each of 3 seeds
    assert len(keys) == 3 * (12 + 1 + 15 + 2)


def test_runner_skips_finished_cells(tmp_path):
    # a CSV that already holds every cell of the quick suite: nothing is trained, nothing written
    path = tmp_path / "done.csv"
    p = quality.plan("quick", None, None, None, path)
    for key, tasks in quality._keys(p):
        store.append(path, Cell(key, {t: {"rmse" if t == "price" else "accuracy": 0.5} for t in tasks}, 1, 0.0, 10.0))
    before = path.read_bytes()
    lines = []
    quality.run(quality.plan("quick", None, None, None, path), echo=lines.append)
    assert path.read_bytes() == before
    assert lines[0].endswith(f"{len(quality._keys(p))} finished in {path}, 0 to train")


@pytest.mark.slow
def test_quick_suite_trains_then_resumes(tmp_path):
    path = tmp_path / "quick.csv"
    lines = []
    cells = quality.run(quality.plan("quick", None, None, None, path), echo=lines.append)
    expected = quality._keys(quality.plan("quick", None, None, None, path))
    assert len(cells) == len(expected) == 7  # 4 single-task, LightGBM, equal, uncertainty
    assert sum(line.startswith("[") for line in lines) == 7
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["kind"] for r in rows} == {"single_task", "reference", "multi_task"}
    # drop the last cell's rows (as if killed before it was written): only that cell trains again
    kept = [r for r in rows if r["method"] != "uncertainty"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=store.FIELDS)
        writer.writeheader()
        writer.writerows(kept)
    lines.clear()
    quality.run(quality.plan("quick", None, None, None, path), echo=lines.append)
    trained = [line for line in lines if line.startswith("[")]
    assert len(trained) == 1 and "uncertainty" in trained[0]
    table = quality.markdown(store.read(path), ["diamonds"], csv_name="quick.csv", suite=quality.QUICK)
    assert "| lightgbm |" in table and "price rmse ↓" in table


def test_normalized_mutual_information_by_hand():
    import numpy as np

    a = np.array([0, 0, 1, 1])
    assert quality.normalized_mutual_information(a, np.array([7, 7, 3, 3])) == pytest.approx(1.0)  # a relabelling
    assert quality.normalized_mutual_information(a, np.array([0, 1, 0, 1])) == pytest.approx(0.0)  # independent
    assert quality.normalized_mutual_information(a, np.zeros(4)) == 0.0  # a constant label carries nothing
    # a = [0,0,1,1], b = [0,1,1,1]: I = H(b) - H(b|a) = 0.5623 - 0.3466 nats, H(a) = ln 2
    b = np.array([0, 1, 1, 1])
    ha, hb = np.log(2), -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    mutual = hb - 0.5 * np.log(2)
    assert quality.normalized_mutual_information(a, b) == pytest.approx(mutual / np.sqrt(ha * hb))


def test_group_columns_score_subsets_of_the_tasks(tmp_path):
    path = tmp_path / "cells.csv"
    names = list(quality.main_metrics("qm9"))
    base = {t: {"mae": 1.0} for t in names}
    for t in names:
        store.append(path, _cell("qm9", "single_task", "equal", 0, {t: base[t]}, t))
    worse_energies = {t: {"mae": 2.0 if t in ("u0", "u", "h", "g") else 1.0} for t in names}
    store.append(path, _cell("qm9", "multi_task", "equal", 0, worse_energies))
    table = quality.markdown(store.read(path), ["qm9"], csv_name="cells.csv", suite=quality.FULL)
    # energies 100 % worse, the other eight unchanged: overall (4 × -100) / 12
    assert "| equal | losses | -33.3 ± 0 | -100 ± 0 | 0 ± 0 |" in table


def test_cli_writes_the_table_from_the_csv(tmp_path, capsys):
    from polytask.cli.main import main

    path, md = tmp_path / "cells.csv", tmp_path / "bench.md"
    for seed in (0, 1):
        for task in ("income", "marital"):
            store.append(path, _cell("adult", "single_task", "equal", seed, {task: {"accuracy": 0.8}}, task))
        store.append(path, _cell("adult", "multi_task", "equal", seed,
                                 {"income": {"accuracy": 0.84}, "marital": {"accuracy": 0.8}}))
    assert main(["bench", "quality", "--suite", "full", "--table-only", "--csv", str(path), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "[`cells.csv`](cells.csv)" in text and "| adult | 2 | equal | 2.5 ± 0 |" in text
    assert main(["bench", "quality", "--datasets", "qm8", "--csv", str(path)]) == 2
    assert "no data set 'qm8'" in capsys.readouterr().err
