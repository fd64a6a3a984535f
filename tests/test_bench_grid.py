"""The benchmark grid: a tiny real grid through the CLI (synthetic data, a random
test-sized timm backbone, one epoch), resuming, failing cells, interruptions, presets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from vitqc.bench.grid import (
    PRESETS,
    BackboneChoice,
    Cell,
    GridSpec,
    expand_grid,
    feature_key,
    load_config_file,
    merged_config,
    run_grid,
    spec_from_config,
)
from vitqc.bench.store import open_store
from vitqc.errors import VitqcError
from vitqc.heads import parse_head

GRID_CONFIG = {
    "backbones": [
        {"name": "test_resnet", "weights": "random"},
        "no_such_backbone",
        {"name": "test_resnet", "weights": "random", "image_size": 96, "heads": ["flow"]},
    ],
    "heads": ["flow", "gmm", "gmm:conditioning=embedding"],
    "epochs": 1,
    "patience": 1,
    "head_options": {"flow": {"steps": 2}, "gmm": {"n_components": 4}},
    "timing_repeats": 1,
    "timing_min_seconds": 0.0,
    "gallery_good": 1,
    "gallery_defective": 2,
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from vitqc.data.synth import generate_synthetic

    root = tmp_path_factory.mktemp("grid-data") / "synth"
    generate_synthetic(root, n_train=10, n_test_good=3, n_test_defective=4, size=64, seed=1)
    return root


def _app() -> typer.Typer:
    from vitqc.cli_bench import register

    app = typer.Typer()
    register(app)
    return app


@pytest.fixture(scope="module")
def real_grid(data_root, tmp_path_factory) -> dict[str, Any]:
    """Run the tiny grid once through ``vitqc benchmark --config``."""
    tmp = tmp_path_factory.mktemp("grid")
    config = tmp / "grid.yaml"
    config.write_text(
        yaml.safe_dump({**GRID_CONFIG, "data": [os.path.relpath(data_root, tmp)]}),
        encoding="utf-8",
    )
    db = tmp / "results.sqlite"
    args = ["benchmark", "--config", str(config), "--db", str(db), "--cache-dir", str(tmp / "c")]
    result = CliRunner().invoke(_app(), args)
    return {"db": db, "config": config, "args": args, "result": result, "tmp": tmp}


def test_tiny_grid_fills_the_database(real_grid):
    result = real_grid["result"]
    assert result.exit_code == 1, result.output  # two cells fail on purpose
    assert "7 cells: 4 ran ok, 3 failed" in result.output
    with open_store(real_grid["db"], create=False) as store:
        assert store.integrity_ok()
        ok = store.runs("ok")
        errors = store.runs("error")
        root = store.artifacts_dir
    # heads of one backbone back to back; a variant is its own method, and so is a size
    assert [r["head"] for r in ok] == ["flow", "gmm", "gmm:conditioning=embedding", "flow"]
    assert [r["config"]["head_options"].get("conditioning") for r in ok[1:3]] == [
        None,
        "embedding",
    ]
    assert [r["input_size"] for r in ok] == [[160, 160]] * 3 + [[96, 96]]
    assert ok[3]["config"]["image_size"] == 96 and "image_size" not in ok[0]["config"]
    assert "@96" in ok[3]["method"] and "@" not in ok[0]["method"]
    assert len(errors) == 3 and all("no_such_backbone" in e["error"] for e in errors)
    assert all(e["backbone"] == "no_such_backbone" for e in errors)
    for run in ok:
        assert run["dataset"] == "synth" and run["category"] == "tile"
        assert run["backbone"] == "test_resnet" and run["weights"] == "random"
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_prauc", "threshold"):
            assert run[key] is not None and 0 <= run[key] <= 1 or key == "threshold"
        assert run["metrics"]["n_test"] == 7
        assert set(run["per_defect"]) == set(run["metrics"]["per_defect_type"])
        for defect_type, figures in run["per_defect"].items():
            measured = run["metrics"]["per_defect_type"][defect_type]
            for key in ("image_auroc", "pixel_auroc", "aupro"):
                assert 0 <= figures[key] <= 1 and figures[key] == measured[key], key
        assert run["feature_seconds"] > 0 and run["head_seconds"] > 0
        for col in ("backbone_ms_b1", "backbone_ms_b32", "pipeline_ms_b1", "pipeline_ms_b32"):
            assert run[col] > 0, col
        assert run["backbone_params"] > 0 and run["head_params"] > 0
        assert run["bundle_bytes"] > 0
        assert run["feature_channels"]
        assert run["cpu_model"] and run["threads"] >= 1 and run["device"] == "cpu"
        assert run["torch_version"] and run["vitqc_version"] and run["created_at"]
        assert run["config"]["epochs"] == 1
        assert run["config"]["head"] == run["head"].partition(":")[0]
        curves = json.loads((root / run["artifacts"] / "curves.json").read_text())
        assert {"roc", "pr", "pro", "gallery"} <= set(curves)
        assert len(curves["gallery"]) == 3
        for entry in curves["gallery"]:
            assert (root / entry["overlay"]).is_file() and (root / entry["image"]).is_file()
    # the second head read the first head's features from the cache
    assert [r["features_reused"] for r in ok] == [0, 1, 1, 0]
    assert not list(root.glob(".bundle-*")), "temporary bundles are removed"


def test_rerun_skips_and_retry_failed(real_grid):
    with open_store(real_grid["db"]) as store:
        before = {r["cell_key"]: r["id"] for r in store.runs(None)}
    runner = CliRunner()
    result = runner.invoke(_app(), real_grid["args"])
    assert result.exit_code == 0, result.output
    assert "resuming: 4 cells done, 3 failed earlier" in result.output
    with open_store(real_grid["db"]) as store:
        assert {r["cell_key"]: r["id"] for r in store.runs(None)} == before

    result = runner.invoke(_app(), [*real_grid["args"], "--retry-failed"])
    assert result.exit_code == 1
    with open_store(real_grid["db"]) as store:
        after = {r["cell_key"]: (r["id"], r["status"]) for r in store.runs(None)}
    assert set(after) == set(before)
    for key, (run_id, status) in after.items():
        assert (run_id == before[key]) == (status == "ok")  # only failed cells reran


def test_tables_and_report_from_the_real_grid(real_grid, tmp_path):
    runner = CliRunner()
    result = runner.invoke(_app(), ["tables", str(real_grid["db"])])
    assert result.exit_code == 0 and "test_resnet i2+3 (random)" in result.output
    result = runner.invoke(_app(), ["recommend", str(real_grid["db"])])
    assert result.exit_code == 0 and "Recommendation: " in result.output
    out = tmp_path / "r.html"
    result = runner.invoke(_app(), ["report", str(real_grid["db"]), "--out", str(out)])
    assert result.exit_code == 0
    html = out.read_text()
    assert "gallery synth tile" in html and "curves synth tile" in html


# --------------------------------------------------------------------------- stub cells


def fake_cell(cell: Cell, spec: GridSpec, dataset: Any, *args: Any, **kwargs: Any):
    """The row a cell would write, without fitting anything (for resume/interrupt tests)."""
    row = {
        "dataset": dataset.name,
        "category": dataset.category,
        "backbone": cell.backbone.name,
        "head": cell.head,
        "method": f"{cell.head} / {cell.backbone.name}",
        "image_auroc": 0.5,
    }
    return row, {"a": {"image_auroc": 0.1}, "b": {"image_auroc": 0.2}, "c": {"image_auroc": 0.3}}


def stub_spec(data_root: Path, n_backbones: int = 3) -> GridSpec:
    return GridSpec(
        data=[data_root],
        backbones=[BackboneChoice(f"bb{i}") for i in range(n_backbones)],
        heads=["flow", "gmm"],
        epochs=1,
    )


def test_interrupt_mid_grid_leaves_a_consistent_database(data_root, tmp_path):
    db = tmp_path / "i.sqlite"
    spec = stub_spec(data_root)
    calls: list[str] = []
    interrupt_at = [3]

    def interrupting(cell, *args, **kwargs):
        calls.append(cell.label())
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt
        return fake_cell(cell, *args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run_grid(spec, db, progress=False, cell_runner=interrupting)
    with open_store(db) as store:
        assert store.integrity_ok()
        assert store.counts() == {"ok": 2, "error": 0}
        assert all(len(r["per_defect"]) == 3 for r in store.runs())

    calls.clear()
    interrupt_at[0] = -1
    summary = run_grid(spec, db, progress=False, cell_runner=interrupting)
    assert summary.skipped == 2 and summary.ok == 4 and len(calls) == 4


def test_failing_cell_is_recorded_and_the_grid_goes_on(data_root, tmp_path):
    def failing(cell, *args, **kwargs):
        if cell.backbone.name == "bb1" and cell.head == "gmm":
            raise RuntimeError("out of memory")
        return fake_cell(cell, *args, **kwargs)

    db = tmp_path / "f.sqlite"
    summary = run_grid(stub_spec(data_root), db, progress=False, cell_runner=failing)
    assert (summary.ok, summary.failed) == (5, 1)
    with open_store(db) as store:
        (err,) = store.runs("error")
    assert err["backbone"] == "bb1" and err["head"] == "gmm"
    assert err["error"].startswith("RuntimeError: out of memory (at test_bench_grid.py:")
    assert err["per_defect"] == {} and err["image_auroc"] is None


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_bench_grid import fake_cell, stub_spec
from vitqc.bench.grid import run_grid

def slow_cell(*args, **kwargs):
    time.sleep(0.02)
    return fake_cell(*args, **kwargs)

run_grid(stub_spec(Path({data!r}), 60), {db!r}, progress=False, cell_runner=slow_cell)
"""


def test_hard_kill_mid_grid_leaves_whole_rows(data_root, tmp_path):
    """SIGKILL while cells are being written: SQLite's journal rolls the half cell back."""
    db = tmp_path / "k.sqlite"
    script = tmp_path / "run.py"
    tests = str(Path(__file__).parent)
    script.write_text(KILL_SCRIPT.format(tests=tests, data=str(data_root), db=str(db)))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                with open_store(db) as store:
                    if store.counts()["ok"] >= 5:
                        break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    with open_store(db) as store:
        assert store.integrity_ok()
        runs = store.runs()
        assert 5 <= len(runs) < 120
        assert all(len(r["per_defect"]) == 3 for r in runs)
    summary = run_grid(stub_spec(data_root, 60), db, progress=False, cell_runner=fake_cell)
    assert summary.skipped == len(runs) and summary.skipped + summary.ok == 120


# --------------------------------------------------------------------------- config


def test_backbone_choices_and_cell_keys(data_root):
    assert BackboneChoice.parse("resnet50:3+4") == BackboneChoice("resnet50", (3, 4))
    assert BackboneChoice.parse({"name": "deit", "layers": [7], "heads": "flow"}) == (
        BackboneChoice("deit", (7,), None, ("flow",))
    )
    with pytest.raises(VitqcError, match="layers"):
        BackboneChoice.parse("resnet50:x")
    assert BackboneChoice.parse("dino:7@448") == BackboneChoice("dino", (7,), image_size=448)
    assert BackboneChoice.parse("dino@448").label() == "dino @448"
    with pytest.raises(VitqcError, match="image size of backbone 'dino'"):
        BackboneChoice.parse("dino:7@big")
    with pytest.raises(VitqcError, match="image size"):
        BackboneChoice.parse({"name": "dino", "image_size": 0})
    spec = stub_spec(data_root, 2)
    cells = expand_grid(spec)
    assert [c.label() for c in cells] == [
        "tile | bb0 | flow",
        "tile | bb0 | gmm",
        "tile | bb1 | flow",
        "tile | bb1 | gmm",
    ]
    key = cells[0].key(spec)
    assert key == cells[0].key(stub_spec(data_root, 2))
    spec.epochs = 2
    assert cells[0].key(spec) != key
    with pytest.raises(VitqcError, match="categories"):
        expand_grid(GridSpec([data_root], [BackboneChoice("b")], ["flow"], categories=["x"]))


def test_head_variants():
    assert parse_head("knn") == ("knn", {})
    assert parse_head("knn:coreset_ratio=0.01+neighbourhood=1") == (
        "knn",
        {"coreset_ratio": 0.01, "neighbourhood": 1},
    )
    assert parse_head("gmm:conditioning=embedding") == ("gmm", {"conditioning": "embedding"})
    with pytest.raises(VitqcError, match="unknown head 'gnm'"):
        parse_head("gnm")
    with pytest.raises(VitqcError, match=r"head variant 'gmm:colour=red'.*n_components"):
        parse_head("gmm:colour=red")
    # VT-ADL takes its sizes as **options (preset defaults): those names are accepted too
    assert parse_head("vtadl:patch_size=32+reduction=sum+preset=cpu") == (
        "vtadl",
        {"patch_size": 32, "reduction": "sum", "preset": "cpu"},
    )
    with pytest.raises(VitqcError, match=r"vtadl:patch=32.*patch_size"):
        parse_head("vtadl:patch=32")
    with pytest.raises(VitqcError, match="unknown head"):
        spec_from_config({"data": ".", "backbones": "a", "heads": "flow,nope:x=1"})
    base = {"data": ".", "backbones": "a", "heads": "flow"}
    assert spec_from_config({**base, "image_score": "top:0.01"}).image_score == "top:0.01"
    with pytest.raises(VitqcError, match="image score 'median'"):
        spec_from_config({**base, "image_score": "median"})


def test_config_file_presets_and_precedence(data_root, tmp_path):
    config = tmp_path / "sub" / "c.yaml"
    config.parent.mkdir()
    config.write_text("data: ../d\nbackbones: a:1,b\nheads: [flow]\nepochs: 7\ndb: x.sqlite\n")
    file_cfg = load_config_file(config)
    assert file_cfg["data"] == [str(tmp_path / "sub" / "../d")]
    assert file_cfg["db"] == str(tmp_path / "sub" / "x.sqlite")
    merged = merged_config(file_config=file_cfg, flags={"epochs": 3, "heads": None})
    spec = spec_from_config(merged)
    assert spec.epochs == 3 and spec.heads == ["flow"]
    assert spec.backbones == [BackboneChoice("a", (1,)), BackboneChoice("b")]
    config.write_text("data: d\nbogus: 1\n")
    with pytest.raises(VitqcError, match="bogus"):
        load_config_file(config)
    with pytest.raises(VitqcError, match="--preset"):
        merged_config(flags={"preset": "paper-xyz"})

    from vitqc.backbones.registry import BACKBONES

    for name in PRESETS:
        spec = spec_from_config(
            merged_config(flags={"preset": name, "data": [str(data_root)], "categories": "tile"})
        )
        assert all(b.name in BACKBONES for b in spec.backbones), name
        assert spec.preset == name
    deit = spec_from_config(merged_config(flags={"preset": "paper-deit", "data": [data_root]}))
    assert [c.label() for c in expand_grid(deit)] == [
        "tile | deit_base_distilled_patch16_224 i11 | gmm",
        "tile | deit_base_distilled_patch16_224 i11 | flow",
        "tile | deit_base_distilled_patch16_224 i7 | flow",
    ]
    assert deit.epochs == 500 and deit.patience == 30
    nf = spec_from_config(
        merged_config(
            flags={
                "preset": "paper-nf",
                "data": [data_root],
                "backbone_weights": {"swin_tiny_patch4_window7_224": "esvit.pth"},
            }
        )
    )
    assert nf.categories == ["bottle", "carpet", "hazelnut", "leather", "screw"]
    assert {b.name: b.weights for b in nf.backbones}["swin_tiny_patch4_window7_224"] == "esvit.pth"
    assert {b.name: b.layers for b in nf.backbones}["resnet50"] == (2, 3, 4)


def test_list_presets_cli():
    result = CliRunner().invoke(_app(), ["benchmark", "--list-presets"])
    assert result.exit_code == 0
    for name in PRESETS:
        assert name in result.output


def test_latency_keeps_what_it_could_measure():
    import torch
    from torch import nn

    from vitqc.bench.timing import count_parameters, measure_latency

    class Broken(nn.Module):
        input_size = (8, 8)

        def __init__(self) -> None:
            super().__init__()
            self.preprocessor = nn.Identity()
            self.extractor = nn.Conv2d(3, 4, 3)

        def features(self, x: torch.Tensor) -> torch.Tensor:  # as AnomalyModel.features
            return self.extractor(self.preprocessor(x))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("head does not run here")

    errors: list[str] = []
    out = measure_latency(Broken(), (1, 2), min_seconds=0, min_repeats=1, errors=errors)
    assert set(out) == {"backbone_ms_b1", "backbone_ms_b2"} and all(v > 0 for v in out.values())
    assert len(errors) == 2 and "head does not run here" in errors[0]
    with pytest.raises(RuntimeError):
        measure_latency(Broken(), (1,), min_seconds=0, min_repeats=1)
    assert count_parameters(Broken()) == 3 * 4 * 9 + 4
    # given images (fewer than a batch) are repeated to fill each batch
    seen: list[tuple[int, ...]] = []

    class Spy(Broken):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape))
            return x

    images = torch.rand(3, 3, 8, 8)
    measure_latency(Spy(), (5,), min_seconds=0, min_repeats=1, images=images)
    assert seen and all(shape == (5, 3, 8, 8) for shape in seen)


def test_time_budget_is_part_of_the_cell(tmp_path):
    base = {"data": str(tmp_path), "backbones": "a", "heads": "vtadl"}
    plain, budget = spec_from_config(base), spec_from_config({**base, "max_minutes": "30"})
    assert (plain.max_minutes, budget.max_minutes) == (None, 30.0)
    cell = Cell(tmp_path, None, BackboneChoice("a"), "vtadl")
    assert "max_minutes" not in cell.config(plain)  # keys of earlier runs unchanged
    assert cell.config(budget)["max_minutes"] == 30.0
    assert cell.key(plain) != cell.key(budget)
    with pytest.raises(VitqcError, match="--max-minutes"):
        spec_from_config({**base, "max_minutes": 0})


def test_bit_depth_is_part_of_the_cell(tmp_path):
    base = {"data": str(tmp_path), "backbones": "a", "heads": "gaussian"}
    plain, twelve = spec_from_config(base), spec_from_config({**base, "bit_depth": "12"})
    assert (plain.bit_depth, twelve.bit_depth) == (8, 12)
    cell = Cell(tmp_path, None, BackboneChoice("a"), "gaussian")
    assert "bit_depth" not in cell.config(plain)  # keys of earlier runs unchanged
    assert cell.config(twelve)["bit_depth"] == 12 and cell.key(plain) != cell.key(twelve)
    with pytest.raises(VitqcError, match="--bit-depth must be 8 to 16"):
        spec_from_config({**base, "bit_depth": 17})


def test_the_vit_versus_cnn_study_config_expands_on_the_shared_data():
    from conftest import MAGNETIC_TILE, require

    require(MAGNETIC_TILE)
    require(MAGNETIC_TILE.parent / "kolektorsdd")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vit_vs_cnn.yaml"
    spec = spec_from_config(merged_config(file_config=load_config_file(path)))
    assert spec.folds == 0 and [b.image_size for b in spec.backbones].count(448) == 2
    cells = expand_grid(spec)
    assert len(cells) == 2 * 6 * 4
    assert {c.data.name for c in cells} == {"kolektorsdd", "magnetic_tile"}
    groups = {feature_key(c, spec) for c in cells}
    assert len(groups) == 2 * 6  # each backbone, block and size extracts once per dataset
