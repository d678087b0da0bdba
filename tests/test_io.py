import numpy as np
import pytest
import torch

from model.io import CheckpointError, load_model, read_vectors, save_model
from model.network import Encoder, Qinco, QincoConfig, encode
from tests.conftest import random_model


def test_save_load_gives_identical_codes(tmp_path, gaussian):
    for cfg in (QincoConfig(d=16, M=4, K=16, L=1, h=32), QincoConfig(d=16, M=2, K=16, L=1, h=32, nlist=8, de=8)):
        model = random_model(cfg)
        save_model(model, tmp_path / "m.safetensors", {"note": "hello"})
        loaded, extra = load_model(tmp_path / "m.safetensors", with_extra=True)
        assert loaded.cfg == cfg and extra == {"note": "hello"}
        enc = Encoder(A=8, B=4)
        assert (encode(model, gaussian, enc) == encode(loaded, gaussian, enc)).all()


def test_checkpoint_is_not_a_pickle(tmp_path):
    save_model(random_model(QincoConfig(d=4, M=1, K=4)), tmp_path / "m.safetensors")
    head = (tmp_path / "m.safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80")  # pickle protocol marker


def test_corrupt_and_mismatched_files_raise_clear_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match="no such model file"):
        load_model(path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(path)
    save_model(random_model(QincoConfig(d=4, M=2, K=4)), path)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(CheckpointError):
        load_model(path)
    # A torch pickle is refused, not executed.
    torch.save({"x": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError):
        load_model(path)
    # Weights that do not fit the stated config.
    from safetensors.torch import save_file
    import json
    model = random_model(QincoConfig(d=4, M=2, K=4))
    meta = {"format": "qinco-search/model", "format_version": "1",
            "config": json.dumps({"d": 4, "M": 3, "K": 4, "L": 2, "h": 256, "de": 0, "rank": 0, "nlist": 0})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(path)
    meta["format_version"] = "99"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="version 99"):
        load_model(path)


def _write_vecs(path, x, dtype):
    with open(path, "wb") as f:
        for row in x:
            np.array([len(row)], np.int32).tofile(f)
            row.astype(dtype).tofile(f)


def test_vector_files(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (7, 5))
    _write_vecs(tmp_path / "a.fvecs", x, np.float32)
    _write_vecs(tmp_path / "a.bvecs", x, np.uint8)
    np.save(tmp_path / "a.npy", x.astype(np.float16))
    for name in ("a.fvecs", "a.bvecs", "a.npy"):
        np.testing.assert_array_equal(read_vectors(tmp_path / name).astype(np.int64), x)
    (tmp_path / "bad.fvecs").write_bytes(b"\x05\x00\x00\x00abc")
    with pytest.raises(ValueError, match="not a .fvecs file"):
        read_vectors(tmp_path / "bad.fvecs")
    with pytest.raises(ValueError, match="unknown vector format"):
        read_vectors(tmp_path / "a.txt") if (tmp_path / "a.txt").write_text("1") else None
    with pytest.raises(FileNotFoundError):
        read_vectors(tmp_path / "missing.npy")


def test_decode_matches_faiss_index_qinco():
    """faiss's own QINCo implementation, loaded with our weights, decodes our codes identically."""
    from model.io import to_faiss_qinco
    from model.network import ENCODERS, decode
    model = random_model(QincoConfig(d=16, M=4, K=256, L=2, h=32))
    x = np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    codes = encode(model, x, ENCODERS["fast"])
    index = to_faiss_qinco(model)
    theirs = model.denormalize(torch.from_numpy(index.sa_decode(codes))).numpy()
    np.testing.assert_allclose(theirs, decode(model, codes), atol=1e-5)
    # ...and faiss's greedy encoder picks the codes of our greedy encoder.
    xn = model.normalize(torch.from_numpy(x)).numpy()
    assert (index.sa_encode(xn) == encode(model, x, ENCODERS["greedy"])).mean() > 0.99
