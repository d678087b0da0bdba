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
