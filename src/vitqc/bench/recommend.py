"""Section 4.4 of the evaluation paper made concrete: which model to deploy, and why.

The paper's guidance: rank by image AUROC when a missed defect is expensive, by image
PR-AUC when false alarms are, by AUPRO when the location matters; then let hardware and
real-time requirements decide between the large accurate and the small fast models.
Here the constraints (latency at batch 1 of the full pipeline, total parameters, the
device the latency was measured on) filter the benchmarked models, the Pareto front of
accuracy vs latency vs size shows the real trade-offs, and the most accurate model on
the front within the constraints is recommended (ties: the faster, then the smaller).

Accuracy is the mean over the (dataset, category) cells that *every* candidate model was
run on, so a model is never ranked on easier categories than another.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vitqc.bench.tables import backbone_label, human_count, latest_runs, mean_std, model_label
from vitqc.errors import VitqcError

#: priority -> (metric key, metric name, why it is the right metric)
PRIORITIES: dict[str, tuple[str, str, str]] = {
    "recall": (
        "image_auroc",
        "image AUROC",
        "a missed defect is expensive: AUROC measures how well defective parts are "
        "ranked above good ones at every threshold",
    ),
    "precision": (
        "image_prauc",
        "image PR-AUC",
        "false alarms are expensive: PR-AUC drops with every good part flagged among the "
        "defective ones",
    ),
    "localization": (
        "aupro",
        "AUPRO",
        "the location of the defect matters: AUPRO scores the overlap with each defect "
        "region, small ones as much as large ones",
    ),
}


@dataclass
class ModelSummary:
    """One model (head + backbone + layers + weights) on one device, over its runs."""

    label: str
    head: str
    backbone: str
    device: str
    accuracy: float | None = None
    accuracy_std: float | None = None
    n_cells: int = 0
    metrics: dict[str, float | None] = field(default_factory=dict)
    latency_ms: float | None = None
    latency_ms_b32: float | None = None
    backbone_latency_ms: float | None = None
    params: int | None = None
    backbone_params: int | None = None
    head_params: int | None = None
    bundle_bytes: int | None = None
    feasible: bool = True
    excluded: str = ""
    on_front: bool = False


@dataclass
class Recommendation:
    priority: str
    metric: str
    metric_name: str
    constraints: dict[str, Any]
    cells: list[tuple[str, str]]
    models: list[ModelSummary]
    front: list[ModelSummary]
    chosen: ModelSummary | None
    reasons: list[str]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "priority": self.priority,
            "metric": self.metric,
            "constraints": self.constraints,
            "cells": [list(c) for c in self.cells],
            "chosen": asdict(self.chosen) if self.chosen else None,
            "front": [m.label + " @ " + m.device for m in self.front],
            "models": [asdict(m) for m in self.models],
            "reasons": self.reasons,
            "warnings": self.warnings,
        }


def parse_count(text: str | float | int | None) -> int | None:
    """``"30M"``, ``"1.5G"``, ``"800k"`` or a plain number -> int (for ``--max-params``)."""
    if text is None:
        return None
    if isinstance(text, int | float):
        return int(text)
    s = str(text).strip().upper().replace("_", "")
    mult = {"K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9}.get(s[-1:], 1.0)
    if s[-1:] in "KMGB":
        s = s[:-1]
    try:
        return int(float(s) * mult)
    except ValueError:
        raise VitqcError(
            f"--max-params must be a number like 30M or 25000000, got {text!r}"
        ) from None


def _median(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.median(vals) if vals else None


def _max_int(values: Sequence[Any]) -> int | None:
    vals = [int(v) for v in values if v is not None]
    return max(vals) if vals else None


def dominates(a: ModelSummary, b: ModelSummary) -> bool:
    """a is at least as good in accuracy, latency and size, and strictly better in one."""
    (acc_a, lat_a, par_a), (acc_b, lat_b, par_b) = _rank_key(a), _rank_key(b)
    # _rank_key negates accuracy, so smaller is better in all three.
    no_worse = acc_a <= acc_b and lat_a <= lat_b and par_a <= par_b
    better = acc_a < acc_b or lat_a < lat_b or par_a < par_b
    return no_worse and better


def pareto_front(models: Sequence[ModelSummary]) -> list[ModelSummary]:
    """Models no other model dominates, most accurate first."""
    front = [m for m in models if not any(dominates(o, m) for o in models if o is not m)]
    return sorted(front, key=_rank_key)


def _rank_key(m: ModelSummary) -> tuple[float, float, float]:
    return (
        -(m.accuracy if m.accuracy is not None else -math.inf),
        m.latency_ms if m.latency_ms is not None else math.inf,
        m.params if m.params is not None else math.inf,
    )


def summarize_models(
    runs: Sequence[dict[str, Any]], metric: str
) -> tuple[list[ModelSummary], list[tuple[str, str]], list[str]]:
    """Group runs into models; accuracy = mean of ``metric`` over the common cells."""
    runs = latest_runs(runs)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((model_label(run), str(run.get("device") or "?")), []).append(run)
    warnings: list[str] = []

    def cells_with_metric(rs: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {(str(r["dataset"]), str(r["category"])) for r in rs if r.get(metric) is not None}

    covered = [cells_with_metric(rs) for rs in groups.values()]
    nonempty = [c for c in covered if c]
    common = set.intersection(*nonempty) if nonempty else set()
    if nonempty and not common:
        warnings.append(
            "no (dataset, category) was run with every model: each model's accuracy is its "
            "mean over its own categories, which may not compare fairly"
        )
    models = []
    for (label, device), rs in groups.items():
        first = rs[0]
        cells = cells_with_metric(rs)
        use = common if common else cells
        chosen = [r for r in rs if (str(r["dataset"]), str(r["category"])) in use]
        values = [float(r[metric]) for r in chosen if r.get(metric) is not None]
        mean, std = mean_std(values)
        other = {}
        for key in ("image_auroc", "image_prauc", "pixel_auroc", "aupro"):
            other[key] = mean_std([r.get(key) for r in chosen])[0]
        bb_params = _max_int([r.get("backbone_params") for r in rs])
        head_params = _max_int([r.get("head_params") for r in rs])
        total = None if bb_params is None else bb_params + (head_params or 0)
        m = ModelSummary(
            label=label,
            head=str(first["head"]),
            backbone=backbone_label(first),
            device=device,
            accuracy=mean,
            accuracy_std=std,
            n_cells=len(values),
            metrics=other,
            latency_ms=_median([r.get("pipeline_ms_b1") for r in rs]),
            latency_ms_b32=_median([r.get("pipeline_ms_b32") for r in rs]),
            backbone_latency_ms=_median([r.get("backbone_ms_b1") for r in rs]),
            params=total,
            backbone_params=bb_params,
            head_params=head_params,
            bundle_bytes=_max_int([r.get("bundle_bytes") for r in rs]),
        )
        if mean is None:
            m.feasible = False
            m.excluded = f"no {metric} measured" + (" on the common categories" if common else "")
        models.append(m)
    return sorted(models, key=_rank_key), sorted(common), warnings


def recommend(
    runs: Sequence[dict[str, Any]],
    priority: str = "recall",
    max_latency_ms: float | None = None,
    max_params: int | None = None,
    device: str | None = None,
    tie_tolerance: float = 0.0,
) -> Recommendation:
    """Filter by constraints, take the Pareto front, pick the most accurate model on it.

    ``device`` keeps runs whose measured device starts with it (``cpu``, ``cuda``).
    ``tie_tolerance`` (a fraction, e.g. 0.005 = half a point) widens what counts as a tie
    in accuracy, which then goes to the faster model.
    """
    if priority not in PRIORITIES:
        raise VitqcError(f"unknown --priority {priority!r}: choose {', '.join(PRIORITIES)}")
    metric, metric_name, why = PRIORITIES[priority]
    constraints = {
        "max_latency_ms": max_latency_ms,
        "max_params": max_params,
        "device": device,
    }
    runs = [r for r in runs if r.get("status", "ok") == "ok"]
    if device:
        runs = [r for r in runs if str(r.get("device") or "").lower().startswith(device.lower())]
    if not runs:
        where = f" measured on {device!r}" if device else ""
        raise VitqcError(f"no finished runs{where} in the results database")
    models, cells, warnings = summarize_models(runs, metric)
    for m in models:
        if not m.feasible:
            continue
        if max_latency_ms is not None:
            if m.latency_ms is None:
                m.feasible, m.excluded = False, "latency not measured"
            elif m.latency_ms > max_latency_ms:
                m.feasible = False
                m.excluded = f"{m.latency_ms:.1f} ms > {max_latency_ms:g} ms"
        if m.feasible and max_params is not None:
            if m.params is None:
                m.feasible, m.excluded = False, "parameters not counted"
            elif m.params > max_params:
                m.feasible = False
                m.excluded = f"{human_count(m.params)} params > {human_count(max_params)}"
    feasible = [m for m in models if m.feasible]
    front = pareto_front(feasible)
    for m in front:
        m.on_front = True
    chosen = None
    if front:
        best = max(m.accuracy for m in front if m.accuracy is not None)
        tied = [m for m in front if m.accuracy is not None and m.accuracy >= best - tie_tolerance]
        chosen = min(tied, key=lambda m: _rank_key(m)[1:])
    rec = Recommendation(
        priority, metric, metric_name, constraints, cells, models, front, chosen, [], warnings
    )
    rec.reasons = _reasons(rec, why)
    return rec


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"


def _constraint_text(c: dict[str, Any]) -> str:
    parts = []
    if c.get("max_latency_ms") is not None:
        parts.append(f"latency <= {c['max_latency_ms']:g} ms/image at batch 1")
    if c.get("max_params") is not None:
        parts.append(f"<= {human_count(c['max_params'])} parameters")
    if c.get("device"):
        parts.append(f"measured on {c['device']}")
    return ", ".join(parts) if parts else "no constraints"


def _reasons(rec: Recommendation, why: str) -> list[str]:
    n_ok = sum(m.feasible for m in rec.models)
    reasons = [
        f"priority '{rec.priority}': ranked by mean {rec.metric_name}, because {why} "
        "(paper, section 4.4)",
        f"{n_ok} of {len(rec.models)} models meet the constraints "
        f"({_constraint_text(rec.constraints)})",
    ]
    m = rec.chosen
    if m is None:
        excluded = "; ".join(f"{x.label}: {x.excluded}" for x in rec.models if x.excluded)
        reasons.append(f"no model meets the constraints ({excluded}): relax them")
        return reasons
    n = len(rec.cells) if rec.cells else m.n_cells
    cells = f"{n} {'common ' if rec.cells else ''}categor{'y' if n == 1 else 'ies'}"
    std = f" (std {100 * m.accuracy_std:.2f})" if m.accuracy_std is not None else ""
    reasons.append(
        f"{m.label} has the highest {rec.metric_name} on the Pareto front within the "
        f"constraints: {_pct(m.accuracy)}{std} over {cells}"
    )
    others = ", ".join(
        f"{name} {_pct(m.metrics.get(key))}"
        for key, name in (
            ("image_auroc", "image AUROC"),
            ("image_prauc", "image PR-AUC"),
            ("pixel_auroc", "pixel AUROC"),
            ("aupro", "AUPRO"),
        )
        if key != rec.metric
    )
    reasons.append(f"its other metrics: {others}")
    reasons.append(
        f"latency {_ms(m.latency_ms)}/image at batch 1 on {m.device} (full pipeline; "
        f"backbone alone {_ms(m.backbone_latency_ms)}; batch 32: {_ms(m.latency_ms_b32)}/image)"
    )
    bundle = f"; bundle {m.bundle_bytes / 1e6:.1f} MB" if m.bundle_bytes else ""
    reasons.append(
        f"size {human_count(m.params)} parameters (backbone {human_count(m.backbone_params)}, "
        f"head {human_count(m.head_params)}){bundle}"
    )
    for alt in rec.front:
        if alt is m or alt.accuracy is None or m.accuracy is None:
            continue
        gains = []
        if alt.latency_ms is not None and m.latency_ms and alt.latency_ms < m.latency_ms:
            gains.append(f"{m.latency_ms / max(alt.latency_ms, 1e-9):.1f}x faster")
        if alt.params is not None and m.params and alt.params < m.params:
            gains.append(f"{m.params / max(alt.params, 1):.1f}x smaller")
        if gains:
            reasons.append(
                f"trade-off on the front: {alt.label} is {' and '.join(gains)} at "
                f"{_pct(alt.accuracy)} ({100 * (alt.accuracy - m.accuracy):+.2f} points)"
            )
    return reasons


def format_recommendation(rec: Recommendation, width: int = 120) -> str:
    """The front as a table, then the recommendation and its reasons (plain text)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    table = Table(
        title=f"Models by {rec.metric_name} ('*' = Pareto front within constraints)",
        header_style="bold",
    )
    for name, justify in (
        ("", "left"),
        ("model", "left"),
        ("device", "left"),
        (rec.metric_name, "right"),
        ("ms/img b1", "right"),
        ("ms/img b32", "right"),
        ("params", "right"),
        ("excluded", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for m in rec.models:
        mark = "->" if m is rec.chosen else ("*" if m.on_front else "")
        table.add_row(
            mark,
            m.label,
            m.device,
            _pct(m.accuracy),
            _ms(m.latency_ms),
            _ms(m.latency_ms_b32),
            human_count(m.params),
            m.excluded,
        )
    console.print(table)
    if rec.chosen is not None:
        console.print(f"Recommendation: {rec.chosen.label} ({rec.chosen.device})", markup=False)
    else:
        console.print("Recommendation: none", markup=False)
    for reason in rec.reasons:
        console.print(f"  - {reason}", markup=False, highlight=False)
    for w in rec.warnings:
        console.print(f"warning: {w}", markup=False, highlight=False)
    return console.file.getvalue()  # type: ignore[attr-defined]
