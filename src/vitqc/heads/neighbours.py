"""Nearest-neighbour search over a memory bank, behind one interface.

``exact`` is the reference: squared distances by chunked float32 matrix products, the
minimum taken over fixed blocks of the bank, so nothing depends on the batch size and
the ONNX export traces it. The faiss modes (``faiss-flat``: exact, ``IndexFlatL2``;
``faiss-hnsw`` and ``faiss-ivf``: approximate) build their index from the same bank
when first needed; the index is never stored, so a bundle holds only the bank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SEARCHES = ("exact", "faiss-flat", "faiss-hnsw", "faiss-ivf")

#: Bank entries per distance block of the exact search: ``[queries, BANK_BLOCK]`` at a time.
BANK_BLOCK = 4096
#: Queries per block of an eager exact search (one image's patches at 224 px: 784): 512
#: was 3-12 % faster per image than 1024 at batch 1 and 32 on 15k- and 48k-entry banks.
QUERY_BLOCK = 512


def exact_min_sq_distances(
    queries: torch.Tensor,
    bank: torch.Tensor,
    block: int = BANK_BLOCK,
    query_block: int = QUERY_BLOCK,
    bank_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared Euclidean distance of each query ``[N, D]`` to its nearest row of
    ``bank [M, D]``: matrix products, no ``torch.cdist`` (which ONNX cannot hold).
    ``bank_sq``: the rows' squared norms, when the caller keeps them (else computed).

    Eager calls take ``query_block`` queries at a time, so the ``[queries, block]``
    distances stay in cache (at batch 32 the whole batch's block was memory bound); a
    trace (the ONNX export) takes every query at once, whatever the batch size."""
    if bank_sq is None:
        bank_sq = bank.pow(2).sum(1)
    if queries.shape[0] <= query_block or torch.jit.is_tracing():
        return _block_min_sq_distances(queries, bank, bank_sq, block)
    return torch.cat(
        [_block_min_sq_distances(q, bank, bank_sq, block) for q in queries.split(query_block)]
    )


def _block_min_sq_distances(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, block: int
) -> torch.Tensor:
    best = None
    for start in range(0, int(bank.shape[0]), block):
        part, part_sq = bank[start : start + block], bank_sq[start : start + block]
        # |b|^2 - 2 q.b in the product itself (one pass over the block's distances);
        # the query's own |q|^2 does not change which entry is nearest: added once
        d2 = torch.addmm(part_sq[None], queries, part.T, alpha=-2).amin(1)
        best = d2 if best is None else torch.minimum(best, d2)
    return (best + queries.pow(2).sum(1)).clamp_min(0)


@dataclass(frozen=True)
class SearchParams:
    """How a faiss index is built and searched (ignored by ``exact``).

    ``hnsw_m`` links per node and ``ef_search`` the candidate list of HNSW; ``nlist``
    inverted lists (0: about 4 sqrt(bank size)) of which ``nprobe`` are scanned for IVF.
    """

    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 32
    nlist: int = 0
    nprobe: int = 8
    seed: int = 0


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # a dependency of vitqc; only a broken install lacks it
        raise RuntimeError("the faiss searches need faiss-cpu (pip install faiss-cpu)") from exc
    return faiss


def build_index(bank: np.ndarray, search: str, params: SearchParams = SearchParams()) -> Any:
    """A faiss index over ``bank [M, D]`` (float32) for one of the faiss modes."""
    faiss = _faiss()
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    d = bank.shape[1]
    if search == "faiss-flat":
        index = faiss.IndexFlatL2(d)
    elif search == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
    elif search == "faiss-ivf":
        nlist = params.nlist or max(1, min(bank.shape[0] // 39, round(4 * bank.shape[0] ** 0.5)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        index.cp.seed = params.seed
        index.train(bank)
        index.nprobe = min(params.nprobe, nlist)
    else:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    index.add(bank)
    return index


def index_min_sq_distances(index: Any, queries: np.ndarray, threads: int) -> np.ndarray:
    """Squared distance of each query to the nearest entry the index finds."""
    faiss = _faiss()
    faiss.omp_set_num_threads(max(1, threads))
    distances, _ = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    return distances[:, 0]


def recall_at_1(index: Any, queries: np.ndarray, bank: np.ndarray) -> float:
    """Fraction of queries whose nearest bank entry the index finds (exact distance ties
    count as found)."""
    exact = exact_min_sq_distances(torch.from_numpy(queries), torch.from_numpy(bank)).numpy()
    found = index_min_sq_distances(index, queries, torch.get_num_threads())
    return float(np.mean(found <= exact * (1 + 1e-4) + 1e-6))
