"""ONNX export and the torch-free runtime (issue 17): parity with torch per head, batch
independence, the same decisions as `vitqc predict`, and the runtime without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from vitqc.bundle import load_bundle, save_bundle
from vitqc.data.io import read_image
from vitqc.data.layouts import load_dataset
from vitqc.data.transforms import Preprocessor, resize_batch
from vitqc.decision import operator_score
from vitqc.errors import VitqcError
from vitqc.export import METADATA_KEY, bundle_id, export_bundle, export_onnx
from vitqc.heads.neighbours import GROUP, export_search, resolve_search
from vitqc.pipeline import FitOptions, fit, predict_images
from vitqc.runtime import (
    HEAD_BATCH_CHOICES,
    MICRO_BATCH,
    MICRO_BATCH_CHOICES,
    OUTPUTS,
    ExportedModel,
    fastest_head_batch,
    fastest_micro_batch,
    feature_names,
    resize_image,
    run_head,
)

HEADS = ("gaussian", "knn", "flow", "gmm")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def dataset(synth_root):
    return load_dataset(synth_root, category="tile", seed=0)


@pytest.fixture(scope="module")
def images(dataset, tmp_path_factory) -> list[Path]:
    """Test images as files: the originals (96 px), a grayscale one, a large non-square
    one (downsampling) and one already at the model's input size (no resize)."""
    out = tmp_path_factory.mktemp("export-images")
    files = [s.path for s in dataset.test[:6]]
    defective = next(s for s in dataset.test if s.label == 1)
    rgb = Image.open(defective.path).convert("RGB")
    rgb.convert("L").save(out / "gray.png")
    rgb.resize((517, 300), Image.Resampling.BICUBIC).save(out / "wide.png")
    rgb.resize((224, 224), Image.Resampling.BICUBIC).save(out / "input_size.png")
    return [Path(f) for f in files] + sorted(out.glob("*.png"))


@pytest.fixture(scope="module", params=HEADS)
def exported(request, dataset, tmp_path_factory):
    head = request.param
    out = tmp_path_factory.mktemp(f"export-{head}")
    options = FitOptions(
        head=head, statistics="position", folds=0, epochs=1, patience=1, progress=False
    )
    model, report = fit(dataset, options)
    save_bundle(model, out / "model", {"fit": report.to_dict()})
    onnx_path = export_bundle(out / "model", out / "model.onnx")
    loaded, _ = load_bundle(out / "model")
    return head, loaded, out / "model", onnx_path, ExportedModel(onnx_path, threads=1)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.abs(a - b) / np.maximum(np.abs(b), 1e-12)).max())


def test_operator_score_is_half_at_the_threshold_bounded_and_monotone():
    low, thr = 2.0, 5.0
    s = np.linspace(-10, 1e4, 100_001)
    v = operator_score(s, low, thr)
    assert float(operator_score(thr, low, thr)) == 0.5
    assert v.min() == 0.0 and v.max() < 1.0 and np.all(np.diff(v) >= 0)
    assert np.all(np.diff(v[s > low]) > 0)  # strictly increasing above map_low
    assert float(operator_score(low + 2 * (thr - low), low, thr)) == pytest.approx(0.75)
    # the torch twin is the same function (the export graph computes it)
    t = operator_score(torch.tensor(s[:5000]), torch.tensor(low), torch.tensor(thr))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), v[:5000], atol=1e-12)
    with pytest.raises(VitqcError, match="threshold"):
        operator_score(1.0, 3.0, 3.0)


def test_onnx_runtime_matches_torch(exported, images):
    """The graph's outputs are torch's. A knn graph searches the bank as
    ``export_search`` says (the default: int8 candidates), so the torch reference does
    too; that search and torch's default (``resolve_search``: bfloat16, int8 or float32
    candidates) differ from the exact search only where entries nearly tie."""
    head, model, _, _, runtime = exported
    x = resize_batch([read_image(p) for p in images], model.input_size)
    out = runtime.run(x.numpy())
    if head == "knn":
        default = model.head.search
        with torch.no_grad():
            default_maps = model(x)[0]
            model.head.set_search("exact")
            exact_maps = model(x)[0]
        model.head.set_search(export_search(default))
    try:
        with torch.no_grad():
            maps, scores = model(x)
    finally:
        if head == "knn":
            model.head.set_search(default)
    if head == "knn":  # each candidate search against the exact one: never nearer
        # (candidates are measured in float32); the candidate searches run on 64
        # principal axes of this random-weight model's 152-dimension bank, whose spread
        # they hold less well than a real one's (measured: int8 0.086, float32 0.066)
        tolerance = {"exact": 0.0, "bfloat16": 0.1, "float32": 0.1, "int8": 0.1}
        for found in (default_maps, maps):
            assert torch.all(found >= exact_maps - 1e-4)
        assert _rel(default_maps.numpy(), exact_maps.numpy()) <= tolerance[resolve_search(default)]
        assert _rel(maps.numpy(), exact_maps.numpy()) <= tolerance["int8"]
    threshold = float(model.threshold)
    assert _rel(out["score"], scores.numpy()) <= 1e-4, head
    torch_map = operator_score(maps, model.map_low, model.threshold).numpy()
    assert out["map"].shape == torch_map.shape == (len(images), *model.input_size)
    assert float(np.abs(out["map"] - torch_map).max()) <= 1e-3, head
    expected = operator_score(scores.numpy().astype(np.float64), float(model.map_low), threshold)
    np.testing.assert_allclose(out["normalized_score"], expected, atol=1e-5)
    assert out["defective"].dtype == bool
    np.testing.assert_array_equal(out["defective"], scores.numpy() > threshold)
    assert out["map"].min() >= 0 and out["map"].max() <= 1


def test_same_padding_exports_as_one_convolution(exported):
    """EfficientNet-Lite's TF-style "same" padding: no ``Pad`` (nor the shape arithmetic
    that computes it) in the graph; each stride-2 convolution carries its asymmetric
    padding. The outputs equal torch's (``test_onnx_runtime_matches_torch``)."""
    *_, onnx_path, _ = exported
    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    assert not [n.name for n in nodes if n.op_type in ("Pad", "Ceil")]  # Ceil: the arithmetic
    pads = [
        list(onnx.helper.get_attribute_value(a))
        for n in nodes
        if n.op_type == "Conv"
        for a in n.attribute
        if a.name == "pads"
    ]
    assert [0, 0, 1, 1] in pads  # 3 x 3, stride 2, even input: nothing before, 1 after


@pytest.mark.parametrize("exported", ["flow"], indirect=True)
def test_flow_couplings_export_without_shape_arithmetic(exported):
    """Each flow step's coupling splits its coefficients at a constant width and adds
    ``x * exp(s)`` to the shift without a product by 1: no ``Shape`` / ``Slice`` nodes
    and two ``Mul`` per step (the clamp and the scale), one ``Split`` for the step's
    input and one for its coefficients. The outputs equal torch's
    (``test_onnx_runtime_matches_torch``)."""
    _, loaded, _, onnx_path, _ = exported
    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    flow_nodes = [n for n in nodes if n.name.startswith("/head/flows.")]
    steps = sum(len(flow) for flow in loaded.head.flows)
    kinds = [n.op_type for n in flow_nodes]
    assert not [n.name for n in flow_nodes if n.op_type in ("Shape", "Slice", "Gather")]
    assert kinds.count("Split") == 2 * steps
    assert kinds.count("Mul") == 3 * steps  # the 0.1 (folded into its convolution by ORT)
    assert kinds.count("Add") == steps


def test_static_same_padding_matches_torch_and_restores_the_module(tmp_path):
    """A ``Conv2dSame`` traced at a fixed size is one ``Conv`` with pads (odd and even
    sizes, 3 x 3 and 5 x 5, strides 1 and 2), equal to torch's dynamic padding; the
    module is as it was afterwards, also for another input size."""
    import onnxruntime as ort
    from timm.layers import Conv2dSame

    from vitqc.export import static_same_padding

    torch.manual_seed(0)
    for kernel, stride, size in ((3, 2, 224), (5, 2, 57), (3, 1, 31), (5, 2, 28)):
        conv = Conv2dSame(4, 6, kernel, stride=stride).eval()
        net = nn.Sequential(conv)  # as in a backbone: the module is not the graph's root
        x = torch.rand(2, 4, size, size + 3)
        with torch.no_grad():
            expected = conv(x)
        path = tmp_path / f"conv{kernel}{stride}{size}.onnx"
        with static_same_padding(net, x):
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17)
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops == ["Conv"], (kernel, stride, size, ops)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
        assert "forward" not in vars(conv)  # the class's own forward again
        other = torch.rand(1, 4, size + 5, size + 1)
        with torch.no_grad():
            assert conv(other).shape[-2:] == (
                -(-(size + 5) // stride),
                -(-(size + 1) // stride),
            )


def test_batch_of_one_and_of_eight_agree(exported, images):
    _, model, _, onnx_path, runtime = exported
    x = np.stack([resize_image(read_image(p), model.input_size) for p in images[:8]])
    assert runtime.micro_batch in MICRO_BATCH_CHOICES  # the faster here, timed once
    chunked = ExportedModel(onnx_path, threads=1, micro_batch=MICRO_BATCH)
    assert chunked.micro_batch == MICRO_BATCH < 8
    eight = chunked.run(x)  # in micro-batches
    whole = ExportedModel(onnx_path, threads=1, micro_batch=8).run(x)  # one graph call
    ones = [runtime.run(x[i : i + 1]) for i in range(8)]
    for name in ("score", "normalized_score", "map", "defective"):
        assert eight[name].shape == whole[name].shape == (8, *ones[0][name].shape[1:]), name
    for batched in (eight, whole):
        one_scores = np.concatenate([o["score"] for o in ones])
        assert _rel(one_scores, batched["score"]) <= 1e-5
        one_maps = np.concatenate([o["map"] for o in ones])
        assert float(np.abs(one_maps - batched["map"]).max()) <= 1e-4
    odd = chunked.run(x[: MICRO_BATCH + 1])  # a full chunk and a chunk of one, in order
    assert _rel(odd["score"], eight["score"][: MICRO_BATCH + 1]) <= 1e-5


def test_a_batch_runs_backbone_and_head_in_calls_of_their_own_size(exported, images):
    """The graph's feature-map outputs are the backbone's features; cut there, a batch
    runs the backbone part ``micro_batch`` images at a time and the head part
    ``head_batch`` at a time, with the outputs of the whole graph. A single image, or a
    model told not to split, runs the whole graph and never builds the parts; once built,
    the parts replace the whole graph's session and single images run through them."""
    _, model, _, onnx_path, _ = exported
    x = np.stack([resize_image(read_image(p), model.input_size) for p in images[:8]])
    split = ExportedModel(onnx_path, threads=1, micro_batch=1, head_batch=3)
    one_image = split.run(x[:1])
    assert split._split is None  # one image: the whole graph, no parts built
    ort_features = split.session.run(split.features, {"image": x})
    backbone, head = split.split_sessions()
    assert split.session is None  # the parts replace the whole graph: constants held once
    assert [o.name for o in backbone.get_outputs()] == split.features
    assert [i.name for i in head.get_inputs()] == split.features
    assert [o.name for o in head.get_outputs()] == list(OUTPUTS)
    through_parts = split.run(x[:1])  # one image after a batch's split: the parts
    for name in OUTPUTS:
        np.testing.assert_allclose(through_parts[name], one_image[name], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch_features = model.features(torch.from_numpy(x))
    for got, want in zip(ort_features, torch_features, strict=True):
        assert got.shape == tuple(want.shape)
        assert float(np.abs(got - want.numpy()).max()) <= 1e-4 * float(want.abs().max())
    whole = ExportedModel(onnx_path, threads=1, micro_batch=8, split=False)
    assert whole.features == []
    parts, one_call = split.run(x), whole.run(x)  # head calls of 3, 3 and 2 images
    assert whole._split is None
    for name in OUTPUTS:
        np.testing.assert_allclose(parts[name], one_call[name], rtol=1e-5, atol=1e-6)
    ref = [run_head(head, [f[i : i + 1] for f in ort_features], split.features, 1) for i in (0, 7)]
    np.testing.assert_allclose(parts["score"][[0, 7]], [r[0][0] for r in ref], rtol=1e-5)
    timed = ExportedModel(onnx_path, threads=1)
    assert timed.head_batch in HEAD_BATCH_CHOICES  # timed once on blank features
    assert fastest_head_batch(head, choices=(2,)) == 2


def test_fastest_micro_batch_is_timed_on_the_session(exported):
    """The choice runs the real session on blank images and returns one of the sizes it
    was given (a single choice: that one); it is made only when a batch needs it."""
    _, model, _, onnx_path, _ = exported
    single = ExportedModel(onnx_path, threads=1)
    single.run(np.zeros((1, 3, *model.input_size), np.float32))
    assert single._micro_batch is None  # a single image never times the choice
    assert fastest_micro_batch(single.session, model.input_size, choices=(2,)) == 2
    chosen = fastest_micro_batch(single.session, model.input_size, choices=(1, 3), repeats=1)
    assert chosen in (1, 3)


def test_runtime_resize_matches_torch(images):
    for path in images:
        image = read_image(path)
        ref = resize_batch([image], (224, 224))[0].numpy()
        assert float(np.abs(resize_image(image, (224, 224)) - ref).max()) < 5e-5, path


@contextmanager
def searching_as_exported(model):
    """A knn head searching as its exported graph does (``export_search``: int8
    candidates), so that predict and the graph pick the same candidates on any CPU
    (predict's own default depends on the CPU: ``resolve_search``); other heads as
    they are."""
    search = getattr(model.head, "search", None)
    if search is None:
        yield
        return
    model.head.set_search(export_search(search))
    try:
        yield
    finally:
        model.head.set_search(search)


def test_runtime_gives_predict_decisions(exported, images, tmp_path):
    head, model, _, _, runtime = exported
    with searching_as_exported(model):
        predicted = predict_images(model, images, tmp_path / "predict")
    rows = list(runtime.score_files(images))
    assert [r["file"] for r in rows] == [p["file"] for p in predicted]
    for r, p in zip(rows, predicted, strict=True):
        assert r["defective"] == p["defective"], (head, r, p)
        assert r["threshold"] == p["threshold"]
        assert r["score"] == pytest.approx(p["score"], rel=1e-4)
        assert r["normalized_score"] == pytest.approx(p["normalized_score"], abs=1e-3)
    # predict's normalized score is the operator score: 0.5 at the threshold
    for p in predicted:
        assert (p["normalized_score"] > 0.5) == p["defective"]
    # the minimum-area rule on the exported map flags what predict flags
    area = 150.0
    with searching_as_exported(model):
        predicted = predict_images(model, images, tmp_path / "area", min_area=area)
    rows = list(runtime.score_files(images, min_area=area))
    for r, p in zip(rows, predicted, strict=True):
        assert r["defective"] == p["defective"], (head, r, p)
        assert r["largest_region_px"] == pytest.approx(p["largest_region_px"], rel=0.02, abs=40)
    # another threshold without exporting again: the lowest score flags every image
    lowest = min(r["score"] for r in rows) - 1e-6
    again = list(runtime.score_files(images, threshold=lowest, min_area=0))
    assert all(r["defective"] for r in again)


def test_metadata_carries_what_a_caller_needs(exported):
    head, model, bundle_dir, onnx_path, runtime = exported
    proto = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    info = json.loads(props[METADATA_KEY])
    assert info == runtime.info
    assert info["model_id"] == bundle_id(bundle_dir)
    assert info["input_size"] == list(model.input_size)
    assert info["resize"]["method"] == "bilinear" and info["resize"]["antialias"] is True
    assert info["resize"]["channel_order"] == "RGB"
    assert info["threshold"] == float(model.threshold)
    assert info["map_low"] == float(model.map_low)
    assert info["calibration"] == json.loads(json.dumps(model.calibration.to_dict()))
    assert "min_area" in info["calibration"] and "fpr_interval" in info["calibration"]
    assert info["head"]["name"] == head and info["head"]["config"] == model.head.config()
    assert info["backbone"]["name"] == model.extractor.name
    assert info["image_score"] == model.image_score
    assert info["smoothing_sigma"] == model.smoothing_sigma
    assert set(info["validation"]) >= {"proxy", "image_auroc"}
    graph_input = proto.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "image" and dims[0].dim_param == "N"
    assert [d.dim_value for d in dims[1:]] == [3, *model.input_size]
    n_features = len(model.extractor.feature_shapes())
    assert info["features"] == feature_names(n_features) == runtime.features
    assert [o.name for o in proto.graph.output] == [
        "score",
        "normalized_score",
        "map",
        "defective",
        *info["features"],
    ]
    assert not any(n.op_type == "CDist" for n in proto.graph.node)


TORCH_BLOCKER = textwrap.dedent(
    """
    import runpy, sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is not installed here")
            return None

    sys.meta_path.insert(0, NoTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker failed")
    sys.argv = ["vitqc.runtime", *sys.argv[1:]]
    runpy.run_module("vitqc.runtime", run_name="__main__", alter_sys=True)
    """
)


def run_runtime(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", TORCH_BLOCKER, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("exported", ["knn"], indirect=True)
def test_knn_graph_searches_with_int8_products(exported, tmp_path):
    """The default search exports as int8 candidates: one integer product per bank
    block, its argmax through the maxima of groups of ``GROUP`` columns where the block
    has whole groups (two ``ArgMax``, one ``GatherND``) and one ``ArgMax`` for a partial
    block, the queries quantized once; no float product over the bank (the float32
    work left is measuring each block's candidate again). A head set to the exact
    search exports that."""
    head, model, _, onnx_path, _ = exported

    def ops(path: Path) -> list[str]:
        return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]

    default = ops(onnx_path)
    widths = [rows.shape[1] for rows in model.head.int8_bank().blocks]
    grouped = sum(width % GROUP == 0 for width in widths)
    blocks = len(widths)
    assert default.count("MatMulInteger") == blocks
    assert default.count("GatherND") == grouped
    assert default.count("ArgMax") == blocks + grouped
    assert default.count("QuantizeLinear") == 1
    assert "Gemm" not in default
    # on the bank's first 64 principal axes: the queries' projection is one MatMul, and
    # the integer rows are 64 + the norm's columns wide
    int8 = model.head.int8_bank()
    assert int8.axes.projection.shape == (sum(model.head.feature_channels), 64)
    assert all(rows.shape[0] == 80 for rows in int8.blocks)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    quantize = next(node for node in graph.node if node.op_type == "QuantizeLinear")
    keys = producer[quantize.input[0]]  # the projected queries and the norm's columns
    assert keys.op_type == "Concat" and producer[keys.input[0]].op_type == "MatMul"
    search = model.head.search
    model.head.set_search("exact")
    try:
        exact = ops(export_onnx(model, tmp_path / "exact.onnx", {}))
    finally:
        model.head.set_search(search)
    assert "MatMulInteger" not in exact and "QuantizeLinear" not in exact
    assert exact.count("Gemm") == blocks


@pytest.mark.parametrize("exported", ["knn"], indirect=True)  # one head is enough here
def test_runtime_cli_runs_without_torch(exported, images, tmp_path):
    head, model, _, onnx_path, runtime = exported
    folder = tmp_path / "in"
    folder.mkdir()
    for p in images:
        (folder / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    proc = run_runtime(onnx_path, folder, "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = list(runtime.score_files([folder]))
    assert lines == expected and len(lines) == len(images)
    for row in lines:
        assert set(row) >= {"file", "score", "normalized_score", "defective"}
    with searching_as_exported(model):
        predicted = predict_images(model, sorted(folder.iterdir()), tmp_path / "predict")
    assert [r["defective"] for r in lines] == [p["defective"] for p in predicted]
    # another threshold from the command line
    proc = run_runtime(onnx_path, images[0], "--threshold", "1e9", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["defective"] is False and row["threshold"] == 1e9

    # bad inputs: one line each, exit 2
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert_one_line_error(run_runtime(onnx_path, tmp_path / "missing.png"), "missing.png")
    assert_one_line_error(run_runtime(onnx_path, text), "not a valid image")
    assert_one_line_error(run_runtime(text, images[0]), "not an ONNX model")
    plain = tmp_path / "plain.onnx"
    node = onnx.helper.make_node("Identity", ["image"], ["score"])
    value = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1])
    result = onnx.helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([node], "g", [value], [result])
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), plain
    )
    assert_one_line_error(run_runtime(plain, images[0]), "not a vitqc model")


@pytest.mark.parametrize("exported", ["gaussian"], indirect=True)  # one head is enough here
def test_vitqc_export_command(exported, tmp_path):
    head, _, bundle_dir, onnx_path, runtime = exported
    out = tmp_path / "cli.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "vitqc.cli", "export", str(bundle_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and not list(tmp_path.glob(".*.tmp"))  # written atomically
    assert ExportedModel(out).info["model_id"] == runtime.info["model_id"]
    proc = subprocess.run(
        [sys.executable, "-m", "vitqc.cli", "export", str(tmp_path / "nope"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(proc, "model directory not found")


def test_vtadl_exports_with_parity_and_an_uncalibrated_model_is_refused(tmp_path):
    """VT-ADL (its own ViT on the pixels, SSIM in the image score) in the same graph; a
    small untrained one is enough for parity."""
    from vitqc.backbones import create_backbone
    from vitqc.calibration import Calibration
    from vitqc.heads import create_head
    from vitqc.scoring import AnomalyModel

    extractor = create_backbone("pixels", image_size=(28, 28))
    head = create_head("vtadl", [3], [(28, 28)], width=16, depth=1, heads=2, mlp_dim=32)
    model = AnomalyModel(Preprocessor.for_backbone(extractor), extractor, head).eval()
    with pytest.raises(VitqcError, match="no calibrated threshold") as info:
        export_onnx(model, tmp_path / "v.onnx", {})
    assert "\n" not in str(info.value) and not (tmp_path / "v.onnx").exists()
    model.set_calibration(Calibration(threshold=5.0, map_low=1.0, map_high=4.0))
    runtime = ExportedModel(export_onnx(model, tmp_path / "v.onnx", {}), threads=1)
    x = torch.rand(8, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps, scores = model(x)
    out = runtime.run(x.numpy())
    assert _rel(out["score"], scores.numpy()) <= 1e-4
    torch_map = operator_score(maps, model.map_low, model.threshold).numpy()
    assert float(np.abs(out["map"] - torch_map).max()) <= 1e-3
    assert _rel(runtime.run(x[:1].numpy())["score"], out["score"][:1]) <= 1e-5


@pytest.mark.parametrize(
    "backbone",
    [
        "tf_efficientnet_lite1",
        "vit_small_patch14_dinov2",
        "deit_base_distilled_patch16_224",
        "swin_tiny_patch4_window7_224",
        "efficientformer_l3",
        "resnet50",
    ],
)
def test_every_registered_backbone_exports(backbone, tmp_path):
    """Random weights: the graph, not the accuracy (lite0 and pixels are covered above).
    The gaussian head on the backbone's default layers, prepared on random images."""
    from vitqc.backbones import create_backbone
    from vitqc.calibration import Calibration
    from vitqc.heads import create_head
    from vitqc.scoring import AnomalyModel

    extractor = create_backbone(backbone, weights="random")
    x = torch.rand(4, 3, *extractor.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = extractor(x)
    head = create_head(
        "gaussian", [f.shape[1] for f in features], [tuple(f.shape[-2:]) for f in features]
    )
    head.prepare(features)
    model = AnomalyModel(Preprocessor.for_backbone(extractor), extractor, head).eval()
    with torch.no_grad():
        maps, scores = model(x[:2])
    low = float(maps.min())
    model.set_calibration(
        Calibration(threshold=float(scores.mean()), map_low=low, map_high=low + 1)
    )
    runtime = ExportedModel(export_onnx(model, tmp_path / "m.onnx", {}), threads=1)
    out = runtime.run(x[:2].numpy())
    assert _rel(out["score"], scores.numpy()) <= 1e-4, backbone
    torch_map = operator_score(maps, model.map_low, model.threshold).numpy()
    assert float(np.abs(out["map"] - torch_map).max()) <= 1e-3, backbone


def test_runtime_matches_predict_on_real_images(exported, tmp_path):
    """Real magnetic_tile photos (grayscale JPEGs of varying sizes, resized by the
    runtime's Pillow path and by torch): the same scores and decisions as predict."""
    from conftest import MAGNETIC_TILE, require

    test_dir = require(MAGNETIC_TILE) / "test"
    files = sorted((test_dir / "good").glob("*"))[:3]
    files += sorted(p for d in test_dir.iterdir() if d.name != "good" for p in d.glob("*"))[:3]
    head, model, _, _, runtime = exported
    with searching_as_exported(model):
        predicted = predict_images(model, files, tmp_path / "predict")
    rows = list(runtime.score_files(files))
    for r, p in zip(rows, predicted, strict=True):
        assert r["score"] == pytest.approx(p["score"], rel=1e-4), (head, r["file"])
        assert r["defective"] == p["defective"], (head, r["file"])
        assert r["normalized_score"] == pytest.approx(p["normalized_score"], abs=1e-5)


_RSS_MB = """
import psutil

def rss_mb():
    return psutil.Process().memory_info().rss / 2**20
"""

_ARENA_CHILD = (
    _RSS_MB
    + """
import sys
import numpy as np
from vitqc.runtime import OUTPUTS, ExportedModel, fastest_head_batch, run_head

_, head = ExportedModel(sys.argv[1], threads=1).split_sessions()
shapes = [(32, *i.shape[1:]) for i in head.get_inputs()]
base = rss_mb()
fastest_head_batch(head, choices=(1, 32), repeats=1)
timed = rss_mb()
run_head(head, [np.zeros(s, np.float32) for s in shapes], [i.name for i in head.get_inputs()], 32)
print(timed - base, rss_mb() - timed)
"""
)

_SPLIT_CHILD = (
    _RSS_MB
    + """
import sys
import numpy as np
import onnx  # the split's own import, not what it holds
from vitqc.runtime import ExportedModel, release_free_heap

model = ExportedModel(sys.argv[1], threads=1)
image = np.zeros((1, 3, *model.input_size), np.float32)
model.run(image)
release_free_heap()  # what is held, not what the heap keeps of what was freed
whole = rss_mb()
model.split_sessions()
model.run(image)
release_free_heap()
print(rss_mb() - whole)
"""
)


@pytest.mark.parametrize("exported", ["gaussian"], indirect=True)
def test_the_split_parts_hold_the_constants_once(exported):
    """After the split the backbone and head sessions take the whole graph's place
    without a second copy of its constants: the parts are loaded from files (a session
    made from bytes keeps them) and the split's own copies are handed back."""
    _, _, _, onnx_path, _ = exported
    file_mb = onnx_path.stat().st_size / 2**20
    assert file_mb > 10  # the per-position whitening: the constants dominate
    out = subprocess.run(
        [sys.executable, "-c", _SPLIT_CHILD, str(onnx_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    added = float(out.stdout)
    assert added < file_mb / 4, (added, file_mb)


@pytest.mark.parametrize("exported", ["knn"], indirect=True)
def test_choosing_the_head_batch_leaves_no_working_memory_behind(exported):
    """The calls that time the head batch hand onnxruntime's arena memory back: a knn
    head's products of 32 images at once (784 x bank entries each, int32) take tens of
    MB that a model choosing single images would otherwise hold for good."""
    _, _, _, onnx_path, _ = exported
    out = subprocess.run(
        [sys.executable, "-c", _ARENA_CHILD, str(onnx_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    after_timing, after_a_plain_call = (float(v) for v in out.stdout.split())
    assert after_a_plain_call > 40, after_a_plain_call  # what a call of 32 holds on to
    assert after_timing < after_a_plain_call / 4, (after_timing, after_a_plain_call)
