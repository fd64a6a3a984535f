"""Nearest-neighbour search modes against brute force, and the knn head on each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitqc.errors import VitqcError
from vitqc.heads import create_head, neighbours, parse_head
from vitqc.heads.neighbours import (
    SEARCHES,
    SearchParams,
    build_index,
    candidate_min_sq_distances,
    candidate_search_bank,
    exact_min_sq_distances,
    export_search,
    index_min_sq_distances,
    int8_min_sq_distances,
    int8_search_bank,
    recall_of,
    resolve_search,
)


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Points around 50 centres, as patch embeddings are (not uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, d)) * 4
    return (centres[rng.integers(0, 50, n)] + rng.standard_normal((n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def bank_and_queries() -> tuple[np.ndarray, np.ndarray]:
    return _clustered(6000, 48, 0), _clustered(500, 48, 1)


def _brute_force(queries: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q, b = queries.astype(np.float64), bank.astype(np.float64)
    d2 = (q**2).sum(1)[:, None] - 2 * q @ b.T + (b**2).sum(1)[None]
    return d2.min(1), d2.argmin(1)


def test_exact_search_is_brute_force(bank_and_queries) -> None:
    bank, queries = bank_and_queries
    want, _ = _brute_force(queries, bank)
    q, b = torch.from_numpy(queries), torch.from_numpy(bank)
    for block in (700, 4096, 10_000):  # the blocking changes nothing
        for query_block in (512, 96):  # 500 queries: one block, or five and a part
            got = exact_min_sq_distances(q, b, block, query_block)
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-3)
            # the bank's squared norms handed in: the same distances
            kept = exact_min_sq_distances(q, b, block, query_block, bank_sq=b.pow(2).sum(1))
            torch.testing.assert_close(kept, got, rtol=0, atol=0)


def test_faiss_flat_finds_the_same_neighbours(bank_and_queries) -> None:
    bank, queries = bank_and_queries
    want_d2, want_idx = _brute_force(queries, bank)
    index = build_index(bank, "faiss-flat")
    d2, idx = index.search(queries, 1)
    np.testing.assert_array_equal(idx[:, 0], want_idx)
    np.testing.assert_allclose(d2[:, 0], want_d2, rtol=1e-4, atol=1e-3)
    assert recall_of(index_min_sq_distances(index, queries, 1), queries, bank) == 1.0


@pytest.mark.parametrize(
    ("search", "params", "min_recall"),
    [
        # measured on this data: 0.966, 0.858, 0.654, 0.994, 0.542
        ("faiss-hnsw", SearchParams(ef_search=128), 0.95),
        ("faiss-hnsw", SearchParams(), 0.83),
        ("faiss-hnsw", SearchParams(ef_search=8), 0.60),
        ("faiss-ivf", SearchParams(), 0.98),
        ("faiss-ivf", SearchParams(nprobe=1), 0.50),
    ],
)
def test_approximate_search_recall(bank_and_queries, search, params, min_recall) -> None:
    """Recall@1 of the approximate modes on clustered data (stated per setting), and
    they never report a distance below the true nearest one."""
    bank, queries = bank_and_queries
    index = build_index(bank, search, params)
    recall = recall_of(index_min_sq_distances(index, queries, 1), queries, bank)
    assert recall >= min_recall, f"{search} {params}: recall@1 {recall:.3f}"
    want, _ = _brute_force(queries, bank)
    found = index_min_sq_distances(index, queries, threads=1)
    assert np.all(found >= want * (1 - 1e-4) - 1e-3)


def test_bfloat16_search_measures_its_candidates_exactly(bank_and_queries) -> None:
    """bfloat16 products pick one candidate per bank block, measured again in float32:
    every found distance is a true distance to a bank entry (never below the nearest),
    nearly every one is the nearest (recall stated), and blocks that do not divide the
    bank, groups larger than a block or a bank smaller than a group change nothing of
    that."""
    bank, queries = bank_and_queries
    want, _ = _brute_force(queries, bank)
    q, b = torch.from_numpy(queries), torch.from_numpy(bank)
    b_sq = b.pow(2).sum(1)
    search_bank = candidate_search_bank(b, b_sq)
    rows = search_bank.rows
    assert rows.dtype == torch.bfloat16 and rows.shape == (6000, 64)  # 48 + 1 -> 64 wide
    assert search_bank.axes.projection is None  # every dimension
    # measured on this data (tight clusters, many near ties): recall@1 0.976 with two
    # candidates per query (blocks of 4096), 0.994 with nine, 1.0 with 150; a missed
    # nearest entry is at most 0.21 % farther
    for block, query_block, min_recall in ((4096, 512, 0.97), (700, 96, 0.99), (40, 500, 1.0)):
        found = candidate_min_sq_distances(q, b, b_sq, search_bank, block, query_block).numpy()
        assert np.all(found >= want * (1 - 1e-4) - 1e-3)
        assert np.all(found <= want * 1.005)
        recall = recall_of(found, queries, bank)
        assert recall >= min_recall, f"block {block}: recall@1 {recall:.3f}"
        hit = found <= want * (1 + 1e-4) + 1e-6
        np.testing.assert_allclose(found[hit], want[hit], rtol=1e-4, atol=1e-3)
    # float32 products on every dimension: each block's candidate is its nearest entry
    float32_bank = candidate_search_bank(b, b_sq, dtype=torch.float32)
    assert float32_bank.rows.dtype == torch.float32 and float32_bank.rows.shape == (6000, 56)
    found = candidate_min_sq_distances(q, b, b_sq, float32_bank).numpy()
    np.testing.assert_allclose(found, want, rtol=1e-4, atol=1e-3)
    small = b[:10]  # fewer entries than one group
    small_sq = small.pow(2).sum(1)
    found = candidate_min_sq_distances(q, small, small_sq, candidate_search_bank(small, small_sq))
    np.testing.assert_allclose(
        found.numpy(), _brute_force(queries, bank[:10])[0], rtol=1e-4, atol=1e-3
    )


def test_int8_products_rank_by_distance_and_candidates_are_measured_exactly(
    bank_and_queries,
) -> None:
    """The int8 rows: a quantized query's integer product with an entry is
    ``(q.b - |b|^2 / 2) / scale^2`` up to rounding, so the largest product per block is
    (nearly) the nearest entry; each candidate is measured again in float32, so every
    found distance is a true one, nearly every one the nearest (recall stated), whatever
    the blocks."""
    bank, queries = bank_and_queries
    want, _ = _brute_force(queries, bank)
    q, b = torch.from_numpy(queries), torch.from_numpy(bank)
    b_sq = b.pow(2).sum(1)
    int8 = int8_search_bank(b, b_sq)
    rows = torch.cat(int8.blocks, 1)
    assert rows.dtype == torch.int8 and rows.shape[1] == 6000 and rows.shape[0] % 16 == 0
    assert [block.shape[1] for block in int8.blocks] == [4096, 1904]
    quantized = torch.round(torch.cat([q, int8.query_columns.expand(len(q), -1)], 1) / int8.scale)
    products = quantized.double() @ rows.double()  # exact: small integers
    step = int8.scale * int8.bank_scale
    want_products = (q.double() @ b.double().T - b_sq.double() / 2) / step
    error = (products - want_products).abs().max() * step
    assert error <= 0.03 * float(b_sq.mean())  # measured: 1.8 % of a mean |b|^2
    # measured on this data: recall@1 0.928 with blocks of 4096 (two candidates), a
    # missed nearest entry at most 1.6 % farther; 0.980 and 0.78 % with 700 (nine)
    for block, query_block, min_recall, farther in (
        (4096, 512, 0.92, 1.02),
        (700, 96, 0.97, 1.01),
    ):
        blocked = int8_search_bank(b, b_sq, block)
        found = int8_min_sq_distances(q, b, b_sq, blocked, query_block).numpy()
        assert np.all(found >= want * (1 - 1e-4) - 1e-3)
        assert np.all(found <= want * farther)
        recall = recall_of(found, queries, bank)
        assert recall >= min_recall, f"block {block}: recall@1 {recall:.3f}"
    # a bank wider than the padding, and queries beyond its range (they saturate)
    far = int8_min_sq_distances(q * 3, b, b_sq, int8)
    assert np.all(far.numpy() >= _brute_force(queries * 3, bank)[0] * (1 - 1e-4) - 1e-3)


def _low_rank() -> tuple[torch.Tensor, torch.Tensor]:
    """A bank of 6000 and 500 queries: clusters in a 16-dimensional subspace of 48
    dimensions plus isotropic noise (patch embeddings' variance also falls off across
    axes)."""
    rng = np.random.default_rng(10)
    basis = torch.from_numpy(np.linalg.qr(rng.standard_normal((48, 48)))[0][:, :16]).float()
    bank, queries = (
        torch.from_numpy(_clustered(n, 16, seed)) @ basis.T
        + 0.3 * torch.from_numpy(rng.standard_normal((n, 48)).astype(np.float32))
        for n, seed in ((6000, 0), (500, 1))
    )
    return bank, queries


def test_bfloat16_search_on_principal_axes() -> None:
    """With ``dims`` the bfloat16 products run on the bank's first principal axes, as the
    int8 ones do: the rows are the projected entries with ``|b - mu|^2``, every found
    distance is a true one (measured in full) and most are the nearest (recall stated)."""
    bank, queries = _low_rank()
    want, _ = _brute_force(queries.numpy(), bank.numpy())
    bank_sq = bank.pow(2).sum(1)
    projected = candidate_search_bank(bank, bank_sq, dims=16)
    axes = projected.axes
    assert projected.rows.shape == (6000, 32)  # 16 axes + the norm, padded to 32
    torch.testing.assert_close(
        projected.rows[:, :17].float(),
        torch.cat([-2 * axes.project(bank), (bank - axes.centre).pow(2).sum(1, True)], 1),
        rtol=1e-2,
        atol=1e-2,
    )
    # measured: recall@1 0.998 on 16 axes with blocks of 700, 0.974 on 24 with 4096
    # (0.992 on all 48), 0.28 on 8 (fewer axes than the spread)
    for dims, block, min_recall in ((16, 700, 0.98), (24, 4096, 0.95), (8, 700, 0.0)):
        search_bank = candidate_search_bank(bank, bank_sq, dims)
        found = candidate_min_sq_distances(queries, bank, bank_sq, search_bank, block).numpy()
        assert np.all(found >= want * (1 - 1e-4) - 1e-3)
        recall = recall_of(found, queries.numpy(), bank.numpy())
        assert recall >= min_recall, f"{dims} axes: recall@1 {recall:.3f}"
        if dims == 8:
            assert recall < 0.5


def test_int8_search_on_principal_axes(bank_and_queries) -> None:
    """With ``dims`` the int8 products run on the bank's first principal axes: the rows
    rank entries by ``|b - mu|^2 - 2 q'.b'`` for the projected query ``q'``, every found
    distance is still a true one (measured in full), and most are the nearest (recall
    stated). ``dims`` at or above the bank's width, or 0, projects nothing."""
    bank, queries = bank_and_queries
    want, _ = _brute_force(queries, bank)
    q, b = torch.from_numpy(queries), torch.from_numpy(bank)
    b_sq = b.pow(2).sum(1)
    int8 = int8_search_bank(b, b_sq, dims=24)
    centre, axes = int8.axes.centre, int8.axes.projection
    assert axes.shape == (48, 24)
    torch.testing.assert_close(axes.T @ axes, torch.eye(24), rtol=0, atol=1e-5)
    spread = ((b - centre) @ axes).var(0)
    assert torch.all(spread[:-1] >= spread[1:])  # largest variance first
    keys = int8.keys(q)
    torch.testing.assert_close(keys[:, :24], (q - centre) @ axes)
    rows = torch.cat(int8.blocks, 1)
    assert rows.shape[0] == 32  # 24 axes + the norm's integer columns, padded to 16
    products = torch.round(keys / int8.scale).double() @ rows.double()
    projected = ((q - centre) @ axes).double() @ ((b - centre) @ axes).double().T
    step = int8.scale * int8.bank_scale
    want_products = (projected - (b - centre).pow(2).sum(1).double() / 2) / step
    error = (products - want_products).abs().max() * step
    assert error <= 0.03 * float((b - centre).pow(2).sum(1).mean())  # measured: 1.9 %
    # recall needs axes that hold the spread: clusters in a 16-dimensional subspace of
    # the 48 plus isotropic noise (patch embeddings' variance also falls off across
    # axes). Measured: recall@1 0.990 on 16 axes with blocks of 700 (nine candidates),
    # 0.924 on 24 with blocks of 4096 (two), against 0.996 and 0.972 on all 48; 0.28 on 8
    flat_bank, flat_queries = _low_rank()
    flat_want, _ = _brute_force(flat_queries.numpy(), flat_bank.numpy())
    flat_sq = flat_bank.pow(2).sum(1)
    for dims, block, min_recall in ((16, 700, 0.99), (24, 4096, 0.92), (8, 700, 0.0)):
        blocked = int8_search_bank(flat_bank, flat_sq, block, dims)
        found = int8_min_sq_distances(flat_queries, flat_bank, flat_sq, blocked).numpy()
        assert np.all(found >= flat_want * (1 - 1e-4) - 1e-3)
        recall = recall_of(found, flat_queries.numpy(), flat_bank.numpy())
        assert recall >= min_recall, f"{dims} axes: recall@1 {recall:.3f}"
        if dims == 8:  # fewer axes than the spread: most candidates miss
            assert recall < 0.5
    for dims in (0, 48, 64):
        plain = int8_search_bank(b, b_sq, dims=dims)
        assert plain.axes.projection is None and plain.axes.centre is None
        torch.testing.assert_close(
            torch.cat(plain.blocks, 1), torch.cat(int8_search_bank(b, b_sq).blocks, 1)
        )


def test_int8_block_argmax_is_the_first_largest_product() -> None:
    """The eager int8 search's per-block argmax (largest group of ``GROUP`` columns,
    then the largest column in it) gives ``argmax``'s column, the first of equal
    products, which the ONNX graph's ``ArgMax`` gives; also for a partial last block."""
    generator = torch.Generator().manual_seed(0)
    for width in (4096, 2 * neighbours.GROUP, 1904, 3):
        # few distinct values: many ties within and across groups
        products = torch.randint(-5, 5, (300, width), generator=generator, dtype=torch.int32)
        assert torch.equal(neighbours._row_argmax(products), products.argmax(1))
    queries = torch.randint(-128, 128, (40, 32), generator=generator, dtype=torch.int8)
    rows = torch.randint(-128, 128, (32, 4096), generator=generator, dtype=torch.int8)
    want = (queries.int() @ rows.int()).argmax(1)
    assert torch.equal(neighbours._BlockArgmax.apply(queries, rows), want)


@pytest.mark.parametrize("width", [4096, 2 * neighbours.GROUP, 1904])
def test_exported_block_argmax_is_the_first_largest_product(tmp_path, width) -> None:
    """The ONNX graph's block argmax (group maxima, their ``ArgMax``, the ``ArgMax``
    within the winning group; a plain ``ArgMax`` for a partial block) gives in ONNX
    Runtime the column ``argmax`` gives: the first of equal products, ties within and
    across groups included."""
    generator = torch.Generator().manual_seed(1)
    # few distinct values: many equal products
    rows = torch.randint(-2, 3, (8, width), generator=generator, dtype=torch.int8)
    queries = torch.randint(-2, 3, (300, 8), generator=generator).float()

    search, session = _block_argmax_graph(rows, queries, tmp_path / "argmax.onnx")
    want = (queries.int() @ rows.int()).argmax(1)
    for n in (300, 1):
        found = session.run(None, {"q": queries[:n].numpy()})[0]
        assert found.shape == (n,)
        np.testing.assert_array_equal(found, want[:n].numpy())
    assert torch.equal(search(queries), want)


def _block_argmax_graph(
    rows: torch.Tensor, queries: torch.Tensor, path
) -> tuple[torch.nn.Module, object]:
    """The int8 search's block argmax over ``rows`` for integer-valued float ``queries``
    (quantized with step 1), as a torch module and as an ONNX Runtime session of its
    exported graph (any number of queries)."""
    import onnxruntime as ort

    from vitqc.export import OPSET

    class Search(torch.nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            quantized = neighbours._QuantizeQueries.apply(q, 1.0)
            return neighbours._BlockArgmax.apply(quantized, rows)

    torch.onnx.export(
        Search(),
        (queries,),
        str(path),
        opset_version=OPSET,
        dynamo=False,
        input_names=["q"],
        dynamic_axes={"q": {0: "n"}},
    )
    return Search(), ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_int8_rows_are_exact_in_onnx_runtime_without_vnni(tmp_path, bank_and_queries) -> None:
    """ONNX Runtime's uint8 x int8 products on x86 CPUs without VNNI (AVX2) add each
    pair of products in int16, which saturates beyond 32767: with rows of -127..127 most
    products of large queries came out wrong there. Every value of the search rows is
    within 64, so the graph's block argmax is the exact one for any query, the
    extremes of uint8 included (on CPUs with VNNI this holds either way)."""
    bank, _ = bank_and_queries
    b = torch.from_numpy(bank)
    for int8 in (
        int8_search_bank(b, b.pow(2).sum(1)),
        int8_search_bank(b, b.pow(2).sum(1), dims=24),
    ):
        rows = torch.cat(int8.blocks, 1)
        assert int(rows.abs().max()) <= 64
    rows = int8.blocks[0]
    generator = torch.Generator().manual_seed(2)
    queries = torch.randint(-128, 128, (200, rows.shape[0]), generator=generator).float()
    queries[:50] = 127.0  # the largest uint8 values, 255, against every column
    queries[50:100] = -128.0

    _, session = _block_argmax_graph(rows, queries, tmp_path / "rows.onnx")
    found = session.run(None, {"q": queries.numpy()})[0]
    want = (queries.long() @ rows.long()).argmax(1)
    np.testing.assert_array_equal(found, want.numpy())


def test_export_search_is_int8_for_the_default() -> None:
    """An ONNX graph of the default search holds int8 candidates (ONNX Runtime's fast
    integer products); one of an explicit other mode holds the exact search."""
    assert export_search("auto") == export_search("int8") == "int8"
    for search in ("exact", "bfloat16", "float32", "faiss-flat", "faiss-hnsw", "faiss-ivf"):
        assert export_search(search) == "exact"


def test_auto_search_follows_the_cpus_matrix_units(monkeypatch) -> None:
    """``auto`` (the knn head's default) runs bfloat16 candidates on CPUs with AMX tiles,
    int8 candidates on CPUs with int8 dot products but no AMX, and float32 candidates
    elsewhere; other modes are themselves."""
    assert create_head("knn", [8], [(4, 4)]).search == "auto"
    for amx, vnni, expected in [
        (True, True, "bfloat16"),
        (True, False, "bfloat16"),
        (False, True, "int8"),
        (False, False, "float32"),
    ]:
        monkeypatch.setattr(neighbours, "amx_tiles", lambda amx=amx: amx)
        monkeypatch.setattr(neighbours, "native_int8", lambda vnni=vnni: vnni)
        assert resolve_search("auto") == expected
    assert [resolve_search(s) for s in SEARCHES[1:]] == list(SEARCHES[1:])


def test_search_is_deterministic(bank_and_queries) -> None:
    bank, queries = bank_and_queries
    for search in ("faiss-hnsw", "faiss-ivf"):
        a = index_min_sq_distances(build_index(bank, search), queries, threads=1)
        b = index_min_sq_distances(build_index(bank, search), queries, threads=1)
        np.testing.assert_array_equal(a, b)


def _features(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 8, 8, 8, generator=g), torch.randn(n, 16, 4, 4, generator=g)]


def test_knn_head_search_modes() -> None:
    """Every mode on the same bank: the flat index gives the exact maps; approximate
    modes are never below them; the index follows the bank through load_state_dict."""
    train, test = _features(30, 0), _features(4, 1)
    heads = {}
    for search in SEARCHES:
        head = create_head("knn", [8, 16], [(8, 8), (4, 4)], coreset_ratio=0.5, search=search)
        head.prepare(train)
        heads[search] = head.eval()
    exact = heads["exact"](test)
    torch.testing.assert_close(heads["faiss-flat"](test), exact, rtol=1e-4, atol=1e-4)
    for search in ("bfloat16", "float32", "int8", "faiss-hnsw", "faiss-ivf"):
        assert torch.all(heads[search](test) >= exact - 1e-4)
    # float32 products on every dimension (24, below search_dims): the nearest entry
    torch.testing.assert_close(heads["float32"](test), exact, rtol=1e-4, atol=1e-4)
    near = torch.isclose(heads["bfloat16"](test), exact, rtol=1e-4, atol=1e-4)
    assert near.float().mean() > 0.95  # measured: 0.977 (one bank block: one candidate)
    torch.testing.assert_close(heads["bfloat16"](test), exact, rtol=5e-3, atol=0)
    assert torch.equal(heads["auto"](test), heads[resolve_search("auto")](test))
    switched = heads["faiss-ivf"]
    switched.set_search("faiss-ivf", nprobe=10_000)  # every list scanned: exact
    torch.testing.assert_close(switched(test), exact, rtol=1e-4, atol=1e-4)
    assert switched.config()["nprobe"] == 10_000

    # a head rebuilt from the exact head's state searches the new bank, not a stale one
    rebuilt = create_head(
        "knn", [8, 16], [(8, 8), (4, 4)], search="faiss-flat", **_bank_config(heads["exact"])
    )
    rebuilt.load_state_dict(heads["exact"].state_dict())
    torch.testing.assert_close(rebuilt.eval()(test), exact, rtol=1e-4, atol=1e-4)
    stale = heads["faiss-flat"]
    stale.load_state_dict(heads["exact"].state_dict())  # same bank: same maps
    stale.bank.mul_(2.0)  # an in-place change of the bank rebuilds the index
    torch.testing.assert_close(stale(test), _exact_with_bank(heads["exact"], stale.bank, test))
    candidates = heads["bfloat16"]  # its bfloat16 rows follow the bank the same way
    search_bank = candidates.candidate_bank()
    candidates.bank.mul_(2.0)
    assert candidates.candidate_bank() is not search_bank
    moved = _exact_with_bank(heads["exact"], candidates.bank, test)
    torch.testing.assert_close(candidates(test), moved, rtol=5e-3, atol=0)


def test_knn_head_int8_search_on_principal_axes() -> None:
    """``search_dims`` below the embedding's width runs the int8 products on that many
    principal axes of the bank; the head's maps stay true distances (never below the
    exact ones; these isotropic features have no axes to spare, so most candidates
    miss), the option travels in the config, and ``set_search`` changes it."""
    train, test = _features(30, 0), _features(4, 1)
    assert create_head("knn", [8, 16], [(8, 8), (4, 4)]).config()["search_dims"] == 64
    head = create_head(
        "knn", [8, 16], [(8, 8), (4, 4)], coreset_ratio=0.5, search="int8", search_dims=12
    )
    head.eval().prepare(train)
    assert head.int8_bank().axes.projection.shape == (24, 12)
    assert head.candidate_bank().axes.projection.shape == (24, 12)
    assert head.candidate_bank("float32").axes.projection.shape == (24, 12)
    exact = _exact_with_bank(head, head.bank, test)
    projected = head(test)
    assert torch.all(projected >= exact - 1e-4)  # recall: test_int8_search_on_principal_axes
    rebuilt = create_head("knn", [8, 16], [(8, 8), (4, 4)], **head.config())
    rebuilt.load_state_dict(head.state_dict())
    assert rebuilt.search_dims == 12
    torch.testing.assert_close(rebuilt.eval()(test), projected, rtol=0, atol=0)
    head.set_search("int8", search_dims=0)  # every dimension: a new int8 bank
    assert head.int8_bank().axes.projection is None
    torch.testing.assert_close(head(test), _plain_int8_head(head)(test), rtol=0, atol=0)


def _plain_int8_head(head) -> torch.nn.Module:
    """A fresh int8 head on ``head``'s bank, searching every dimension."""
    plain = create_head(
        "knn", [8, 16], [(8, 8), (4, 4)], search="int8", search_dims=0, **_bank_config(head)
    )
    plain.load_state_dict(head.state_dict())
    return plain.eval()


def test_exact_search_keeps_the_float32_bank_until_the_bank_changes() -> None:
    """The eager exact search reuses one float32 copy of the bank and its norms, made in
    any mode (here in inference mode, then used outside it), and makes them again when
    the bank changes in place or through load_state_dict."""
    train, test = _features(30, 0), _features(4, 1)
    head = create_head("knn", [8, 16], [(8, 8), (4, 4)], coreset_ratio=0.5, search="exact")
    head.eval().prepare(train)
    with torch.inference_mode():
        first = head(test)
    kept = head.search_bank()[0]
    assert torch.equal(head(test), first) and head.search_bank()[0] is kept
    torch.testing.assert_close(first, _exact_with_bank(head, head.bank.clone(), test))
    head.bank.mul_(2.0)
    torch.testing.assert_close(head(test), _exact_with_bank(head, head.bank.clone(), test))
    other = create_head("knn", [8, 16], [(8, 8), (4, 4)], coreset_ratio=0.2, search="exact")
    other.eval()
    other.prepare(_features(30, 2))
    head = create_head("knn", [8, 16], [(8, 8), (4, 4)], **_bank_config(other)).eval()
    head.set_search("exact")
    head(test)  # a float32 copy of its zero bank, made before the state arrives
    head.load_state_dict(other.state_dict())
    torch.testing.assert_close(head(test), other(test), rtol=0, atol=0)


def _bank_config(head) -> dict:
    return {"bank_size": int(head.bank.shape[0])}


def _exact_with_bank(head, bank: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
    probe = create_head(
        "knn", [8, 16], [(8, 8), (4, 4)], bank_size=int(bank.shape[0]), search="exact"
    )
    probe.load_state_dict({**head.state_dict(), "bank": bank})
    return probe.eval()(features)


def test_search_option_parses_and_rejects() -> None:
    assert parse_head("knn:search=faiss-hnsw+ef_search=64") == (
        "knn",
        {"search": "faiss-hnsw", "ef_search": 64},
    )
    with pytest.raises(Exception, match="search must be one of"):
        create_head("knn", [8], [(4, 4)], search="annoy")
    assert parse_head("knn:search_dims=0") == ("knn", {"search_dims": 0})
    with pytest.raises(VitqcError, match="--head knn: search_dims must be 0"):
        create_head("knn", [8], [(4, 4)], search_dims=-1)
