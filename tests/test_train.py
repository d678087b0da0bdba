import numpy as np
import torch
import pytest

from model.io import load_model
from model.network import QincoConfig
from model.train import TrainConfig, train

QUICK = TrainConfig(max_minutes=0.5, A=8, B=2, batch=128, val=1000, eval_every=2000, lr=1e-3, threads=0)


def test_short_training_on_real_data_beats_rq_initialisation(tmp_path, glove_sample):
    cfg = QincoConfig(d=50, M=3, K=32, L=1, h=64)
    out = tmp_path / "glove.safetensors"
    train(glove_sample, out, cfg, QUICK)
    model, extra = load_model(out, with_extra=True)
    state = extra["training"]["state"]
    # The RQ start and the trained model, measured with the same training encoder.
    assert state["best_val_mse"] < 0.99 * state["init_val_mse"], state["history"]
    assert state["init_val_mse"] < 1.05 * state["rq_val_mse"]  # starts at the RQ solution
    assert state["seconds"] < 0.5 * 60 + 20  # the budget holds (plus the final save)


def test_resume_continues_from_the_saved_model(tmp_path, glove_sample):
    cfg = QincoConfig(d=50, M=2, K=16, L=1, h=32)
    out = tmp_path / "m.safetensors"
    quick = TrainConfig(max_minutes=0.15, A=4, B=2, batch=128, val=500, eval_every=1000)
    train(glove_sample[:3000], out, cfg, quick)
    first = load_model(out, with_extra=True)[1]["training"]["state"]
    train(glove_sample[:3000], out, None, quick, resume=True)
    second = load_model(out, with_extra=True)[1]["training"]["state"]
    assert second["vectors_seen"] > first["vectors_seen"]
    assert second["best_val_mse"] <= first["best_val_mse"]


def test_ivf_training(tmp_path, glove_sample):
    cfg = QincoConfig(d=50, M=2, K=16, L=1, h=32, nlist=16)
    out = tmp_path / "ivf.safetensors"
    model = train(glove_sample[:3000], out, cfg, TrainConfig(max_minutes=0.15, A=4, B=2, batch=128, val=500))
    assert model.centroids.abs().sum() > 0
    assert load_model(out).cfg.nlist == 16


@pytest.mark.parametrize("data, message", [
    (np.zeros((100, 8, 2), np.float32), "2-D"),
    (np.full((100, 8), np.nan, np.float32), "NaN or Inf"),
    (np.zeros((0, 8), np.float32), "empty"),
])
def test_training_rejects_bad_data(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        train(data, tmp_path / "m.safetensors", QincoConfig(d=8, M=1, K=4), QUICK)


def test_training_rejects_wrong_dimension(tmp_path, glove_sample):
    with pytest.raises(ValueError, match="expected dim 8, got 50"):
        train(glove_sample[:1000], tmp_path / "m.safetensors", QincoConfig(d=8, M=1, K=4), QUICK)


def test_too_few_vectors_for_the_codebooks_is_a_clear_error(tmp_path, glove_sample):
    with pytest.raises(ValueError, match="at least K=256 vectors"):
        train(glove_sample[:200], tmp_path / "m.safetensors", QincoConfig(d=50, M=2), TrainConfig(val=20))
    assert not (tmp_path / "m.safetensors").exists()


def test_recipe_options_optimizer_groups_and_schedule():
    from model.network import Qinco, QincoConfig
    from model.train import lr_factor, make_optimizer
    model = Qinco(QincoConfig(d=8, M=2, K=16, L=1, h=8, nlist=0))
    tc = TrainConfig(lr=1e-3, lr_codebooks=1e-4, optimizer="adamw", weight_decay=0.1, schedule="cosine", warmup=100)
    opt = make_optimizer(model, tc)
    codebooks, network = opt.param_groups
    assert isinstance(opt, torch.optim.AdamW)
    assert codebooks["base_lr"] == 1e-4 and codebooks["weight_decay"] == 0.0
    assert network["base_lr"] == 1e-3 and network["weight_decay"] == 0.1
    assert {id(p) for p in codebooks["params"]} == {id(s.codebook) for s in model.steps}
    assert lr_factor(tc, 50, 0, 100) == 0.5  # warm-up
    assert lr_factor(tc, 200, 0, 100) == 1.0 and abs(lr_factor(tc, 200, 50, 100) - 0.5) < 1e-9
    assert lr_factor(tc, 200, 100, 100) == 0.0  # the cosine reaches 0 at the budget
    plateau = TrainConfig(warmup=100, schedule="plateau", optimizer="adam")
    assert lr_factor(plateau, 200, 99, 100) == 1.0 and isinstance(make_optimizer(model, plateau), torch.optim.Adam)
    with pytest.raises(ValueError, match="optimizer"):
        train(np.zeros((100, 8), np.float32), "/nonexistent/x.safetensors", QincoConfig(d=8, M=2, K=16),
              TrainConfig(optimizer="sgd"))
