"""Nearest-neighbour baseline head (PatchCore style): a coreset memory bank.

Patch embeddings are the feature maps averaged over a ``neighbourhood`` x
``neighbourhood`` window (PatchCore's 3; EfficientNet-Lite's default takes each patch
alone, ``backbones.registry``), brought to the finest grid and concatenated. The bank
is the greedy k-center coreset of the training patches (PatchCore's, picked on a random
projection in few passes over the patches) stored as float16. The patch score is the
Euclidean distance to the nearest bank entry.

``standardize`` (off by default; "position" with ``fuse=True`` for EfficientNet-Lite)
first standardizes the features per channel and grid position, as the density heads do:
distances then measure how unusual a patch is *for its place*, and the border patches of
CNN features stop looking like defects (higher image AUROC, slightly coarser maps; the
figures are in the notes of the heads issue). ``standardize=None`` is the plain
PatchCore embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from vitqc.errors import VitqcError
from vitqc.heads.base import DerivedValues, FeatureStandardizer, Head, concat_at_finest
from vitqc.heads.neighbours import (
    CANDIDATE_TYPES,
    SEARCHES,
    CandidateBank,
    Int8Bank,
    SearchParams,
    build_index,
    candidate_min_sq_distances,
    candidate_search_bank,
    exact_min_sq_distances,
    export_search,
    index_min_sq_distances,
    int8_min_sq_distances,
    int8_search_bank,
    resolve_search,
)

#: Values per block of the coreset's distance update (``[points, picks]``, 1 MB): a
#: block stays in cache while its minimum is taken. With the picks of a pass (about 700
#: on magnetic_tile's 477k patches) 16384 points per block went through memory: 114 s
#: against 65 s for the whole update.
_COVERAGE_VALUES = 262_144
#: Farthest points a pass of the greedy coreset picks among (``greedy_coreset``).
_CANDIDATES = 1024
#: Principal axes of the bank the candidate searches' products run on (int8, float32 and
#: bfloat16: ``neighbours.on_principal_axes``): on 64 of EfficientNet-Lite0's 152
#: dimensions the int8 products and their argmax over magnetic_tile's bank took 27
#: against 44 ms per image, and no test figure moved by more than 0.002 on kolektorsdd or
#: magnetic_tile (issue 19 notes).
SEARCH_DIMS = 64


def greedy_coreset(
    points: torch.Tensor,
    n_select: int,
    projection_dim: int = 128,
    candidates: int = _CANDIDATES,
    seed: int = 0,
) -> torch.Tensor:
    """Indices of the greedy k-center coreset of ``points [M, D]``: PatchCore's
    selection, each pick the point farthest from those already picked, on a
    Johnson-Lindenstrauss projection to ``projection_dim`` dimensions.

    The picks are those of one-at-a-time greedy, made in few passes over all points.
    A pass takes the ``candidates`` farthest points and picks among them, updating
    only their distances, while the farthest candidate is at least as far as every
    point left out (distances only shrink, so that is the pick one-at-a-time greedy
    makes). One blocked matrix product then updates every point's distance.
    """
    m = points.shape[0]
    n_select = min(n_select, m)
    generator = torch.Generator().manual_seed(seed)
    if points.shape[1] > projection_dim:
        proj = torch.randn(points.shape[1], projection_dim, generator=generator)
        proj /= math.sqrt(projection_dim)
        reduced = torch.cat([p.float() @ proj for p in points.split(65536)])
    else:
        reduced = points.float()
    sq_norms = reduced.pow(2).sum(1)
    selected = torch.empty(n_select, dtype=torch.long)
    first = int(torch.randint(m, (1,), generator=generator))
    min_dist = (sq_norms - 2 * reduced @ reduced[first] + sq_norms[first]).clamp_min(0)
    min_dist[first] = -math.inf  # picked points are never candidates again
    selected[0] = first
    count = 1
    nearest = torch.empty(m)
    while count < n_select:
        take = min(candidates, m - count)
        top = torch.topk(min_dist, min(take + 1, m))
        cand, cand_dist = top.indices[:take], top.values[:take].clone()
        # the farthest point left out of the candidates
        bound = float(top.values[take]) if top.values.numel() > take else -math.inf
        cand_points, cand_sq = reduced[cand], sq_norms[cand]
        start = count
        while count < n_select:
            j = int(torch.argmax(cand_dist))
            farthest = float(cand_dist[j])
            if farthest == -math.inf or farthest < bound:
                break
            selected[count] = cand[j]
            count += 1
            to_pick = torch.addmv(cand_sq + cand_sq[j], cand_points, cand_points[j], alpha=-2)
            torch.minimum(cand_dist, to_pick.clamp_min_(0), out=cand_dist)
            cand_dist[j] = -math.inf
        new = selected[start:count]
        centres, centres_sq = reduced[new].T.contiguous(), sq_norms[new][None]
        # as the exact search: the centres' |c|^2 - 2 p.c in the product, |p|^2 after;
        # a block of points at a time, so each block of the product stays in cache
        step = max(1, _COVERAGE_VALUES // len(new))
        for row in range(0, m, step):
            rows = slice(row, row + step)
            block = torch.addmm(centres_sq, reduced[rows], centres, alpha=-2)
            torch.amin(block, 1, out=nearest[rows])
        min_dist = torch.minimum(min_dist, (nearest + sq_norms).clamp_min(0))
        min_dist[new] = -math.inf
    return selected


class KNNHead(Head):
    name = "knn"
    trainable = False

    def __init__(
        self,
        feature_channels: list[int],
        feature_sizes: list[tuple[int, int]],
        coreset_ratio: float = 0.1,
        max_bank: int = 50_000,
        neighbourhood: int = 3,
        projection_dim: int = 128,
        standardize: str | None = None,
        fuse: bool = False,
        seed: int = 0,
        bank_size: int = 0,
        search: str = "auto",
        ef_search: int = SearchParams.ef_search,
        nprobe: int = SearchParams.nprobe,
        search_dims: int = SEARCH_DIMS,
    ) -> None:
        super().__init__(feature_channels, feature_sizes)
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
        self.search = search
        self.search_params = SearchParams(ef_search=ef_search, nprobe=nprobe, seed=seed)
        if search_dims < 0:
            raise ValueError(f"search_dims must be 0 (every dimension) or more, got {search_dims}")
        #: principal axes of the bank the candidate searches' products run on (0: all)
        self.search_dims = search_dims
        #: what is derived from the bank (the faiss index, the float32 and bfloat16
        #: search banks), rebuilt when the bank changes (``_from_bank``)
        self._derived = DerivedValues()
        self.standardization, self.fuse = standardize, fuse
        self.standardize = (
            FeatureStandardizer(
                feature_channels, self.feature_sizes, standardize, fuse=fuse, seed=seed
            )
            if standardize is not None
            else None
        )
        self.coreset_ratio, self.max_bank, self.neighbourhood = (
            coreset_ratio,
            max_bank,
            neighbourhood,
        )
        self.projection_dim, self.seed = projection_dim, seed
        self.register_buffer(
            "bank", torch.zeros(bank_size, sum(feature_channels), dtype=torch.float16)
        )

    def _embeddings(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.standardize is not None:
            features = self.standardize(features)
        return concat_at_finest(features, self.neighbourhood)

    def prepare(
        self, train_features: list[torch.Tensor], fitted: FeatureStandardizer | None = None
    ) -> None:
        if self.standardize is not None:
            self.standardize.fit_or_copy(train_features, fitted)
        emb = self._embeddings(train_features)
        patches = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).to(torch.float16)
        n_select = max(1, min(self.max_bank, round(self.coreset_ratio * patches.shape[0])))
        idx = greedy_coreset(patches, n_select, self.projection_dim, seed=self.seed)
        self.bank = patches[idx].clone()

    def set_search(self, search: str, search_dims: int | None = None, **params: int) -> None:
        """Search the same bank another way (``search_dims``; ``ef_search``, ``nprobe``:
        ``SearchParams``)."""
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
        self.search = search
        if search_dims is not None and search_dims != self.search_dims:
            self.search_dims = search_dims
            for name in ("int8", *CANDIDATE_TYPES):
                self._derived.drop(f"{name}_bank")
        self.search_params = replace(self.search_params, **params)
        self._derived.drop("index")

    def _from_bank(self, name: str, build: Callable[[], Any]) -> Any:
        """``build()``, made when first needed and again whenever the bank changes
        (``prepare``, ``load_state_dict``, in place); never stored (``DerivedValues``)."""
        return self._derived.get(name, [self.bank], build)

    def search_bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank in float32 and its rows' squared norms, for the exact and candidate
        searches (per call they cost about 4 % of a magnetic_tile search at batch 1)."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            bank = self.bank.detach().float()
            return bank, bank.pow(2).sum(1)

        return self._from_bank("search_bank", build)

    def candidate_bank(self, search: str = "bfloat16") -> CandidateBank:
        """The bank as the bfloat16 or float32 candidate search takes it
        (``candidate_search_bank``, on ``search_dims`` principal axes)."""
        dtype = CANDIDATE_TYPES[search]
        return self._from_bank(
            f"{search}_bank",
            lambda: candidate_search_bank(*self.search_bank(), self.search_dims, dtype),
        )

    def int8_bank(self) -> Int8Bank:
        """The bank as the int8 search takes it (``int8_search_bank``, on ``search_dims``
        principal axes)."""
        return self._from_bank(
            "int8_bank", lambda: int8_search_bank(*self.search_bank(), dims=self.search_dims)
        )

    def prepare_export(self) -> None:
        # constants of the graph, not steps traced from the bank
        if export_search(self.search) == "int8":
            self.int8_bank()
        else:
            self.search_bank()

    def index(self) -> object:
        """The faiss index over the bank."""
        return self._from_bank(
            "index",
            lambda: build_index(
                self.bank.detach().float().cpu().numpy(), self.search, self.search_params
            ),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Distance of each patch to its nearest bank entry. The exact search takes
        matrix products over fixed blocks of the bank; the bfloat16, float32 and int8
        ones measure each block's candidate (found by products of that type) in float32
        (``auto`` picks the fastest on this CPU: ``resolve_search``); the faiss modes
        search their index on the CPU. An export (``vitqc.export``) traces the int8 or
        the exact search, as ``export_search`` says."""
        emb = self._embeddings(features)
        d, h, w = emb.shape[1], emb.shape[2], emb.shape[3]
        queries = emb.permute(0, 2, 3, 1).reshape(-1, d)
        if self.bank.shape[0] == 0:
            raise VitqcError("the knn head has an empty memory bank: prepare() it first")
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        search = export_search(self.search) if tracing else resolve_search(self.search)
        if search in ("exact", "int8", *CANDIDATE_TYPES):
            bank, bank_sq = self.search_bank()
        if search == "exact":
            d2 = exact_min_sq_distances(queries, bank, bank_sq=bank_sq)
        elif search in CANDIDATE_TYPES:
            d2 = candidate_min_sq_distances(queries, bank, bank_sq, self.candidate_bank(search))
        elif search == "int8":
            d2 = int8_min_sq_distances(queries, bank, bank_sq, self.int8_bank())
        else:
            found = index_min_sq_distances(
                self.index(), queries.detach().float().cpu().numpy(), torch.get_num_threads()
            )
            d2 = torch.from_numpy(found).to(queries.device).clamp_min(0)
        return d2.sqrt().reshape(-1, h, w)

    def config(self) -> dict[str, Any]:
        return {
            "coreset_ratio": self.coreset_ratio,
            "max_bank": self.max_bank,
            "neighbourhood": self.neighbourhood,
            "projection_dim": self.projection_dim,
            "standardize": self.standardization,
            "fuse": self.fuse,
            "seed": self.seed,
            "bank_size": int(self.bank.shape[0]),
            "search": self.search,
            "ef_search": self.search_params.ef_search,
            "nprobe": self.search_params.nprobe,
            "search_dims": self.search_dims,
        }
