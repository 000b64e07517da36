"""`polytask report` and `polytask inspect` on real runs: sections, missing logs, errors, configs per group."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from polytask.cli.main import main
from polytask.diagnostics.report import SECTIONS, write_report


def _config(tmp_path, name, **extra):
    cfg = {"seed": 0, "output_dir": str(tmp_path / name),
           "data": {"dataset": "adult", "options": {"rows": 800}},
           "tasks": {"income": {"kind": "binary"}, "marital": {"kind": "binary"}, "hours": {"kind": "regression"}},
           "model": {"architecture": "hard_sharing", "encoder": {"name": "mlp", "hidden": [16]}},
           "method": "equal", "train": {"epochs": 2, "batch_size": 100}, "run": {"progress": False}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A diagnosed run (affinity, health, gradient method) and a bare one."""
    tmp = tmp_path_factory.mktemp("runs")
    full = _config(tmp, "full", method="mgda", health={"every": 2},
                   callbacks=[{"name": "diagnostics", "affinity_every": 2}])
    bare = _config(tmp, "bare")
    assert main(["train", str(full)]) == 0
    assert main(["train", str(bare)]) == 0
    return tmp / "full", tmp / "bare"


def _sections(page: str) -> dict[str, str]:
    found = dict(re.findall(r'<section id="(\w+)" data-section="\w+">(.*?)</section>', page, flags=re.S))
    assert list(found) == [anchor for anchor, _ in SECTIONS]
    return found


@pytest.mark.slow  # two short trainings in the module fixture
def test_report_of_a_diagnosed_run_fills_every_section(runs, tmp_path):
    full, _ = runs
    out = write_report([full], tmp_path / "r.html")
    page = out.read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained, static
    sections = _sections(page)
    for anchor in ("curves", "weights", "conflict", "affinity", "health"):
        assert "data:image/png;base64," in sections[anchor], anchor
    for anchor in ("metrics", "conflict", "grouping"):
        assert "<tbody><tr>" in sections[anchor], anchor
    assert 'class="missing"' not in page.replace(sections["comparison"], "")
    assert "No Δm: this run has no single-task baselines" in sections["metrics"]
    assert "best split into at most B groups (TAG affinity)" in sections["grouping"]


@pytest.mark.slow  # two short trainings in the module fixture
def test_sections_without_their_logs_say_what_to_enable_and_the_page_still_renders(runs, tmp_path):
    full, bare = runs
    page = write_report([bare, full], tmp_path / "two.html").read_text()
    sections = _sections(page)
    assert 'data-missing="conflict"' in sections["conflict"] and "health.every" in sections["conflict"]
    assert 'data-missing="affinity"' in sections["affinity"] and "affinity_every: 10" in sections["affinity"]
    assert 'data-missing="health"' in sections["health"] and "set `health.every: N`" in sections["health"]
    assert "<b>bare</b>" in sections["affinity"] and "data:image/png" in sections["affinity"]  # the full run still drawn
    comparison = sections["comparison"]
    assert "<td>bare</td>" in comparison and "<td>full</td>" in comparison and "data:image/png" in comparison


def test_report_of_a_folder_without_a_run_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no polytask run" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report.html").exists()


def test_nonexistent_run_message(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert f"run directory '{tmp_path / 'nope'}' does not exist" in err


@pytest.mark.slow  # two short trainings in the module fixture
def test_damaged_summary_is_a_data_error_naming_the_file(runs, tmp_path, capsys):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(runs[1], copy)
    (copy / "summary.json").write_text("{not json")
    assert main(["report", str(copy)]) == 2
    assert "summary.json is not valid JSON" in capsys.readouterr().err


@pytest.mark.slow  # two short trainings in the module fixture
def test_inspect_prints_groups_and_writes_a_config_per_group_that_trains(runs, tmp_path, capsys):
    full, bare = runs
    assert main(["inspect", str(full), "--groups", "3", "--write-configs", str(tmp_path / "cfg")]) == 0
    out = capsys.readouterr().out
    assert "TAG affinity (row: source task, column: target task)" in out and "best split into at most 3 groups" in out
    written = sorted((tmp_path / "cfg").glob("group-*.yaml"))
    groups = [list(yaml.safe_load(p.read_text())["tasks"]) for p in written]
    assert sorted(t for g in groups for t in g) == ["hours", "income", "marital"]
    one = yaml.safe_load(written[0].read_text())
    assert one["output_dir"].endswith("full-group-1") and "in_features" not in one["model"]["encoder"]
    one["output_dir"] = str(tmp_path / "g1")
    one["train"]["epochs"] = 1
    one["callbacks"] = []
    (tmp_path / "g1.yaml").write_text(yaml.safe_dump(one))
    assert main(["train", str(tmp_path / "g1.yaml")]) == 0  # the written config is a valid config
    assert list(json.loads((tmp_path / "g1" / "summary.json").read_text())["tasks"]) == groups[0]


@pytest.mark.slow  # two short trainings in the module fixture
def test_inspect_without_affinity_says_how_to_get_it(runs, capsys):
    _, bare = runs
    assert main(["inspect", str(bare), "--groups", "2"]) == 2
    assert "affinity_every: 10" in capsys.readouterr().err
