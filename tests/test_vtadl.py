"""VT-ADL head: geometry per preset, mixture likelihood, training, scores, round trips."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_msssim import ssim
from safetensors.torch import load_file, save_file
from scipy.special import logsumexp
from scipy.stats import norm
from torch import nn

from vitqc.heads import HEADS, create_head, head_defaults
from vitqc.heads.vtadl import VTADL_PRESETS, VTADLHead, decoder_plan, preset_for_size
from vitqc.scoring import AnomalyModel
from vitqc.training import TrainConfig, train_head

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available at {path} (expected ../shared/data beside the repo)")
    return path


# Small widths keep every test fast; the geometry (patch grid, decoder plan) is the preset's.
TINY = {"width": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "latent_dim": 16}
#: Float32 agreement between two computations of the same value by different kernels: on
#: AVX-512/AMX CPUs oneDNN picks its convolution kernels by batch size, and one image alone
#: and within a batch of five differed by 4e-5 relative (a batch-dependent bug, such as
#: BatchNorm on batch statistics, moves scores by far more).
F32 = {"rtol": 1e-4, "atol": 1e-4}


def tiny_head(size: int = 28, **kw) -> VTADLHead:
    opts = {**TINY, "decoder_channels": 16, **kw}
    return VTADLHead([3], [(size, size)], **opts)


def digits(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Blob images in [-1, 1]: a bright disc on a dark background, jittered."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(n):
        cy, cx = (size / 2 + 2 * torch.randn(2, generator=g)).tolist()
        r = size / 4 * (1 + 0.1 * torch.randn(1, generator=g).item())
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).float()
        out.append((2 * disc - 1).expand(3, size, size))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("preset", "size"), [("mnist", 28), ("mnist", 32), ("cpu", 64), ("cpu", 256), ("paper", 512)]
)
def test_shapes_per_preset_geometry(preset: str, size: int):
    head = tiny_head(size, preset=preset, decoder_channels=8)
    p = VTADL_PRESETS[preset]["patch_size"]
    x = torch.rand(2, 3, size, size) * 2 - 1
    head.eval()
    with torch.no_grad():
        terms = head.terms([x])
        assert head([x]).shape == (2, size // p, size // p)
        assert head.image_scores([x]).shape == (2,)
    assert terms["recon"].shape == x.shape  # exact input size, no resizing
    assert terms["nll"].shape == (2, (size // p) ** 2)
    assert terms["mse"].shape == terms["ssim"].shape == (2,)
    assert float(terms["recon"].abs().max()) <= 1.0  # tanh output


def test_decoder_plan_lands_on_size():
    assert decoder_plan(28) == (7, 2, 28)
    assert decoder_plan(256) == (8, 5, 256)
    assert decoder_plan(512) == (16, 5, 512)
    assert decoder_plan(64) == (4, 4, 64)
    assert decoder_plan(300) == (10, 5, 320)  # large odd factor: decode 320, crop to 300
    head = tiny_head(60, patch_size=4, decoder_channels=8)  # 60 = 15 * 4: seed 15, crop-free
    assert head.terms([torch.zeros(2, 3, 60, 60)])["recon"].shape == (2, 3, 60, 60)


def test_presets_and_validation():
    assert preset_for_size(28, 28) == "mnist"
    assert preset_for_size(256, 256) == "cpu"
    assert preset_for_size(512, 512) == "paper"
    paper = VTADL_PRESETS["paper"]
    assert (paper["image_size"], paper["patch_size"], paper["width"]) == (512, 32, 512)
    assert (paper["depth"], paper["heads"], paper["mlp_dim"]) == (6, 8, 1024)
    with pytest.raises(ValueError, match="patch_size"):
        tiny_head(30)  # 4 does not divide 30
    with pytest.raises(ValueError, match="unknown vtadl options"):
        tiny_head(28, nonsense=1)
    with pytest.raises(ValueError, match="image_score"):
        tiny_head(28, image_score="median")
    with pytest.raises(ValueError, match="anomaly_map"):
        tiny_head(28, anomaly_map="ssim")


def test_registered_with_paper_training_defaults():
    assert HEADS["vtadl"] is VTADLHead
    d = head_defaults("vtadl", "pixels", "cnn")
    assert (d["lr"], d["weight_decay"], d["batch_size"]) == (1e-4, 1e-4, 8)
    assert isinstance(create_head("vtadl", [3], [(28, 28)], **TINY), VTADLHead)


@pytest.mark.parametrize("conditioning", ["position", "embedding"])
def test_mixture_nll_matches_direct_computation(conditioning: str):
    """Per-patch NLL = -log sum_k pi_k prod_d N(z_d; mu_kd, sigma_kd) / D on LayerNorm'd tokens."""
    head = tiny_head(28, conditioning=conditioning, n_components=3).double()
    head.prepare([digits(8).double()])
    tokens = torch.randn(2, 49, 16, dtype=torch.float64)
    got = head.patch_nll(tokens).detach().numpy()

    z = torch.nn.functional.layer_norm(tokens, (16,))
    mix = head.mixture
    with torch.no_grad():
        h = mix.trunk(z if conditioning == "embedding" else mix.position.expand(2, -1, -1))
        logits = mix.to_logits(h).numpy()
        mean = mix.to_mean(h).unflatten(-1, (3, 16)).numpy()
        std = (torch.nn.functional.softplus(mix.to_std(h)) + mix.min_std).unflatten(-1, (3, 16))
    z, std = z.numpy(), std.numpy()
    expected = np.empty((2, 49))
    for b in range(2):
        for p in range(49):
            log_w = logits[b, p] - logsumexp(logits[b, p])
            comp = [
                log_w[k] + norm.logpdf(z[b, p], mean[b, p, k], std[b, p, k]).sum() for k in range(3)
            ]
            expected[b, p] = -logsumexp(comp) / 16
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_overfits_a_few_images_and_nll_stays_bounded():
    x = digits(4)
    head = tiny_head(28, noise_sd=0.0)
    head.prepare([x])
    cfg = TrainConfig(
        epochs=30, patience=30, batch_size=4, lr=3e-3, weight_decay=0.0, progress=False
    )
    result = train_head(head, [x], [x], cfg)
    losses = [val for _, val in result.history]
    assert losses[-1] < 0.5 * losses[0]
    head.eval()
    with torch.no_grad():
        nll = head.terms([x])["nll"]
    bound = math.log(head.mixture.min_std) + 0.5 * math.log(2 * math.pi)
    assert torch.isfinite(nll).all()
    assert float(nll.min()) > bound + 0.5  # a real density estimate, not a collapse

    # the residual map: |x - recon| at pixel resolution, highest where the image has
    # something the autoencoder never saw (a bright square on the dark background)
    head.anomaly_map = "residual"
    odd = x[:1].clone()
    odd[..., 1:6, 1:6] = 1.0
    with torch.no_grad():
        residual = head([odd])[0]
        expected = (head.terms([odd])["recon"] - odd).abs().mean(1)[0]
    torch.testing.assert_close(residual, expected)
    assert residual.shape == (28, 28)
    inside = residual[1:6, 1:6].mean()
    assert float(inside) > 3 * float(residual.mean())


def test_nll_gradient_stops_at_encoder_unless_joint():
    x = digits(2)
    for joint in (False, True):
        head = tiny_head(28, joint_nll=joint)
        head.prepare([x])
        head.patch_nll(head.embeddings(x)).mean().backward()
        enc_grad = head.encoder.patch_embed.weight.grad
        assert (enc_grad is not None and float(enc_grad.abs().sum()) > 0) == joint
        assert float(head.mixture.to_mean.bias.grad.abs().sum()) > 0


def test_eval_is_deterministic_and_per_image():
    x = digits(5, seed=1)
    head = tiny_head(28)
    head.prepare([x])
    head.train()
    head.loss([x]).backward()  # move BatchNorm running stats off their defaults
    head.eval()
    with torch.no_grad():
        maps, scores = head([x]), head.image_scores([x])
        assert torch.equal(maps, head([x]))
        assert torch.equal(scores, head.image_scores([x]))
        for i in range(5):
            torch.testing.assert_close(head([x[i : i + 1]])[0], maps[i], **F32)
            single = head.image_scores([x[i : i + 1]])[0]
            torch.testing.assert_close(single, scores[i], **F32)


def test_image_scores_loss_terms_and_map_max():
    x = digits(3, seed=2)
    head = tiny_head(28)
    head.prepare([x])
    head.eval()
    with torch.no_grad():
        t = head.terms([x])
        recon = t["recon"]
        mse = (recon - x).pow(2).mean((1, 2, 3))
        s = ssim(recon, x, data_range=2.0, size_average=False)
        expected = t["nll"].mean(1) + 5.0 * mse + 0.5 * (1 - s)
        torch.testing.assert_close(head.image_scores([x]), expected)
        torch.testing.assert_close(head.loss([x]), expected.mean())
    # the SSIM term counts against the image: lower similarity, higher score
    one = torch.ones(1)
    assert float(head.combine(0 * one, 0 * one, 0.2 * one)) > float(
        head.combine(0 * one, 0 * one, one)
    )
    assert float(head.combine(0 * one, 0 * one, one)) == 0.0

    # AnomalyModel uses the head's image score, or the map maximum for "map_max"
    class Pixels(nn.Module):
        input_size = (28, 28)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [x]

    for mode in ("loss", "map_max"):
        head.image_score = mode
        model = AnomalyModel(nn.Identity(), Pixels(), head, smoothing_sigma=2.0)
        maps, scores = model.maps_from_features([x])
        assert maps.shape == (3, 28, 28)
        expected = head.image_loss([x]) if mode == "loss" else maps.flatten(1).max(1).values
        torch.testing.assert_close(scores, expected.detach(), **F32)
    assert head.image_scores([x]) is None

    # score(): map and image score from one pass, the same as forward / image_scores
    with torch.no_grad():
        for anomaly_map in ("nll", "residual"):
            for mode in ("loss", "map_max"):
                head.anomaly_map, head.image_score = anomaly_map, mode
                patch_map, image_scores = head.score([x])
                torch.testing.assert_close(patch_map, head([x]))
                if mode == "map_max":
                    assert image_scores is None
                else:
                    torch.testing.assert_close(image_scores, head.image_scores([x]))


def test_config_round_trip(tmp_path):
    head = tiny_head(28, reduction="sum", n_components=4, image_score="map_max", seed=3)
    x = digits(4)
    head.prepare([x])
    head.train()
    head.loss([x]).backward()
    config = json.loads(json.dumps(head.config()))
    assert config["preset"] == "mnist" and config["reduction"] == "sum"
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "w.st"))

    rebuilt = create_head("vtadl", [3], [(28, 28)], **config)
    ref = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == ref
    rebuilt.load_state_dict(load_file(str(tmp_path / "w.st")), strict=True)
    assert rebuilt.config() == head.config()
    head.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt([x]), head([x]))
        assert torch.equal(rebuilt.image_loss([x]), head.image_loss([x]))


# ------------------------------------------------------------------ end to end (real MNIST)


def _protocol_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mnist_protocol.py"
    spec = importlib.util.spec_from_file_location("mnist_protocol", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = [f"--head-option={k}={v}" for k, v in {**TINY, "decoder_channels": 16}.items()]


@pytest.mark.filterwarnings("ignore:target_fpr")
def test_mnist_protocol_on_a_small_slice(tmp_path):
    root = require(MNIST)
    protocol = _protocol_module()
    out = tmp_path / "mnist.json"
    args = ["--root", str(root), "--digits", "3", "--limit-train", "24", "--limit-test", "120"]
    summary = protocol.main([*args, "--epochs", "2", "--out", str(out), *SMALL])
    row = summary["digits"][0]
    assert (row["digit"], row["n_train"], row["n_test"]) == (3, 24, 120)
    assert 0.0 <= row["auroc"] <= 1.0
    assert set(row["auroc_by_score"]) >= {"loss", "map_max", "mse", "one_minus_ssim"}
    assert row["auroc"] == pytest.approx(row["auroc_by_score"]["loss"], abs=1e-6)
    # normal digits against each other digit alone: present digits only, each an AUROC
    by_class = row["auroc_by_anomalous_class"]
    assert set(by_class) <= {f"digit_{d}" for d in range(10) if d != 3} and by_class
    assert all(0.0 <= v <= 1.0 for v in by_class.values())
    assert set(row["auroc_by_score_and_class"]["mse"]) == set(by_class)
    assert json.loads(out.read_text())["mean_auroc"] == pytest.approx(row["auroc"])


@pytest.mark.filterwarnings("ignore:target_fpr")
def test_bundle_round_trip(tmp_path):
    from vitqc import pipeline
    from vitqc.bundle import load_bundle, save_bundle
    from vitqc.data.layouts import load_dataset

    ds = load_dataset(require(MNIST), format="mnist", normal_class=7)
    ds.train, ds.val, ds.test = ds.train[:16], ds.val[:8], ds.test[:12]
    options = pipeline.FitOptions(  # backbone and size by default: pixels at MNIST's 28 px
        head="vtadl",
        head_options={**TINY, "decoder_channels": 16},
        epochs=2,
        progress=False,
    )
    model, _ = pipeline.fit(ds, options)
    assert model.extractor.name == "pixels" and model.input_size == (28, 28)
    assert model.head.preset == "mnist" and model.head.grid == (7, 7)
    scores, maps = pipeline.score_samples(model, ds.test, progress=False)
    save_bundle(model, tmp_path / "model")
    loaded, config = load_bundle(tmp_path / "model")
    assert config["head"]["name"] == "vtadl"
    assert config["head"]["config"] == model.head.config()
    scores2, maps2 = pipeline.score_samples(loaded, ds.test, progress=False)
    np.testing.assert_allclose(scores2, scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps2, maps, rtol=1e-5, atol=1e-6)


def test_step_benchmark_measures_every_part():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vtadl_step.py"
    spec = importlib.util.spec_from_file_location("bench_vtadl_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.measure(28, {"preset": "mnist"}, batch=2, channels=3, repeats=1)
    assert r["grid"] == "7x7" and 0.5 < r["params_m"] < 1.0
    assert all(r[k] > 0 for k in ("step", "encoder", "decoder", "ssim", "nll"))
