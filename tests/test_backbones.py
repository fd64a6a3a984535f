"""Backbone registry, weight sources and the frozen feature extractor (random weights)."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitqc.backbones import (
    BACKBONES,
    FeatureExtractor,
    create_backbone,
    create_backbone_from_spec,
    describe_backbone,
    list_backbones,
)
from vitqc.backbones.registry import format_backbone_table
from vitqc.backbones.weights import build_timm_model, hub_reachable, read_weights_file
from vitqc.errors import VitqcError

DEIT = "deit_base_distilled_patch16_224"
SWIN = "swin_tiny_patch4_window7_224"
LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def deit() -> FeatureExtractor:
    return create_backbone(DEIT, layers=["i7", 11], weights="random")


@pytest.fixture(scope="module")
def x224() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- shapes


def test_deit_i7_and_i11_shapes_differ(deit: FeatureExtractor, x224: torch.Tensor) -> None:
    assert deit.layers == (7, 11) and deit.family == "transformer"
    f7, f11 = deit(x224)
    assert f7.shape == f11.shape == (1, 768, 14, 14)
    assert f7.dtype == torch.float32 and f7.is_contiguous()
    assert not torch.allclose(f7, f11)
    assert deit.feature_shapes() == [(768, 14, 14), (768, 14, 14)]
    assert deit.feature_strides == [16, 16]


def test_deit_final_norm_applied_once(deit: FeatureExtractor, x224: torch.Tensor) -> None:
    m = deit.model
    with torch.no_grad():
        t = m.norm_pre(m._pos_embed(m.patch_embed(x224)))
        for blk in m.blocks[:8]:
            t = blk(t)
        t = m.norm(t)[:, m.num_prefix_tokens :]  # norm once, then drop cls + dist tokens
    manual = t.reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    assert torch.allclose(deit(x224)[0], manual, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "shapes"),
    [
        (SWIN, [(768, 7, 7)]),
        ("efficientformer_l3", [(512, 7, 7)]),
        ("resnet50", [(512, 28, 28), (1024, 14, 14), (2048, 7, 7)]),
        (LITE0, [(40, 28, 28), (112, 14, 14)]),
        ("resnet18", [(128, 28, 28), (256, 14, 14)]),  # any timm name: stride-8/16 default
    ],
)
def test_backbone_feature_shapes(name: str, shapes: list, x224: torch.Tensor) -> None:
    ext = create_backbone(name, weights="random")
    assert ext.input_size == (224, 224)
    out = ext(x224)
    assert [tuple(f.shape[1:]) for f in out] == shapes
    assert ext.feature_shapes() == shapes
    assert ext.feature_channels == [c for c, _, _ in shapes]


def test_registry_is_data_and_any_timm_name_guesses_family() -> None:
    names = [s.name for s in list_backbones()]
    assert names[0] == LITE0 and set(names) == set(BACKBONES)
    assert BACKBONES["resnet50"].default_layers == (2, 3, 4)
    assert create_backbone("vit_tiny_patch16_224", weights="random").family == "transformer"
    assert create_backbone("resnet18", weights="random").family == "cnn"


def test_backbone_table_without_details_is_cheap() -> None:
    table = format_backbone_table(details=False)
    assert all(name in table for name in BACKBONES)


def test_describe_backbone_reports_counts() -> None:
    d = describe_backbone(LITE0)
    assert d["feature_shapes"] == [[40, 28, 28], [112, 14, 14]]
    assert 0 < d["num_parameters"] < d["model_parameters"] == 4_652_008


def test_layer_validation() -> None:
    with pytest.raises(VitqcError, match="out of range"):
        create_backbone(LITE0, layers=[7], weights="random")
    with pytest.raises(VitqcError, match="invalid layer"):
        create_backbone(LITE0, layers=["x"], weights="random")
    assert create_backbone(LITE0, layers=[-1, 3], weights="random").layers == (3, 4)
    assert create_backbone(LITE0, layers="3, i2", weights="random").layers == (2, 3)


# ---------------------------------------------------------------- frozen extractor


def test_extractor_is_frozen_and_features_are_trainable_inputs(x224: torch.Tensor) -> None:
    ext = create_backbone(LITE0, weights="random")
    assert all(not p.requires_grad for p in ext.parameters())
    ext.train()
    assert not ext.training and not any(m.training for m in ext.modules())
    feats = ext(x224)
    norm = torch.nn.LayerNorm(feats[0].shape[1])
    norm(feats[0].permute(0, 2, 3, 1)).sum().backward()  # no inference-tensor error
    assert norm.weight.grad is not None


def test_random_weights_are_seeded_and_fingerprint_tracks_settings(x224: torch.Tensor) -> None:
    a = create_backbone(LITE0, weights="random")
    b = create_backbone(LITE0, weights="random")
    assert a.weights_hash == "random:0" and a.fingerprint() == b.fingerprint()
    assert torch.equal(a(x224)[0], b(x224)[0])
    assert create_backbone(LITE0, layers=[3], weights="random").fingerprint() != a.fingerprint()
    assert create_backbone(LITE0, weights="random", image_size=192).fingerprint() != a.fingerprint()


def test_spec_dict_rebuilds_the_same_extractor(x224: torch.Tensor) -> None:
    ext = create_backbone(LITE0, layers=[3], weights="random")
    spec = json.loads(json.dumps(ext.spec_dict()))
    again = create_backbone_from_spec(spec)
    assert again.fingerprint() == ext.fingerprint()
    assert torch.equal(again(x224)[0], ext(x224)[0])
    with pytest.raises(VitqcError, match="differ"):
        create_backbone_from_spec({**spec, "weights_hash": "sha256:00"})


# ---------------------------------------------------------------- weight sources


@pytest.mark.parametrize("timm_name", [LITE0, "tf_efficientnet_lite1"])
def test_package_weights_classify_coffee_as_espresso(timm_name: str) -> None:
    from PIL import Image
    from skimage.data import coffee

    model, source, digest = build_timm_model(timm_name, "package")
    assert source == "package" and digest.startswith("sha256:")
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    x = timm.data.create_transform(**cfg)(Image.fromarray(coffee())).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == 967  # espresso
    assert float(probs[967]) > 0.5


def test_package_extractor_matches_full_model(x224: torch.Tensor) -> None:
    ext = create_backbone(LITE0)  # default weights: the packaged file
    assert ext.weights_source == "package" and ext.mean == (0.5, 0.5, 0.5)
    full, _, _ = build_timm_model(LITE0, "package")
    with torch.no_grad():
        ref = full.eval().forward_intermediates(x224, indices=[2, 3], intermediates_only=True)
    for got, want in zip(ext(x224), ref, strict=True):  # BatchNorm folded: float rounding
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_cpu_batches_run_in_micro_batches_with_the_same_features() -> None:
    """A batch larger than MICRO_BATCH runs in chunks (channels-last for CNNs): each
    image gets the features it gets alone, and the outputs are plain contiguous tensors."""
    from vitqc.backbones.extractor import MICRO_BATCH

    ext = create_backbone(LITE0, weights="random")
    assert ext.channels_last and not create_backbone(DEIT, weights="random").channels_last
    x = torch.rand(2 * MICRO_BATCH + 1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    whole = ext(x)
    with torch.no_grad():  # the model it runs (BatchNorm folded), on the batch in one call
        ref = ext.inference_model().forward_intermediates(
            x, indices=list(ext.layers), **ext._fi_kwargs
        )
    for got, want in zip(whole, ref, strict=True):
        assert got.is_contiguous() and got.shape[0] == x.shape[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for i in (0, MICRO_BATCH, 2 * MICRO_BATCH):
        for got, alone in zip(whole, ext(x[i : i + 1]), strict=True):
            torch.testing.assert_close(got[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_eager_inference_folds_batch_norm_into_the_convolutions(x224: torch.Tensor) -> None:
    """The features come from a copy with every conv -> BatchNorm folded (package
    weights: real statistics), equal to the unfolded model's; the extractor's own state,
    parameter count and module tree are untouched; a new state (load_state_dict) is
    folded again; a transformer without BatchNorm runs as it is."""
    from timm.layers import BatchNormAct2d

    ext = create_backbone(LITE0)
    state = {k: v.clone() for k, v in ext.state_dict().items()}
    params = ext.num_parameters()
    with torch.no_grad():
        ref = ext.model.forward_intermediates(x224, indices=list(ext.layers), **ext._fi_kwargs)
    for got, want in zip(ext(x224), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    folded = ext.inference_model()
    assert folded is not ext.model
    assert not [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(isinstance(m, BatchNormAct2d) for m in ext.model.modules())
    assert ext.state_dict().keys() == state.keys() and ext.num_parameters() == params
    assert not [n for n, _ in ext.named_modules() if "folded" in n]

    other = create_backbone(LITE0, weights="random")
    ext.load_state_dict(other.state_dict())
    for got, want in zip(ext(x224), other(x224), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    deit = create_backbone(DEIT, weights="random")
    deit(x224[:1])
    assert deit.inference_model() is deit.model


def test_batch_norm_is_not_folded_where_the_convolution_output_is_also_used_elsewhere() -> None:
    """A conv whose output feeds its BatchNorm and a residual sum: folding would change
    the sum, so the check against the original keeps the model as it is."""
    from vitqc.backbones.folding import fold_batch_norms

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.tail = torch.nn.Conv2d(4, 4, 1)
            self.tail_bn = torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.tail_bn(self.tail(self.bn(y) + y))

    torch.manual_seed(0)
    block = Block().eval()
    for bn in (block.bn, block.tail_bn):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.rand(2, 4, 8, 8)
    model, n = fold_batch_norms(block, lambda m: [m(x)])
    assert (model, n) == (block, 0)

    class Chain(Block):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.tail_bn(self.tail(self.bn(self.conv(x))))

    block = Chain().eval()
    block.load_state_dict(model.state_dict())
    model, n = fold_batch_norms(block, lambda m: [m(x)])
    assert n == 2 and model is not block and isinstance(block.bn, torch.nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), block(x), rtol=1e-5, atol=1e-5)


def _perturbed_lite0() -> torch.nn.Module:
    torch.manual_seed(7)
    return timm.create_model(LITE0, pretrained=False).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_round_trip(tmp_path, suffix: str, x224: torch.Tensor) -> None:
    src = _perturbed_lite0()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    ext = create_backbone(LITE0, weights=path)
    assert ext.weights_source == str(path) and ext.weights_hash.startswith("sha256:")
    with torch.no_grad():
        ref = src.forward_intermediates(x224, indices=[2, 3], intermediates_only=True)
    for got, want in zip(ext(x224), ref, strict=True):  # BatchNorm folded: float rounding
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_weights_file_that_does_not_fit(tmp_path) -> None:
    state = dict(_perturbed_lite0().state_dict())
    state["extra.weight"] = torch.zeros(2)
    del state["conv_stem.weight"]
    state["bn1.weight"] = torch.zeros(5)
    path = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(VitqcError) as info:
        create_backbone(LITE0, weights=path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    assert "missing keys conv_stem.weight" in msg
    assert "unexpected keys extra.weight" in msg
    assert "bn1.weight (5,) vs (32,)" in msg


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_corrupt_weights_file(tmp_path, suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00\x01 definitely not weights" * 10)
    with pytest.raises(VitqcError, match=re.escape(str(path))):
        create_backbone(LITE0, weights=path)


def test_missing_weights_file_and_unknown_backbone(tmp_path) -> None:
    with pytest.raises(VitqcError, match="not found"):
        create_backbone(LITE0, weights=tmp_path / "nope.pth")
    with pytest.raises(VitqcError, match="'resnet5o'.*deit_base_distilled_patch16_224"):
        create_backbone("resnet5o")
    with pytest.raises(VitqcError, match="no packaged weights for resnet18"):
        create_backbone("resnet18", weights="package")


def test_hub_offline_is_a_one_line_error() -> None:
    if hub_reachable():
        pytest.skip("the Hugging Face hub is reachable from here")
    with pytest.raises(VitqcError, match=r"could not download .* pass --weights PATH"):
        create_backbone("resnet18", weights="hub")


def _to_original_swin(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Swin keys -> Microsoft's layout (downsample at the end of the previous stage)."""
    out = {}
    for k, v in state.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[k.replace("head.fc.", "head.")] = v
    return out


def _esvit_checkpoint(backbone: dict[str, torch.Tensor]) -> dict:
    wrapped = {f"module.backbone.{k}": v for k, v in backbone.items()}
    wrapped["module.head.mlp.0.weight"] = torch.zeros(4, 768)  # DINO projection head
    wrapped["module.head_dense.last_layer.weight"] = torch.zeros(4, 4)
    return {
        "teacher": wrapped,
        "student": {k: v + 1 for k, v in wrapped.items()},
        "epoch": 300,
        "args": argparse.Namespace(arch="swin_tiny", window_size=7),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm resampling internals
def test_esvit_checkpoint_loads_into_swin(tmp_path, x224: torch.Tensor) -> None:
    torch.manual_seed(3)
    src = timm.create_model(SWIN, pretrained=False).eval()
    original = _to_original_swin(src.state_dict())
    assert "layers.0.downsample.reduction.weight" in original
    original["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49).long()
    path = tmp_path / "checkpoint.pth"
    torch.save(_esvit_checkpoint(original), path)
    ext = create_backbone(SWIN, weights=path)
    with torch.no_grad():
        ref = src.forward_intermediates(x224, indices=[3], norm=True, intermediates_only=True)
    assert ext(x224)[0].shape == (1, 768, 7, 7)
    assert torch.allclose(ext(x224)[0], ref[0], atol=1e-4)  # teacher weights, not student

    # EsViT's window-14 model: relative position tables (27x27) are resized to 13x13.
    w14 = dict(original)
    for k in list(w14):
        if k.endswith("relative_position_bias_table") and not k.startswith("layers.3."):
            w14[k] = torch.randn(27 * 27, w14[k].shape[1])
    torch.save(_esvit_checkpoint(w14), tmp_path / "w14.pth")
    ext14 = create_backbone(SWIN, weights=tmp_path / "w14.pth")
    assert ext14(x224)[0].shape == (1, 768, 7, 7)


def test_read_weights_file_unwraps_and_strips(tmp_path) -> None:
    path = tmp_path / "nested.pth"
    t = torch.ones(2)
    torch.save({"model": {"module.backbone.a": t, "module.head.b": t}, "optimizer": {}}, path)
    assert list(read_weights_file(path)) == ["a"]
