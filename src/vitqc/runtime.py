"""Score images with an exported model: onnxruntime, numpy and Pillow, no torch.

    python -m vitqc.runtime MODEL.onnx IMAGE_OR_FOLDER... [--threshold T]

prints one JSON line per image: ``file``, ``score`` (raw), ``normalized_score`` (the
operator scale of ``vitqc.decision.operator_score``: 0.5 at the threshold in use),
``threshold``, ``defective``, and with a stored (or ``--min-area``) minimum area
``min_area_px`` and ``largest_region_px``. A bad input (missing file, not an image, not a
vitqc ONNX file) prints one line ``error: ...`` and exits with status 2.

Preprocessing follows the file's ``resize`` metadata, which is what ``vitqc predict``
does (``vitqc.data.transforms.resize_batch``): uint8 RGB (grayscale and palette images
converted by Pillow like ``vitqc.data.io.read_image``) divided by 255, resized per channel
as float32 with Pillow's bilinear filter (an antialiased triangle filter, the one torch's
``antialias=True`` reproduces), clipped to [0, 1]; an image already at the input size is
passed as is. Pillow and torch differ by at most about 2e-5 per pixel value (rounding).

Decisions are ``vitqc.decision.decide`` on the raw ``score`` with the threshold in use.
With a minimum area, ``decide`` runs on the operator scale of the stored threshold (the
graph's ``map`` and the scores mapped alike, against the threshold in use mapped alike):
the scale is strictly increasing above ``map_low``, so the same images and pixels pass
as with raw values (a ``--threshold`` at or below ``map_low`` makes the area rule count
every pixel above ``map_low``).

A batch of images runs its graph in two parts, cut at the feature maps: the backbone a
few images at a time and the head in calls of the size each runs fastest in
(``ExportedModel.run``).

Only torch-free vitqc modules are imported: ``vitqc.data.io`` (reading images, as
``vitqc predict`` does), ``vitqc.decision`` and ``vitqc.errors``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitqc.data.io import expand_inputs, read_image, white_level_for
from vitqc.decision import decide, operator_score
from vitqc.errors import VitqcError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "MICRO_BATCH",
    "HEAD_BATCH_CHOICES",
    "MICRO_BATCH_CHOICES",
    "OUTPUTS",
    "ExportedModel",
    "fastest_head_batch",
    "fastest_micro_batch",
    "feature_names",
    "main",
    "release_free_heap",
    "resize_image",
    "run_head",
    "run_in_chunks",
    "split_graph",
]

#: The ONNX file format shared with ``vitqc.export`` (defined here: this module has no torch)
METADATA_KEY = "vitqc"
FORMAT = "vitqc-onnx"
FORMAT_VERSION = 1
OUTPUTS = ("score", "normalized_score", "map", "defective")
#: Graph outputs holding the backbone's feature maps (listed under the metadata's
#: ``features``; files exported before them have none and run whole).
FEATURE_OUTPUT = "features_{}"
#: Images per backbone call that ``ExportedModel`` chooses among, by timing them once,
#: when a batch first needs it. On one CPU thread onnxruntime's backbone time per image
#: grows with the batch (activations leave the cache), while a head with large
#: per-position statistics (the GMM's) reads them once per call and prefers larger
#: batches: a batch's graph is therefore split at the feature maps, the backbone run in
#: micro-batches and the head in calls of its own size (``HEAD_BATCH_CHOICES``).
MICRO_BATCH_CHOICES = (1, 4)
#: The largest choice: what a batch runs in when no choice is made.
MICRO_BATCH = max(MICRO_BATCH_CHOICES)
#: Images per call of a split graph's head that ``ExportedModel`` chooses among, timed
#: once: per-position statistics (the GMM's 72 MB whitening) are read once per call and
#: favour large calls, while a knn search's products grow with the call (784 x 4096 int32
#: per image and bank block) and favour single images.
HEAD_BATCH_CHOICES = (1, 4, 32)


def feature_names(n: int) -> list[str]:
    """The names of ``n`` feature-map outputs of an exported graph."""
    return [FEATURE_OUTPUT.format(i) for i in range(n)]


def _shrinking_arena() -> Any:
    """onnxruntime run options that hand the CPU memory arena's unused chunks back after
    the call: a call timed only to choose a size leaves no working memory behind."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). Memory that one-time work freed (the graph split's protobuf copies, the
    arena chunks of the calls timed to choose a size) otherwise stays in the process."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _run_in_calls(
    session: Any,
    inputs: dict[str, np.ndarray],
    chunk: int,
    outputs: Sequence[str] | None,
    run_options: Any = None,
) -> list[np.ndarray]:
    """``session`` on ``inputs`` (arrays sharing their first, batch axis) ``chunk`` images
    per call, its outputs (all of them, or ``outputs``) concatenated over the batch."""
    names = list(outputs) if outputs is not None else None
    n = len(next(iter(inputs.values())))
    parts = [
        session.run(names, {k: v[start : start + chunk] for k, v in inputs.items()}, run_options)
        for start in range(0, max(1, n), chunk)
    ]
    return parts[0] if len(parts) == 1 else [np.concatenate(v) for v in zip(*parts, strict=True)]


def run_in_chunks(
    session: Any, batch: np.ndarray, chunk: int = MICRO_BATCH, outputs: Sequence[str] | None = None
) -> list[np.ndarray]:
    """An onnxruntime ``session`` on ``batch`` (input ``image``, float32) ``chunk`` images
    per call, its outputs concatenated over the batch (all of them, or ``outputs``)."""
    return _run_in_calls(session, {"image": np.asarray(batch, np.float32)}, chunk, outputs)


def run_head(
    session: Any, features: Sequence[np.ndarray], names: Sequence[str], chunk: int
) -> list[np.ndarray]:
    """The head part of a split graph on feature maps ``features`` (inputs ``names``),
    ``chunk`` images per call: its ``OUTPUTS``, concatenated over the batch."""
    return _run_in_calls(session, dict(zip(names, features, strict=True)), chunk, OUTPUTS)


def split_graph(path: str | Path, features: Sequence[str]) -> tuple[Any, Any]:
    """An exported graph cut at its feature maps: the backbone (``image`` -> the
    ``features`` outputs) and the head (those -> ``OUTPUTS``), as ONNX models
    (``onnx.utils.Extractor``)."""
    import onnx
    from onnx.utils import Extractor

    extractor = Extractor(onnx.load(str(path)))
    backbone = extractor.extract_model(["image"], list(features))
    head = extractor.extract_model(list(features), list(OUTPUTS))
    return backbone, head


def _fastest_choice(choices: Sequence[int], run: Callable[[int], int], repeats: int) -> int:
    """The choice whose ``run(choice)`` (which returns how many images it ran) took the
    least time per image: each choice run once to warm up (onnxruntime allocates on its
    first call of a shape), then the best of ``repeats`` alternating timings."""
    for choice in choices:
        run(choice)
    best: dict[int, float] = {}
    for _ in range(repeats):
        for choice in choices:
            start = time.perf_counter()
            images = run(choice)
            per_image = (time.perf_counter() - start) / images
            best[choice] = min(best.get(choice, np.inf), per_image)
    release_free_heap()  # the timed calls' arena chunks
    return min(choices, key=lambda choice: best[choice])


def fastest_head_batch(
    session: Any, choices: Sequence[int] = HEAD_BATCH_CHOICES, repeats: int = 1
) -> int:
    """The head call size of ``choices`` with the lowest time per image, one call of that
    many blank feature maps each (``_fastest_choice``)."""
    inputs = session.get_inputs()
    shapes = [tuple(i.shape[1:]) for i in inputs]
    if not all(isinstance(d, int) for shape in shapes for d in shape):
        return max(choices)  # not a vitqc graph's fixed feature shapes: one call
    n = max(choices)
    blank = {i.name: np.zeros((n, *s), np.float32) for i, s in zip(inputs, shapes, strict=True)}
    shrink = _shrinking_arena()

    def run(chunk: int) -> int:
        _run_in_calls(session, {k: v[:chunk] for k, v in blank.items()}, chunk, OUTPUTS, shrink)
        return chunk

    return _fastest_choice(choices, run, repeats)


def fastest_micro_batch(
    session: Any,
    input_size: Sequence[int],
    choices: Sequence[int] = MICRO_BATCH_CHOICES,
    repeats: int = 2,
) -> int:
    """The chunk size of ``choices`` with the lowest time per image on a blank batch of
    ``max(choices)`` images (``_fastest_choice``)."""
    batch = np.zeros((max(choices), 3, int(input_size[0]), int(input_size[1])), np.float32)
    shrink = _shrinking_arena()

    def run(chunk: int) -> int:
        _run_in_calls(session, {"image": batch}, chunk, None, shrink)
        return len(batch)

    return _fastest_choice(choices, run, repeats)


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """uint8 ``[H, W, 3]`` (or ``[H, W]``) -> float32 ``[3, h, w]`` in [0, 1], the
    runtime's twin of ``vitqc.data.transforms.resize_batch`` for one image."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise VitqcError(f"expected a uint8 HxWx3 or HxW image, got {arr.dtype} {arr.shape}")
    x = arr.astype(np.float32) / np.float32(255.0)
    h, w = int(size[0]), int(size[1])
    if x.shape[:2] == (h, w):
        return np.ascontiguousarray(x.transpose(2, 0, 1))
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(x[:, :, c])).resize(
                (w, h), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels), 0.0, 1.0)


class ExportedModel:
    """An exported vitqc model in an onnxruntime session, with its metadata (``info``)."""

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        micro_batch: int | None = None,
        split: bool = True,
        head_batch: int | None = None,
    ) -> None:
        """``micro_batch``: images per backbone call (None: ``micro_batch`` chooses).
        ``split``: a batch runs its backbone in micro-batches and its head in calls of
        ``head_batch`` images (None: ``head_batch`` chooses), where the file names its
        feature maps; otherwise the whole graph runs in micro-batches."""
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a dependency
            raise VitqcError("the runtime needs onnxruntime: pip install onnxruntime") from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise VitqcError(f"model file not found: {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self._options = options
        try:
            #: the whole graph's session; None once a batch has split it (``split_sessions``)
            self.session: Any = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf
            raise VitqcError(f"cannot load {self.path}: not an ONNX model") from exc
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        try:
            info = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            info = None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise VitqcError(f"{self.path} is not a vitqc model (no {METADATA_KEY!r} metadata)")
        if info.get("format_version") != FORMAT_VERSION:
            raise VitqcError(
                f"{self.path}: unsupported vitqc ONNX format {info.get('format_version')!r}"
            )
        names = {o.name for o in self.session.get_outputs()}
        if not set(OUTPUTS) <= names:
            raise VitqcError(f"{self.path} lacks the outputs {sorted(set(OUTPUTS) - names)}")
        self.info: dict[str, Any] = info
        self.input_size = (int(info["input_size"][0]), int(info["input_size"][1]))
        self.threshold = float(info["threshold"])
        self.map_low = float(info["map_low"])
        self.min_area = float(info.get("min_area") or 0.0)
        #: the value read as white in grayscale files of more than 8 bits (``image_array``)
        self.white_level = white_level_for(int((info.get("resize") or {}).get("bit_depth", 8)))
        self._micro_batch = None if micro_batch is None else max(1, int(micro_batch))
        features = info.get("features") or []
        #: the feature-map outputs where a batch's graph is split (none: it runs whole)
        self.features: list[str] = list(features) if split and set(features) <= names else []
        self._split: tuple[Any, Any] | None = None
        self._head_batch = None if head_batch is None else max(1, int(head_batch))
        self._choosing = threading.Lock()

    def split_sessions(self) -> tuple[Any, Any]:
        """The backbone and head sessions of the split graph, made when first needed
        (the first batch of more than one image). They then replace the whole graph's
        session (``session`` becomes None; single images run through the parts, as
        fast), so the model holds its constants once: a model only ever given single
        images holds one session, and so does one given batches."""
        import onnx
        import onnxruntime as ort

        with self._choosing:
            if self._split is None:
                # Each part is loaded from a file: a session made from bytes keeps them
                # (onnxruntime's Python ``InferenceSession``), a second copy of the
                # constants.
                with tempfile.TemporaryDirectory(prefix="vitqc-split-") as tmp:
                    paths = [Path(tmp, "backbone.onnx"), Path(tmp, "head.onnx")]
                    for part, part_path in zip(
                        split_graph(self.path, self.features), paths, strict=True
                    ):
                        onnx.save(part, part_path)
                    backbone, head = (
                        ort.InferenceSession(
                            str(p), self._options, providers=["CPUExecutionProvider"]
                        )
                        for p in paths
                    )
                self._split = (backbone, head)
                self.session = None
                release_free_heap()  # what the split's protobuf copies leave in the heap
            return self._split

    @property
    def micro_batch(self) -> int:
        """Images per backbone call (per graph call for a graph that runs whole): as
        given, or the fastest of ``MICRO_BATCH_CHOICES`` on this machine, timed on blank
        images once, when first needed (the first batch of more than one image)."""
        session = self.split_sessions()[0] if self.features else self.session
        with self._choosing:
            if self._micro_batch is None:
                self._micro_batch = fastest_micro_batch(session, self.input_size)
        return self._micro_batch

    @property
    def head_batch(self) -> int:
        """Images per call of the split graph's head: as given, or the fastest of
        ``HEAD_BATCH_CHOICES`` on this machine, timed on blank features once, when a
        batch first needs it."""
        head = self.split_sessions()[1]
        with self._choosing:
            if self._head_batch is None:
                self._head_batch = fastest_head_batch(head)
        return self._head_batch

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The graph on ``[N, 3, h, w]`` float32 in [0, 1]: its four outputs by name. A
        single image runs the whole graph (its parts, once a batch has built them); a
        batch runs the backbone ``micro_batch`` images at a time and the head
        ``head_batch`` at a time (each image scores on its own: the same values either
        way)."""
        whole = self.session  # None once the split parts replace it
        if len(batch) <= 1 and whole is not None:
            values = run_in_chunks(whole, batch, 1, OUTPUTS)
        elif self.features:
            backbone, head = self.split_sessions()
            single = len(batch) <= 1
            features = run_in_chunks(backbone, batch, 1 if single else self.micro_batch)
            values = run_head(head, features, self.features, 1 if single else self.head_batch)
        else:
            values = run_in_chunks(whole, batch, self.micro_batch, OUTPUTS)
        return dict(zip(OUTPUTS, values, strict=True))

    def score_images(
        self,
        images: Sequence[np.ndarray],
        threshold: float | None = None,
        min_area: float | None = None,
        maps: bool = False,
    ) -> list[dict[str, Any]]:
        """Rows for uint8 images of any size (one ``run`` for the batch). With
        ``maps``, each row also holds ``map``: the graph's ``[h, w]`` anomaly map (float32,
        the operator scale of the stored threshold)."""
        if not images:
            return []
        thr = self.threshold if threshold is None else float(threshold)
        area = self.min_area if min_area is None else float(min_area)
        out = self.run(np.stack([resize_image(im, self.input_size) for im in images]))
        scores = out["score"].astype(np.float64)
        if area > 0:
            # the map is on the operator scale of the stored threshold: decide there
            # (strictly increasing above map_low, so the same images and pixels)
            flagged, areas = decide(
                operator_score(scores, self.map_low, self.threshold),
                out["map"],
                float(operator_score(thr, self.map_low, self.threshold)),
                area,
                [im.shape[:2] for im in images],
            )
        else:
            flagged, areas = decide(scores, None, thr)
        rows = []
        for i in range(len(images)):
            row: dict[str, Any] = {
                "score": float(scores[i]),
                "normalized_score": float(operator_score(scores[i], self.map_low, thr)),
                "threshold": thr,
                "defective": bool(flagged[i]),
            }
            if areas is not None:
                row.update(min_area_px=area, largest_region_px=float(areas[i]))
            if maps:
                row["map"] = out["map"][i]
            rows.append(row)
        return rows

    def score_files(
        self,
        inputs: Sequence[str | Path],
        threshold: float | None = None,
        min_area: float | None = None,
        batch_size: int = 8,
    ) -> Iterator[dict[str, Any]]:
        """Rows (with ``file``) for image files and folders, ``batch_size`` at a time."""
        files = expand_inputs(inputs)
        for start in range(0, len(files), max(1, int(batch_size))):
            chunk = files[start : start + max(1, int(batch_size))]
            images = [read_image(p, self.white_level) for p in chunk]
            rows = self.score_images(images, threshold, min_area)
            for path, row in zip(chunk, rows, strict=True):
                yield {"file": str(path), **row}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vitqc.runtime",
        description="Score images with an exported vitqc model (onnxruntime, no torch): "
        "one JSON line per image.",
    )
    parser.add_argument("model", type=Path, help="MODEL.onnx from `vitqc export`")
    parser.add_argument("inputs", nargs="+", type=Path, help="images or folders of images")
    parser.add_argument(
        "--threshold", type=float, default=None, help="raw-score threshold (default: stored)"
    )
    parser.add_argument(
        "--min-area",
        type=float,
        default=None,
        help="minimum defect area in original pixels (default: stored; 0: off)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per graph call")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime CPU threads")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.threshold is not None and not np.isfinite(args.threshold):
            raise VitqcError(f"--threshold must be a finite number, got {args.threshold}")
        model = ExportedModel(args.model, threads=args.threads)
        files = expand_inputs(args.inputs)  # every input checked before the first line
        for row in model.score_files(files, args.threshold, args.min_area, args.batch_size):
            print(json.dumps(row), flush=True)
    except VitqcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
