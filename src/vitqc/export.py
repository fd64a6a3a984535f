"""One ONNX file per model: preprocessing, frozen backbone, head, maps and calibration.

``export_onnx(model, out, meta)`` traces :class:`ExportGraph` (the model's own modules,
in eval mode) with torch's TorchScript-based exporter (``dynamo=False``, opset
``OPSET``): it needs no extra package and exports an EfficientNet-Lite model in about
2 s on one CPU thread, against about 19 s for the ``torch.export`` based exporter (which
also needs ``onnxscript``). The file holds:

- input ``image``: float32 ``[N, 3, H, W]`` in [0, 1], RGB, at the model's input size
  (N dynamic). How to get there is in the metadata's ``resize`` entry: the pixels of a
  uint8 image divided by 255, grayscale replicated to three channels, resized with
  ``vitqc.data.transforms.resize_tensor`` (bilinear, antialiased, no corner alignment;
  ``vitqc.runtime`` reproduces it with Pillow).
- outputs ``score`` ``[N]`` (raw image score, the units of the threshold),
  ``normalized_score`` ``[N]`` and ``map`` ``[N, H, W]`` on the operator scale
  (``vitqc.decision.operator_score``: 0.5 at the threshold), ``defective`` ``[N]`` bool
  (``score > threshold`` at the stored threshold; the minimum-area rule, when stored,
  is applied by the caller from ``map``, see ``vitqc.runtime``).
- metadata: one ``metadata_props`` entry, key ``vitqc``, a JSON object (``FORMAT``,
  ``format_version``, ``vitqc_version``, ``model_id``, ``input_size``, ``resize``,
  ``threshold``, ``map_low``, ``min_area``, the whole ``calibration`` block, backbone,
  head, ``image_score``, ``smoothing_sigma``, ``validation`` = the fit's proxy figures).
  A caller can apply another threshold from ``score`` without exporting again.

Every head exports (VT-ADL's SSIM window is a fixed buffer of the head, so the graph
holds a constant kernel). A head outside ``EXPORTABLE_HEADS``, or a model without a
calibrated threshold, is refused with a one-line ``VitqcError``.
The knn head's distances are matrix products over fixed blocks of its memory bank
(``KNNHead.forward``), so the traced graph is valid for every batch size and never uses
``torch.cdist``. The graph holds the int8 candidate search of a head searching by
``auto`` (the default) or ``int8``, and the exact search otherwise
(``heads.neighbours.export_search``): where torch runs other candidates by default
(bfloat16 on CPUs with AMX), a near tie may give torch or the graph a slightly larger
distance (a few per mille).

TensorFlow-style "same" padding (timm's ``Conv2dSame``: EfficientNet-Lite's stride-2
convolutions) is dynamic in torch: the padding is computed from the input's size on every
call and applied as a separate ``F.pad``. Traced as it is, each such convolution becomes
``Shape`` arithmetic, a ``Pad`` and a ``Conv``, and the ``Pad`` splits ONNX Runtime's
blocked-layout chain of convolutions (a layout conversion out and back in around it).
The input size of an exported graph is fixed, so ``static_same_padding`` exports each of
them as one ``Conv`` with the (asymmetric) padding as its ``pads`` attribute.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same_arg
from torch import nn

from vitqc import __version__
from vitqc.atomic import atomic_path
from vitqc.decision import operator_score
from vitqc.errors import VitqcError
from vitqc.files import file_sha256
from vitqc.runtime import FORMAT, FORMAT_VERSION, METADATA_KEY, OUTPUTS, feature_names
from vitqc.scoring import AnomalyModel, aggregate_maps, maps_at_input_size

__all__ = [
    "EXPORTABLE_HEADS",
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "OPSET",
    "ExportGraph",
    "bundle_id",
    "export_bundle",
    "export_onnx",
    "static_same_padding",
    "trace_to_onnx",
]

OPSET = 17
EXPORTABLE_HEADS = ("gaussian", "knn", "flow", "gmm", "vtadl")


class ExportGraph(nn.Module):
    """What the ONNX file computes: ``image [N, 3, H, W]`` in [0, 1] ->
    ``(score, normalized_score, map, defective)``; ``AnomalyModel.forward`` (its
    preprocessor, extractor and head modules, ``maps_from_features``' upsampling,
    smoothing and image score) followed by the calibration."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        refuse_unexportable(model)
        self.preprocessor = model.preprocessor
        self.extractor = model.extractor
        head = model.head
        self.head = head
        self.input_size = tuple(int(v) for v in model.input_size)
        self.smoothing_sigma = float(model.smoothing_sigma)
        self.image_score = model.image_score
        self.register_buffer("threshold", model.threshold.detach().clone().float())
        self.register_buffer("map_low", model.map_low.detach().clone().float())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``OUTPUTS``, then the backbone's feature maps (the head's inputs, named
        ``feature_names``: where ``vitqc.runtime`` splits the graph)."""
        features = [f.float() for f in self.extractor(self.preprocessor(image))]
        patch, scores = self.head.score(features)
        maps = maps_at_input_size(patch, self.input_size, self.smoothing_sigma)
        if scores is None:
            scores = aggregate_maps(maps, self.image_score)
        normalized = operator_score(scores, self.map_low, self.threshold)
        normalized_maps = operator_score(maps, self.map_low, self.threshold)
        return scores, normalized, normalized_maps, scores > self.threshold, *features


class _StaticSamePadConv(torch.autograd.Function):
    """A convolution after zero padding of ``pads`` = (top, left, bottom, right): in
    torch ``F.pad`` then ``F.conv2d``, in ONNX one ``Conv`` with those ``pads``."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, dilation, groups, pads):
        top, left, bottom, right = pads
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def symbolic(g, x, weight, bias, stride, dilation, groups, pads):
        inputs = [x, weight] if bias is None else [x, weight, bias]
        return g.op(
            "Conv",
            *inputs,
            pads_i=list(pads),
            strides_i=list(stride),
            dilations_i=list(dilation),
            group_i=groups,
        )


@contextmanager
def static_same_padding(module: nn.Module, example: torch.Tensor) -> Iterator[None]:
    """Within the block, every timm ``Conv2dSame`` in ``module`` pads as it does for
    ``example``'s size, as one convolution with constant pads (see the module docstring):
    for tracing at a fixed input size. The modules are restored on exit.

    The sizes are read in a trace of their own: a trace runs what an export traces (a
    ``FeatureExtractor`` traces its timm model, not its folded copy), and a size read in
    the export's own trace would be one of its values, not a constant."""
    convs = [m for m in module.modules() if isinstance(m, Conv2dSame)]
    if not convs:
        yield
        return
    sizes: dict[nn.Module, list[int]] = {}

    def record(conv: nn.Module, args: tuple) -> None:  # a pre-hook's return replaces args
        sizes.setdefault(conv, [int(v) for v in args[0].shape[-2:]])

    hooks = [conv.register_forward_pre_hook(record) for conv in convs]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on the int() above
            torch.jit.trace(module, (example,), check_trace=False, strict=False)
    finally:
        for hook in hooks:
            hook.remove()
    convs = [conv for conv in convs if conv in sizes]  # those the forward runs
    for conv in convs:
        left, right, top, bottom = pad_same_arg(
            sizes[conv], conv.weight.shape[-2:], conv.stride, conv.dilation
        )
        conv.forward = lambda x, c=conv, pads=(top, left, bottom, right): _StaticSamePadConv.apply(
            x, c.weight, c.bias, c.stride, c.dilation, c.groups, pads
        )
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward


def refuse_unexportable(model: AnomalyModel) -> None:
    """A one-line ``VitqcError`` for what the export cannot hold."""
    name = getattr(model.head, "name", type(model.head).__name__)
    if name not in EXPORTABLE_HEADS:
        raise VitqcError(
            f"cannot export the {name!r} head to ONNX yet (exportable heads: "
            f"{', '.join(EXPORTABLE_HEADS)})"
        )
    threshold, low = float(model.threshold), float(model.map_low)
    if not threshold == threshold:  # NaN
        raise VitqcError("this model has no calibrated threshold: refit it with `vitqc fit`")
    if not threshold > low:
        raise VitqcError(
            f"cannot export: the threshold ({threshold:g}) is not above the typical normal "
            f"pixel score ({low:g}), so the operator score is undefined"
        )


def bundle_id(bundle_dir: str | Path) -> str:
    """sha256 over the bundle's ``config.json`` and ``model.safetensors`` bytes."""
    from vitqc.bundle import CONFIG_FILE, WEIGHTS_FILE

    paths = [Path(bundle_dir) / name for name in (CONFIG_FILE, WEIGHTS_FILE)]
    for path in paths:
        if not path.is_file():
            raise VitqcError(f"not a vitqc model: {path} is missing")
    return file_sha256(*paths)


def _unsaved_model_id(model: AnomalyModel, config: dict[str, Any]) -> str:
    """For a model that was never saved: sha256 over its config and non-backbone tensors."""
    from safetensors.torch import save

    own = {
        k: v.detach().contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.startswith("extractor.")
    }
    blob = json.dumps({k: v for k, v in config.items() if k != "meta"}, sort_keys=True)
    return hashlib.sha256(blob.encode() + save(own)).hexdigest()


def export_metadata(model: AnomalyModel, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON object stored under ``METADATA_KEY``. ``meta`` is the bundle config (as
    ``bundle.read_config`` returns it, with ``model_id`` added by ``export_bundle``);
    what it lacks comes from the model itself."""
    from vitqc.bundle import model_config

    config = {**model_config(model), **meta}
    h, w = (int(v) for v in model.input_size)
    fit_meta = (config.get("meta") or {}).get("fit") or {}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vitqc_version": __version__,
        "model_id": config.get("model_id") or _unsaved_model_id(model, config),
        "input_size": [h, w],
        "input": {
            "name": "image",
            "shape": ["N", 3, h, w],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "channel_order": "RGB",
        },
        "resize": {
            "method": "bilinear",
            "antialias": True,
            "align_corners": False,
            "channel_order": "RGB",
            "grayscale": "replicate to 3 channels",
            "bit_depth": model.preprocessor.bit_depth,
            "values": "grayscale files of more than 8 bits scaled by 255 / (2 ** bit_depth - "
            "1) to uint8 (vitqc.data.io.image_array); uint8 / 255, resized as float, clipped "
            "to [0, 1]; "
            "an image already at the input size is not resized",
            "reference": "vitqc.data.transforms.resize_tensor",
        },
        "outputs": {
            "score": "raw image score [N] (threshold units)",
            "normalized_score": "operator score [N]: 0.5 at the threshold",
            "map": "anomaly map [N, H, W] on the operator scale",
            "defective": "score > threshold [N] (bool, stored threshold)",
            "features_*": "the backbone's feature maps, the head's inputs (listed under "
            "'features'): vitqc.runtime runs a batch's backbone and head in calls of "
            "their own sizes",
        },
        "normalized_score": "u = (s - map_low) / (threshold - map_low); "
        "clip(u, 0, 1) / 2 for u <= 1, 1 - 1 / (2 u) above (vitqc.decision.operator_score)",
        # the buffers' float32 values: what `vitqc predict` compares against
        "threshold": float(model.threshold),
        "map_low": float(model.map_low),
        "map_high": float(model.map_high),
        "min_area": float(model.min_area),
        "calibration": config.get("calibration"),
        "backbone": config.get("backbone"),
        "preprocessing": config.get("preprocessing"),
        "head": {
            "name": config["head"]["name"],
            "config": config["head"].get("config"),
            "feature_channels": config["head"].get("feature_channels"),
            "feature_sizes": config["head"].get("feature_sizes"),
        },
        "image_score": config.get("image_score", model.image_score),
        "smoothing_sigma": float(config.get("smoothing_sigma", model.smoothing_sigma)),
        "validation": fit_meta.get("proxy"),
        "exporter": {"torch": torch.__version__, "dynamo": False, "opset": OPSET},
    }


def trace_to_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    output_names: list[str] | None = None,
) -> None:
    """Trace ``module`` on ``example`` (input ``image``, batch dynamic, the rest fixed)
    into the ONNX file ``path``, as every vitqc export is traced: TorchScript exporter,
    opset ``OPSET``, same-padding convolutions with constant pads."""
    names = output_names or []
    with warnings.catch_warnings(), static_same_padding(module, example):
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            output_names=names or None,
            dynamic_axes={"image": {0: "N"}, **{name: {0: "N"} for name in names}},
            do_constant_folding=True,
        )


def export_onnx(model: AnomalyModel, out: Path, meta: dict[str, Any]) -> Path:
    """Write ``out`` (atomically): the model as one ONNX file with its metadata.

    ``meta`` is the bundle config (``bundle.read_config``, plus ``model_id``; may be
    empty for a model never saved). Raises ``VitqcError`` for a head that cannot be
    exported."""
    import onnx

    out = Path(out)
    model.eval()
    graph = ExportGraph(model).eval()
    info = export_metadata(model, meta)
    h, w = info["input_size"]
    example = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # fills inference caches (the GMM's mixture terms) before tracing
        n_features = len(graph(example)) - len(OUTPUTS)
        model.head.prepare_export()
    info["features"] = feature_names(n_features)
    with tempfile.TemporaryDirectory(prefix="vitqc-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            trace_to_onnx(graph, example, raw, output_names=[*OUTPUTS, *info["features"]])
        except Exception as exc:  # the exporter's errors are long; one line here
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise VitqcError(
                f"cannot export the {info['head']['name']!r} head to ONNX: "
                f"{type(exc).__name__}: {first[:200]}"
            ) from exc
        proto = onnx.load(str(raw))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info)
    proto.producer_name, proto.producer_version = "vitqc", __version__
    onnx.checker.check_model(proto)
    with atomic_path(out, suffix=".onnx") as tmp_out:
        onnx.save(proto, str(tmp_out))
    return out


def export_bundle(model_dir: str | Path, out: str | Path, weights: str | None = None) -> Path:
    """``vitqc export``: load the bundle, export it with its config as metadata."""
    from vitqc.bundle import load_bundle

    model, config = load_bundle(model_dir, weights=weights)
    return export_onnx(model, Path(out), {**config, "model_id": bundle_id(model_dir)})
