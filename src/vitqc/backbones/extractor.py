"""A frozen timm model that returns the feature maps the heads are fitted on.

Every backbone goes through timm's ``forward_intermediates``, so there is no per-model
feature code: transformers get their final norm applied once to each chosen block (not
after every block, the reference code's bug), CNNs return their stage outputs as they are.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vitqc.backbones.folding import fold_batch_norms
from vitqc.errors import VitqcError


def normalize_layers(
    layers: int | str | Sequence[int | str], num_features: int, name: str
) -> tuple[int, ...]:
    """Layer indices as sorted unique ints in ``[0, num_features)``.

    Accepts ints, negative ints (from the end), "7" and "i7" (the paper's block naming),
    and comma-separated strings ("2,3") as typed on the command line.
    Sorted because ``forward_intermediates`` returns maps in network order.
    """
    if isinstance(layers, str):
        items: list[int | str] = [t for t in layers.split(",") if t.strip()]
    elif isinstance(layers, int):
        items = [layers]
    else:
        items = list(layers)
    out: set[int] = set()
    for item in items:
        text = str(item).strip().lower()
        if text.startswith("i"):
            text = text[1:]
        try:
            idx = int(text)
        except ValueError:
            raise VitqcError(f"invalid layer {item!r} for {name}: expected an integer") from None
        if idx < 0:
            idx += num_features
        if not 0 <= idx < num_features:
            raise VitqcError(
                f"layer {item} out of range for {name}: it has feature layers 0..{num_features - 1}"
            )
        out.add(idx)
    if not out:
        raise VitqcError(f"no layers given for {name}")
    return tuple(sorted(out))


def feature_info_of(model: nn.Module) -> list[dict[str, Any]]:
    info = getattr(model, "feature_info", None)
    if info is None:
        raise VitqcError(f"{type(model).__name__} exposes no feature_info: cannot pick layers")
    return [dict(f) for f in info]


#: Images per backbone call on the CPU: a CNN's activations for a batch of 32 leave the
#: cache, and its time per image grows with the batch (``benchmarks/bench_inference.py``).
MICRO_BATCH = 2


def micro_batches(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` in chunks of ``MICRO_BATCH`` images on the CPU (whole on a GPU or in a trace)."""
    if x.shape[0] > MICRO_BATCH and x.device.type == "cpu" and not torch.jit.is_tracing():
        return list(x.split(MICRO_BATCH))
    return [x]


class FeatureExtractor(nn.Module):
    """Frozen, always-eval backbone: ``forward(x) -> list[Tensor[B, C, h, w]]`` (float32).

    ``x`` is the preprocessed batch at ``input_size``. Parameters never need gradients
    and ``train()`` keeps the module in eval mode, so BatchNorm statistics and dropout can
    never change features between training and inference.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        timm_name: str,
        layers: Sequence[int | str] | int | str,
        family: str,
        input_size: tuple[int, int],
        weights_source: str,
        weights_hash: str,
        apply_norm: bool,
    ) -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise VitqcError(
                f"backbone {name} has no forward_intermediates in this timm version: "
                "choose another model"
            )
        info = feature_info_of(model)
        self.name = name
        self.timm_name = timm_name
        self.layers = normalize_layers(layers, len(info), name)
        self.family = family
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.weights_source = weights_source
        self.weights_hash = weights_hash
        self.apply_norm = apply_norm
        cfg = getattr(model, "pretrained_cfg", None) or {}
        # The normalization the weights were trained with (timm's pretrained cfg).
        mean = cfg.get("mean") or (0.0, 0.0, 0.0)
        std = cfg.get("std") or (1.0, 1.0, 1.0)
        self.mean = (float(mean[0]), float(mean[1]), float(mean[2]))
        self.std = (float(std[0]), float(std[1]), float(std[2]))
        self.feature_strides = [int(info[i].get("reduction", 0)) for i in self.layers]
        self.model_parameters = sum(p.numel() for p in model.parameters())

        # Drop what comes after the last chosen layer (and the classifier): less compute,
        # and num_parameters() counts what actually runs. The final norm is kept.
        prune = getattr(model, "prune_intermediate_layers", None)
        if prune is not None:
            prune(indices=list(self.layers), prune_norm=False, prune_head=True)
        params = inspect.signature(model.forward_intermediates).parameters
        kwargs: dict[str, Any] = {"intermediates_only": True}
        if "output_fmt" in params:
            kwargs["output_fmt"] = "NCHW"
        if "norm" in params:
            kwargs["norm"] = bool(apply_norm)
        if "stop_early" in params:
            kwargs["stop_early"] = True
        self._fi_kwargs = kwargs
        # CNNs run channels-last: depthwise convolutions (EfficientNet-Lite) are faster
        # that way on a CPU, and their per-image time no longer grows with the batch.
        self.channels_last = family == "cnn"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)
        self._shapes: list[tuple[int, int, int]] | None = None
        #: ``self.model`` with its BatchNorms folded into the convolutions, what eager
        #: inference runs (``inference_model``); held in a list so that it is no
        #: submodule: the state dict, parameter counts and bundles stay the model's own.
        self._folded: list[nn.Module] = []
        self.register_load_state_dict_post_hook(lambda module, keys: module._folded.clear())

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ...: fold again when next run
        self._folded.clear()
        return super()._apply(fn, *args, **kwargs)

    def _intermediates(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return model.forward_intermediates(x, indices=list(self.layers), **self._fi_kwargs)

    def inference_model(self) -> nn.Module:
        """The model eager inference runs: ``self.model`` with its BatchNorms folded into
        the convolutions (``backbones.folding``), built on first use. A trace (the ONNX
        export) takes ``self.model`` itself; ONNX Runtime folds them when it loads."""
        if torch.jit.is_tracing():
            return self.model
        if not self._folded:
            p = next(self.model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
            x = torch.rand(1, 3, *self.input_size, generator=torch.Generator().manual_seed(0))
            folded, _ = fold_batch_norms(
                self.model, lambda model: self._intermediates(model, x.to(device))
            )
            self._folded.append(folded)
        return self._folded[0]

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode whatever the caller asks (frozen backbone)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of ``x``; on the CPU a large batch runs ``MICRO_BATCH`` images at a
        time (a trace, i.e. the ONNX export, takes the batch whole)."""
        chunks = micro_batches(x)
        model = self.inference_model()
        with torch.inference_mode():
            parts = [self._intermediates(model, c) for c in chunks]
            feats = [torch.cat(layer).float().contiguous() for layer in zip(*parts, strict=True)]
        # Inference tensors cannot be saved for backward; a trainable head (e.g. a
        # LayerNorm on the features) needs normal tensors, hence the clone outside.
        return [f.clone() for f in feats]

    # ------------------------------------------------------------ description

    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """``(C, h, w)`` of each output at ``input_size`` (one dry run, then cached)."""
        if self._shapes is None:
            p = next(self.model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
            x = torch.zeros(1, 3, *self.input_size, device=device)
            self._shapes = [tuple(int(d) for d in f.shape[1:]) for f in self(x)]  # type: ignore[misc]
        return list(self._shapes)

    @property
    def feature_channels(self) -> list[int]:
        return [c for c, _, _ in self.feature_shapes()]

    def num_parameters(self) -> int:
        """Parameters that run (after pruning the unused tail and the classifier)."""
        return sum(p.numel() for p in self.model.parameters())

    def spec_dict(self) -> dict[str, Any]:
        """JSON-able recipe for rebuilding this extractor (saved in model bundles)."""
        import timm

        return {
            "name": self.name,
            "timm_name": self.timm_name,
            "layers": list(self.layers),
            "weights_source": self.weights_source,
            "weights_hash": self.weights_hash,
            "input_size": list(self.input_size),
            "family": self.family,
            "timm_version": timm.__version__,
        }

    def fingerprint(self) -> str:
        """Stable short hash of what determines the features; used in cache keys.

        The timm version is included: a changed implementation may change features.
        """
        d = self.spec_dict()
        keyed = {
            k: d[k] for k in ("timm_name", "layers", "weights_hash", "input_size", "timm_version")
        }
        keyed["apply_norm"] = self.apply_norm
        keyed["batch_norm"] = "folded"  # eager features fold BatchNorm (inference_model)
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, layers={list(self.layers)}, input_size={self.input_size}, "
            f"weights={self.weights_hash}"
        )
