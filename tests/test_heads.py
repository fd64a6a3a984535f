"""Heads on synthetic feature maps: likelihoods, ranking, determinism, training loop."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.covariance import ledoit_wolf

from vitqc.cpu import native_bfloat16
from vitqc.errors import VitqcError
from vitqc.heads import PAPER_DEFAULTS, base, create_head, fuse_maps, head_defaults, knn
from vitqc.heads.base import FeatureStandardizer, concat_at_finest
from vitqc.heads.gmm import (
    GMMHead,
    MixtureDensity,
    _shared_mixture_nll,
    fit_diagonal_gmm,
    mixture_nll,
)
from vitqc.heads.gmm import logsumexp as floored_logsumexp
from vitqc.heads.knn import greedy_coreset
from vitqc.training import (
    TrainConfig,
    evaluate_loss,
    train_head,
    training_precision,
)

CHANNELS = [8, 16]
SIZES = [(8, 8), (4, 4)]


def make_features(n: int, seed: int, defect: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = 0.5 * torch.randn(n, 8, 8, 8, generator=g) + 1.0
    b = torch.randn(n, 16, 4, 4, generator=g)
    if defect:
        a[:, :, 2:4, 5:7] += 2.5
        b[:, :, 1, 2] += 2.5
    return [a, b]


@pytest.fixture(scope="module")
def data():
    return {
        "train": make_features(48, 0),
        "val": make_features(12, 1),
        "good": make_features(10, 2),
        "bad": make_features(10, 3, defect=True),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_floored_logsumexp_is_torchs_and_so_is_its_gradient(dtype):
    """Terms far below the largest (exp of them would be subnormal) are left out of the
    log-sum-exp: the value and the gradient are torch's to rounding, on terms spread over
    thousands (a GMM's log-joint far from a component) as on ordinary ones."""
    g = torch.Generator().manual_seed(3)
    for scale in (1.0, 3000.0):
        x = (scale * torch.randn(6, 5, 40, generator=g)).to(dtype).requires_grad_()
        ref = x.detach().clone().requires_grad_()
        got, expected = floored_logsumexp(x, -1), torch.logsumexp(ref, -1)
        torch.testing.assert_close(got, expected)
        weights = torch.randn(6, 5, generator=g).to(dtype)
        (got * weights).sum().backward()
        (expected * weights).sum().backward()
        torch.testing.assert_close(x.grad, ref.grad)


def test_mixture_nll_matches_scipy():
    rng = np.random.default_rng(0)
    n, k, d = 5, 3, 4
    x = rng.normal(size=(n, d))
    logits = rng.normal(size=(k,))
    mean = rng.normal(size=(k, d))
    std = rng.uniform(0.3, 2.0, size=(k, d))
    log_w = logits - logsumexp(logits)
    expected = np.array(
        [
            -logsumexp([log_w[j] + norm.logpdf(x[i], mean[j], std[j]).sum() for j in range(k)])
            for i in range(n)
        ]
    )
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    got = mixture_nll(t(x), t(logits), t(mean), t(std)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # the expanded-square form used for position/shared conditioning agrees
    shared = _shared_mixture_nll(t(x)[None], t(logits)[None], t(mean)[None], t(std)[None])
    np.testing.assert_allclose(shared.numpy()[0], expected, rtol=1e-8)
    # over a batch, and with one mixture per position (the points as positions)
    batch = torch.stack([t(x), t(x).flip(0)])
    shared = _shared_mixture_nll(batch, t(logits)[None], t(mean)[None], t(std)[None])
    np.testing.assert_allclose(shared.numpy(), [expected, expected[::-1]], rtol=1e-8)
    p_logits = rng.normal(size=(n, k))
    p_mean, p_std = rng.normal(size=(n, k, d)), rng.uniform(0.3, 2.0, size=(n, k, d))
    per_position = _shared_mixture_nll(batch, t(p_logits), t(p_mean), t(p_std))
    np.testing.assert_allclose(
        per_position.numpy()[0],
        mixture_nll(t(x), t(p_logits), t(p_mean), t(p_std)).numpy(),
        rtol=1e-8,
    )


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("flow", {"steps": 4}),
        ("gmm", {"n_components": 6, "conditioning": "position"}),
        ("gmm", {"n_components": 6, "conditioning": "shared"}),
        ("gmm", {"n_components": 6, "conditioning": "embedding"}),
        ("gmm", {"n_components": 6, "standardize": "position-whiten", "fuse": True}),
        ("flow", {"steps": 4, "standardize": "position-whiten", "fuse": True}),
        ("gaussian", {}),
        ("gaussian", {"fuse": True}),
        ("knn", {"coreset_ratio": 0.2}),
        ("knn", {"coreset_ratio": 0.2, "standardize": "position"}),
        ("knn", {"coreset_ratio": 0.2, "standardize": "position", "fuse": True}),
    ],
)
def test_head_ranks_defects_above_good(data, name, kwargs):
    head = create_head(name, CHANNELS, SIZES, **kwargs)
    head.prepare(data["train"])
    if head.trainable:
        cfg = TrainConfig(epochs=25, patience=10, batch_size=8, lr=1e-3, progress=False)
        result = train_head(head, data["train"], data["val"], cfg)
        assert result.best_epoch >= 1
        assert np.isfinite(result.best_val_loss)
    with torch.no_grad():
        good = head(data["good"])
        bad = head(data["bad"])
    assert good.shape == (10, 8, 8)
    good_scores = good.flatten(1).max(1).values
    bad_scores = bad.flatten(1).max(1).values
    assert bad_scores.min() > good_scores.max()
    # the defect is located: the hottest patch of a defective map lies in the defect
    peak = bad[0].argmax()
    row, col = divmod(int(peak), 8)
    assert 1 <= row <= 4 and 4 <= col <= 7


@pytest.mark.parametrize("name", ["flow", "gaussian", "gmm", "knn"])
def test_scores_do_not_depend_on_batch(data, name):
    head = create_head(name, CHANNELS, SIZES)
    head.prepare(data["train"])
    head.eval()
    batch = [torch.cat([g, b]) for g, b in zip(data["good"], data["bad"], strict=True)]
    with torch.no_grad():
        together = head(batch)
        alone = torch.cat([head([f[i : i + 1] for f in batch]) for i in range(batch[0].shape[0])])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_training_restores_best_weights_and_is_reproducible(data):
    def run():
        head = create_head("gmm", CHANNELS, SIZES, n_components=4)
        head.prepare(data["train"])
        # a large learning rate makes validation loss bounce, so the best epoch is not the last
        cfg = TrainConfig(epochs=15, patience=100, batch_size=4, lr=3e-2, progress=False)
        return head, train_head(head, data["train"], data["val"], cfg)

    head, result = run()
    assert evaluate_loss(head, data["val"], 4) == pytest.approx(result.best_val_loss, rel=1e-5)
    assert result.best_val_loss == min(v for _, v in result.history)
    head2, result2 = run()
    assert result.history == result2.history
    for (k, v), v2 in zip(head.state_dict().items(), head2.state_dict().values(), strict=True):
        torch.testing.assert_close(v, v2, msg=k)


@pytest.mark.parametrize("name", ["flow", "gmm"])
def test_training_standardizes_the_features_once_not_every_step(data, name):
    head = create_head(name, CHANNELS, SIZES, **({"steps": 2} if name == "flow" else {}))
    head.prepare(data["train"])
    with torch.no_grad():
        torch.testing.assert_close(
            head.loss(data["val"]), head.input_loss(head.fixed_inputs(data["val"]))
        )
    calls = []
    head.standardize.register_forward_hook(lambda *_: calls.append(1))
    cfg = TrainConfig(epochs=4, patience=100, batch_size=4, progress=False)
    result = train_head(head, data["train"], data["val"], cfg)
    assert result.epochs_run == 4
    assert len(calls) == 2  # the training and the validation features, 64 images a call


def test_early_stopping_stops_after_patience(data):
    head = create_head("flow", CHANNELS, SIZES, steps=2)
    head.prepare(data["train"])
    cfg = TrainConfig(epochs=500, patience=3, batch_size=8, lr=5e-2, progress=False)
    result = train_head(head, data["train"], data["val"], cfg)
    assert result.epochs_run == result.best_epoch + 3
    assert result.epochs_run < 500


@pytest.mark.parametrize("steps_per_epoch", [None, 5, 13])
def test_an_epoch_is_a_pass_or_steps_per_epoch_batches_of_shuffled_passes(data, steps_per_epoch):
    """Every image once per pass, in a new order each pass; with ``steps_per_epoch`` the
    passes run on across epochs, each epoch that many batches."""
    head = create_head("flow", CHANNELS, SIZES, steps=2)
    head.prepare(data["train"])
    n = data["train"][0].shape[0]  # 48: 5 batches of 10 a pass, the last of 8
    with torch.no_grad():  # a fingerprint of each image, as training sees it
        ident = head.fixed_inputs(data["train"])[1][:, 0, 0, 0]
    batches: list[list[int]] = []
    real = head.input_loss

    def spy(inputs):
        if head.training:
            batches.append([int(torch.argmin((ident - v).abs())) for v in inputs[1][:, 0, 0, 0]])
        return real(inputs)

    head.input_loss = spy
    epochs = 4
    cfg = TrainConfig(
        epochs=epochs, patience=100, batch_size=10, progress=False, steps_per_epoch=steps_per_epoch
    )
    result = train_head(head, data["train"], data["val"], cfg)
    assert result.epochs_run == epochs
    per_pass = math.ceil(n / 10)
    assert len(batches) == epochs * (steps_per_epoch or per_pass)
    for start in range(0, len(batches) - per_pass + 1, per_pass):
        one_pass = [i for b in batches[start : start + per_pass] for i in b]
        assert sorted(one_pass) == list(range(n))  # every image once a pass
    assert [len(b) for b in batches[:per_pass]] == [10, 10, 10, 10, 8]
    assert batches[0] != batches[per_pass]  # a new order each pass
    with pytest.raises(ValueError, match="steps_per_epoch"):
        train_head(head, data["train"], data["val"], replace(cfg, steps_per_epoch=0))


def test_time_budget_stops_after_the_epoch_that_reaches_it(data):
    def run(**kw):
        head = create_head("flow", CHANNELS, SIZES, steps=2)
        head.prepare(data["train"])
        cfg = TrainConfig(batch_size=8, lr=5e-2, progress=False, **kw)
        return head, train_head(head, data["train"], data["val"], cfg)

    head, result = run(epochs=50, patience=100, max_minutes=1e-9)
    assert (result.epochs_run, result.best_epoch, result.stopped) == (1, 1, "time")
    assert evaluate_loss(head, data["val"], 8) == pytest.approx(result.best_val_loss, rel=1e-5)
    _, result = run(epochs=3, patience=100, max_minutes=60.0)
    assert (result.epochs_run, result.stopped) == (3, "epochs")
    _, result = run(epochs=500, patience=2)
    assert result.stopped == "patience" and result.epochs_run == result.best_epoch + 2


def test_flow_steps_run_in_bfloat16_where_asked_weights_and_evaluation_in_float32(data):
    """``precision="bfloat16"``: the training steps' convolutions give bfloat16 under
    autocast; the weights, the validation loss and the scores stay float32."""

    def run(precision: str):
        head = create_head("flow", CHANNELS, SIZES, steps=2)
        head.prepare(data["train"])
        seen: set[tuple[bool, torch.dtype]] = set()  # (training step, conv output dtype)
        for module in head.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(
                    lambda mod, args, out: seen.add((torch.is_grad_enabled(), out.dtype))
                )
        before = evaluate_loss(head, data["val"], 8)
        cfg = TrainConfig(epochs=4, patience=100, batch_size=8, lr=1e-2, progress=False)
        result = train_head(head, data["train"], data["val"], replace(cfg, precision=precision))
        return head, result, seen, before

    head, result, seen, before = run("bfloat16")
    assert result.precision == "bfloat16"
    assert seen == {(True, torch.bfloat16), (False, torch.float32)}
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert result.best_val_loss < before  # it learns
    assert evaluate_loss(head, data["val"], 8) == pytest.approx(result.best_val_loss, rel=1e-6)
    _, result, seen, _ = run("float32")
    assert result.precision == "float32"
    assert seen == {(True, torch.float32), (False, torch.float32)}
    _, result, _, _ = run("auto")
    assert result.precision == ("bfloat16" if native_bfloat16() else "float32")


def test_only_heads_that_allow_it_train_in_bfloat16():
    gmm = create_head("gmm", CHANNELS, SIZES)
    flow = create_head("flow", CHANNELS, SIZES, steps=2)
    assert training_precision(gmm, "auto") == "float32"
    assert training_precision(flow, "float32") == "float32"
    assert training_precision(flow, "bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="gmm head does not train in bfloat16"):
        training_precision(gmm, "bfloat16")
    with pytest.raises(ValueError, match="precision must be one of"):
        training_precision(flow, "half")


def test_greedy_coreset_covers_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(500, 2, generator=g) for c in centres])
    idx = greedy_coreset(points, 8)
    assert len(set(idx.tolist())) == 8
    clusters = {int(i) // 500 for i in idx}
    assert clusters == {0, 1, 2, 3}


def _one_at_a_time_greedy(points: torch.Tensor, n_select: int, seed: int) -> list[int]:
    """k-center greedy as PatchCore states it, in float64: each pick the point farthest
    from those already picked (the first drawn as ``greedy_coreset`` draws it)."""
    first = int(torch.randint(points.shape[0], (1,), generator=torch.Generator().manual_seed(seed)))
    points = points.double()
    picks, dist = [first], (points - points[first]).pow(2).sum(1)
    while len(picks) < n_select:
        dist[picks] = -1
        picks.append(int(dist.argmax()))
        dist = torch.minimum(dist, (points - points[picks[-1]]).pow(2).sum(1))
    return picks


@pytest.mark.parametrize("candidates", [1, 5, 64, 1024])
def test_greedy_coreset_picks_what_one_at_a_time_greedy_picks(candidates):
    """Passes over few candidates, many, or every point: always the same picks, in the
    same order, as the plain one-at-a-time greedy (no projection: 16 <= 16 dims)."""
    for seed in range(3):
        points = torch.randn(400, 16, generator=torch.Generator().manual_seed(seed))
        picks = greedy_coreset(points, 60, projection_dim=16, candidates=candidates, seed=seed)
        assert picks.tolist() == _one_at_a_time_greedy(points, 60, seed)


def test_greedy_coreset_with_duplicate_points_picks_each_point_once():
    """More picks than distinct points: every distance reaches 0, and the rest of the
    picks are still distinct points, not repeats."""
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(10, 1)
    picks = greedy_coreset(points, 15, candidates=4)
    assert len(set(picks.tolist())) == 15


def test_greedy_coreset_does_not_depend_on_its_row_blocks(monkeypatch):
    """The distance update runs over blocks of points; blocks of at most 7 values (a
    few points each, and partial last ones) select exactly what one block of everything
    selects."""
    points = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(knn, "_COVERAGE_VALUES", 10**9)
    whole = greedy_coreset(points, 40, projection_dim=8, candidates=3)
    monkeypatch.setattr(knn, "_COVERAGE_VALUES", 7)
    assert torch.equal(greedy_coreset(points, 40, projection_dim=8, candidates=3), whole)


def test_knn_bank_is_bounded_and_float16(data):
    head = create_head("knn", CHANNELS, SIZES, coreset_ratio=0.5, max_bank=100)
    head.prepare(data["train"])
    assert head.bank.dtype == torch.float16
    assert head.bank.shape == (100, sum(CHANNELS))


def test_fuse_maps_upsamples_to_finest_grid():
    fine = torch.zeros(2, 8, 8)
    coarse = torch.ones(2, 4, 4)
    fused = fuse_maps([coarse, fine])
    assert fused.shape == (2, 8, 8)
    torch.testing.assert_close(fused, torch.full((2, 8, 8), 0.5))


def test_paper_defaults_follow_table_2():
    assert PAPER_DEFAULTS[("gmm", "cnn")]["head"]["n_components"] == 50
    assert head_defaults("gmm", "deit_base_distilled_patch16_224", "transformer")["batch_size"] == 8
    flow_resnet = head_defaults("flow", "resnet50", "cnn")
    assert flow_resnet["head"]["steps"] == 8 and flow_resnet["lr"] == 1e-4
    flow_deit = head_defaults("flow", "deit_base_distilled_patch16_224", "transformer")
    assert flow_deit["head"]["steps"] == 20 and flow_deit["lr"] == 1e-3
    assert head_defaults("flow", "swin_tiny_patch4_window7_224", "transformer")["lr"] == 1e-4


def test_backbone_head_overrides_replace_table_2_where_it_has_no_row():
    lite = head_defaults("flow", "tf_efficientnet_lite0", "cnn")
    # steps still from Table 2
    assert lite["head"] == {"steps": 8, "hidden_ratio": 1.0, "standardize": "position-whiten"}
    assert lite["batch_size"] == 32 and lite["lr"] == 1e-3 and lite["weight_decay"] == 1e-5
    assert lite["proxy_patience"] == 1  # it peaks at epoch 0 or 1 by the proxy
    # the override is a copy: the registry's data stays as it was
    lite["head"]["steps"] = 99
    assert head_defaults("flow", "tf_efficientnet_lite1", "cnn")["head"]["steps"] == 8
    # what the override leaves out comes from Table 2's ResNet-50 row
    gmm = head_defaults("gmm", "tf_efficientnet_lite0", "cnn")
    assert gmm["head"]["n_components"] == 50 and gmm["batch_size"] == 32
    assert gmm["head"]["standardize"] == "position-whiten" and gmm["head"]["fuse"]
    assert gmm["head"]["conditioning"] == "shared"  # the whitening carries the position
    assert head_defaults("knn", "tf_efficientnet_lite0", "cnn")["head"] == {
        "standardize": "position",
        "fuse": True,
        "neighbourhood": 1,
    }
    assert head_defaults("knn", "resnet50", "cnn")["head"] == {}
    # DINOv2's GMM starts from the whitened Gaussian; the rest of Table 2's ViT row stays
    dino = head_defaults("gmm", "vit_small_patch14_dinov2", "transformer")
    assert dino["head"] == {
        "n_components": 100,
        "standardize": "position-whiten",
        "conditioning": "shared",
    }
    assert dino["lr"] == 1e-4 and dino["batch_size"] == 8
    flow = head_defaults("flow", "vit_small_patch14_dinov2", "transformer")
    assert flow["head"] == {"steps": 20, "hidden_ratio": 0.16, "standardize": "position-whiten"}


def test_em_initialization_recovers_two_clusters():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 3, generator=g) * 0.2 + torch.tensor([3.0, 0.0, 0.0])
    b = torch.randn(200, 3, generator=g) * 0.5 - torch.tensor([3.0, 0.0, 0.0])
    log_w, means, stds = fit_diagonal_gmm(torch.cat([a, b]), 2, generator=g)
    order = means[:, 0].argsort(descending=True)
    torch.testing.assert_close(log_w[order].exp(), torch.tensor([2 / 3, 1 / 3]), atol=0.02, rtol=0)
    torch.testing.assert_close(means[order, 0], torch.tensor([3.0, -3.0]), atol=0.1, rtol=0)
    torch.testing.assert_close(stds[order].mean(1), torch.tensor([0.2, 0.5]), atol=0.05, rtol=0)


def test_gmm_head_starts_at_the_em_mixture(data):
    """Before any training step, every position scores like one classic diagonal GMM."""
    head = GMMHead(CHANNELS[:1], SIZES[:1], n_components=3, conditioning="position")
    head.prepare(data["train"][:1])
    good = data["good"][:1]
    x = head.standardize(good)[0].permute(0, 2, 3, 1).reshape(-1, 8)
    mixture = head.mixtures[0]
    with torch.no_grad():
        h = mixture.trunk(mixture.position)
        logits, mean = mixture.to_logits(h), mixture.to_mean(h).unflatten(-1, (3, 8))
        std = torch.nn.functional.softplus(mixture.to_std(h)).unflatten(-1, (3, 8))
    std = std + mixture.min_std
    # the position-dependent part is small next to the EM fit it starts from
    assert float((mean - mean.mean(0)).abs().max()) < 0.05 * float(mean.abs().max())
    with torch.no_grad():
        nll = head._nll_maps(head.fixed_inputs(good))[0].flatten()
    direct = mixture_nll(x, logits.mean(0), mean.mean(0), std.mean(0))
    torch.testing.assert_close(nll, direct, atol=0.05, rtol=0.02)


def test_whitening_decorrelates_training_features():
    g = torch.Generator().manual_seed(3)
    mix = torch.eye(6) + 0.4 * torch.randn(6, 6, generator=g)  # well conditioned
    f = torch.einsum("oc,bchw->bohw", mix, torch.randn(20, 6, 5, 5, generator=g)) + 2.0
    standardizer = FeatureStandardizer([6], mode="whiten")
    standardizer.fit([f])
    out = standardizer([f])[0].transpose(0, 1).reshape(6, -1)
    torch.testing.assert_close(out.mean(1), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cov(out), torch.eye(6), atol=1e-3, rtol=0)
    plain = FeatureStandardizer([6])
    plain.fit([f])
    corr = torch.cov(plain([f])[0].transpose(0, 1).reshape(6, -1))
    assert float((corr - torch.diag(corr.diag())).abs().max()) > 0.3  # only scaled


def test_gmm_inference_cache_never_goes_stale(data):
    head = GMMHead(CHANNELS, SIZES, n_components=3, conditioning="position")
    head.prepare(data["train"])
    head.eval()
    with torch.no_grad():
        first = head(data["bad"])
        cached = head.mixtures[0].inference_terms()
        head.eval()  # the scoring model calls eval() before every batch: keep the cache
        assert torch.equal(head(data["bad"]), first)  # cached mixture, same scores
        assert cached is not None and head.mixtures[0].inference_terms() is cached
        other = GMMHead(CHANNELS, SIZES, n_components=3, conditioning="position", seed=5)
        other.prepare(data["val"])
        head.load_state_dict(other.state_dict())  # new weights: the cache must go
        torch.testing.assert_close(head(data["bad"]), other.eval()(data["bad"]))
        changed = head(data["bad"])
    head.train()  # a training step changes the weights; eval recomputes afterwards
    loss = head.loss(data["train"])
    loss.backward()
    with torch.no_grad():
        for p in head.parameters():
            p -= 0.1 * p.grad.sign()
    head.eval()
    with torch.no_grad():
        after = head(data["bad"])
        head.mixtures[0]._derived.drop("terms")
        head.mixtures[1]._derived.drop("terms")
        torch.testing.assert_close(after, head(data["bad"]))
    assert not torch.allclose(after, changed)


@pytest.mark.parametrize("fuse", [True, False])
def test_gmm_scores_whitened_rows_as_handed_over(data, fuse):
    """At inference on per-position whitened features the GMM takes the whitening's
    position-major rows as they are: the same scores, to the bit, as its maps from the
    ``[B, C, h, w]`` inputs training rates (one image, several; fused or per layer)."""
    head = GMMHead(CHANNELS, SIZES, n_components=3, standardize="position-whiten", fuse=fuse)
    head.prepare(data["train"])
    head.eval()
    for n in (1, 10):
        features = [f[:n] for f in data["bad"]]
        with torch.no_grad():
            rows = head.standardize.whitened_rows(features)
            expected = head.input_maps(head.fixed_inputs(features))
            got = head(features)
        assert [r.shape[:2] for r in rows] == [(h * w, n) for h, w in head.standardize.out_sizes]
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("conditioning", ["position", "shared"])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_gmm_inference_mixture_in_float32_matches_float64(offset, conditioning):
    """The inference mixture is kept in float32 and expanded around the centre of the
    components' means, so inputs far from zero (VT-ADL's embeddings are not
    standardized) score as the float64 density does, to float32's rounding; the same
    for a position-major view of the patches (how the per-position whitening hands
    them over)."""
    g = torch.Generator().manual_seed(0)
    mixture = MixtureDensity(16, (3, 3), 4, conditioning, 8, min_std=0.05)
    patches = offset + torch.randn(500, 16, generator=g)
    mixture.init_from_data(patches, torch.Generator().manual_seed(1))
    mixture.eval()
    x = offset + torch.randn(6, 9, 16, generator=g)
    x[0] += 5.0  # one far from every component
    with torch.no_grad():
        params = [t.double() for t in mixture.parameters_for(mixture.position)]
        expected = mixture_nll(x.double(), *params)
        got = mixture(x)
        position_major = mixture(x.transpose(0, 1).contiguous().transpose(0, 1))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(position_major, got, rtol=0, atol=0)


def test_per_position_standardization_removes_positional_statistics():
    g = torch.Generator().manual_seed(4)
    f = torch.randn(30, 3, 4, 5, generator=g)
    f[:, :, 0, :] = 10.0 + 4.0 * f[:, :, 0, :]  # a "border row" with its own statistics
    standardizer = FeatureStandardizer([3], [(4, 5)], mode="position")
    standardizer.fit([f])
    out = standardizer([f])[0]
    torch.testing.assert_close(out.mean(0), torch.zeros(3, 4, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(0), torch.ones(3, 4, 5), atol=1e-4, rtol=0)
    # per channel only, the border row stays far out
    plain = FeatureStandardizer([3])
    plain.fit([f])
    assert float(plain([f])[0][:, :, 0].abs().mean()) > 1.5 * float(
        plain([f])[0][:, :, 1:].abs().mean()
    )
    with pytest.raises(ValueError, match="feature sizes"):
        FeatureStandardizer([3], mode="position")


@pytest.mark.parametrize("name", ["flow", "gaussian", "gmm", "knn"])
def test_head_construction_does_not_depend_on_global_rng(name):
    torch.manual_seed(1)
    first = create_head(name, CHANNELS, SIZES, seed=3).state_dict()
    torch.rand(1000)  # whatever else the process did before
    np.random.rand(10)
    second = create_head(name, CHANNELS, SIZES, seed=3).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def _correlated_features(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(5) + 0.6 * torch.randn(5, 5, generator=g)
    a = torch.einsum("oc,bchw->bohw", mix, torch.randn(n, 5, 6, 6, generator=g))
    a[:, :, 0] = 3.0 + 2.0 * a[:, :, 0]  # a border row with its own statistics
    b = torch.randn(n, 3, 3, 3, generator=g) + a[:, :3, ::2, ::2]  # correlated with layer a
    return [a, b]


def test_position_whitening_gives_identity_covariance_at_every_position():
    train = _correlated_features(400, 0)
    standardizer = FeatureStandardizer(
        [5, 3], [(6, 6), (3, 3)], "position-whiten", fuse=True, ridge=1e-6, shrink=False
    )
    standardizer.fit(train)
    assert standardizer.out_channels == [8] and standardizer.out_sizes == [(6, 6)]
    (z,) = standardizer(train)
    assert z.shape == (400, 8, 6, 6)
    torch.testing.assert_close(z.mean(0), torch.zeros(8, 6, 6), atol=1e-4, rtol=0)
    for row, col in [(0, 0), (0, 3), (2, 5), (5, 5)]:
        cov = torch.cov(z[:, :, row, col].T.double())
        torch.testing.assert_close(cov, torch.eye(8, dtype=cov.dtype), atol=1e-3, rtol=0)


def test_position_whitening_norm_is_the_mahalanobis_distance():
    train, new = _correlated_features(300, 1), _correlated_features(7, 2)
    standardizer = FeatureStandardizer([5, 3], [(6, 6), (3, 3)], "position-whiten", fuse=True)
    standardizer.fit(train)
    (z,) = standardizer(new)
    fused = lambda fs: torch.cat(  # noqa: E731
        [fs[0], torch.nn.functional.interpolate(fs[1], size=(6, 6), mode="bilinear")], 1
    ).double()
    x_train, x_new = fused(train), fused(new)
    for row, col in [(0, 1), (4, 2)]:
        pts = x_train[:, :, row, col].numpy()
        mean, std = pts.mean(0), pts.std(0, ddof=1)
        corr = ledoit_wolf((pts - mean) / std, assume_centered=True)[0] + 0.01 * np.eye(8)
        d = (x_new[:, :, row, col].numpy() - mean) / std
        expected = np.einsum("nc,cd,nd->n", d, np.linalg.inv(corr), d)
        got = z[:, :, row, col].double().pow(2).sum(1).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-3)


@pytest.mark.parametrize(
    ("kernel", "block_values"),
    [("rows", None), ("blocks", None), ("blocks", 50), ("columns", None)],
)
@pytest.mark.parametrize("fuse", [True, False])
def test_position_whitening_is_the_per_position_product_and_leaves_its_input_alone(
    monkeypatch, fuse, kernel, block_values
):
    """The whitening lays the (fused) features out position-major itself; what it returns
    is exactly the whitening matrix times the standardized (concatenated) vector at each
    position, for one image (by every single-image kernel; products over blocks of
    positions with 50 values per block: several blocks and a partial last one) or
    several, laid out with contiguous channels, and the caller's features are not
    touched."""
    monkeypatch.setattr(base, "SINGLE_IMAGE_KERNELS", {kernel: base.SINGLE_IMAGE_KERNELS[kernel]})
    monkeypatch.setattr(base, "_fastest_kernel", {})
    if block_values is not None:
        monkeypatch.setattr(base, "_BLOCK_VALUES", block_values)
    channels, sizes = [1, 3], [(6, 6), (3, 3)]  # one channel: a [P, 1, 1] layout
    g = torch.Generator().manual_seed(4)
    train = [torch.randn(30, c, *s, generator=g) for c, s in zip(channels, sizes, strict=True)]
    standardizer = FeatureStandardizer(channels, sizes, "position-whiten", fuse=fuse)
    standardizer.fit(train)
    inputs = concat_at_finest(train) if fuse else None
    for n in (1, 5):
        features = [f[:n].clone() for f in train]
        out = standardizer(features)
        for f, kept in zip(features, train, strict=True):
            assert torch.equal(f, kept[:n])
        layers = [inputs[:n]] if fuse else features
        for i, (x, z) in enumerate(zip(layers, out, strict=True)):
            c, (h, w) = x.shape[1], x.shape[2:]
            d = (x - getattr(standardizer, f"mean_{i}")) / getattr(standardizer, f"std_{i}")
            d = d.flatten(2).permute(2, 1, 0)  # [P, C, N]
            expected = (getattr(standardizer, f"whitening_{i}") @ d).permute(2, 1, 0)
            torch.testing.assert_close(z, expected.reshape(n, c, h, w), rtol=1e-6, atol=1e-6)
            # channels contiguous: the flow and the GMM read it without a transposing copy
            assert c == 1 or z.stride(1) == 1


def test_one_image_takes_the_kernel_timed_fastest_once_per_shape(monkeypatch):
    """The first single image of a shape times every kernel (3 alternating rounds) and
    keeps the fastest for that shape; later images of that shape only run it, and every
    kernel gives the batched product plus the bias."""
    calls = {name: 0 for name in base.SINGLE_IMAGE_KERNELS}

    def counted(name):
        kernel = base.SINGLE_IMAGE_KERNELS[name]

        def run(matrices, x, bias):
            calls[name] += 1
            return kernel(matrices, x, bias)

        return run

    monkeypatch.setattr(
        base, "SINGLE_IMAGE_KERNELS", {name: counted(name) for name in base.SINGLE_IMAGE_KERNELS}
    )
    monkeypatch.setattr(base, "_fastest_kernel", {})
    g = torch.Generator().manual_seed(6)
    matrices, x = torch.randn(7, 5, 5, generator=g), torch.randn(7, 1, 5, generator=g)
    bias = torch.randn(7, 1, 5, generator=g)
    expected = torch.bmm(x, matrices.transpose(1, 2)) + bias
    torch.testing.assert_close(base.single_image_products(matrices, x, bias), expected)
    chosen = base._fastest_kernel[(7, 5, 5)]
    assert calls == {name: 3 + (name == chosen) for name in calls}
    torch.testing.assert_close(base.single_image_products(matrices, x, bias), expected)
    assert calls == {name: 3 + 2 * (name == chosen) for name in calls}
    for kernel in base.SINGLE_IMAGE_KERNELS.values():
        torch.testing.assert_close(kernel(matrices, x, bias), expected)


def test_folded_whitening_follows_refits_loads_and_dtype_changes():
    """The whitening runs with its standardization folded in (a copy beside the buffers,
    not in the state dict); refitting, loading other statistics or changing dtype drops
    the copy, so the output is always the current statistics'."""
    g = torch.Generator().manual_seed(8)
    first, second = (torch.randn(25, 4, 3, 3, generator=g) * 3 + 1 for _ in range(2))
    standardizer = FeatureStandardizer([4], [(3, 3)], "position-whiten")
    standardizer.fit([first])
    probe = [torch.randn(2, 4, 3, 3, generator=g)]
    before = standardizer(probe)[0]
    assert set(standardizer.state_dict()) == {"mean_0", "std_0", "whitening_0"}
    reference = FeatureStandardizer([4], [(3, 3)], "position-whiten")
    reference.fit([second])
    expected = reference(probe)[0]
    assert not torch.allclose(before, expected)
    standardizer.fit([second])
    torch.testing.assert_close(standardizer(probe)[0], expected)
    standardizer.fit([first])
    standardizer(probe)
    standardizer.load_state_dict(reference.state_dict())
    torch.testing.assert_close(standardizer(probe)[0], expected)
    doubled = standardizer.double()([probe[0].double()])
    assert doubled[0].dtype == torch.float64
    torch.testing.assert_close(doubled[0], expected.double(), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # a copy made in inference mode still serves autograd
        standardizer.float()([probe[0]])
    x = probe[0][:1].clone().requires_grad_()
    standardizer([x])[0].sum().backward()
    assert x.grad is not None


def test_position_whitening_of_one_image_keeps_its_gradient():
    """A single image needing a gradient takes the batched product (the blocked one
    writes into buffers, which autograd cannot follow): the gradient is the whitening's."""
    standardizer = FeatureStandardizer([3], [(4, 4)], "position-whiten")
    standardizer.fit([torch.randn(20, 3, 4, 4, generator=torch.Generator().manual_seed(5))])
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    standardizer([x])[0].sum().backward()
    std, whitening = standardizer.std_0, standardizer.whitening_0  # [3, 4, 4], [16, 3, 3]
    expected = whitening.sum(1).T.reshape(3, 4, 4) / std  # d(sum W (x - m) / s) / dx
    torch.testing.assert_close(x.grad[0], expected)


@pytest.mark.parametrize("mode", ["channel", "position", "whiten", "position-whiten"])
def test_statistics_do_not_depend_on_the_block_size(monkeypatch, mode):
    """The statistics are fitted over float64 blocks of images or positions; blocks of a
    few values give what one block of everything gives, and the means and standard
    deviations are NumPy's."""
    train = _correlated_features(40, 3)
    fitted = {}
    for block in (1 << 30, 100):
        monkeypatch.setattr(base, "_BLOCK_VALUES", block)
        standardizer = FeatureStandardizer([5, 3], [(6, 6), (3, 3)], mode)
        standardizer.fit(train)
        fitted[block] = standardizer.state_dict()
    for key, value in fitted[100].items():
        torch.testing.assert_close(value, fitted[1 << 30][key], rtol=1e-6, atol=1e-6)
    x = train[1].double().numpy()
    axes = (0,) if mode.startswith("position") else (0, 2, 3)
    mean, std = x.mean(axes), x.std(axes, ddof=1)
    if not mode.startswith("position"):
        mean, std = mean.ravel(), std.ravel()
    np.testing.assert_allclose(fitted[100]["mean_1"].numpy(), mean, rtol=1e-5, atol=1e-6)
    if mode != "position-whiten":  # there: clamped to 1e-3, as the per-position std
        np.testing.assert_allclose(fitted[100]["std_1"].numpy(), std, rtol=1e-5)


def test_position_whitening_refuses_wide_fused_features_and_subsets_wide_layers():
    with pytest.raises(VitqcError, match="position-whiten needs 116 M values"):
        FeatureStandardizer([768], [(14, 14)], "position-whiten", fuse=True)
    wide = FeatureStandardizer([768, 40], [(14, 14), (14, 14)], "position-whiten", seed=3)
    assert wide.out_channels[0] < 768 and wide.out_channels[1] == 40
    assert wide.subsets == [True, False] and wide.channels_0.numel() == wide.out_channels[0]
    features = [torch.randn(50, 768, 14, 14), torch.randn(50, 40, 14, 14)]
    wide.fit(features)
    z = wide([f[:2] for f in features])
    assert [t.shape[1] for t in z] == wide.out_channels
    # the flow and the GMM whiten wide features the same way (their seed, their subset)
    single = FeatureStandardizer([768], [(14, 14)], "position-whiten", seed=3)
    for name in ("flow", "gmm"):
        head = create_head(name, [768], [(14, 14)], standardize="position-whiten", seed=3)
        assert torch.equal(head.standardize.channels_0, single.channels_0)


def test_few_training_images_give_a_tempered_whitening():
    """48 images of 112 channels: the covariance is singular; shrinkage keeps a new
    image's whitened norm close to its standardized one instead of blowing it up."""
    g = torch.Generator().manual_seed(6)
    mix = torch.randn(112, 112, generator=g) / 112**0.5 + torch.eye(112)
    feats = torch.einsum("oc,bchw->bohw", mix, torch.randn(58, 112, 2, 2, generator=g))
    train, new = [feats[:48]], [feats[48:]]
    scale = {}
    for shrink in (True, False):
        standardizer = FeatureStandardizer([112], [(2, 2)], "position-whiten", shrink=shrink)
        standardizer.fit(train)
        scale[shrink] = float(standardizer(new)[0].pow(2).mean())
    assert scale[True] < 3.0 < 20.0 < scale[False]


def test_gaussian_head_is_half_the_mean_squared_mahalanobis_distance_per_layer():
    """PaDiM's score through the shared whitening: per layer 0.5 * d^2 / C, averaged."""
    train, new = _correlated_features(300, 3), _correlated_features(5, 4)
    head = create_head("gaussian", [5, 3], [(6, 6), (3, 3)])
    assert not head.trainable
    head.prepare(train)
    with torch.no_grad():
        got = head(new)
    per_layer = []
    for layer, size in ((0, (6, 6)), (1, (3, 3))):
        standardizer = FeatureStandardizer([(5, 3)[layer]], [size], "position-whiten")
        standardizer.fit([train[layer]])
        (z,) = standardizer([new[layer]])
        per_layer.append(0.5 * z.pow(2).mean(1))
    torch.testing.assert_close(got, fuse_maps(per_layer), rtol=1e-5, atol=1e-6)


def test_per_layer_whitening_fits_a_56x56_stride4_grid_in_bounded_memory():
    """EfficientNet-Lite0's three stages (24 x 56 x 56, 40 x 28 x 28, 112 x 14 x 14):
    fused, the whitening would need 97 M values (refused); per layer its buffers (what
    the model holds and carries) stay under 6 M values, 24 MB in float32."""
    channels, sizes = [24, 40, 112], [(56, 56), (28, 28), (14, 14)]
    with pytest.raises(VitqcError, match="position-whiten needs 97 M values"):
        FeatureStandardizer(channels, sizes, "position-whiten", fuse=True)
    head = create_head("gaussian", channels, sizes)
    buffers = sum(b.numel() for b in head.buffers())
    assert buffers < 6_000_000
    g = torch.Generator().manual_seed(0)
    train = [torch.randn(24, c, *s, generator=g) for c, s in zip(channels, sizes, strict=True)]
    head.prepare(train)
    with torch.no_grad():
        assert head([f[:2] for f in train]).shape == (2, 56, 56)


def test_gaussian_head_keeps_a_seeded_channel_subset_where_whitening_would_not_fit():
    """DeiT's 768 channels on 14 x 14 would need 116 M whitening values: the head keeps
    the most channels that fit (PaDiM's random reduction); narrow layers keep them all."""
    from vitqc.heads.base import MAX_WHITENING_VALUES, whitened_channels

    assert whitened_channels([40, 112], [(28, 28), (14, 14)]) == [40, 112]
    kept = whitened_channels([768], [(14, 14)])
    assert kept[0] < 768 and kept[0] ** 2 * 196 <= MAX_WHITENING_VALUES
    assert (kept[0] + 1) ** 2 * 196 > MAX_WHITENING_VALUES
    head = create_head("gaussian", [768], [(14, 14)])
    again = create_head("gaussian", [768], [(14, 14)])
    subset = head.standardize.channels_0
    assert subset.numel() == kept[0] and torch.equal(subset, again.standardize.channels_0)
    features = [torch.randn(6, 768, 14, 14)]
    head.prepare(features)
    assert head(features).shape == (6, 14, 14)
    # the subset travels with the weights; a narrow head's state dict has no subset
    assert "standardize.channels_0" in head.state_dict()
    assert not any("channels_" in k for k in create_head("gaussian", [40], [(8, 8)]).state_dict())
    # bundles from before the subset moved into the standardizer load the same
    old_layout = {
        k.removeprefix("standardize."): v
        for k, v in head.state_dict().items()
        if k == "standardize.channels_0"
    }
    old_layout.update({k: v for k, v in head.state_dict().items() if k != "standardize.channels_0"})
    again.load_state_dict(old_layout)
    torch.testing.assert_close(again(features), head(features))


@pytest.mark.parametrize("name", ["flow", "gmm"])
def test_fixed_inputs_of_a_training_set_are_those_of_the_whole_batch(data, name):
    from vitqc.training import fixed_inputs

    head = create_head(name, CHANNELS, SIZES)
    head.prepare(data["train"])
    head.eval()
    with torch.no_grad():
        whole = head.fixed_inputs(data["train"])
    for batch_size in (5, 48, 64):  # a short last batch, exactly one, more than all
        parts = fixed_inputs(head, data["train"], batch_size=batch_size)
        for got, expected in zip(parts, whole, strict=True):
            assert got.is_contiguous()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_flow_convolves_channels_last_with_the_same_maps(data):
    head = create_head("flow", CHANNELS, SIZES, steps=2)
    head.prepare(data["train"])
    head.eval()
    convs = [m for m in head.flows.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    with torch.no_grad():
        maps = head(data["bad"])
        head.flows.to(memory_format=torch.contiguous_format)
        plain = fuse_maps(
            [
                0.5 * flow(f)[0].pow(2).mean(1)
                for flow, f in zip(head.flows, head.fixed_inputs(data["bad"]), strict=True)
            ]
        )
    torch.testing.assert_close(maps, plain, rtol=1e-5, atol=1e-5)


def test_head_latency_benchmark_times_each_variant_on_the_backbone_shapes(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_head_latency.py"
    spec = importlib.util.spec_from_file_location("bench_head_latency", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    medians = bench.main(["--heads", "gaussian,gmm", "--rounds", "1", "--min-seconds", "0.01"])
    assert list(medians) == ["gaussian", "gmm"]
    assert all(ms[b] > 0 for ms in medians.values() for b in (1, 32))
    out = capsys.readouterr().out
    assert "features [40, 112] on [(28, 28), (14, 14)]" in out  # Lite0's default layers
    assert out.count("\n") == 4  # the shapes, the header and one row per variant


@pytest.mark.parametrize("rank_size", [(2, (6, 5)), (0, ())])
def test_folded_flow_block_matches_freias_block_forward_gradients_and_inverse(rank_size):
    from FrEIA.modules import AllInOneBlock

    from vitqc.heads.flow import FoldedAllInOneBlock, _subnet

    rank, size = rank_size
    channels = 7
    if rank == 2:
        subnet = _subnet(3, 12)
    else:

        def subnet(c_in: int, c_out: int) -> torch.nn.Module:
            return torch.nn.Sequential(
                torch.nn.Linear(c_in, 12), torch.nn.ReLU(), torch.nn.Linear(12, c_out)
            )

    blocks = []
    for cls in (AllInOneBlock, FoldedAllInOneBlock):
        np.random.seed(3)  # the hard permutation comes from numpy's global RNG
        torch.manual_seed(3)
        blocks.append(cls([(channels, *size)], subnet_constructor=subnet, affine_clamping=2.0))
    freia, folded = blocks
    with torch.no_grad():  # a global affine away from its identity start
        freia.global_scale.add_(0.3 * torch.randn_like(freia.global_scale))
        freia.global_offset.normal_(0, 0.5)
    folded.load_state_dict(freia.state_dict())
    x = torch.randn(4, channels, *size, generator=torch.Generator().manual_seed(0))
    outs = []
    for block in blocks:
        (z,), log_jac = block([x])
        (0.5 * z.pow(2).sum() - log_jac.sum()).backward()
        outs.append((z, log_jac, [p.grad for p in block.parameters() if p.requires_grad]))
    (z, log_jac, grads), (z2, log_jac2, grads2) = outs
    assert (z - x).abs().max() > 0.1  # the block does transform its input
    torch.testing.assert_close(z2, z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_jac2, log_jac, rtol=1e-5, atol=1e-5)
    assert len(grads2) == len(grads) and all(g is not None for g in grads2)
    for g2, g in zip(grads2, grads, strict=True):
        torch.testing.assert_close(g2, g, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the inverse (FrEIA's own) undoes the folded forward
        (back,), _ = folded([z2.detach()], rev=True)
    torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-4)
    # without gradients the folded permutation is made once per change of the parameters:
    # an update in place (an optimizer step, load_state_dict) is seen by the next call
    with torch.no_grad():
        (cached,), _ = folded([x])
        torch.testing.assert_close(cached, z2.detach())
        for block in blocks:
            block.global_scale.mul_(1.5)
            block.global_offset.add_(0.25)
        (moved,), moved_jac = folded([x])
        (expected,), expected_jac = freia([x])
    assert (moved - cached).abs().max() > 0.1
    torch.testing.assert_close(moved, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moved_jac, expected_jac, rtol=1e-5, atol=1e-5)
