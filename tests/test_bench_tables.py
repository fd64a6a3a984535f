"""The paper's tables from a hand-made database, in markdown, CSV and LaTeX."""

from __future__ import annotations

import csv
import io

import pytest
import typer
from test_bench_store import CATEGORIES, MODELS, hand_made_db
from typer.testing import CliRunner

from vitqc.bench.store import open_store
from vitqc.bench.tables import (
    build_tables,
    latest_runs,
    mean_std,
    render_tables,
    table1,
    tables_backbones,
    tables_per_category,
)
from vitqc.errors import VitqcError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    db = hand_made_db(tmp_path_factory.mktemp("tables") / "h.sqlite")
    with open_store(db) as store:
        return store.runs()


def test_table1_sizes(runs):
    t = table1(runs)
    rows = {r[0]: r for r in t.rows}
    assert set(rows) == {
        "deit_base_distilled_patch16_224 i11",
        "efficientformer_l3 i3",
        "resnet50 i2+3+4",
    }
    assert t.columns[-3:] == ["flow params", "gmm params", "knn params"]
    deit = rows["deit_base_distilled_patch16_224 i11"]
    assert deit[1:4] == [86_000_000, [768], [14]]
    assert deit[4:] == [5_000_000, 30_000_000, None]  # no knn on DeiT


def test_tables_3_4_per_category(runs):
    tables = tables_per_category(runs)
    assert [t.title for t in tables] == [
        "Tables 3/4: mvtec, backbone deit_base_distilled_patch16_224, per category",
        "Tables 3/4: mvtec, backbone efficientformer_l3, per category",
        "Tables 3/4: mvtec, backbone resnet50, per category",
    ]
    deit = tables[0]
    assert deit.columns[:5] == [
        "category",
        "flow i11 image AUROC",
        "flow i11 pixel AUROC",
        "flow i11 AUPRO",
        "flow i11 image PR-AUC",
    ]
    assert [r[0] for r in deit.rows] == list(sorted(CATEGORIES))
    mean, std = deit.footer
    assert mean[0] == "mean" and std[0] == "std"
    assert mean[1] == pytest.approx(MODELS["deit_flow"]["image_auroc"])
    assert std[1] == pytest.approx(0.02)  # sample std of +-0.02, 0
    assert mean[5] == pytest.approx(MODELS["deit_gmm"]["image_auroc"])


def test_tables_3_4_one_table_per_input_size(runs):
    # a grid entry with its own input size (NAME:LAYERS@448) gets its own table; the
    # method columns there do not repeat the size
    deit = [r for r in runs if r["backbone"].startswith("deit")]
    big = [
        {**r, "id": 1000 + i, "config": {**r["config"], "image_size": 448}}
        for i, r in enumerate(deit)
    ]
    tables = tables_per_category(deit + big)
    assert [t.title.split(", ")[1] for t in tables] == [
        "backbone deit_base_distilled_patch16_224",
        "backbone deit_base_distilled_patch16_224 @448",
    ]
    assert tables[0].columns == tables[1].columns
    assert tables[1].columns[1] == "flow i11 image AUROC"
    assert tables[1].footer == tables[0].footer
    # elsewhere the size stays in the method's name
    side = tables_backbones(deit + big)[0]
    assert "image AUROC deit_base_distilled_patch16_224 i11 @448" in side.columns


def test_tables_5_6_backbones_side_by_side(runs):
    tables = tables_backbones(runs)
    assert [t.title for t in tables] == [
        "Tables 5/6: mvtec, head flow, backbones side by side"
    ]  # gmm and knn ran on one backbone only
    t = tables[0]
    assert t.columns[1:4] == [
        "image AUROC deit_base_distilled_patch16_224 i11",
        "image AUROC efficientformer_l3 i3",
        "image AUROC resnet50 i2+3+4",
    ]
    assert t.columns[4].startswith("AUPRO")
    assert t.footer[0][3] == pytest.approx(MODELS["resnet_flow"]["image_auroc"])


def test_render_all_formats(runs):
    tables = build_tables(runs)
    md = render_tables(tables, "md")
    assert "| category | flow i11 image AUROC |" in md
    assert "| grid | 95.00 |" in md
    assert "| **mean** | **95.00** |" in md
    assert "86M" in md

    text = render_tables(tables, "csv")
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert len(blocks) == len(tables)
    rows = list(csv.reader(io.StringIO(blocks[1])))
    assert rows[0][:2] == ["table", "category"]
    grid = next(r for r in rows if r[1] == "grid")
    assert float(grid[2]) == pytest.approx(95.0)
    t1 = list(csv.reader(io.StringIO(blocks[0])))
    assert t1[1][2] == "86000000" and t1[1][3] == "768"

    latex = render_tables(tables, "latex")
    assert latex.count(r"\begin{tabular}") == len(tables)
    assert r"deit\_base\_distilled\_patch16\_224" in latex
    assert r"\midrule" in latex and r"\bottomrule" in latex
    assert "95.00" in latex

    one = render_tables(build_tables(runs, "6"), "md")
    assert "Tables 5/6" in one and "Table 1" not in one
    with pytest.raises(VitqcError, match="--table"):
        build_tables(runs, "2")
    with pytest.raises(VitqcError, match="--format"):
        render_tables(tables, "html")


def test_latest_run_wins_and_mean_std():
    a = {"id": 1, "dataset": "d", "category": "c", "backbone": "b", "head": "h", "x": 1}
    b = {**a, "id": 2, "x": 2}
    assert latest_runs([b, a]) == [b]
    assert latest_runs([{**a, "status": "error"}]) == []
    assert mean_std([None]) == (None, None)
    assert mean_std([0.5, None]) == (0.5, None)


def test_tables_cli(tmp_path):
    from vitqc.cli_bench import register

    db = hand_made_db(tmp_path / "h.sqlite", models=("deit_flow", "eff_flow"))
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    for fmt in ("md", "csv", "latex"):
        result = runner.invoke(app, ["tables", str(db), "--format", fmt])
        assert result.exit_code == 0, result.output
        assert "efficientformer" in result.output
    out = tmp_path / "t.tex"
    result = runner.invoke(app, ["tables", str(db), "--format", "latex", "--out", str(out)])
    assert result.exit_code == 0 and r"\toprule" in out.read_text()
    result = runner.invoke(app, ["tables", str(tmp_path / "none.sqlite")])
    assert result.exit_code != 0
    assert isinstance(result.exception, VitqcError)
