"""One self-contained HTML report of a results database.

Factory PCs are often offline and reports get mailed around, so the file has no external
resource at all: CSS is inline, every plot is a PNG inside a ``data:`` URI, and a
Content-Security-Policy forbids the page from loading anything else. A tiny inline
script logs a console error for any image that fails to decode, which the headless
browser test turns into a failure.

Sections: summary, the paper's tables, accuracy vs latency (colour = backbone, marker =
head, Pareto front marked), ROC / PR / PRO curves per category (one row of panels per
backbone, one line per head), anomaly-map galleries per category (image, ground truth,
one overlay per run, as in the paper's figures; one gallery per backbone when a category
has more than ``GALLERY_RUNS`` runs), every run's figures, and the failed runs with their
errors.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vitqc.atomic import write_text  # noqa: E402
from vitqc.bench.artifacts import read_run_artifacts  # noqa: E402
from vitqc.bench.recommend import PRIORITIES, pareto_front, summarize_models  # noqa: E402
from vitqc.bench.store import open_store  # noqa: E402
from vitqc.bench.tables import (  # noqa: E402
    Table,
    backbone_label,
    build_tables,
    format_value,
    head_label,
    latest_runs,
    model_label,
)

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px;
       color: #1d2430; background: #fff; max-width: 1600px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #d0d7e2; padding-bottom: 4px; margin-top: 2em; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #d0d7e2; padding: 3px 8px; }
th { background: #eef2f8; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.foot td { font-weight: bold; background: #f7f9fc; }
caption { text-align: left; font-weight: bold; padding: 4px 0; }
.meta { color: #5a6475; font-size: 13px; }
.err { color: #a01818; font-family: monospace; white-space: pre-wrap; }
img.plot { max-width: 100%; border: 1px solid #e3e8ef; }
nav a { margin-right: 14px; }
.scroll { overflow-x: auto; }
"""

# Logs a console error for an image that did not decode (caught by the browser test).
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var bad = 0;
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    if (!im.complete || im.naturalWidth === 0) { bad++; console.error('image failed: ' + im.alt); }
  }
  document.body.setAttribute('data-images-ok', bad === 0 ? 'yes' : 'no');
});
"""

_COLORS = plt.get_cmap("tab10").colors
#: most runs in one category's anomaly-map gallery; more get one gallery per backbone
GALLERY_RUNS = 8
#: a fixed marker per head, so a large grid's scatter reads as backbone (colour) x head
_HEAD_MARKERS = {"gaussian": "o", "gmm": "s", "flow": "^", "knn": "D", "vtadl": "v"}
_SPARE_MARKERS = ("P", "X", "*", "h", "p", "<", ">", "8")


def _styles(keys: Sequence[str], fixed: dict[str, Any], spare: Sequence[Any]) -> dict[str, Any]:
    """One style per key: the fixed one where the key has one (and it is still free),
    else the next spare one, cycling when they run out."""
    out: dict[str, Any] = {}
    spares = [v for v in spare if v not in fixed.values()] or list(spare)
    for key in keys:
        style = fixed.get(key)
        if style is None or style in out.values():
            style = spares[sum(k not in fixed for k in out) % len(spares)]
        out[key] = style
    return out


def head_markers(heads: Sequence[str]) -> dict[str, str]:
    """Marker per head spec: the base heads' own, variants (``gmm:k=8``) a spare one."""
    ordered = sorted(set(heads), key=lambda h: (h not in _HEAD_MARKERS, h))
    return _styles(ordered, _HEAD_MARKERS, _SPARE_MARKERS)


def series_colors(keys: Sequence[str]) -> dict[str, Any]:
    """Colour per key in first-seen order."""
    return _styles(list(dict.fromkeys(keys)), {}, _COLORS)


def _dataset_title(dataset: str, category: str) -> str:
    """Section title "mvtec / carpet"; a single-category dataset is named once."""
    return dataset if category in ("", dataset) else f"{dataset} / {category}"


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def fig_to_png(fig: Any, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    return f'<img class="plot" alt="{_esc(alt)}" src="{png_data_uri(png)}">'


# --------------------------------------------------------------------------- tables


def table_html(table: Table) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in table.columns)
    body = []
    for cls, rows in (("", table.rows), ("foot", table.footer)):
        for row in rows:
            cells = []
            for value, kind in zip(row, table.kinds, strict=True):
                num = ' class="num"' if kind in ("pct", "params") else ""
                cells.append(f"<td{num}>{_esc(format_value(value, kind))}</td>")
            attr = f' class="{cls}"' if cls else ""
            body.append(f"<tr{attr}>{''.join(cells)}</tr>")
    return (
        f'<div class="scroll"><table><caption>{_esc(table.title)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _defect_figures(figures: dict[str, Any]) -> str:
    """``92.30 (pixel 96.70, AUPRO 90.10)``, in percent: a defect type's image AUROC, and its
    localization figures where the run had masks."""
    text = format_value(figures.get("image_auroc"), "pct")
    where = [
        f"{name} {format_value(figures[key], 'pct')}"
        for key, name in (("pixel_auroc", "pixel"), ("aupro", "AUPRO"))
        if figures.get(key) is not None
    ]
    return f"{text} ({', '.join(where)})" if where else text


def _runs_table(runs: Sequence[dict[str, Any]]) -> str:
    cols = [
        ("dataset", "dataset", "text"),
        ("category", "category", "text"),
        ("model", None, "text"),
        ("img AUROC", "image_auroc", "pct"),
        ("pix AUROC", "pixel_auroc", "pct"),
        ("AUPRO", "aupro", "pct"),
        ("PR-AUC", "image_prauc", "pct"),
        ("F1", "f1", "pct"),
        ("feat s", "feature_seconds", "sec"),
        ("head s", "head_seconds", "sec"),
        ("bb ms b1", "backbone_ms_b1", "ms"),
        ("ms b1", "pipeline_ms_b1", "ms"),
        ("ms b32", "pipeline_ms_b32", "ms"),
        ("bb params", "backbone_params", "params"),
        ("head params", "head_params", "params"),
        ("bundle MB", "bundle_bytes", "mb"),
        ("device", "device", "text"),
    ]
    head = "".join(f"<th>{_esc(c[0])}</th>" for c in cols)
    rows = []
    for r in runs:
        cells = []
        for _, key, kind in cols:
            value = model_label(r) if key is None else r.get(key)
            if value is None:
                text = "-"
            elif kind in ("sec", "ms"):
                text = f"{float(value):.2f}"
            elif kind == "mb":
                text = f"{float(value) / 1e6:.2f}"
            else:
                text = format_value(value, kind)
            num = ' class="num"' if kind != "text" else ""
            cells.append(f"<td{num}>{_esc(text)}</td>")
        per = r.get("per_defect") or {}
        detail = ", ".join(f"{k}: {_defect_figures(v)}" for k, v in per.items())
        cells.append(f"<td>{_esc(detail)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        '<div class="scroll"><table><caption>Every finished run (latest per cell)</caption>'
        f"<thead><tr>{head}<th>per defect type: image AUROC (pixel AUROC, AUPRO)</th>"
        "</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


# --------------------------------------------------------------------------- plots


def scatter_png(runs: Sequence[dict[str, Any]]) -> bytes | None:
    """Accuracy vs latency for each priority metric: colour = backbone, marker = head,
    marker area ~ parameters; the Pareto front (accuracy, latency, size) ringed and
    joined in latency order."""
    panels = []
    for _priority, (key, name, _) in PRIORITIES.items():
        models, _, _ = summarize_models(runs, key)
        models = [m for m in models if m.accuracy is not None and m.latency_ms is not None]
        if models:
            panels.append((name, models, pareto_front(models)))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    every = [m for _, ms, _ in panels for m in ms]
    color = series_colors(sorted({m.backbone for m in every}))
    marker = head_markers([m.head for m in every])
    biggest = max((m.params or 1) for m in every)
    for ax, (name, models, front) in zip(axes[0], panels, strict=False):
        for m in models:
            size = 40 + 400 * math.sqrt((m.params or 1) / biggest)
            ax.scatter(
                m.latency_ms,
                100 * m.accuracy,
                s=size,
                color=color[m.backbone],
                marker=marker[m.head],
                alpha=0.75,
            )
        pts = sorted((m.latency_ms, 100 * m.accuracy) for m in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", lw=1, label="Pareto front")
        ax.scatter(
            [p[0] for p in pts], [p[1] for p in pts], s=160, facecolors="none", edgecolors="k"
        )
        ax.set_xlabel("full pipeline latency, ms/image at batch 1")
        ax.set_ylabel(f"mean {name} (%)")
        ax.set_title(f"{name} vs latency (marker area ~ parameters)", fontsize=10)
        ax.grid(alpha=0.3)
        lats = [m.latency_ms for m in models]
        if min(lats) > 0 and max(lats) / min(lats) > 20:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    handles = [
        plt.Line2D([], [], marker="s", ms=9, ls="", color=c, label=bb) for bb, c in color.items()
    ]
    handles += [
        plt.Line2D([], [], marker=mk, ls="", color="0.35", label=h) for h, mk in marker.items()
    ]
    handles.append(plt.Line2D([], [], ls="--", color="k", label="Pareto front"))
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(4, len(handles)),
        fontsize=8,
        bbox_to_anchor=(0.5, -0.02 - 0.04 * math.ceil(len(handles) / 4)),
    )
    fig.tight_layout()
    return fig_to_png(fig)


CurveEntry = tuple[str, dict[str, Any], dict[str, Any]]


def curves_png(entries: Sequence[CurveEntry], group_of: Any = None) -> bytes | None:
    """ROC, PR and PRO panels with one line per run (``(label, run, curves)``); with
    ``group_of(run)``, one row of panels per group (e.g. per backbone, so that a large
    grid stays readable), each line's colour fixed by its run's head across rows."""
    if not any(c.get(k) for _, _, c in entries for k in ("roc", "pr", "pro")):
        return None
    groups: dict[str, list[CurveEntry]] = {}
    for entry in entries:
        groups.setdefault(group_of(entry[1]) if group_of else "", []).append(entry)
    color = series_colors([str(run.get("head", label)) for label, run, _ in entries])
    fig, axes = plt.subplots(len(groups), 3, figsize=(15, 4.2 * len(groups)), squeeze=False)
    spec = (
        ("roc", "ROC (image)", "false positive rate", "true positive rate", "image_auroc"),
        ("pr", "Precision-recall (image)", "recall", "precision", "image_prauc"),
        ("pro", "PRO (pixel, FPR <= 0.3)", "false positive rate", "per-region overlap", "aupro"),
    )
    for row, (group, members) in zip(axes, groups.items(), strict=True):
        for ax, (key, title, xl, yl, metric) in zip(row, spec, strict=True):
            for label, run, curves in members:
                c = curves.get(key)
                if not c:
                    continue
                value = run.get(metric)
                tag = f" ({100 * value:.1f})" if value is not None else ""
                line = color[str(run.get("head", label))]
                ax.plot(c["x"], c["y"], color=line, lw=1.4, label=label + tag)
            if key == "roc":
                ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
            ax.set_xlim(0, 0.3 if key == "pro" else 1)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{group}: {title}" if group else title, fontsize=10)
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig_to_png(fig)


def _load_png(root: Path, rel: str | None) -> np.ndarray | None:
    if not rel:
        return None
    try:
        with Image.open(root / rel) as img:
            return np.asarray(img.convert("RGB"))
    except OSError:
        return None


def gallery_png(
    root: Path, entries: Sequence[tuple[str, dict[str, Any], dict[str, Any]]]
) -> bytes | None:
    """Rows: the category's gallery images; columns: image, ground truth, one anomaly-map
    overlay per run, titled with its image score (the papers' figures 3-5)."""
    base = next((c.get("gallery") for _, _, c in entries if c.get("gallery")), None)
    if not base:
        return None
    n_rows, n_cols = len(base), 2 + len(entries)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(1.9 * n_cols, 1.9 * n_rows + 0.4), squeeze=False
    )
    for r, item in enumerate(base):
        image = _load_png(root, item.get("image"))
        mask = _load_png(root, item.get("mask"))
        kind = "good" if item["label"] == 0 else str(item["defect_type"])
        # (pixels, title on the first row, title on later rows)
        tiles: list[tuple[np.ndarray | None, str, str]] = [
            (image, kind, kind),
            (mask, "ground truth", "" if mask is not None else "no mask"),
        ]
        for label, _run, curves in entries:
            gal = {g["key"]: g for g in curves.get("gallery") or []}
            g = gal.get(item["key"], {})
            score = f"{g['score']:.3g}" if "score" in g else ""
            tiles.append((_load_png(root, g.get("overlay")), f"{label}\n{score}", score))
        for c, (arr, first, later) in enumerate(tiles):
            ax = axes[r][c]
            if arr is not None:
                ax.imshow(arr)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(first if r == 0 else later, fontsize=7)
    fig.tight_layout()
    return fig_to_png(fig, dpi=80)


# --------------------------------------------------------------------------- page


def build_report_html(
    runs: Sequence[dict[str, Any]],
    failed: Sequence[dict[str, Any]],
    artifacts_root: Path,
    title: str = "vitqc benchmark report",
    source: str = "",
) -> str:
    """The whole page as one string (pure: reads only the stored artifacts)."""
    from vitqc import __version__
    from vitqc.bench.store import now_iso

    runs = latest_runs(runs)
    artifacts_root = Path(artifacts_root)
    parts: list[str] = []
    nav = [
        ("tables", "Tables"),
        ("tradeoff", "Accuracy vs latency"),
        ("curves", "Curves"),
        ("gallery", "Anomaly maps"),
        ("runs", "All runs"),
    ]
    if failed:
        nav.append(("failed", "Failed runs"))
    machines = sorted(
        {f"{r.get('cpu_model')} / {r.get('device')} / torch {r.get('torch_version')}" for r in runs}
    )
    parts.append(f"<h1>{_esc(title)}</h1>")
    parts.append(
        f'<p class="meta">{len(runs)} finished runs, {len(failed)} failed; '
        f"source {_esc(source)}; generated {_esc(now_iso())} by vitqc {_esc(__version__)}.<br>"
        f"Machines: {_esc('; '.join(machines) or '-')}</p>"
    )
    parts.append("<nav>" + "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in nav) + "</nav>")

    parts.append('<h2 id="tables">Tables</h2>')
    if runs:
        parts.extend(table_html(t) for t in build_tables(runs))
    else:
        parts.append("<p>No finished runs yet.</p>")

    parts.append('<h2 id="tradeoff">Accuracy vs latency</h2>')
    png = scatter_png(runs) if runs else None
    parts.append(
        img_tag(png, "accuracy vs latency scatter with Pareto front")
        if png
        else "<p>No latency measured (benchmark ran with timing off).</p>"
    )

    by_cat: dict[tuple[str, str], list[tuple[str, dict[str, Any], dict[str, Any]]]] = {}
    for r in runs:
        curves = read_run_artifacts(artifacts_root, r.get("artifacts")) or {}
        by_cat.setdefault((str(r["dataset"]), str(r["category"])), []).append(
            (model_label(r), r, curves)
        )

    parts.append('<h2 id="curves">ROC / PR / PRO curves</h2>')
    for (ds, cat), entries in by_cat.items():
        by_head = [(head_label(r), r, curves) for _, r, curves in entries]
        png = curves_png(by_head, group_of=backbone_label)
        parts.append(f"<h3>{_esc(_dataset_title(ds, cat))}</h3>")
        parts.append(img_tag(png, f"curves {ds} {cat}") if png else "<p>No curves stored.</p>")

    parts.append('<h2 id="gallery">Anomaly maps</h2>')
    parts.append(
        '<p class="meta">Good and defective test images, their ground truth and each '
        "run's anomaly map (calibrated: 1 = the validation maximum); the number is the image "
        "score.</p>"
    )
    for (ds, cat), entries in by_cat.items():
        parts.append(f"<h3>{_esc(_dataset_title(ds, cat))}</h3>")
        if len(entries) <= GALLERY_RUNS:
            png = gallery_png(artifacts_root, entries)
            none = "<p>No gallery stored.</p>"
            parts.append(img_tag(png, f"gallery {ds} {cat}") if png else none)
            continue
        by_backbone: dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]] = {}
        for _, r, curves in entries:  # too many columns to read: one gallery per backbone
            by_backbone.setdefault(backbone_label(r), []).append((head_label(r), r, curves))
        for bb, members in by_backbone.items():
            png = gallery_png(artifacts_root, members)
            parts.append(f"<h4>{_esc(bb)}</h4>")
            parts.append(
                img_tag(png, f"gallery {ds} {cat} {bb}") if png else "<p>No gallery stored.</p>"
            )

    parts.append('<h2 id="runs">All runs</h2>')
    parts.append(_runs_table(runs) if runs else "<p>None.</p>")

    if failed:
        parts.append(
            '<h2 id="failed">Failed runs</h2><table><thead><tr><th>dataset</th>'
            "<th>category</th><th>model</th><th>error</th></tr></thead><tbody>"
        )
        for r in failed:
            parts.append(
                f"<tr><td>{_esc(r['dataset'])}</td><td>{_esc(r['category'])}</td>"
                f'<td>{_esc(model_label(r))}</td><td class="err">{_esc(r.get("error"))}</td></tr>'
            )
        parts.append("</tbody></table>")

    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{_esc(title)}</title><style>{CSS}</style>"
        f"<script>{CHECK_SCRIPT}</script></head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def write_report(db_path: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Read the database and its artifacts, write the report atomically, return its path."""
    db_path = Path(db_path)
    with open_store(db_path, create=False) as store:
        runs = store.runs("ok")
        failed = store.runs("error")
        root = store.artifacts_dir
    page = build_report_html(
        runs,
        failed,
        root,
        title=title or f"vitqc benchmark report: {db_path.name}",
        source=str(db_path),
    )
    write_text(out, page)
    # The temp-file write leaves 0600; a report is meant to be opened and shared.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)
    return Path(out)


__all__ = ["build_report_html", "write_report"]
