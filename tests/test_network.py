import numpy as np
import pytest
import torch

from model.network import ENCODERS, Encoder, QincoConfig, decode, encode
from tests.conftest import random_model

TINY = QincoConfig(d=16, M=4, K=16, L=1, h=32)
TINY_IVF = QincoConfig(d=16, M=3, K=16, L=1, h=32, nlist=8)


def mse(x, y):
    return float(((x - y) ** 2).sum(1).mean())


@pytest.mark.parametrize("cfg, width, dtype", [(TINY, 4, np.uint8), (TINY_IVF, 4, np.int32)])
def test_encode_decode_shapes_and_dtypes(cfg, width, dtype, gaussian):
    model = random_model(cfg)
    for name, enc in ENCODERS.items():
        codes = encode(model, gaussian, enc)
        assert codes.shape == (len(gaussian), width) and codes.dtype == dtype, name
        assert codes[:, -cfg.M:].max() < cfg.K
        x = decode(model, codes)
        assert x.shape == gaussian.shape and x.dtype == np.float32


@pytest.mark.parametrize("cfg", [TINY, QincoConfig(d=16, M=4, K=16, L=2, h=32, de=8, rank=4)])
def test_beam_no_worse_than_greedy(cfg, gaussian):
    model = random_model(cfg)
    greedy = mse(gaussian, decode(model, encode(model, gaussian, ENCODERS["greedy"])))
    for B in (2, 4, 8):
        beam = mse(gaussian, decode(model, encode(model, gaussian, Encoder(A=cfg.K, B=B))))
        assert beam <= greedy * (1 + 1e-6), (B, beam, greedy)
    # Pre-selecting all K candidates is full greedy search, exactly.
    assert (encode(model, gaussian, Encoder(A=cfg.K, B=1)) == encode(model, gaussian, ENCODERS["greedy"])).all()


def test_encoder_reconstruction_equals_decode(gaussian):
    model = random_model(TINY)
    xn = model.normalize(torch.from_numpy(gaussian))
    codes, xhat = model.encode_normalized(xn, Encoder(A=8, B=3))
    np.testing.assert_allclose(model.decode_normalized(codes).detach().numpy(), xhat.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY, TINY_IVF])
def test_small_decodes_equal_large_ones(cfg, gaussian):
    """Fewer rows than K take the per-row codeword half, more take the table: same result."""
    model = random_model(cfg)
    codes = encode(model, gaussian, ENCODERS["fast"])
    whole = decode(model, codes)  # 300 rows > K
    np.testing.assert_allclose(np.vstack([decode(model, codes[i:i + 5]) for i in range(0, 300, 5)]),
                               whole, atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY, TINY_IVF])
def test_prefix_decode_equals_stepwise_reconstruction(cfg, gaussian):
    model = random_model(cfg)
    codes = encode(model, gaussian, Encoder(A=8, B=2))
    lead = 1 if cfg.nlist else 0
    with torch.no_grad():
        lists = torch.from_numpy(codes[:, 0].astype(np.int64)) if lead else None
        steps = model(torch.from_numpy(codes[:, lead:].astype(np.int64)), lists)  # (M, n, d)
    for m in range(1, cfg.M + 1):
        prefix = decode(model, codes[:, :lead + m])
        np.testing.assert_allclose(prefix, model.denormalize(steps[m - 1]).numpy(), atol=1e-5)
    # Each added step lowers the error on average: prefixes are lower-rate codes.
    if lead:
        np.testing.assert_allclose(decode(model, codes[:, :1]),
                                   model.denormalize(model.centroids[lists]).numpy(), atol=1e-6)


def test_ivf_first_code_is_nearest_centroid(gaussian):
    model = random_model(TINY_IVF)
    codes = encode(model, gaussian, ENCODERS["fast"])
    xn = model.normalize(torch.from_numpy(gaussian))
    nearest = torch.cdist(xn, model.centroids).argmin(1).numpy()
    assert (codes[:, 0] == nearest).all()


def test_large_nlist_uses_hnsw_assignment():
    cfg = QincoConfig(d=8, M=1, K=4, L=0, nlist=20000)
    model = random_model(cfg)
    import faiss
    assert isinstance(model.coarse_index(), faiss.IndexHNSWFlat)
    x = model.denormalize(model.centroids[:50]).numpy()
    assert (encode(model, x, ENCODERS["fast"])[:, 0] == np.arange(50)).all()


def test_untrained_model_is_its_residual_quantizer():
    """Zero-initialised outputs: a fresh model decodes as plain RQ over its codebooks."""
    from model.network import Qinco
    torch.manual_seed(0)
    model = Qinco(TINY)
    with torch.no_grad():
        for step in model.steps:
            step.codebook.normal_()
    codes = np.random.default_rng(0).integers(0, TINY.K, (50, TINY.M)).astype(np.uint8)
    expected = sum(model.steps[m].codebook[codes[:, m].astype(np.int64)] for m in range(TINY.M))
    np.testing.assert_allclose(decode(model, codes), expected.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((5, 12), np.float32), "expected dim 16, got 12"),
    (np.full((5, 16), np.nan, np.float32), "NaN or Inf"),
    (np.full((5, 16), np.inf, np.float32), "NaN or Inf"),
    (np.zeros((0, 16), np.float32), "empty"),
    (np.zeros((2, 3, 16), np.float32), "2-D"),
])
def test_encode_rejects_bad_vectors(bad, message):
    with pytest.raises(ValueError, match=message):
        encode(random_model(TINY), bad)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 5), np.uint8), "shape"),
    (np.full((3, 4), 16, np.int32), r"\[0, 16\)"),
    (np.full((3, 4), -1, np.int32), r"\[0, 16\)"),
    (np.zeros((3, 4), np.float32), "integers"),
])
def test_decode_rejects_bad_codes(bad, message):
    with pytest.raises(ValueError, match=message):
        decode(random_model(TINY), bad)


def test_config_validation():
    with pytest.raises(ValueError, match="M must be >= 1"):
        QincoConfig(d=4, M=0)
    with pytest.raises(ValueError, match="unknown QINCo config keys"):
        QincoConfig.from_dict({"d": 4, "M": 1, "bogus": 3})


# ---- the fast path: extracted weights, numpy small-batch decoder, restructured encoder ----

FAST_CFGS = [TINY, TINY_IVF, QincoConfig(d=16, M=3, K=16, L=2, h=32, de=8, rank=4),
             QincoConfig(d=16, M=3, K=16, L=0, h=32, nlist=4), QincoConfig(d=16, M=3, K=16, L=1, h=32, de=8, nlist=4)]


def reference_decode(model, codes):
    """The module-by-module decoder (Qinco.decode_normalized), raw space."""
    from model.network import split_codes
    c, lists = split_codes(model, codes)
    with torch.no_grad():
        return model.denormalize(model.decode_normalized(c, lists)).numpy()


@pytest.mark.parametrize("cfg", FAST_CFGS)
def test_fast_decode_equals_reference(cfg, gaussian):
    """Small batches (numpy path) and large ones (torch path), every prefix, IVF or not."""
    from model.network import SMALL_DECODE
    model = random_model(cfg)
    codes = encode(model, gaussian, Encoder(A=4, B=2))
    lead = 1 if cfg.nlist else 0
    for m in range(1 - lead, cfg.M + 1):
        prefix = codes[:, :lead + m]
        for rows in (1, 20, SMALL_DECODE, SMALL_DECODE + 1, 300):
            np.testing.assert_allclose(decode(model, prefix[:rows]), reference_decode(model, prefix[:rows]),
                                       atol=1e-5, rtol=0)


def test_fast_decode_equals_reference_on_real_model(ivf_model, glove_sample):
    codes = encode(ivf_model, glove_sample[:200], ENCODERS["balanced"])
    for rows in (20, 200):
        np.testing.assert_allclose(decode(ivf_model, codes[:rows]), reference_decode(ivf_model, codes[:rows]),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", FAST_CFGS)
@pytest.mark.parametrize("enc", [ENCODERS["fast"], ENCODERS["balanced"], Encoder(A=16, B=3), ENCODERS["greedy"]])
def test_fast_encoder_equals_reference(cfg, enc, gaussian):
    """Same beam search, fewer operations: the same codes up to float ties, never a higher MSE."""
    model = random_model(cfg)
    xn = model.normalize(torch.from_numpy(gaussian))
    lists = model.assign(xn) if cfg.nlist else None
    with torch.no_grad():
        ref_codes, ref_xhat = model.encode_normalized_reference(xn, enc, lists)
        codes, xhat = model.encode_normalized(xn, enc, lists)
        for chunk in (1, 7):  # chunking changes nothing
            assert (model.encode_normalized(xn, enc, lists, chunk=chunk)[0] == codes).all()
        decoded = model.decode_normalized(codes, lists)
    assert (codes == ref_codes).all(1).float().mean() >= 0.99
    err, ref_err = mse(xn.numpy(), xhat.numpy()), mse(xn.numpy(), ref_xhat.numpy())
    assert err <= ref_err * (1 + 1e-5)
    np.testing.assert_allclose(xhat.numpy(), decoded.numpy(), atol=1e-5)  # returned xhat = decode(codes)


def test_encode_workers_agree(glove_sample, ivf_model):
    """The single-threaded worker pool gives the calling thread's codes, and leaves the
    process's torch thread setting alone."""
    import threading

    def new_thread_setting():  # what a thread started now gets (earlier tests may have changed it)
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        return seen[0]

    threads, default = torch.get_num_threads(), new_thread_setting()
    x = glove_sample[:300]
    one = encode(ivf_model, x, ENCODERS["balanced"], workers=1)
    two = encode(ivf_model, x, ENCODERS["balanced"], workers=2)
    assert (one == two).all()
    assert torch.get_num_threads() == threads and new_thread_setting() == default


# bf16 network, float32 candidate errors (the training search runs under autocast).  Measured on
# the fixture (4-byte IVF model, 2,000 GloVe vectors): bf16 MSE +1.2e-7 relative to float32, 99.95%
# identical codes; on the demo model (8 bytes, 512 vectors) +9e-5.  Tolerance: 0.1%.
BF16_MSE_TOLERANCE = 1e-3


def test_bf16_encoder_mse_close_to_float32(ivf_model, glove_sample):
    x = glove_sample[:2000]
    f32 = encode(ivf_model, x, ENCODERS["balanced"])
    b16 = encode(ivf_model, x, ENCODERS["balanced"], dtype=torch.bfloat16)
    err32, err16 = mse(x, decode(ivf_model, f32)), mse(x, decode(ivf_model, b16))
    assert err16 <= err32 * (1 + BF16_MSE_TOLERANCE), (err16, err32)
    assert (f32 == b16).all(1).mean() > 0.8


def test_encode_normalized_under_autocast(ivf_model, glove_sample):
    """Training calls encode_normalized under torch.autocast(bf16): float32 results, bf16-close MSE."""
    xn = ivf_model.normalize(torch.from_numpy(glove_sample[:500]))
    lists = ivf_model.assign(xn)
    with torch.no_grad():
        codes32, xhat32 = ivf_model.encode_normalized(xn, ENCODERS["balanced"], lists)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            codes16, xhat16 = ivf_model.encode_normalized(xn, ENCODERS["balanced"], lists)
        decoded16 = ivf_model.decode_normalized(codes16, lists)
    assert codes16.dtype == torch.long and xhat16.dtype == torch.float32
    err32 = float((xn - xhat32).square().sum(1).mean())
    err16 = float((xn - decoded16).square().sum(1).mean())
    assert err16 <= err32 * (1 + BF16_MSE_TOLERANCE)


def test_fast_weights_follow_weight_changes(gaussian):
    """The extracted weights are rebuilt after in-place updates and load_state_dict."""
    model = random_model(TINY_IVF)
    other = random_model(TINY_IVF, seed=1)
    codes = encode(model, gaussian, ENCODERS["fast"])
    before = decode(model, codes[:20])
    with torch.no_grad():  # an optimizer step
        for p in model.steps.parameters():
            p.add_(0.05)
    np.testing.assert_allclose(decode(model, codes[:20]), reference_decode(model, codes[:20]), atol=1e-5)
    assert not np.allclose(decode(model, codes[:20]), before)
    model.load_state_dict(other.state_dict())
    np.testing.assert_allclose(decode(model, codes[:20]), reference_decode(other, codes[:20]), atol=1e-5)
    np.testing.assert_allclose(decode(model, codes), reference_decode(other, codes), atol=1e-5)


def test_fast_decode_concurrent_readers(gaussian):
    """Request threads decode at once (and may build the cache at once): same results."""
    from concurrent.futures import ThreadPoolExecutor
    model = random_model(TINY_IVF)
    codes = encode(model, gaussian, ENCODERS["fast"])
    expected = reference_decode(model, codes)
    model.invalidate_fast()
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: decode(model, codes[i:i + 20]), range(0, 280, 5)))
    for i, out in zip(range(0, 280, 5), outs):
        np.testing.assert_allclose(out, expected[i:i + 20], atol=1e-5)


def test_fast_weights_not_cached_in_training_mode(gaussian):
    """A fused optimizer step does not bump version counters: training mode never reuses them."""
    model = random_model(TINY_IVF).train()
    codes = encode(model, gaussian, ENCODERS["fast"])
    decode(model, codes[:20])
    opt = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    np.testing.assert_allclose(decode(model, codes[:20]), reference_decode(model, codes[:20]), atol=1e-5)


def test_encode_workers_and_background_threads_keep_their_own_torch_threads():
    """Threads that set their own torch thread count keep it, and leave the default of threads
    started later alone (session 9 found the encode pool's workers back at the default)."""
    import threading

    from model.network import _single_thread_pool
    from model.threads import background_thread, torch_threads_default

    default = torch_threads_default()

    def used_threads(_=None):
        torch.ones(1 << 16).sum()
        return torch.get_num_threads()

    assert set(_single_thread_pool(2).map(used_threads, range(4))) == {1}
    seen = []

    def background():
        background_thread(1, 0)
        seen.append(used_threads())

    t = threading.Thread(target=background)
    t.start()
    t.join()
    assert seen == [1] and torch_threads_default() == default


def test_more_seed_rounds_never_reconstruct_worse_and_the_encoder_uses_its_rounds(gaussian):
    """A seed after 32 rounds of local search is, per vector, at least as close over the seed
    codebooks as after 16 (the first 16 rounds are the same draws); an encoder's `seed_rounds`
    reaches the local search, and `quality` searches 32.  Rounds outside [1, MAX_SEED_ROUNDS] are
    refused."""
    import dataclasses
    from model.seeds import MAX_SEED_ROUNDS, SEED_ROUNDS
    cfg = QincoConfig(d=16, M=4, K=16, L=1, h=16)
    model = random_model(cfg)
    books = torch.stack([step.codebook.detach() for step in model.steps])  # (M, K, d)
    model.set_seed_codebooks(books.numpy())
    xn = model.normalize(torch.from_numpy(gaussian))

    def additive_err(codes):  # what the local search minimises: the seed codebooks' sum, no network
        return (xn - books[torch.arange(cfg.M), codes].sum(1)).square().sum(1)

    with torch.no_grad():
        err = {r: additive_err(model.seed_codes(xn, None, r)) for r in (1, 16, 32)}
    assert (err[16] <= err[1] + 1e-6).all() and (err[32] <= err[16] + 1e-6).all()
    assert err[32].mean() < err[1].mean()  # the search does something
    import faiss
    assert SEED_ROUNDS == faiss.LocalSearchQuantizer(16, 3, 4).encode_ils_iters  # faiss's default
    assert ENCODERS["balanced"].seed_rounds == SEED_ROUNDS and ENCODERS["quality"].seed_rounds == 32
    # Both entry points (torch and numpy) search the encoder's rounds.
    enc = Encoder(A=1, B=1)  # a weak search, so the seeds win often and their rounds show
    (c16, _), (c32, _) = (model.encode_normalized(xn, dataclasses.replace(enc, seed_rounds=r)) for r in (16, 32))
    assert not (c16 == c32).all()
    assert (torch.from_numpy(encode(model, gaussian, dataclasses.replace(enc, seed_rounds=32)).astype(np.int64))
            == c32).all()
    assert (torch.from_numpy(encode(model, gaussian, enc).astype(np.int64)) == c16).all()
    for bad in (0, -1, MAX_SEED_ROUNDS + 1, 16.5, True, "16"):
        with pytest.raises(ValueError, match="seed_rounds"):
            Encoder(A=4, B=4, seed_rounds=bad)
        with pytest.raises(ValueError, match="rounds"):
            model.seed_codes(xn, None, bad)
    # The benchmarks' encoder names: a setting, AxB, or AxBxR.
    from model.network import parse_encoder
    assert parse_encoder("quality") == ENCODERS["quality"]
    assert parse_encoder("4x16") == Encoder(A=4, B=16)
    assert parse_encoder("4x16x32") == Encoder(A=4, B=16, seed_rounds=32)
    for bad in ("4", "4x", "x16", "4x16x32x1", "-4x16", "best", "4x16x0", "\u0664x16", "4x16x\u00b3",
                "9" * 5000 + "x1"):
        with pytest.raises(ValueError):
            parse_encoder(bad)


@pytest.mark.parametrize("cfg", [QincoConfig(d=16, M=3, K=16, L=1, h=16), QincoConfig(d=16, M=3, K=16, L=1, h=16,
                                                                                        nlist=4)])
def test_seeded_encoders_keep_the_better_of_the_search_and_the_seed(cfg, gaussian, tmp_path):
    """A seeded encoder keeps, per vector, whichever of its beam search's code and the model's seed
    code (LSQ++'s local search over the seed codebooks) the network decodes closer; the fast path,
    the reference, a model file and `encode` agree; `fast` (fast ingest) skips the seeds."""
    import dataclasses
    from model.io import load_model, save_model
    model = random_model(cfg)
    xn = model.normalize(torch.from_numpy(gaussian))
    lists = model.assign(xn) if cfg.nlist else None
    enc = Encoder(A=4, B=2)
    unseeded = dataclasses.replace(enc, seeded=False)
    assert model.seed_codes(xn, lists) is None  # a model without seed codebooks
    plain, plain_xhat = model.encode_normalized(xn, enc, lists)
    fast = encode(model, gaussian, ENCODERS["fast"])
    model.set_seed_codebooks(torch.stack([step.codebook.detach() for step in model.steps]).numpy())
    seeds = model.seed_codes(xn, lists)
    assert seeds.shape == (len(xn), cfg.M) and seeds.dtype == torch.long and 0 <= seeds.min() <= seeds.max() < cfg.K
    with torch.no_grad():
        codes, xhat = model.encode_normalized(xn, enc, lists, seeds=seeds)
        ref_codes, ref_xhat = model.encode_normalized_reference(xn, enc, lists, seeds=seeds)
        seed_err = (xn - model.decode_normalized(seeds, lists)).square().sum(1)
    assert (model.encode_normalized(xn, unseeded, lists)[0] == plain).all()
    err, plain_err = (xn - xhat).square().sum(1), (xn - plain_xhat).square().sum(1)
    assert (err <= torch.minimum(plain_err, seed_err) + 1e-5).all()
    kept = (codes == seeds).all(1) & ~(codes == plain).all(1)
    assert 0 < kept.sum() < len(xn)  # the base codebooks' local search: sometimes better
    assert (codes == ref_codes).all(1).float().mean() >= 0.99
    np.testing.assert_allclose(xhat.numpy(), ref_xhat.numpy(), atol=1e-4)
    # The numpy entry point finds the seeds itself (one faiss call per batch), as encode_normalized does.
    lead = 1 if cfg.nlist else 0
    for workers in (1, 2):  # the seeds are found before the batch is split among the workers
        raw = encode(model, gaussian, enc, workers=workers)
        assert (torch.from_numpy(raw[:, lead:].astype(np.int64)) == codes).all()
    # Each vector's seed is its own: the same in any batch, and in threads that ask at once.
    assert (model.seed_codes(xn[7:9], None if lists is None else lists[7:9]) == seeds[7:9]).all()
    from concurrent.futures import ThreadPoolExecutor
    model.set_seed_codebooks(model.seed_codebooks.numpy().copy())  # a new seeder, built once by the threads
    with ThreadPoolExecutor(4) as pool:
        assert all((s == seeds).all() for s in pool.map(lambda _: model.seed_codes(xn, lists), range(8)))
        assert len({id(s) for s in pool.map(lambda _: model.seeder(), range(8))}) == 1
    assert (encode(model, gaussian, ENCODERS["fast"]) == fast).all()
    # The seed codebooks travel in the model file; a file written before them loads without.
    save_model(model, tmp_path / "m.safetensors")
    again = load_model(tmp_path / "m.safetensors")
    assert torch.equal(again.seed_codebooks, model.seed_codebooks)
    assert (torch.from_numpy(encode(again, gaussian, enc)[:, lead:].astype(np.int64)) == codes).all()
    model.set_seed_codebooks(None)
    save_model(model, tmp_path / "old.safetensors")
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(tmp_path / "old.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "old.safetensors"))
    del tensors["seed_codebooks"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    assert load_model(tmp_path / "old.safetensors").seed_codes(xn, lists) is None
    # A file whose seed codebooks do not fit the model is refused, whatever their shape.
    from model.io import CheckpointError
    for bad in (torch.zeros(()), torch.zeros(cfg.M), torch.zeros(cfg.M, cfg.K, cfg.d + 1), torch.zeros(cfg.M, 8, cfg.d),
                torch.zeros(1, cfg.K, cfg.d), torch.zeros(cfg.M, cfg.K, cfg.d, 1)):
        save_file({**tensors, "seed_codebooks": bad}, str(tmp_path / "bad.safetensors"), metadata=meta)
        with pytest.raises(CheckpointError, match="weights do not match"):
            load_model(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="seed codebooks"):
        model.set_seed_codebooks(np.zeros((cfg.M, cfg.K, cfg.d + 1), np.float32))
    big = random_model(QincoConfig(d=4, M=33, K=256, L=1, h=4))  # 33² x 256² products: over the cap
    with pytest.raises(ValueError, match="MiB"):
        big.set_seed_codebooks(np.zeros((33, 256, 4), np.float32))


def test_the_seed_encoder_is_lsqs_own(monkeypatch):
    """model/seeds.py runs faiss's LSQ++ encoder with its inner products computed once: the same
    error as faiss's `compute_codes` over the same codebooks (another random start, the same
    search), and the same codes for the same batch."""
    import faiss
    from model.seeds import LocalSearch
    x = np.random.default_rng(2).standard_normal((2000, 16)).astype(np.float32)
    lsq = faiss.LocalSearchQuantizer(16, 3, 4)
    lsq.nperts, lsq.train_iters = 3, 4
    lsq.train(x)
    books = faiss.vector_to_array(lsq.codebooks).reshape(3, 16, 16)
    ours = LocalSearch(books).codes(x)
    theirs = faiss.unpack_bitstrings(lsq.compute_codes(x), 3, 4)
    error = lambda codes: float(((x - books[np.arange(3), codes].sum(1)) ** 2).sum(1).mean())
    assert ours.shape == (2000, 3) and ours.dtype == np.int64
    assert abs(error(ours) - error(theirs)) < 0.01 * error(theirs)
    assert (LocalSearch(books).codes(x) == ours).all()
    monkeypatch.setattr("model.seeds.CHUNK", 300)  # chunks change nothing: each row has its own draws
    assert (LocalSearch(books).codes(x) == ours).all() and (LocalSearch(books).codes(x[1:]) == ours[1:]).all()
    greedy = np.zeros((2000, 3), np.int64)  # residual greedy over the same codebooks: worse
    r = x.copy()
    for m in range(3):
        greedy[:, m] = ((r[:, None] - books[m][None]) ** 2).sum(-1).argmin(1)
        r -= books[m][greedy[:, m]]
    assert error(ours) < error(greedy)
