from pathlib import Path

import numpy as np
import pytest
import torch

from model.network import Qinco, QincoConfig


@pytest.fixture(scope="session", autouse=True)
def frozen_imports():
    """As `qinco serve` does once started: the objects of the imports (torch's, faiss's...) out
    of the cycle collector's passes, so that a collection's delete collects only what came since."""
    import gc
    gc.freeze()
    yield
    gc.unfreeze()

DATA = Path(__file__).parent / "data"


def random_model(cfg: QincoConfig, seed: int = 0) -> Qinco:
    """A model whose every layer matters (no zero-initialised outputs)."""
    torch.manual_seed(seed)
    model = Qinco(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "codebook" in name else 0.1)
        if cfg.nlist:
            model.set_centroids(torch.randn(cfg.nlist, cfg.d))
    return model.eval()


@pytest.fixture(scope="session")
def glove_sample() -> np.ndarray:
    """8,000 real GloVe 50-d vectors (unit norm), float32."""
    return np.load(DATA / "glove-50-sample.f16.npy").astype(np.float32)


@pytest.fixture
def gaussian():
    return np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)


# Fixture models train for a number of vectors, not minutes, on one thread and in float32: the
# same model on every machine, whatever its speed or its bf16 hardware (about 6 s here).
# stop_after=0: the fixtures see many epochs of a few thousand vectors, and an early stop would change them
FIXTURE_TRAINING = dict(max_vectors=60_000, max_minutes=30, threads=1, bf16=False, seed=0, device="cpu", stop_after=0,
                        lsq_iters=50)  # the models the tests were tuned on (the default is 100)


@pytest.fixture(scope="session")
def ivf_model(glove_sample, tmp_path_factory):
    """A small IVF-QINCo model (2 code bytes + list, 16 lists) trained on 60,000 real GloVe vectors."""
    cfg = QincoConfig(d=50, M=2, K=256, L=1, h=32, nlist=16)
    out = tmp_path_factory.mktemp("ivf") / "ivf.safetensors"
    return train_fixture(glove_sample[:4000], out, cfg, A=8, B=2, batch=128, val=500)


def train_fixture(x, out, cfg: QincoConfig, **options) -> Qinco:
    """train() with FIXTURE_TRAINING, then the test process's thread count back as it was."""
    from model.threads import set_threads
    from model.train import TrainConfig, train
    threads = torch.get_num_threads()
    try:
        return train(x, out, cfg, TrainConfig(**{**FIXTURE_TRAINING, **options}), report=False)
    finally:
        set_threads(threads)


@pytest.fixture
def data_dir(tmp_path, ivf_model):
    """A data directory holding the tiny IVF model as models/ivf.safetensors."""
    from model.io import save_model
    (tmp_path / "models").mkdir()
    save_model(ivf_model, tmp_path / "models" / "ivf.safetensors")
    return tmp_path


@pytest.fixture
def vectors(glove_sample):
    """400 real GloVe vectors that the tiny model was not trained on."""
    return glove_sample[4000:4400]


@pytest.fixture(scope="session")
def regular_install(tmp_path_factory) -> Path:
    """A fresh venv outside the checkout with the project's and the client's wheels (tests/installed.py)."""
    from tests.installed import regular_install
    return regular_install(tmp_path_factory.mktemp("installed"))
