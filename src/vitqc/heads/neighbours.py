"""Nearest-neighbour search over a memory bank, behind one interface.

``exact`` is the reference: squared distances by chunked float32 matrix products, the
minimum taken over fixed blocks of the bank, so nothing depends on the batch size and
the ONNX export traces it. ``bfloat16`` picks candidates with bfloat16 products (the
matrix units of CPUs that compute bfloat16 natively: AMX, AVX512-BF16) and measures them
again in float32, so a found distance is exact and only a near tie can pick a slightly
farther entry. The faiss modes (``faiss-flat``: exact, ``IndexFlatL2``;
``faiss-hnsw`` and ``faiss-ivf``: approximate) build their index from the same bank
when first needed; the index is never stored, so a bundle holds only the bank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitqc.cpu import native_bfloat16

SEARCHES = ("auto", "exact", "bfloat16", "faiss-flat", "faiss-hnsw", "faiss-ivf")


def resolve_search(search: str) -> str:
    """The mode ``search`` runs: ``auto`` is ``bfloat16`` where the CPU computes bfloat16
    natively (``vitqc.cpu``; elsewhere its products would be emulated, slower than
    float32) and ``exact`` otherwise. ``bfloat16`` is the default because it was the
    fastest search that moved no test figure by more than 0.002 on magnetic_tile and
    kolektorsdd (the notes of the speed issue)."""
    if search == "auto":
        return "bfloat16" if native_bfloat16() else "exact"
    return search


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


#: Bank entries per group of the bfloat16 search: each bank block's candidate for a query
#: is the nearest entry of its nearest group (a minimum over every group, then over one).
GROUP = 64
#: Width of the bfloat16 search's products: the bank's ``D`` values, its squared norm and
#: zeros up to a multiple of this (the matrix units' tile width; a block's product with
#: 153 values took 0.59 ms, with 160 0.55).
_TILE = 32


def bfloat16_search_bank(bank: torch.Tensor, bank_sq: torch.Tensor) -> torch.Tensor:
    """``[M, D']`` bfloat16 rows ``[-2 b, |b|^2, 0...]``: a product with a query's
    ``[q, 1, 0...]`` is ``|b|^2 - 2 q.b``, its squared distance less ``|q|^2``."""
    m, d = bank.shape
    width = -(-(d + 1) // _TILE) * _TILE
    rows = bank.new_zeros(m, width)
    rows[:, :d] = bank * -2
    rows[:, d] = bank_sq
    return rows.to(torch.bfloat16)


def bfloat16_min_sq_distances(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq: torch.Tensor,
    search_rows: torch.Tensor,
    block: int = BANK_BLOCK,
    query_block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """``exact_min_sq_distances`` from candidates: per block of the bank, the entry
    nearest each query by a bfloat16 product (``search_rows``, from
    ``bfloat16_search_bank``), then the float32 distance to every block's candidate."""
    out = []
    for q in queries.split(query_block):
        n, d = q.shape
        augmented = q.new_zeros(search_rows.shape[1], n)
        augmented[:d] = q.T
        augmented[d] = 1
        augmented = augmented.to(torch.bfloat16)
        candidates = torch.stack(
            [
                start + _nearest_in_block(search_rows[start : start + block] @ augmented)
                for start in range(0, int(bank.shape[0]), block)
            ],
            1,
        )  # [n, blocks]
        rows = bank[candidates]  # [n, blocks, D]
        d2 = bank_sq[candidates] - 2 * torch.bmm(rows, q.unsqueeze(2)).squeeze(2)
        out.append(d2.amin(1) + q.pow(2).sum(1))
    return torch.cat(out).clamp_min(0)


def _nearest_in_block(d: torch.Tensor) -> torch.Tensor:
    """Row of the smallest value in each column of ``d [m, n]``: the smallest of its
    smallest group of ``GROUP`` rows. The group minimums reduce over the middle
    dimension, contiguous across queries: with one ``argmin`` over each block's rows the
    search took 172 ms per image on a bank of magnetic_tile's size (47.7k x 152), against 49."""
    m, n = d.shape
    group = min(GROUP, m)
    groups = -(-m // group)
    if groups * group > m:  # the bank's last, partial block
        d = torch.cat([d, d.new_full((groups * group - m, n), float("inf"))])
    best = d.view(groups, group, n).amin(1).argmin(0)  # [n]
    rows = best.unsqueeze(0) * group + torch.arange(group).unsqueeze(1)  # [group, n]
    return rows.gather(0, d.gather(0, rows).argmin(0, keepdim=True)).squeeze(0)


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


def recall_of(found: np.ndarray, queries: np.ndarray, bank: np.ndarray) -> float:
    """Recall@1: the fraction of ``found`` squared distances (one per query, from any
    search) that are the nearest bank entry's (exact distance ties count as found)."""
    exact = exact_min_sq_distances(torch.from_numpy(queries), torch.from_numpy(bank)).numpy()
    return float(np.mean(found <= exact * (1 + 1e-4) + 1e-6))
