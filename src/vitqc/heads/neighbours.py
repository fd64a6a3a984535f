"""Nearest-neighbour search over a memory bank, behind one interface.

``exact`` is the reference: squared distances by chunked float32 matrix products, the
minimum taken over fixed blocks of the bank, so nothing depends on the batch size and
the ONNX export traces it. ``bfloat16`` picks candidates with bfloat16 products (the
matrix units of CPUs that compute bfloat16 natively: AMX, AVX512-BF16) and measures them
again in float32, so a found distance is exact and only a near tie can pick a slightly
farther entry; ``float32`` picks them the same way with float32 products (for CPUs with
neither bfloat16 nor int8 units: only the principal axes make it faster than exact).
``int8`` does the same with int8 products (one quantization step for the bank and the
queries, each entry's squared norm folded into the product as integer columns). With
``dims``, all three run their products on the bank's first principal axes
(``on_principal_axes``): fewer products, candidates less often the nearest. An ONNX
export of the default search runs the int8 one (``export_search``: ONNX Runtime has int8
matrix products on every x86 CPU, no bfloat16 ones). The faiss modes
(``faiss-flat``: exact, ``IndexFlatL2``; ``faiss-hnsw`` and ``faiss-ivf``: approximate)
build their index from the same bank when first needed; the index is never stored, so
a bundle holds only the bank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitqc.cpu import amx_tiles, native_int8

SEARCHES = (
    "auto",
    "exact",
    "bfloat16",
    "float32",
    "int8",
    "faiss-flat",
    "faiss-hnsw",
    "faiss-ivf",
)


def resolve_search(search: str) -> str:
    """The mode ``search`` runs. ``auto`` is the fastest search on this CPU among those
    that moved no test figure by more than 0.002 on magnetic_tile and kolektorsdd (the
    notes of the speed issue): ``bfloat16`` on CPUs with AMX tiles, ``int8`` on CPUs with
    int8 dot products (VNNI) but no AMX (on an AMD EPYC with AVX512-BF16 the int8 search
    took less than half the bfloat16 one's time), ``float32`` candidates elsewhere
    (emulated bfloat16 or int8 products would be slower than float32 ones; on 64
    principal axes the float32 candidates took 99 against 148 ms per image for the exact
    search on magnetic_tile's bank, on an AMD EPYC with AVX2 only)."""
    if search != "auto":
        return search
    if amx_tiles():
        return "bfloat16"
    return "int8" if native_int8() else "float32"


def export_search(search: str) -> str:
    """The search an ONNX graph of a head searching by ``search`` holds: ``int8`` for
    ``auto`` and ``int8`` (the fastest search in ONNX Runtime whose test figures moved
    by at most 0.002), else ``exact`` (the graph cannot hold faiss, and ONNX Runtime
    has no bfloat16 matrix products on CPUs)."""
    return "int8" if search in ("auto", "int8") else "exact"


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
    return _by_query_block(
        queries, query_block, lambda q: _block_min_sq_distances(q, bank, bank_sq, block)
    )


def _by_query_block(
    queries: torch.Tensor, query_block: int, search: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``search(queries)``, ``query_block`` queries at a time in eager calls, so each
    block's distances stay in cache; a trace takes every query at once, so the graph
    holds for any batch size."""
    if queries.shape[0] <= query_block or torch.jit.is_tracing():
        return search(queries)
    return torch.cat([search(q) for q in queries.split(query_block)])


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


#: Bank entries per group of the candidate searches: each bank block's candidate for a query
#: is the nearest entry of its nearest group (a minimum over every group, then over one).
GROUP = 64
#: The candidate searches whose products run in a floating-point type, and that type.
CANDIDATE_TYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
#: Width of the candidate searches' products by type: the bank's ``D`` values, its
#: squared norm and zeros up to a multiple of this. bfloat16: the matrix units' tile width
#: (a block's product with 153 values took 0.59 ms, with 160 0.55); float32: a multiple
#: of 8 (on 64 axes 72 values took 91 ms per magnetic_tile image, 96 took 114).
_TILE = {torch.bfloat16: 32, torch.float32: 8}


@dataclass(frozen=True)
class PrincipalAxes:
    """Where a candidate search's products run: ``(x - centre) @ projection``, the bank's
    mean and the first ``k`` eigenvectors of its covariance (``[D, k]``); both None for
    every dimension as it is."""

    centre: torch.Tensor | None = None  # [D]
    projection: torch.Tensor | None = None  # [D, k]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.projection is None else (x - self.centre) @ self.projection


def on_principal_axes(
    bank: torch.Tensor, bank_sq: torch.Tensor, dims: int
) -> tuple[torch.Tensor, torch.Tensor, PrincipalAxes]:
    """``bank [M, D]`` and its rows' squared norms as a candidate search's products take
    them: with ``0 < dims < D``, the entries on the bank's first ``dims`` principal axes
    ``b' = (b - mu) P`` and the norms ``|b - mu|^2`` (a query then enters as
    ``(q - mu) P``: the smallest ``|b - mu|^2 - 2 q'.b'`` is ``|q - b|^2`` less the
    query's own terms and the product of the two residuals off the axes); otherwise as
    they are."""
    if not 0 < dims < bank.shape[1]:
        return bank, bank_sq, PrincipalAxes()
    axes = PrincipalAxes(*principal_axes(bank, dims))
    return axes.project(bank), (bank - axes.centre).pow(2).sum(1), axes


@dataclass(frozen=True)
class CandidateBank:
    """The bank as the bfloat16 and float32 candidate searches take it: ``rows [M, D']``
    in the search's type, ``[-2 b, |b|^2, 0...]`` (on the principal ``axes``, if any); a
    product with a query's ``[q, 1, 0...]`` is ``|b|^2 - 2 q.b``, its squared distance
    less ``|q|^2``."""

    rows: torch.Tensor
    axes: PrincipalAxes = PrincipalAxes()


def candidate_search_bank(
    bank: torch.Tensor, bank_sq: torch.Tensor, dims: int = 0, dtype: torch.dtype = torch.bfloat16
) -> CandidateBank:
    """``CandidateBank`` of ``bank [M, D]`` (float32) with squared norms ``bank_sq``, in
    ``dtype`` (bfloat16 or float32), on its first ``dims`` principal axes
    (``on_principal_axes``; 0: every dimension)."""
    bank, bank_sq, axes = on_principal_axes(bank, bank_sq, dims)
    m, d = bank.shape
    width = -(-(d + 1) // _TILE[dtype]) * _TILE[dtype]
    rows = bank.new_zeros(m, width)
    rows[:, :d] = bank * -2
    rows[:, d] = bank_sq
    return CandidateBank(rows.to(dtype), axes)


def candidate_min_sq_distances(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq: torch.Tensor,
    search_bank: CandidateBank,
    block: int = BANK_BLOCK,
    query_block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """``exact_min_sq_distances`` from candidates: per block of the bank, the entry
    nearest each query by a product in the search bank's type (``search_bank``, from
    ``candidate_search_bank``), then the float32 distance to every block's candidate."""
    rows = search_bank.rows

    def search(q: torch.Tensor) -> torch.Tensor:
        keys = search_bank.axes.project(q)
        n, d = keys.shape
        augmented = q.new_zeros(rows.shape[1], n)
        augmented[:d] = keys.T
        augmented[d] = 1
        augmented = augmented.to(rows.dtype)
        candidates = torch.stack(
            [
                start + _nearest_in_block(rows[start : start + block] @ augmented)
                for start in range(0, int(bank.shape[0]), block)
            ],
            1,
        )  # [n, blocks]
        return _nearest_candidate(q, bank, bank_sq, candidates)

    return _by_query_block(queries, query_block, search)


def _nearest_candidate(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """Squared float32 distance of each query ``[n, D]`` to the nearest of its
    ``candidates [n, k]`` (rows of ``bank``)."""
    flat = candidates.flatten()  # index_select copies whole rows: 4x faster than bank[c]
    rows = bank.index_select(0, flat).view(*candidates.shape, -1)  # [n, k, D]
    near_sq = bank_sq.index_select(0, flat).view(candidates.shape)
    d2 = near_sq - 2 * torch.bmm(rows, queries.unsqueeze(2)).squeeze(2)
    return (d2.amin(1) + queries.pow(2).sum(1)).clamp_min(0)


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


#: Width of the int8 search's products: the bank's ``D`` values, its squared norm's
#: integer columns and zeros up to a multiple of this.
_INT8_WIDTH = 16
#: Largest magnitude of a quantized query value (int8: -128..127 saturated).
_INT8_MAX = 127
#: Largest magnitude of a value in the bank's rows. ONNX Runtime's uint8 x int8 products
#: on x86 CPUs without VNNI (AVX2: ``vpmaddubsw``) add each pair of products in int16 and
#: saturate beyond 32767; with the bank within 64 a pair stays within 2 x 255 x 64.
_BANK_MAX = 64


def _bank_step(scale: float) -> float:
    """The int8 rows' quantization step for queries quantized by ``scale``: ``scale`` x
    127 / 64, so the rows' values stay within ``_BANK_MAX``."""
    return scale * _INT8_MAX / _BANK_MAX


@dataclass(frozen=True)
class Int8Bank:
    """The bank as the int8 search takes it.

    ``blocks``, each ``[D', m]`` for ``m`` consecutive entries (int8, transposed for the
    products, one contiguous tensor per block of the search), hold ``round(b /
    bank_scale)``, then ``-c`` split over integer columns, ``c = round(|b|^2 / (2 scale
    bank_scale))``; a query row ``round(q / scale)`` followed by ``query_columns / scale``
    (127 for each coarse column, 1 for each fine one, 0 for the padding) then has the
    integer product ``q.b / (scale bank_scale) - c``: the largest is the entry with the
    smallest ``|b|^2 - 2 q.b``.
    Every value of the rows is within ``_BANK_MAX`` (64), so the products are exact in
    int32 on every x86 CPU, also in ONNX Runtime's kernel for CPUs without VNNI, which
    adds pairs of products in int16.

    On principal ``axes`` (``on_principal_axes``) the rows hold ``b' = (b - mu) P`` and
    ``c`` comes from ``|b - mu|^2``: fewer integer products, and candidates less often
    the nearest entry (a missed one is measured at its true, larger distance)."""

    blocks: tuple[torch.Tensor, ...]
    scale: float  # the queries' quantization step
    query_columns: torch.Tensor  # [D' - D] float32, multiples of scale
    axes: PrincipalAxes = PrincipalAxes()

    @property
    def bank_scale(self) -> float:
        """The rows' quantization step (``_bank_step``)."""
        return _bank_step(self.scale)

    def keys(self, queries: torch.Tensor) -> torch.Tensor:
        """The queries ``[n, D]`` as the rows' columns take them: projected, if the
        bank is, then followed by ``query_columns``."""
        queries = self.axes.project(queries)
        return torch.cat([queries, self.query_columns.expand(queries.shape[0], -1)], 1)


def principal_axes(bank: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centre [D], axes [D, dims])``: the mean of ``bank [M, D]`` and the eigenvectors
    of its covariance with the ``dims`` largest eigenvalues (float64 eigendecomposition)."""
    centre = bank.mean(0)
    centred = (bank - centre).double()
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    return centre, vectors[:, -dims:].flip(1).float().contiguous()


def int8_search_bank(
    bank: torch.Tensor, bank_sq: torch.Tensor, block: int = BANK_BLOCK, dims: int = 0
) -> Int8Bank:
    """``Int8Bank`` of ``bank [M, D]`` (float32) with squared norms ``bank_sq``: the
    queries' quantization step is the bank's largest magnitude over 127 (queries beyond
    that magnitude saturate, which only changes which candidate the products pick: its
    distance is measured again), the bank's the same over ``_BANK_MAX``. ``0 < dims <
    D``: the products run on the bank's first ``dims`` principal axes
    (``on_principal_axes``: the norm columns then come from ``|b - mu|^2``)."""
    bank, bank_sq, axes = on_principal_axes(bank, bank_sq, dims)
    m, d = bank.shape
    scale = max(float(bank.abs().max()), 1e-12) / _INT8_MAX  # the queries' step
    bank_scale = _bank_step(scale)
    quantized = torch.round(bank / bank_scale).clamp(-_BANK_MAX, _BANK_MAX)
    folded = torch.round(bank_sq.double() / (2 * scale * bank_scale))
    # c = 127 * coarse + fine, each part spread over columns of at most _BANK_MAX
    coarse, fine = torch.div(folded, _INT8_MAX, rounding_mode="floor"), folded % _INT8_MAX
    coarse_columns, fine_columns = _spread(coarse), _spread(fine)
    columns = [*coarse_columns, *fine_columns]
    width = -(-(d + len(columns)) // _INT8_WIDTH) * _INT8_WIDTH
    rows = torch.zeros(width, m, dtype=torch.float64)
    rows[:d] = quantized.T
    rows[d : d + len(columns)] = -torch.stack(columns)
    query_columns = torch.zeros(width - d)
    query_columns[: len(coarse_columns)] = _INT8_MAX * scale
    query_columns[len(coarse_columns) : len(columns)] = scale
    rows = rows.to(torch.int8)
    blocks = tuple(rows[:, start : start + block].contiguous() for start in range(0, m, block))
    return Int8Bank(blocks, scale, query_columns, axes)


def _spread(values: torch.Tensor) -> list[torch.Tensor]:
    """Non-negative integers ``values`` as a sum of columns each within ``_BANK_MAX``
    (at least one)."""
    n = max(1, int(-(-float(values.max()) // _BANK_MAX)))
    parts, left = [], values.clone()
    for _ in range(n):
        part = left.clamp(max=_BANK_MAX)
        parts.append(part)
        left = left - part
    return parts


class _QuantizeQueries(torch.autograd.Function):
    """``round(q / scale)`` saturated to int8; in ONNX a ``QuantizeLinear`` to uint8 with
    zero point 128 (the same integers, offset), which ``_BlockArgmax`` takes."""

    @staticmethod
    def forward(ctx: Any, queries: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.round(queries / scale).clamp(-128, 127).to(torch.int8)

    @staticmethod
    def symbolic(g: Any, queries: Any, scale: float) -> Any:
        step = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        zero = g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))
        return g.op("QuantizeLinear", queries, step, zero)


class _BlockArgmax(torch.autograd.Function):
    """Column of the largest integer product of each quantized query row with
    ``rows [D', m]``. In ONNX ``MatMulInteger`` (uint8 x int8, ONNX
    Runtime's fast integer path), then the argmax as ``_row_argmax`` takes it: ONNX
    Runtime's ``ArgMax`` over 4096 int32 columns took 1.8 ms for 784 queries, the group
    maxima (``ReduceMax``), their ``ArgMax`` and one within the winning group 0.5."""

    @staticmethod
    def forward(ctx: Any, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return _row_argmax(torch._int_mm(queries, rows))

    @staticmethod
    def symbolic(g: Any, queries: Any, rows: Any) -> Any:
        columns = rows.type().sizes()[1]  # a bank block: a constant of known shape
        zero = g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))
        products = g.op("MatMulInteger", queries, rows, zero)
        if columns % GROUP:  # the bank's last, partial block
            return g.op("ArgMax", products, axis_i=1, keepdims_i=0)
        shape = g.op("Constant", value_t=torch.tensor([-1, columns // GROUP, GROUP]))
        grouped = g.op("Reshape", products, shape)  # [n, groups, GROUP]
        maxima = g.op("ReduceMax", grouped, axes_i=[2], keepdims_i=0)
        best = g.op("ArgMax", maxima, axis_i=1, keepdims_i=1)  # [n, 1]: the first largest
        within = g.op(
            "ArgMax", g.op("GatherND", grouped, best, batch_dims_i=1), axis_i=1, keepdims_i=0
        )
        flat = g.op("Reshape", best, g.op("Constant", value_t=torch.tensor([-1])))
        size = g.op("Constant", value_t=torch.tensor(GROUP))
        return g.op("Add", g.op("Mul", flat, size), within)


def _row_argmax(products: torch.Tensor) -> torch.Tensor:
    """Column of the largest value in each row of ``products [n, m]``, the first of equal
    ones (as ``argmax``): the largest of its largest group of ``GROUP`` columns. The
    group maximums are vectorized and ``argmax`` is not: on rows of 4096 int32 products
    (512 queries) this took 0.22 ms where ``argmax`` took 1.24 (AMD EPYC, one thread)."""
    n, m = products.shape
    if m % GROUP:  # the bank's last, partial block
        return products.argmax(1)
    best = products.view(n, m // GROUP, GROUP).amax(2).argmax(1)  # [n]
    columns = best.unsqueeze(1) * GROUP + torch.arange(GROUP)  # [n, GROUP]
    return columns.gather(1, products.gather(1, columns).argmax(1, keepdim=True)).squeeze(1)


def int8_min_sq_distances(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq: torch.Tensor,
    int8_bank: Int8Bank,
    query_block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """``exact_min_sq_distances`` from candidates: per block of the bank, the entry
    nearest each query by the int8 products (``int8_search_bank``), then the float32
    distance to every block's candidate. Traceable: the ONNX graph holds the same
    integer products."""

    def search(q: torch.Tensor) -> torch.Tensor:
        quantized = _QuantizeQueries.apply(int8_bank.keys(q), int8_bank.scale)
        found, start = [], 0
        for rows in int8_bank.blocks:
            found.append(start + _BlockArgmax.apply(quantized, rows))
            start += rows.shape[1]
        return _nearest_candidate(q, bank, bank_sq, torch.stack(found, 1))

    return _by_query_block(queries, query_block, search)


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
