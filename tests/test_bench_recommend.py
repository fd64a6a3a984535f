"""Section 4.4 as code: the recommendation picks the expected model on a hand-made database."""

from __future__ import annotations

import json

import pytest
import typer
from test_bench_store import hand_made_db, make_run
from typer.testing import CliRunner

from vitqc.bench.recommend import (
    ModelSummary,
    format_recommendation,
    pareto_front,
    parse_count,
    recommend,
)
from vitqc.bench.store import open_store
from vitqc.errors import VitqcError

DEIT_FLOW = "flow / deit_base_distilled_patch16_224 i11"
DEIT_GMM = "gmm / deit_base_distilled_patch16_224 i11"
EFF_FLOW = "flow / efficientformer_l3 i3"
EFF_KNN = "knn / efficientformer_l3 i3"
RESNET_FLOW = "flow / resnet50 i2+3+4"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    db = hand_made_db(tmp_path_factory.mktemp("rec") / "h.sqlite")
    with open_store(db) as store:
        return store.runs()


def _chosen(rec) -> str:
    assert rec.chosen is not None, rec.reasons
    return rec.chosen.label


def test_priority_picks_the_metric(runs):
    assert _chosen(recommend(runs, "recall")) == DEIT_FLOW
    assert _chosen(recommend(runs, "precision")) == DEIT_GMM
    assert _chosen(recommend(runs, "localization")) == EFF_KNN


def test_constraints_and_front(runs):
    rec = recommend(runs, "recall", max_latency_ms=20)
    assert _chosen(rec) == EFF_FLOW
    excluded = {m.label: m.excluded for m in rec.models if not m.feasible}
    assert excluded[DEIT_FLOW] == "40.0 ms > 20 ms"
    # resnet is slower, bigger and less accurate than EfficientFormer+flow: not on the front
    assert [m.label for m in rec.front] == [EFF_FLOW]
    assert RESNET_FLOW not in excluded

    rec = recommend(runs, "recall", max_params=50_000_000)
    assert _chosen(rec) == EFF_FLOW
    assert {m.label: m.excluded for m in rec.models}[DEIT_FLOW] == "91M params > 50M"

    rec = recommend(runs, "recall")
    front = [m.label for m in rec.front]
    assert front[0] == DEIT_FLOW and EFF_FLOW in front and RESNET_FLOW not in front
    text = format_recommendation(rec)
    assert "Recommendation: " + DEIT_FLOW in text
    assert "95.00%" in text and "40.0 ms" in text
    assert "image AUROC" in text and "section 4.4" in text
    assert "faster" in text  # the trade-off against EfficientFormer is spelled out

    rec = recommend(runs, "recall", max_params=1_000_000)
    assert rec.chosen is None
    assert "relax" in rec.reasons[-1]


def test_device_filter(runs):
    with pytest.raises(VitqcError, match="cuda"):
        recommend(runs, "recall", device="cuda")
    assert _chosen(recommend(runs, "recall", device="cpu")) == DEIT_FLOW


def test_tie_goes_to_the_faster_model(tmp_path):
    with open_store(tmp_path / "t.sqlite") as store:
        for name, ms in (("deit_flow", 40.0), ("eff_flow", 12.0)):
            run = make_run(name, "grid", image_auroc=0.9, pipeline_ms_b1=ms)
            # make the slower one smaller, so both are on the front
            if name == "deit_flow":
                run["backbone_params"] = 1_000
            store.record(run)
        runs = store.runs()
    rec = recommend(runs, "recall")
    assert len(rec.front) == 2
    assert _chosen(rec) == EFF_FLOW


def test_common_categories_only(tmp_path):
    """A model run on an easy extra category is not ranked on it."""
    with open_store(tmp_path / "c.sqlite") as store:
        store.record(make_run("deit_flow", "grid", image_auroc=0.8))
        store.record(make_run("eff_flow", "grid", image_auroc=0.7))
        store.record(make_run("eff_flow", "carpet", image_auroc=1.0))
        runs = store.runs()
    rec = recommend(runs, "recall")
    assert rec.cells == [("mvtec", "grid")]
    assert _chosen(rec) == DEIT_FLOW


def test_pareto_and_parse_count():
    a = ModelSummary("a", "h", "b", "cpu", accuracy=0.9, latency_ms=10, params=10)
    b = ModelSummary("b", "h", "b", "cpu", accuracy=0.8, latency_ms=20, params=20)
    c = ModelSummary("c", "h", "b", "cpu", accuracy=0.95, latency_ms=30, params=5)
    assert [m.label for m in pareto_front([a, b, c])] == ["c", "a"]
    assert parse_count("30M") == 30_000_000
    assert parse_count("1.5k") == 1500
    assert parse_count("123") == 123
    with pytest.raises(VitqcError, match="max-params"):
        parse_count("lots")
    with pytest.raises(VitqcError, match="priority"):
        recommend([make_run("deit_flow", "grid")], "speed")


def test_recommend_cli(tmp_path):
    from vitqc.cli_bench import register

    db = hand_made_db(tmp_path / "h.sqlite")
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    result = runner.invoke(
        app, ["recommend", str(db), "--priority", "recall", "--max-latency-ms", "20"]
    )
    assert result.exit_code == 0, result.output
    assert "Recommendation: " + EFF_FLOW in result.output
    result = runner.invoke(
        app, ["recommend", str(db), "--priority", "localization", "--max-params", "45M", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["chosen"]["label"] == EFF_KNN and data["metric"] == "aupro"
    result = runner.invoke(app, ["recommend", str(db), "--max-params", "1M"])
    assert result.exit_code == 1
