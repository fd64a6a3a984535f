"""Model bundles: a directory of safetensors weights and a JSON config. Never pickle.

    MODEL_DIR/config.json        backbone spec (name, layers, weights source + hash),
                                 preprocessing, head config, calibration, provenance
    MODEL_DIR/model.safetensors  head weights, preprocessing and calibration buffers
    MODEL_DIR/backbone.safetensors  only when the backbone cannot be rebuilt from its
                                 source (random weights)

The frozen backbone is rebuilt from its source on load and its weights hash checked,
so a bundle stays small and never carries third-party weights by accident.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vitqc import __version__
from vitqc.atomic import atomic_dir
from vitqc.backbones import create_backbone
from vitqc.calibration import Calibration
from vitqc.data.transforms import Preprocessor
from vitqc.errors import VitqcError
from vitqc.heads import create_head
from vitqc.scoring import AnomalyModel

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BACKBONE_FILE = "backbone.safetensors"


def _split_state(model: AnomalyModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    own, backbone = {}, {}
    for key, value in model.state_dict().items():
        target = backbone if key.startswith("extractor.") else own
        target[key] = value.detach().contiguous().clone()
    return own, backbone


def model_config(model: AnomalyModel) -> dict[str, Any]:
    head = model.head
    return {
        "format_version": FORMAT_VERSION,
        "vitqc_version": __version__,
        "backbone": model.extractor.spec_dict(),
        "preprocessing": model.preprocessor.config(),
        "head": {
            "name": head.name,
            "feature_channels": head.feature_channels,
            "feature_sizes": [list(s) for s in head.feature_sizes],
            "config": head.config(),
        },
        "smoothing_sigma": model.smoothing_sigma,
        "image_score": model.image_score,
        "calibration": model.calibration.to_dict()
        if model.calibration is not None
        else {
            "threshold": float(model.threshold),
            "map_low": float(model.map_low),
            "map_high": float(model.map_high),
        },
    }


def save_bundle(
    model: AnomalyModel, out_dir: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """Write the bundle atomically: an existing bundle is replaced only when complete."""
    own, backbone = _split_state(model)
    config = model_config(model)
    config["meta"] = meta or {}
    with atomic_dir(out_dir) as tmp:
        save_file(own, str(tmp / WEIGHTS_FILE))
        if model.extractor.weights_source == "random":
            save_file(backbone, str(tmp / BACKBONE_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)


def read_config(bundle_dir: str | Path) -> dict[str, Any]:
    path = Path(bundle_dir) / CONFIG_FILE
    if not Path(bundle_dir).is_dir():
        raise VitqcError(f"model directory not found: {bundle_dir}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise VitqcError(f"not a vitqc model: {path} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VitqcError(f"corrupt model config {path}: {exc}") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise VitqcError(f"{path}: unsupported bundle format {config.get('format_version')!r}")
    return config


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError as exc:
        raise VitqcError(f"model weights missing: {path}") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise VitqcError(f"corrupt model weights {path}: {exc}") from exc


def load_bundle(bundle_dir: str | Path, weights: str | None = None) -> tuple[AnomalyModel, dict]:
    """Rebuild the model; ``weights`` overrides where the backbone weights come from."""
    bundle_dir = Path(bundle_dir)
    config = read_config(bundle_dir)
    spec = config["backbone"]
    extractor = create_backbone(
        spec["name"],
        layers=tuple(spec["layers"]),
        weights=weights or spec["weights_source"],
        image_size=tuple(spec["input_size"]),
    )
    backbone_file = bundle_dir / BACKBONE_FILE
    if backbone_file.exists():
        state = {k.removeprefix("extractor."): v for k, v in _load_tensors(backbone_file).items()}
        extractor.load_state_dict(state)
    elif extractor.weights_hash != spec["weights_hash"]:
        raise VitqcError(
            f"backbone weights differ from the ones this model was trained with "
            f"(expected hash {spec['weights_hash'][:16]}, got {extractor.weights_hash[:16]}): "
            "pass --weights with the original file"
        )
    head_cfg = config["head"]
    head = create_head(
        head_cfg["name"],
        head_cfg["feature_channels"],
        [tuple(s) for s in head_cfg["feature_sizes"]],
        **head_cfg["config"],
    )
    pre = Preprocessor.from_config(config["preprocessing"])
    model = AnomalyModel(
        pre,
        extractor,
        head,
        smoothing_sigma=config["smoothing_sigma"],
        image_score=config.get("image_score", "max"),
    )
    state = _load_tensors(bundle_dir / WEIGHTS_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # bundles written before the per-region rule have no min_area buffer: 0 (off)
    missing = [k for k in missing if not k.startswith("extractor.") and k != "min_area"]
    if missing or unexpected:
        raise VitqcError(
            f"{bundle_dir / WEIGHTS_FILE} does not match its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if "fpr_beta" in config.get("calibration", {}):  # how the threshold was fitted
        model.calibration = Calibration.from_dict(config["calibration"])
    model.eval()
    return model, config
