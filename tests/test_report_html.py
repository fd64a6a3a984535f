"""The HTML report: self-contained, and it renders in headless Chromium without console
errors, with tables and plots on screen.

Chromium is Debian's ``chromium`` package; the fixture installs it with apt-get when it is
missing (CI runs as root with Debian's apt reachable) and skips with the reason otherwise.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from test_bench_store import CATEGORIES, MODELS, hand_made_db
from typer.testing import CliRunner

from vitqc.report.html import write_report

BROWSERS = ("chromium", "chromium-browser")


def _find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _install_chromium() -> None:
    """apt-get install chromium; skips (or fails on CI) with the reason when impossible."""
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and apt-get is unavailable: install Chromium")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        pytest.skip("chromium is not installed; run `apt-get install -y chromium` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
    )
    for cmd in steps:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            message = f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)


@pytest.fixture(scope="session")
def chromium() -> str:
    path = _find_browser()
    if path is None:
        _install_chromium()
        path = _find_browser()
    if path is None:
        pytest.fail("apt-get installed chromium but no chromium binary is on PATH")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from vitqc.data.synth import generate_synthetic

    tmp = tmp_path_factory.mktemp("report")
    generate_synthetic(tmp / "synth", n_train=2, n_test_good=3, n_test_defective=4, size=64)
    db = hand_made_db(tmp / "h.sqlite", artifacts_from=tmp / "synth")
    return write_report(db, tmp / "report.html")


def test_report_is_self_contained(report):
    html = report.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "Content-Security-Policy" in html and "img-src data:" in html
    srcs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert srcs, "no images or links at all"
    for ref in srcs:
        assert ref.startswith(("data:", "#")), f"external reference {ref[:60]}"
    assert not re.search(r"https?://", html)
    images = re.findall(r'<img class="plot" alt="([^"]*)"', html)
    # one scatter, then curves and a gallery per category
    assert images[0].startswith("accuracy vs latency")
    for cat in CATEGORIES:
        assert f"curves mvtec {cat}" in images
        assert f"gallery mvtec {cat}" in images
    for title in ("Table 1", "Tables 3/4", "Tables 5/6", "Failed runs", "no_such_backbone"):
        assert title in html
    # a defect type's localization figures where the run had them, image AUROC alone not
    assert "crack: 90.00 (pixel 95.00, AUPRO 80.00), hole: 70.00" in html
    assert oct(report.stat().st_mode & 0o044) == oct(0o044)  # readable by others


def test_report_renders_in_headless_chromium(report, chromium, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        "--window-size=1400,2000",
        report.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    console = [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, "\n".join(console)
    assert shot.is_file(), log[-2000:]
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1400)
    not_white = (pixels < 235).any(axis=2).mean()
    assert not_white > 0.03, f"screenshot is nearly blank ({not_white:.3f} inked)"
    colors = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colors) > 200, "no plots visible (too few colours)"
    # Plots put several saturated colours on screen (markers, curves, heat maps); the
    # page chrome alone has one (the blue links).
    rgb = pixels.reshape(-1, 3).astype(int)
    saturated = rgb[(rgb.max(1) - rgb.min(1)) > 80] // 64
    bins, counts = np.unique(saturated, axis=0, return_counts=True)
    assert (counts > 20).sum() >= 4, f"no plots visible: colour bins {bins[counts > 20]}"


def test_report_cli(tmp_path):
    from vitqc.cli_bench import register

    db = hand_made_db(tmp_path / "h.sqlite", models=("eff_flow",))
    app = typer.Typer()
    register(app)
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(db), "--out", str(out), "--title", "T"])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "<title>T</title>" in html
    # no artifacts stored: the page says so instead of breaking
    assert "No curves stored." in html and "No gallery stored." in html


def test_section_titles_name_a_single_category_dataset_once():
    from vitqc.report.html import _dataset_title

    assert _dataset_title("mvtec", "carpet") == "mvtec / carpet"
    assert _dataset_title("magnetic_tile", "magnetic_tile") == "magnetic_tile"
    assert _dataset_title("folder", "") == "folder"


def test_heads_keep_their_marker_and_variants_get_their_own():
    from vitqc.report.html import head_markers, series_colors

    markers = head_markers(["knn", "gmm:standardize=position", "flow", "gmm", "flow:steps=4"])
    assert (markers["gmm"], markers["flow"], markers["knn"]) == ("s", "^", "D")
    assert len(set(markers.values())) == len(markers)  # every head spec told apart
    colors = series_colors(["b", "a", "b", "c"])
    assert list(colors) == ["b", "a", "c"] and len(set(colors.values())) == 3


def test_curves_get_one_row_of_panels_per_group():
    from vitqc.report.html import curves_png

    curve = {"x": [0.0, 0.5, 1.0], "y": [0.0, 0.8, 1.0]}
    curves = {"roc": curve, "pr": curve, "pro": curve}
    entries = [
        (f"{head} i7", {"head": head, "backbone": bb, "aupro": 0.7}, curves)
        for bb in ("vit", "cnn")
        for head in ("flow", "knn")
    ]
    one = Image.open(io.BytesIO(curves_png(entries)))
    grouped = Image.open(io.BytesIO(curves_png(entries, group_of=lambda r: r["backbone"])))
    assert one.width == grouped.width
    assert 1.8 < grouped.height / one.height < 2.2  # two rows of panels


def test_a_large_grid_gets_one_gallery_per_backbone(tmp_path, monkeypatch):
    from vitqc.data.synth import generate_synthetic
    from vitqc.report import html as report_html

    generate_synthetic(tmp_path / "synth", n_train=2, n_test_good=3, n_test_defective=4, size=64)
    db = hand_made_db(tmp_path / "h.sqlite", artifacts_from=tmp_path / "synth")
    page = write_report(db, tmp_path / "all.html").read_text()
    assert "<h4>" not in page  # a few runs per category: one gallery
    monkeypatch.setattr(report_html, "GALLERY_RUNS", 1)
    page = write_report(db, tmp_path / "split.html").read_text()
    backbones = {m["backbone"] for m in MODELS.values()}
    headings = re.findall(r"<h4>([^<]*)</h4>", page)
    assert {h.split(" ")[0] for h in headings} == backbones
    assert len(headings) == len(backbones) * len(CATEGORIES)
