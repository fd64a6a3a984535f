"""The evaluation paper's tables, rebuilt from the runs in a results database.

- Table 1: per backbone (with its layers) the parameters, patch-embedding size (channels
  of each feature map), feature-map size, and the parameters of each head trained on it.
- Tables 3/4: per dataset and backbone, one row per category with image AUROC, pixel
  AUROC, AUPRO and image PR-AUC for each method (head + layers), then mean and std.
- Tables 5/6: per dataset and head, the backbones side by side (image AUROC, AUPRO),
  only when a head was run on more than one backbone.

Metrics are shown in percent with two decimals, as in the paper; std is the sample
standard deviation over categories (ddof=1, which reproduces the paper's numbers). When
the same cell was run more than once (e.g. different epochs), the latest run counts.
Values stay raw in the ``Table`` objects; only the renderers format them.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from vitqc.errors import VitqcError

FORMATS = ("md", "csv", "latex")
TABLE_IDS = ("1", "3", "5")

#: (column name, metric key) of Tables 3/4.
CATEGORY_METRICS = (
    ("image AUROC", "image_auroc"),
    ("pixel AUROC", "pixel_auroc"),
    ("AUPRO", "aupro"),
    ("image PR-AUC", "image_prauc"),
)
#: (column name, metric key) of Tables 5/6, as in the paper.
BACKBONE_METRICS = (("image AUROC", "image_auroc"), ("AUPRO", "aupro"))


@dataclass
class Table:
    """A titled grid of raw values; ``kinds`` says how each column is formatted.

    kinds: ``text``, ``pct`` (a fraction shown as percent), ``params`` (a count shown as
    12.3M), ``list`` (a list shown comma-separated). ``group`` rows (mean, std) are drawn
    below a rule.
    """

    id: str
    title: str
    columns: list[str]
    kinds: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    footer: list[list[Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- labels


def layers_label(layers: Sequence[int] | None) -> str:
    """``i11`` / ``i2+3``: the paper names blocks by index ("NF i7")."""
    if not layers:
        return ""
    return "i" + "+".join(str(int(v)) for v in layers)


def size_label(run: dict[str, Any]) -> str:
    """``@448`` when the grid set the input size, else empty (the backbone's own)."""
    config = run.get("config") or run.get("config_json") or {}
    size = config.get("image_size") if isinstance(config, dict) else None
    return f"@{int(size)}" if size else ""


def backbone_label(run: dict[str, Any]) -> str:
    parts = [str(run["backbone"])]
    if run.get("layers"):
        parts.append(layers_label(run["layers"]))
    if size := size_label(run):
        parts.append(size)
    if run.get("weights") not in (None, "", "default", "hub"):
        parts.append(f"({run['weights']})")
    return " ".join(parts)


def head_label(run: dict[str, Any], with_size: bool = True) -> str:
    """The head with its layers: the paper's method names ("flow i11", "gmm"); with the
    input size unless ``with_size`` is False (a table already named after it)."""
    label = str(run["head"])
    if run.get("layers"):
        label += " " + layers_label(run["layers"])
    if with_size and (size := size_label(run)):
        label += " " + size
    return label


def backbone_group(run: dict[str, Any]) -> str:
    """The backbone and input size without layers (Tables 3/4 compare layer choices as
    methods; each input size gets its own table)."""
    label = str(run["backbone"])
    if size := size_label(run):
        label += " " + size
    if run.get("weights") not in (None, "", "default", "hub"):
        label += f" ({run['weights']})"
    return label


def model_label(run: dict[str, Any]) -> str:
    return f"{run['head']} / {backbone_label(run)}"


# --------------------------------------------------------------------------- selection


def latest_runs(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per (dataset, category, model): the latest ok one."""
    best: dict[tuple[str, str, str], dict[str, Any]] = {}
    for run in runs:
        if run.get("status", "ok") != "ok":
            continue
        key = (str(run["dataset"]), str(run["category"]), model_label(run))
        if key not in best or int(run.get("id") or 0) >= int(best[key].get("id") or 0):
            best[key] = run
    return sorted(best.values(), key=lambda r: int(r.get("id") or 0))


def _metric(run: dict[str, Any], key: str) -> float | None:
    v = run.get(key)
    if v is None and isinstance(run.get("metrics"), dict):
        v = run["metrics"].get(key)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std of the defined values (std None below two values)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def _ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


# --------------------------------------------------------------------------- tables


def table1(runs: Sequence[dict[str, Any]]) -> Table:
    runs = latest_runs(runs)
    backbones = _ordered(backbone_label(r) for r in runs)
    heads = sorted({str(r["head"]) for r in runs})
    table = Table(
        "1",
        "Table 1: backbone and head sizes",
        ["backbone", "backbone params", "patch embedding", "feature map"]
        + [f"{h} params" for h in heads],
        ["text", "params", "list", "list"] + ["params"] * len(heads),
    )
    for bb in backbones:
        mine = [r for r in runs if backbone_label(r) == bb]
        first = mine[-1]
        sizes = first.get("feature_sizes") or []
        fm = [s[0] if len(s) == 2 and s[0] == s[1] else "x".join(map(str, s)) for s in sizes]
        row: list[Any] = [bb, first.get("backbone_params"), first.get("feature_channels"), fm]
        for h in heads:
            counts = [r.get("head_params") for r in mine if r["head"] == h]
            counts = [c for c in counts if c is not None]
            # knn's memory bank grows with the training set: show the largest.
            row.append(max(counts) if counts else None)
        table.rows.append(row)
    return table


def _category_rows(
    runs: Sequence[dict[str, Any]],
    methods: list[str],
    method_of: Any,
    metrics: Sequence[tuple[str, str]],
    metric_major: bool = False,
) -> tuple[list[list[Any]], list[list[Any]]]:
    categories = sorted({str(r["category"]) for r in runs})
    cell = {(str(r["category"]), method_of(r)): r for r in runs}
    if metric_major:
        order = [(m, key) for _, key in metrics for m in methods]
    else:
        order = [(m, key) for m in methods for _, key in metrics]
    rows = []
    for cat in categories:
        row: list[Any] = [cat]
        for m, key in order:
            run = cell.get((cat, m))
            row.append(None if run is None else _metric(run, key))
        rows.append(row)
    means: list[Any] = ["mean"]
    stds: list[Any] = ["std"]
    for i in range(len(order)):
        mean, std = mean_std([row[i + 1] for row in rows])
        means.append(mean)
        stds.append(std)
    return rows, [means, stds]


def tables_per_category(runs: Sequence[dict[str, Any]]) -> list[Table]:
    """Tables 3/4: one per (dataset, backbone), methods = head + layers."""
    runs = latest_runs(runs)
    out = []
    for ds in _ordered(str(r["dataset"]) for r in runs):
        for bb in _ordered(backbone_group(r) for r in runs if r["dataset"] == ds):
            mine = [r for r in runs if r["dataset"] == ds and backbone_group(r) == bb]
            methods = _ordered(head_label(r, with_size=False) for r in mine)
            columns = ["category"] + [
                f"{m} {name}" for m in methods for name, _ in CATEGORY_METRICS
            ]
            table = Table(
                "3",
                f"Tables 3/4: {ds}, backbone {bb}, per category",
                columns,
                ["text"] + ["pct"] * (len(columns) - 1),
            )
            table.rows, table.footer = _category_rows(
                mine, methods, partial(head_label, with_size=False), CATEGORY_METRICS
            )
            out.append(table)
    return out


def tables_backbones(runs: Sequence[dict[str, Any]]) -> list[Table]:
    """Tables 5/6: one per (dataset, head) with more than one backbone."""
    runs = latest_runs(runs)
    out = []
    for ds in _ordered(str(r["dataset"]) for r in runs):
        for head in _ordered(str(r["head"]) for r in runs if r["dataset"] == ds):
            mine = [r for r in runs if r["dataset"] == ds and r["head"] == head]
            backbones = _ordered(backbone_label(r) for r in mine)
            if len(backbones) < 2:
                continue
            columns = ["category"] + [
                f"{name} {bb}" for name, _ in BACKBONE_METRICS for bb in backbones
            ]
            table = Table(
                "5",
                f"Tables 5/6: {ds}, head {head}, backbones side by side",
                columns,
                ["text"] + ["pct"] * (len(columns) - 1),
            )
            table.rows, table.footer = _category_rows(
                mine, backbones, backbone_label, BACKBONE_METRICS, metric_major=True
            )
            out.append(table)
    return out


def build_tables(runs: Sequence[dict[str, Any]], which: str | None = None) -> list[Table]:
    """All tables (or only Table ``which``: "1", "3"/"4" or "5"/"6")."""
    which = {"4": "3", "6": "5"}.get(str(which), which) if which is not None else None
    if which is not None and which not in TABLE_IDS:
        raise VitqcError(f"unknown --table {which!r}: choose 1, 3 (3/4) or 5 (5/6)")
    tables: list[Table] = []
    if which in (None, "1"):
        tables.append(table1(runs))
    if which in (None, "3"):
        tables.extend(tables_per_category(runs))
    if which in (None, "5"):
        tables.extend(tables_backbones(runs))
    return tables


# --------------------------------------------------------------------------- formatting


def human_count(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{int(n)}"


def format_value(value: Any, kind: str, raw: bool = False) -> str:
    """One cell as text; ``raw`` (CSV) keeps full precision and plain numbers."""
    if value is None:
        return "" if raw else "-"
    if kind == "pct":
        return f"{float(value) * 100:.4f}" if raw else f"{float(value) * 100:.2f}"
    if kind == "params":
        return str(int(value)) if raw else human_count(value)
    if kind == "list":
        items = value if isinstance(value, list | tuple) else [value]
        text = ",".join(str(v) for v in items)
        return text if raw or len(items) <= 1 else f"[{text}]"
    return str(value)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(table: Table) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(_md_escape(c) for c in cells) + " |"

    align = ["---" if k in ("text", "list") else "---:" for k in table.kinds]
    lines = [f"**{table.title}**", "", line(table.columns), "| " + " | ".join(align) + " |"]
    for row in table.rows:
        lines.append(line([format_value(v, k) for v, k in zip(row, table.kinds, strict=True)]))
    for row in table.footer:
        cells = [format_value(v, k) for v, k in zip(row, table.kinds, strict=True)]
        lines.append(line([f"**{c}**" if c != "-" else c for c in cells]))
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["table", *table.columns])
    for row in table.rows + table.footer:
        writer.writerow(
            [table.title]
            + [format_value(v, k, raw=True) for v, k in zip(row, table.kinds, strict=True)]
        )
    return buf.getvalue()


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def render_latex(table: Table) -> str:
    """A ``table`` float with a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    spec = "".join("l" if k in ("text", "list") else "r" for k in table.kinds)

    def line(cells: Sequence[str]) -> str:
        return " & ".join(latex_escape(c) for c in cells) + r" \\"

    lines = [
        r"\begin{table}[ht]",
        r"\centering",
        rf"\caption{{{latex_escape(table.title)}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        line(table.columns),
        r"\midrule",
    ]
    for row in table.rows:
        lines.append(line([format_value(v, k) for v, k in zip(row, table.kinds, strict=True)]))
    if table.footer:
        lines.append(r"\midrule")
        for row in table.footer:
            cells = [format_value(v, k) for v, k in zip(row, table.kinds, strict=True)]
            lines.append(line(cells))
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def render_tables(tables: Sequence[Table], fmt: str = "md") -> str:
    """All tables in one text, separated by blank lines. In CSV each table is a block with
    its own header row and a first column naming the table (``--table`` picks one)."""
    if fmt not in FORMATS:
        raise VitqcError(f"unknown --format {fmt!r}: choose {', '.join(FORMATS)}")
    if not tables:
        return ""
    if fmt == "csv":
        return "\n".join(render_csv(t) for t in tables)
    render = render_markdown if fmt == "md" else render_latex
    return "\n".join(render(t) for t in tables)
