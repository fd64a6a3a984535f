"""Frozen-backbone inference without separate BatchNorm passes.

A frozen CNN's BatchNorm layers are fixed affine maps of the convolution before them, so
they can be folded into its weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``),
as ONNX Runtime does when it loads a graph. In eager torch each BatchNorm is otherwise
another pass over the activations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

#: Largest relative difference (to the output's largest value) the folded copy may show.
FOLD_TOLERANCE = 1e-4


def _conv_batchnorm_pairs(
    model: nn.Module, run: Callable[[nn.Module], Sequence[torch.Tensor]]
) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(convolution, BatchNorm) pairs where the BatchNorm took that convolution's output
    as its input in one forward pass of ``run``."""
    outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def after_conv(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        outputs[id(out)] = (module, out)

    def before_norm(module: nn.Module, args: tuple) -> None:
        found = outputs.get(id(args[0]))
        if found is not None and found[1] is args[0]:
            pairs.append((found[0], module))

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def _what_follows_the_norm(norm: nn.BatchNorm2d) -> nn.Module | None:
    """What a BatchNorm module computes after normalizing (None: not known to us)."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if type(norm) is BatchNormAct2d:  # timm: normalize, then dropout, then activation
        return nn.Sequential(norm.drop, norm.act)
    return None


def fold_batch_norms(
    model: nn.Module, run: Callable[[nn.Module], Sequence[torch.Tensor]]
) -> tuple[nn.Module, int]:
    """``(copy, n)``: an eval-mode copy of ``model`` with ``n`` BatchNorms folded into the
    convolution whose output each one normalizes, found by running ``run(model)`` once
    (``run`` returns the outputs that matter). A convolution or norm used more than once,
    a norm without running statistics or of an unknown subclass, stays as it is. The copy
    must give ``run``'s outputs within ``FOLD_TOLERANCE``; otherwise, or with nothing to
    fold, ``(model, 0)``."""
    folded = copy.deepcopy(model).eval()
    pairs = _conv_batchnorm_pairs(folded, run)
    convs = [id(conv) for conv, _ in pairs]
    norms = [id(norm) for _, norm in pairs]
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in folded.modules():
        for name, child in parent.named_children():
            places.setdefault(id(child), []).append((parent, name))
    n = 0
    for conv, norm in pairs:
        rest = _what_follows_the_norm(norm)
        if (
            rest is None
            or norm.running_mean is None
            or convs.count(id(conv)) != 1
            or norms.count(id(norm)) != 1
            or len(places.get(id(conv), [])) != 1
            or len(places.get(id(norm), [])) != 1
        ):
            continue
        (conv_parent, conv_name), (norm_parent, norm_name) = places[id(conv)] + places[id(norm)]
        setattr(conv_parent, conv_name, fuse_conv_bn_eval(conv, norm))
        setattr(norm_parent, norm_name, rest)
        n += 1
    if n == 0:
        return model, 0
    with torch.no_grad():
        expected, got = run(model), run(folded)
    for a, b in zip(expected, got, strict=True):
        scale = float(a.abs().max()) or 1.0
        if a.shape != b.shape or float((a - b).abs().max()) > FOLD_TOLERANCE * scale:
            return model, 0
    return folded, n
