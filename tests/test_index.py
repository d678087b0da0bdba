import numpy as np
import pytest
import faiss
import torch

from model.codebooks import decode_tables, fit_tables
from model.index import QincoIndex, QincoIndexError, SearchParams
from model.network import Encoder
from model.scan import scan_tables

ENC = Encoder(A=16, B=2)
WIDE = SearchParams(nprobe=16, ef_search=32, nshort=200)


@pytest.fixture
def base(glove_sample):
    return glove_sample[4000:7000]


@pytest.fixture
def index(ivf_model, base):
    idx = QincoIndex(ivf_model)
    idx.add(base, np.arange(len(base)) * 3 + 7, ENC)
    return idx


def exact_neighbours(base, queries, k):
    flat = faiss.IndexFlatL2(base.shape[1])
    flat.add(base)
    return flat.search(queries, k)[1]


def test_fit_tables_recovers_an_additive_code():
    rng = np.random.default_rng(0)
    tables = rng.standard_normal((3, 16, 8)).astype(np.float32)
    codes = rng.integers(0, 16, (2000, 3))
    fitted = fit_tables(codes, decode_tables(tables, codes), 16)
    np.testing.assert_allclose(decode_tables(fitted, codes), decode_tables(tables, codes), atol=1e-3)


def test_indexed_vector_is_its_own_nearest_neighbour(index, base):
    ids = np.arange(len(base)) * 3 + 7
    _, found = index.search(base[:300], 1, WIDE)
    assert found.shape == (300, 1) and found.dtype == np.int64
    assert (found[:, 0] == ids[:300]).mean() > 0.9


def test_reranking_orders_the_shortlist_by_the_neural_decoder(index, base, glove_sample):
    """What re-ranking guarantees, query by query: the k returned are the k of the fixed-table
    shortlist nearest to the query by the neural decoding, with those exact distances."""
    queries = glove_sample[7000:7200]
    D, I = index.search(queries, 10, WIDE)
    _, short_ids, _ = index.shortlist(queries, WIDE.nshort, index.check_params(10, WIDE))
    for q, d, ids, candidates in zip(queries, D, I, short_ids):
        decoded, found = index.reconstruct_many(candidates)
        assert found.all()
        exact = ((decoded - q) ** 2).sum(1)
        best = np.argsort(exact, kind="stable")[:10]
        assert set(ids.tolist()) == set(candidates[best].tolist())
        np.testing.assert_allclose(d, np.sort(exact)[:10], rtol=1e-4, atol=1e-5)
    # And on real data it finds true neighbours (2 bytes + list id on 50-d GloVe: R@10 0.475 here).
    gt = exact_neighbours(base, queries, 1)[:, 0] * 3 + 7
    assert (I == gt[:, None]).any(1).mean() > 0.3


def test_removed_ids_never_return(index, base):
    gone = np.arange(0, 200) * 3 + 7
    assert index.remove(np.concatenate([gone, [10**9]])) == 200
    assert index.ntotal == len(base) - 200
    _, found = index.search(base[:200], 10, WIDE)
    assert not np.isin(found, gone).any()
    assert index.remove(gone) == 0


def test_upsert_replaces_never_duplicates(index, base):
    n = index.ntotal
    index.add(base[[5]], [7], ENC)  # id 7 held base[0]; now it holds base[5]
    assert index.ntotal == n
    _, found = index.search(base[[5]], 2, WIDE)
    assert 7 in found[0]
    np.testing.assert_allclose(index.reconstruct(7), index.reconstruct(5 * 3 + 7), atol=1e-5)
    with pytest.raises(QincoIndexError, match="duplicate ids"):
        index.add(base[:2], [1, 1], ENC)


def test_reconstruct_is_the_neural_decoding(index, base):
    err = ((index.reconstruct(7) - base[0]) ** 2).sum()
    assert err < (base[0] ** 2).sum()
    with pytest.raises(KeyError):
        index.reconstruct(8)


def test_save_load_gives_identical_results(index, base, tmp_path):
    index.tune(base[:100], np.arange(100)[:, None] * 3 + 7, k=1, grid={"nprobe": [1, 4], "nshort": [10, 50]})
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # overwriting is atomic too
    loaded = QincoIndex.load(tmp_path / "idx")
    D1, I1 = index.search(base[:50], 10, WIDE)
    D2, I2 = loaded.search(base[:50], 10, WIDE)
    assert (I1 == I2).all() and np.allclose(D1, D2)
    assert loaded.tuning == index.tuning and loaded.ntotal == index.ntotal


def test_a_format_1_directory_with_the_codes_in_faiss_loads(index, base, tmp_path):
    """Index directories written before lists.npz kept the codes in faiss's own lists."""
    import json
    from model.io import sha256
    index.save(tmp_path / "idx")
    folder = tmp_path / "idx"
    shell = faiss.read_index(str(folder / "index.faiss"))
    rows, list_nos, ids = index.lists.stored()
    listno = list_nos.astype("<i8").view(np.uint8).reshape(-1, 8)[:, :shell.coarse_code_size()]
    shell.add_sa_codes(np.ascontiguousarray(np.hstack([listno, index.lists.codes[rows]])), ids)
    faiss.write_index(shell, str(folder / "index.faiss"))
    (folder / "lists.npz").unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["sha256"] = {f: sha256(folder / f) for f in ("index.faiss", "model.safetensors", "tuning.json")}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    loaded = QincoIndex.load(folder)
    assert loaded.ntotal == index.ntotal and loaded.index.ntotal == 0  # the codes moved to our lists
    D1, I1 = index.search(base[:50], 10, WIDE)
    D2, I2 = loaded.search(base[:50], 10, WIDE)
    assert (I1 == I2).all() and np.allclose(D1, D2)


def test_damaged_index_directory_is_refused(index, tmp_path):
    index.save(tmp_path / "idx")
    with open(tmp_path / "idx" / "index.faiss", "ab") as f:
        f.write(b"x")
    with pytest.raises(QincoIndexError, match="checksum"):
        QincoIndex.load(tmp_path / "idx")
    with pytest.raises(QincoIndexError, match="not an index directory"):
        QincoIndex.load(tmp_path / "nothing")


def test_tuning_gives_a_pareto_front_and_target_recall(index, base):
    queries = base[:200]
    gt = (np.arange(200) * 3 + 7)[:, None]
    front = index.tune(queries, gt, k=10, grid={"nprobe": [1, 2, 8], "nshort": [10, 100]})
    times = [p.ms_per_query for p in front]
    recalls = [p.recall for p in front]
    assert times == sorted(times) and recalls == sorted(recalls)
    top = max(recalls)
    params = index.params_for_recall(top)
    assert params in [p.params for p in front]
    _, found = index.search(queries, 10, target_recall=top)
    assert (found == gt).any(1).mean() >= top - 0.05  # same queries, timing-independent recall


@pytest.mark.parametrize("call, message", [
    (lambda i, q: i.search(q, 0, WIDE), "k must be between 1"),
    (lambda i, q: i.search(q, 10, SearchParams(nprobe=17)), "nprobe must be between 1 and nlist=16"),
    (lambda i, q: i.search(q[:, :40], 10, WIDE), "expected dim 50, got 40"),
    (lambda i, q: i.search(np.full_like(q, np.nan), 10, WIDE), "NaN or Inf"),
    (lambda i, q: i.search(q, 10, target_recall=0.9), "not been tuned"),
    (lambda i, q: i.search(q, 10, SearchParams(nshort=-1)), "nshort must be between 0"),
    (lambda i, q: i.add(q, [1, 2], ENC), "ids must be a 1-D array of 3"),
    (lambda i, q: i.add(q, [-1, 2, 3], ENC), "ids must be >= 0"),
])
def test_bad_requests_raise_clear_errors(index, base, call, message):
    n = index.ntotal
    with pytest.raises(ValueError, match=message):
        call(index, base[:3].copy())
    assert index.ntotal == n


def test_empty_and_small_indexes(ivf_model, base):
    idx = QincoIndex(ivf_model)
    D, I = idx.search(base[:4], 10, WIDE)
    assert D.shape == (4, 0) and I.shape == (4, 0)
    idx.add(base[:3], [1, 2, 3], ENC)
    # Fewer vectors than k, and probes that miss them: every row still has all 3, no -1.
    for nshort in (10, 0):  # re-ranked, and fixed tables alone
        D, I = idx.search(base[100:104], 10, SearchParams(nprobe=1, ef_search=16, nshort=nshort))
        assert I.shape == (4, 3) and (np.sort(I, 1) == [1, 2, 3]).all()
        assert np.isfinite(D).all()


def test_shortlist_distances_are_exact_table_distances(index, base, glove_sample):
    """faiss's LUT distance must be ||q - (centroid + table reconstruction)||² (norms stored right)."""
    from model.codebooks import decode_tables
    queries = glove_sample[7000:7050]
    D, I, codes = index.shortlist(queries, 20, SearchParams(nprobe=16, ef_search=32))
    model = index.model
    approx = model.centroids_raw()[codes[..., 0]] + decode_tables(model.tables.numpy(),
                                                                  codes[..., 1:].reshape(-1, model.cfg.M)
                                                                  ).reshape(*I.shape, -1)
    exact = ((queries[:, None, :] - approx) ** 2).sum(-1)
    valid = I >= 0
    assert np.abs(D[valid] - exact[valid]).mean() < 0.01 * exact[valid].mean()


def test_nshort_zero_is_the_fixed_table_order_and_distances(index, glove_sample):
    queries = glove_sample[7000:7050]
    params = SearchParams(nprobe=16, ef_search=32, nshort=0)
    D, I = index.search(queries, 10, params)
    Ds, Is, _ = index.shortlist(queries, 10, params)
    assert (I == Is).all() and np.allclose(D, Ds)
    # Re-ranking the same 10 candidates reorders them with the neural decoder's exact distances.
    Dr, Ir = index.search(queries, 10, SearchParams(nprobe=16, ef_search=32, nshort=10))
    assert (np.sort(Ir, 1) == np.sort(I, 1)).all() and not np.allclose(Dr, D)
    assert (np.diff(Dr, axis=1) >= 0).all()


@pytest.mark.parametrize("bf16", [False, True])
def test_scan_gives_faiss_distances_and_order(index, glove_sample, bf16):
    """One look-up table per query (model/scan.py) scores as faiss's IVF scanner: within the
    16-bit per-list terms' rounding in float32, within bf16 rounding where the CPU does bf16."""
    queries = glove_sample[7000:7100]
    index.scan_tables = scan_tables(index.tables, bf16)
    D, I, _ = index.shortlist(queries, 20, SearchParams(nprobe=4, ef_search=32))
    sp = faiss.SearchParametersIVF(nprobe=4, quantizer_params=faiss.SearchParametersHNSW(efSearch=32))
    reference = faiss.deserialize_index(faiss.serialize_index(index.index))  # faiss's own lists, same codes
    rows, list_nos, ids = index.lists.stored()
    listno = list_nos.astype("<i8").view(np.uint8).reshape(-1, 8)[:, :reference.coarse_code_size()]
    reference.add_sa_codes(np.ascontiguousarray(np.hstack([listno, index.lists.codes[rows]])), ids)
    Df, If = reference.search(queries, 20, params=sp)
    rounding = index.model.cfg.M * float(index.list_terms[1].max()) / 2
    assert rounding < 1e-3  # far below the gaps between distances
    tol = 1e-2 if bf16 else rounding + 1e-5
    np.testing.assert_allclose(D, Df, atol=tol)
    # Equal distances (common with 2-byte codes) may come in either order or fall off the end.
    inside = D < D[:, -1:] - 2 * tol
    assert all(set(I[q, inside[q]]) <= set(If[q]) for q in range(len(queries)))
    assert bf16 or (I == If).mean() > 0.9


def test_list_terms_round_within_half_a_step():
    from model.scan import LIST_CHUNK, list_terms
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((LIST_CHUNK + 3, 16)).astype(np.float32)  # two chunks
    centroids[5] *= 100  # a list of larger terms gets a larger step, not the others'
    tables = rng.standard_normal((2, 4, 16)).astype(np.float32)
    terms, steps = list_terms(centroids, tables)
    exact = 2 * np.einsum("ld,mkd->lmk", centroids.astype(np.float64), tables)
    assert terms.dtype == np.int16 and terms.shape == (LIST_CHUNK + 3, 2, 4) and steps.shape == (LIST_CHUNK + 3,)
    error = np.abs(terms * steps[:, None, None].astype(np.float64) - exact)
    float32_error = 1e-5 * 2 * np.einsum("ld,mkd->lmk", np.abs(centroids), np.abs(tables))  # the products' own
    assert (error <= steps[:, None, None] / 2 + float32_error).all()
    assert steps[5] > 50 * np.median(steps) and np.abs(terms).max(axis=(1, 2)).min() >= 32766
    zero, step = list_terms(np.zeros((1, 16), np.float32), tables)
    assert (zero == 0).all() and step[0] > 0
    centroids[7, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        list_terms(centroids, tables)


def test_a_model_with_non_finite_centroids_is_refused(ivf_model):
    import copy
    model = copy.deepcopy(ivf_model)
    model.centroids[3, 0] = float("inf")
    with pytest.raises(QincoIndexError, match="cannot be scanned"):
        QincoIndex(model)


def test_small_batches_scan_as_large_ones(index, glove_sample):
    """Fewer than PARALLEL_SCAN queries take the serial kernel and numpy's query tables (no
    thread team, no torch dispatch): each query alone gets the shortlist of the batch."""
    from model.scan import PARALLEL_SCAN
    queries = glove_sample[7000:7000 + PARALLEL_SCAN + 4]
    params = SearchParams(nprobe=4, ef_search=32)
    Db, Ib, Cb = index.shortlist(queries, 20, params)
    for q in range(len(queries)):
        D, I, C = index.shortlist(queries[q:q + 1], 20, params)
        np.testing.assert_allclose(D[0], Db[q], atol=1e-5)
        inside = Db[q] < Db[q, -1] - 1e-4  # ties may swap places or fall off the end
        assert set(I[0, inside]) == set(Ib[q, inside])
        assert (I[0] == Ib[q]).mean() > 0.8 and (C[0][I[0] == Ib[q]] == Cb[q][I[0] == Ib[q]]).all()


def test_writes_are_seen_by_the_next_search(index, base):
    """The scan reads a copy of the lists: every add and remove must refresh it."""
    params = SearchParams(nprobe=16, ef_search=32, nshort=0)
    index.search(base[:1], 1, params)  # builds the copy
    index.add(base[:1], [10**6], ENC)
    assert 10**6 in index.search(base[:1], 10, params)[1]
    index.remove([10**6])
    assert 10**6 not in index.search(base[:1], 10, params)[1]


def test_the_lists_hold_every_write_once(index, base):
    """Adds (new and replaced ids, some moving to other lists), removes and compactions: the lists
    hold each stored id once, with its latest codes, and no removed one."""
    rng = np.random.default_rng(0)
    ids0, codes0 = index.stored_codes()
    expected = dict(zip(ids0.tolist(), codes0.tolist()))
    for step in range(8):
        if step % 2:
            gone = rng.choice(len(base), 200, replace=False) * 3 + 7
            index.remove(gone)
            for i in gone.tolist():
                expected.pop(i, None)
        else:
            ids = np.concatenate([rng.choice(len(base), 50, replace=False) * 3 + 7, 10**6 + step * 100 + np.arange(50)])
            codes = index.encode(base[rng.choice(len(base), 100, replace=False)], ENC)
            index.add_codes(codes, ids)
            expected.update(zip(ids.tolist(), codes.astype(np.int64).tolist()))
        if step == 5:
            index.lists.compact(force=True)
        ids, codes = index.stored_codes()
        assert len(ids) == len(set(ids.tolist())) == index.ntotal == len(expected)
        assert {i: c for i, c in zip(ids.tolist(), codes.tolist())} == expected
        assert (index.ids() == np.sort(ids)).all()
    params = SearchParams(nprobe=16, ef_search=32, nshort=0)
    found = index.search(base[:50], 1, params)[1]
    assert set(found.ravel().tolist()) <= set(expected)


def test_concurrent_searches_agree_with_serial_ones(index, glove_sample):
    """The service searches from several threads at once (under a shared read lock)."""
    from concurrent.futures import ThreadPoolExecutor
    queries = [glove_sample[7000 + 40 * i:7040 + 40 * i] for i in range(8)]
    params = SearchParams(nprobe=8, ef_search=32, nshort=20)
    serial = [index.search(q, 10, params)[1] for q in queries]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda q: index.search(q, 10, params)[1], queries * 3))
    assert all((p == serial[i % 8]).all() for i, p in enumerate(parallel))


def test_exact_index_matches_brute_force_through_upserts_removals_and_filters(gaussian):
    from model.index import EXACT_BLOCK, ExactIndex
    rng = np.random.default_rng(1)
    x = rng.standard_normal((EXACT_BLOCK + 500, 16)).astype(np.float32)  # more than one block
    index = ExactIndex(16)
    ids = np.arange(len(x)) * 3
    index.add_vectors(x[:1000], ids[:1000])
    index.add_vectors(x[1000:], ids[1000:])
    index.add_vectors(x[:10] + 1, ids[:10])  # replaced
    index.remove(ids[10:20])
    stored = {int(i): v for i, v in zip(ids, x)}
    stored.update({int(i): v + 1 for i, v in zip(ids[:10], x[:10])})
    for i in ids[10:20]:
        del stored[int(i)]
    assert index.ntotal == len(stored) and list(index.ids()) == sorted(stored)
    keys = np.array(sorted(stored))
    base = np.stack([stored[int(k)] for k in keys])
    q = gaussian[:5]
    D, I = index.search(q, 7)
    exact = ((q[:, None] - base[None]) ** 2).sum(-1)
    assert (I == keys[np.argsort(exact, 1)[:, :7]]).all()
    assert np.allclose(D, np.sort(exact, 1)[:, :7], rtol=1e-4, atol=1e-3)
    allowed = keys[::50]
    D, I = index.search(q, 3, allowed_ids=allowed)
    sub = ((q[:, None] - base[::50][None]) ** 2).sum(-1)
    assert (I == allowed[np.argsort(sub, 1)[:, :3]]).all()
    assert index.search(q, 3, allowed_ids=np.array([ids[15]]))[1].shape == (5, 0)  # removed: nothing allowed
    many = rng.standard_normal((150, 16)).astype(np.float32)  # more than one block of queries
    D, I = index.search(many, 4, allowed_ids=keys[:300])  # a block of rows with none allowed
    sub = ((many[:, None] - base[:300][None]) ** 2).sum(-1)
    assert (I == keys[:300][np.argsort(sub, 1)[:, :4]]).all()
    vectors, found = index.reconstruct_many([ids[0], ids[15]])
    assert found.tolist() == [True, False] and np.allclose(vectors[0], x[0] + 1)
    # New ids, said to be new (no look-up); removals of the last rows, repeated and unknown ids.
    new = np.array([1, 2, 4], dtype=np.int64)  # not multiples of 3: never stored
    index.add_vectors(x[:3] * 2, new, np.zeros(3, bool))
    last = index.ids()[-3:]
    assert index.remove(np.concatenate([new, new, last, [-5]])) == 6
    for i in [*new, *last]:
        stored.pop(int(i), None)
    assert index.ntotal == len(stored) and list(index.ids()) == sorted(stored)
    vectors, found = index.reconstruct_many(sorted(stored))
    assert found.all() and np.array_equal(vectors, np.stack([stored[k] for k in sorted(stored)]))


def test_bf16_query_tables_search_as_float32(ivf_model, base, glove_sample):
    """The index's bf16 path (taken by itself on CPUs with bf16 hardware: AVX512-BF16, AMX) is
    forced here, emulated, so that every machine runs it: same results as float32's within
    bf16's rounding of the shortlist scores, and re-ranked distances exact either way."""
    ids = np.arange(len(base)) * 3 + 7
    indexes = {}
    for bf16 in (False, True):
        indexes[bf16] = QincoIndex(ivf_model, bf16=bf16)
        indexes[bf16].add(base, ids, ENC)
    assert indexes[True].scan_tables.dtype == torch.bfloat16 and indexes[False].scan_tables.dtype == torch.float32
    queries = glove_sample[7000:7300]
    (D32, I32), (D16, I16) = (indexes[b].search(queries, 10, WIDE) for b in (False, True))
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I32, I16)])
    assert overlap > 0.95, overlap  # 0.99+ measured: a few shortlist places change hands
    same = I32 == I16
    np.testing.assert_allclose(D16[same], D32[same], rtol=1e-5, atol=1e-6)  # re-ranking is exact in both


def test_exact_index_of_unit_vectors_skips_their_norms_and_ranks_the_same():
    """A cosine space's exact index (unit_norm) reads each block once and ranks as the full
    distance does; blocks of consecutive rows are read as views, others row by row."""
    from model.index import EXACT_BLOCK, ExactIndex, VectorRows

    class Counted(VectorRows):
        reads = ranges = 0

        def read(self, rows):
            self.reads += 1
            return super().read(rows)

        def read_range(self, start, stop):
            self.ranges += 1
            return super().read_range(start, stop)

    rng = np.random.default_rng(2)
    x = rng.standard_normal((2 * EXACT_BLOCK + 300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    full, unit = ExactIndex(16, Counted(16)), ExactIndex(16, Counted(16), unit_norm=True)
    for index in (full, unit):
        index.add_vectors(x, np.arange(len(x)))
        index.remove(np.arange(100, 400))  # the last entries move into the first block's holes
    q = rng.standard_normal((6, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    (Df, If), (Du, Iu) = full.search(q, 10), unit.search(q, 10)
    assert (If == Iu).all() and np.allclose(Df, Du, atol=1e-5)
    assert (unit.source.reads, unit.source.ranges) == (1, 1)  # block 0 row by row, block 1 a view
    kept = np.setdiff1d(np.arange(len(x)), np.arange(100, 400))
    want = kept[np.argsort(-(q @ x[kept].T), 1)[:, :10]]
    assert (Iu == want).all()


def test_default_nprobe_grows_as_twice_the_root_of_nlist():
    """16 lists or fewer: every list; then at least 16, 2 sqrt(nlist) once that is more."""
    assert [SearchParams.defaults(n).nprobe for n in (1, 8, 16, 64, 100, 256, 1024, 10_000)] == \
        [1, 8, 16, 16, 20, 32, 64, 200]
    assert all(SearchParams.defaults(n).ef_search >= SearchParams.defaults(n).nprobe for n in (16, 1024, 65_536))


def test_searches_without_params_take_the_defaults_for_their_nlist(index, base, monkeypatch):
    from service.engine.index import QincoSpaceIndex
    narrow = SearchParams(nprobe=1, ef_search=16, nshort=0)  # not SearchParams(): the defaults are used
    asked = []
    monkeypatch.setattr(SearchParams, "defaults", classmethod(lambda cls, nlist: asked.append(nlist) or narrow))
    D, I = index.search(base[:20], 10)
    Dn, In = index.search(base[:20], 10, narrow)
    assert asked == [16] and np.array_equal(I, In) and np.array_equal(D, Dn)
    monkeypatch.undo()
    space = QincoSpaceIndex(index)  # a service's space over an index, told it has 1,024 lists
    space.nlist = 1024
    assert space.default_params() == {"nprobe": 64, "ef_search": 64, "nshort": 20}
    assert space.search_params({}) == SearchParams(64, 64, 20)
    assert space.search_params({"nprobe": 8}) == SearchParams(8, 64, 20)
