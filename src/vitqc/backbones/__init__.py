"""Frozen pretrained backbones: registry, weight sources, feature extractor, feature cache."""

from vitqc.backbones.extractor import FeatureExtractor
from vitqc.backbones.registry import (
    BACKBONES,
    DEFAULT_BACKBONE,
    BackboneSpec,
    create_backbone,
    create_backbone_from_spec,
    describe_backbone,
    list_backbones,
)

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "BackboneSpec",
    "FeatureExtractor",
    "create_backbone",
    "create_backbone_from_spec",
    "describe_backbone",
    "list_backbones",
]
