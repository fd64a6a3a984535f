"""Anomaly heads: one registry, one factory, the paper's hyperparameters as data."""

from __future__ import annotations

import inspect
import json
from typing import Any

from vitqc.backbones.registry import DEFAULT_BACKBONE
from vitqc.errors import VitqcError
from vitqc.heads.base import Head, fuse_maps
from vitqc.heads.flow import FlowHead
from vitqc.heads.gaussian import GaussianHead
from vitqc.heads.gmm import GMMHead
from vitqc.heads.knn import KNNHead
from vitqc.heads.vtadl import VTADLHead

HEADS: dict[str, type[Head]] = {
    "flow": FlowHead,
    "gaussian": GaussianHead,
    "gmm": GMMHead,
    "knn": KNNHead,
    "vtadl": VTADLHead,
}

# Table 2 of the evaluation paper, keyed by (head, backbone group). "cnn" is the ResNet-50
# row (also used for other multi-stage CNNs), "swin" the EsViT row, "transformer" the rest.
PAPER_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("gmm", "cnn"): {
        "batch_size": 4,
        "lr": 1e-4,
        "weight_decay": 1e-4,
        "head": {"n_components": 50},
    },
    ("gmm", "swin"): {
        "batch_size": 8,
        "lr": 1e-4,
        "weight_decay": 1e-4,
        "head": {"n_components": 100},
    },
    ("gmm", "transformer"): {
        "batch_size": 8,
        "lr": 1e-4,
        "weight_decay": 1e-4,
        "head": {"n_components": 100},
    },
    ("flow", "cnn"): {
        "batch_size": 16,
        "lr": 1e-4,
        "weight_decay": 1e-5,
        "head": {"steps": 8, "hidden_ratio": 0.16},
    },
    ("flow", "swin"): {
        "batch_size": 32,
        "lr": 1e-4,
        "weight_decay": 1e-5,
        "head": {"steps": 20, "hidden_ratio": 0.16},
    },
    ("flow", "transformer"): {
        "batch_size": 32,
        "lr": 1e-3,
        "weight_decay": 1e-5,
        "head": {"steps": 20, "hidden_ratio": 0.16},
    },
    # training-free heads: nothing to set per backbone group
    ("gaussian", "cnn"): {"head": {}},
    ("gaussian", "swin"): {"head": {}},
    ("gaussian", "transformer"): {"head": {}},
    ("knn", "cnn"): {"head": {}},
    ("knn", "swin"): {"head": {}},
    ("knn", "transformer"): {"head": {}},
    # VT-ADL trains its own ViT on the image (``pixels`` backbone); the original code's
    # Adam settings and batch size, whatever group the backbone falls in.
    ("vtadl", "cnn"): {"batch_size": 8, "lr": 1e-4, "weight_decay": 1e-4, "head": {}},
    ("vtadl", "swin"): {"batch_size": 8, "lr": 1e-4, "weight_decay": 1e-4, "head": {}},
    ("vtadl", "transformer"): {"batch_size": 8, "lr": 1e-4, "weight_decay": 1e-4, "head": {}},
}


def backbone_group(backbone_name: str, family: str) -> str:
    if "swin" in backbone_name:
        return "swin"
    return "cnn" if family == "cnn" else "transformer"


def head_defaults(head: str, backbone_name: str, family: str) -> dict[str, Any]:
    """Training and head hyperparameters for a (head, backbone) pair: Table 2, with the
    backbone's own ``head_overrides`` (registry data) where the paper has no row for it."""
    if head not in HEADS:
        raise VitqcError(f"unknown head {head!r} (--head): choose one of {', '.join(HEADS)}")
    from vitqc.backbones.registry import get_spec

    defaults = PAPER_DEFAULTS[(head, backbone_group(backbone_name, family))]
    out = {**defaults, "head": dict(defaults["head"])}
    spec = get_spec(backbone_name)
    override = dict(spec.head_overrides.get(head, {})) if spec is not None else {}
    out["head"].update(override.pop("head", {}))
    out.update(override)
    return out


def create_head(
    name: str,
    feature_channels: list[int],
    feature_sizes: list[tuple[int, int]],
    **kwargs: Any,
) -> Head:
    if name not in HEADS:
        raise VitqcError(f"unknown head {name!r} (--head): choose one of {', '.join(HEADS)}")
    try:
        return HEADS[name](feature_channels, feature_sizes, **kwargs)
    except ValueError as exc:  # a bad option or a backbone the head cannot use
        raise VitqcError(f"--head {name}: {exc}") from exc


def check_backbone(head: str, backbone: str, family: str) -> None:
    """Refuse a head/backbone pair that cannot work, before any feature is extracted."""
    families = getattr(HEADS.get(head), "backbone_families", None)
    if families and family not in families:
        raise VitqcError(
            f"--head {head} cannot run on --backbone {backbone}: use --backbone "
            f"{default_backbone(head)}"
        )


def default_backbone(head: str) -> str:
    """The backbone a head runs on when none is named (VT-ADL: the image itself)."""
    cls = HEADS.get(head)
    return getattr(cls, "default_backbone", None) or DEFAULT_BACKBONE


def head_option_names(name: str) -> set[str]:
    """Options a head accepts: its keyword arguments, plus ``option_names`` when it
    takes ``**options`` (VT-ADL's sizes, which default from a preset)."""
    cls = HEADS[name]
    params = inspect.signature(cls.__init__).parameters
    names = {k for k, p in params.items() if p.kind is not p.VAR_KEYWORD}
    return (names | set(getattr(cls, "option_names", ()))) - {
        "self",
        "feature_channels",
        "feature_sizes",
    }


#: The position-free counterpart of each per-position standardization.
POSITION_FREE = {"position-whiten": "whiten", "position": "channel"}


def _option_default(name: str, option: str) -> Any:
    param = inspect.signature(HEADS[name].__init__).parameters.get(option)
    return None if param is None else param.default


def position_free_options(name: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """Option overrides that make a head's statistics position-free, or None when they
    already are (or the head has none). Per-position statistics model aligned parts
    well and fail when parts move between photos; ``fit`` rates both on the proxy. The
    knn head's position-free variant is the plain PatchCore embedding (its own 3 x 3
    neighbourhoods too, whatever the backbone's default)."""
    mode = options.get("standardize", _option_default(name, "standardize"))
    if name == "knn":  # position-free knn is the plain PatchCore embedding
        if mode is None:
            return None
        return {
            "standardize": None,
            "fuse": False,
            "neighbourhood": _option_default(name, "neighbourhood"),
        }
    if mode in POSITION_FREE:
        return {"standardize": POSITION_FREE[mode]}
    return None


def preview_head(name: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The cheaper head and options a choice is *rated* with (the chosen one is then
    built in full). The flow and the GMM start from the whitened Gaussian, so their
    statistics are rated on that Gaussian (the GMM's EM start alone costs seconds);
    the knn head on a 1 % coreset, which dominates its fit. Other heads: themselves."""
    if name in ("flow", "gmm"):
        keep = {k: options[k] for k in ("standardize", "fuse") if k in options}
        return "gaussian", {"standardize": _option_default(name, "standardize"), **keep}
    if name == "knn":
        ratio = options.get("coreset_ratio", _option_default(name, "coreset_ratio"))
        return name, {**options, "coreset_ratio": min(float(ratio), 0.01)}
    return name, dict(options)


def parse_head(text: str) -> tuple[str, dict[str, Any]]:
    """``"gmm"`` or a variant ``"gmm:conditioning=embedding"`` (options joined by '+').

    A variant is its own method in the tables (the string is its label), so one grid
    can compare, say, two GMM conditionings on the same cached features.
    """
    name, _, rest = str(text).strip().partition(":")
    if name not in HEADS:
        raise VitqcError(f"unknown head {name!r}: choose from {', '.join(HEADS)}")
    accepted = head_option_names(name)
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split("+"))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in accepted:
            raise VitqcError(
                f"head variant {text!r}: expected {name}:option=value with an option of "
                f"{name} ({', '.join(sorted(accepted))})"
            )
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return name, options


__all__ = [
    "HEADS",
    "Head",
    "PAPER_DEFAULTS",
    "check_backbone",
    "create_head",
    "default_backbone",
    "fuse_maps",
    "head_defaults",
    "parse_head",
    "position_free_options",
    "preview_head",
]
