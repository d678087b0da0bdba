import faiss
import numpy as np
import torch
import pytest

import model.train as training
from model.io import load_model
from model.network import Encoder, QincoConfig, decode
from model.train import (TrainConfig, choose_start, gradient_passes, initialise, lr_factor, lsq_codebooks,
                         make_optimizer, qinco_loss, reset_dead_codewords, train, train_lsq, validation_mse)
from tests.conftest import FIXTURE_TRAINING, random_model, train_fixture

QUICK = TrainConfig(A=8, B=2, batch=128, val=1000, eval_every=2000, lr=1e-3, **FIXTURE_TRAINING)


def test_short_training_on_real_data_beats_rq_initialisation(tmp_path, glove_sample):
    cfg = QincoConfig(d=50, M=3, K=32, L=1, h=64)
    out = tmp_path / "glove.safetensors"
    # 50,000 vectors: 0.976x the initial validation MSE here (about 5 s).
    train_fixture(glove_sample, out, cfg, A=8, B=2, batch=128, val=1000, eval_every=2000, lr=1e-3, max_vectors=50_000,
                  init="rq")
    model, extra = load_model(out, with_extra=True)
    state = extra["training"]["state"]
    # The RQ start and the trained model, measured with the same training encoder.
    assert state["best_val_mse"] < 0.99 * state["init_val_mse"], state["history"]
    assert state["init_val_mse"] < 1.05 * state["rq_val_mse"]  # starts at the RQ solution
    assert 50_000 <= state["vectors_seen"] < 50_000 + 1024  # stops at the first chunk past max_vectors
    assert extra["training"]["config"]["loss"] == "steps"  # "auto" from RQ's start: QINCo's loss


def test_a_vector_budget_gives_the_same_model_twice(tmp_path, glove_sample):
    cfg = QincoConfig(d=50, M=2, K=16, L=1, h=32, nlist=8)
    models = [train_fixture(glove_sample[:3000], tmp_path / f"{i}.safetensors", cfg, A=4, B=2, batch=128, val=500,
                            max_vectors=8_000) for i in range(2)]
    first, second = (m.state_dict() for m in models)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_time_budget_still_stops_a_run(tmp_path, glove_sample):
    cfg = QincoConfig(d=50, M=2, K=16, L=1, h=32)
    out = tmp_path / "m.safetensors"
    train(glove_sample[:3000], out, cfg, TrainConfig(max_minutes=0.05, A=4, B=2, batch=128, val=500, threads=1),
          report=False)
    state = load_model(out, with_extra=True)[1]["training"]["state"]
    assert 0 < state["vectors_seen"] and state["seconds"] < 0.05 * 60 + 60  # generous: a stop, not a speed


def test_resume_continues_from_the_saved_model(tmp_path, glove_sample):
    cfg = QincoConfig(d=50, M=2, K=16, L=1, h=32)
    out = tmp_path / "m.safetensors"
    options = dict(A=4, B=2, batch=128, val=500, eval_every=1000)
    train_fixture(glove_sample[:3000], out, cfg, max_vectors=6_000, **options)
    first = load_model(out, with_extra=True)[1]["training"]["state"]
    # max_vectors counts the whole run, resumed parts included.
    train(glove_sample[:3000], out, None, TrainConfig(**{**FIXTURE_TRAINING, **options, "max_vectors": 12_000}),
          resume=True, report=False)
    second = load_model(out, with_extra=True)[1]["training"]["state"]
    assert first["vectors_seen"] < second["vectors_seen"] and second["vectors_seen"] >= 12_000
    assert second["best_val_mse"] <= first["best_val_mse"]


def test_ivf_training(tmp_path, glove_sample):
    cfg = QincoConfig(d=50, M=2, K=16, L=1, h=32, nlist=16)
    out = tmp_path / "ivf.safetensors"
    model = train_fixture(glove_sample[:3000], out, cfg, A=4, B=2, batch=128, val=500, max_vectors=8_000)
    assert model.centroids.abs().sum() > 0
    assert load_model(out).cfg.nlist == 16


def test_the_schedule_follows_max_vectors_when_set():
    tc = TrainConfig(max_vectors=10_000, warmup=100_000, schedule="cosine")
    assert lr_factor(tc, 500, 0, 1) == 0.5  # warm-up: at most a tenth of max_vectors
    cosine = lambda done: 0.5 * (1 + np.cos(np.pi * done))
    assert abs(lr_factor(tc, 1_000, 10**6, 1) - cosine(0.1)) < 1e-9  # past the time budget: time does not count
    assert abs(lr_factor(tc, 5_500, 0, 1) - cosine(0.55)) < 1e-9
    assert lr_factor(tc, 10_000, 0, 1) == 0.0
    with pytest.raises(ValueError, match="max_vectors"):
        train(np.zeros((100, 8), np.float32), "/nonexistent/x.safetensors", QincoConfig(d=8, M=2, K=16),
              TrainConfig(max_vectors=-1))


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
    for bad in (TrainConfig(optimizer="sgd"), TrainConfig(lsq_iters=0)):
        with pytest.raises(ValueError, match="optimizer" if bad.lsq_iters else "lsq_iters"):
            train(np.zeros((100, 8), np.float32), "/nonexistent/x.safetensors", QincoConfig(d=8, M=2, K=16), bad)


def test_training_with_the_bf16_code_search(tmp_path, glove_sample):
    """The training search under bf16 autocast (the default on CPUs with bf16 hardware) runs on
    every machine here, emulated: it trains as the float32 search does, within a stated tolerance."""
    cfg = QincoConfig(d=50, M=2, K=32, L=1, h=32)
    states = {}
    for bf16 in (False, True):
        out = tmp_path / f"bf16-{bf16}.safetensors"
        train_fixture(glove_sample[:3000], out, cfg, A=4, B=2, batch=128, val=500, lr=1e-3, max_vectors=8_000,
                      bf16=bf16)
        states[bf16] = load_model(out, with_extra=True)[1]["training"]["state"]
    for state in states.values():
        assert state["vectors_seen"] >= 8_000 and state["best_val_mse"] <= state["init_val_mse"]
    # Validation runs outside autocast, so the two differ only by the codes the search chose.
    assert abs(states[True]["best_val_mse"] / states[False]["best_val_mse"] - 1) < 0.01, states


def test_a_short_budget_trains_lsq_shorter_before_it_skips_it():
    from model.train import LSQ_VS_RQ, lsq_iterations
    lsq_25 = LSQ_VS_RQ * 10  # seconds of LSQ++ at faiss's 25 iterations, after RQ's 10 s
    assert lsq_iterations(50, 20, 10, budget=2 * (20 + 2 * lsq_25)) == 50
    assert lsq_iterations(50, 20, 10, budget=2 * (20 + 2 * lsq_25) - 1) == 25  # 50 would end past half
    assert lsq_iterations(50, 20, 10, budget=2 * (20 + lsq_25) - 1) == 0  # so would 25: skipped
    assert lsq_iterations(10, 20, 10, budget=2 * (20 + lsq_25) - 1) == 10  # fewer than 25 asked: kept
    assert lsq_iterations(10, 20, 10, budget=2 * 20) == 0
    assert lsq_iterations(100, 20, 10, budget=2 * (20 + 4 * lsq_25)) == 100  # the default
    assert lsq_iterations(100, 20, 10, budget=2 * (20 + 4 * lsq_25) - 1) == 50  # halved first
    assert lsq_iterations(100, 20, 10, budget=2 * (20 + 2 * lsq_25) - 1) == 25


def test_lsq_initialisation_is_the_lsq_additive_quantizer(glove_sample, monkeypatch):
    """At step 0 QINCo is an additive quantizer: started from LSQ++, it decodes any code as the sum
    of LSQ++'s codewords (its tables largest energy first), and "best" keeps the better start,
    LSQ++'s only by a margin."""
    cfg = QincoConfig(d=50, M=3, K=16, L=1, h=16)
    x, xval = glove_sample[:3000], glove_sample[3000:3500]
    tc = TrainConfig(init="best", seed=0, threads=1)
    model, state, candidates = initialise(x, xval, cfg, tc)
    assert set(candidates) == {"rq", "lsq"} and state.lsq_val_mse < state.rq_val_mse * 1.2
    tables = candidates["lsq"]
    energy = (tables ** 2).sum((1, 2))
    assert (np.diff(energy) <= 0).all()
    # The same tables as faiss's LSQ++ trained the same way on the same normalised data.
    xn = ((x - model.mean.numpy()) / float(model.scale)).astype(np.float32)
    lsq = train_lsq(xn, cfg, tc.seed, tc.lsq_iters)
    raw = faiss.vector_to_array(lsq.codebooks).reshape(cfg.M, cfg.K, cfg.d)
    np.testing.assert_allclose(lsq_codebooks(lsq, cfg), raw[np.argsort(-(raw ** 2).sum((1, 2)), kind="stable")])
    # lsq_iters (--lsq-iters) reaches faiss: the tables of LSQ++ trained that long.
    _, _, longer = initialise(x, xval, cfg, TrainConfig(init="lsq", seed=0, threads=1, lsq_iters=40))
    np.testing.assert_allclose(longer["lsq"], lsq_codebooks(train_lsq(xn, cfg, tc.seed, 40), cfg))
    assert not np.allclose(longer["lsq"], tables)
    codes = np.random.default_rng(0).integers(0, cfg.K, (20, cfg.M))
    xv = model.normalize(torch.from_numpy(xval))
    choose_start(model, state, {"lsq": tables}, xv, Encoder(A=4, B=2))
    expected = sum(tables[m][codes[:, m]] for m in range(cfg.M)) * float(model.scale) + model.mean.numpy()
    np.testing.assert_allclose(decode(model, codes), expected, rtol=1e-4, atol=1e-4)
    # "best": the start with the lower validation MSE under the training encoder, LSQ++'s only
    # where it wins by LSQ_MARGIN.
    scores = {}
    for name in ("rq", "lsq"):
        choose_start(model, state, {name: candidates[name]}, xv, Encoder(A=4, B=2))
        scores[name] = validation_mse(model, xv, None, Encoder(A=4, B=2))
    choose_start(model, state, candidates, xv, Encoder(A=4, B=2))
    assert state.init == ("lsq" if scores["lsq"] <= scores["rq"] * (1 - training.LSQ_MARGIN) else "rq")
    assert scores["lsq"] < scores["rq"], scores  # this sample's LSQ++ start wins: each margin below decides
    for margin, expected in ((-10.0, "lsq"), (0.0, "lsq"), (0.99, "rq")):
        monkeypatch.setattr(training, "LSQ_MARGIN", margin)
        choose_start(model, state, candidates, xv, Encoder(A=4, B=2))
        assert state.init == expected
        np.testing.assert_array_equal(torch.stack([s.codebook.detach() for s in model.steps]).numpy(),
                                      candidates[expected])
        assert len(model.seed_codebooks) == (cfg.M if expected == "lsq" else 0)  # seeds go with LSQ++'s start


def test_stop_after_validations_without_progress(tmp_path, glove_sample, monkeypatch):
    cfg = QincoConfig(d=50, M=2, K=16, L=1, h=16)
    out = tmp_path / "m.safetensors"
    losses, learning_rates = [], []  # per chunk
    passes = training.gradient_passes

    def recording(net, optimizer, xc, codes, lc, tc, *args):
        losses.append(tc.loss)
        learning_rates.append(optimizer.param_groups[0]["lr"])
        return passes(net, optimizer, xc, codes, lc, tc, *args)
    monkeypatch.setattr(training, "gradient_passes", recording)
    # A learning rate too small to move anything: after the warm-up, 2 stale validations end the run.
    options = dict(A=4, B=2, batch=128, val=500, eval_every=1000, lr=1e-12, warmup=1000, stop_after=2,
                   max_vectors=100_000, init="rq", loss="steps-then-final")
    train_fixture(glove_sample[:3000], out, cfg, **options)
    state = load_model(out, with_extra=True)[1]["training"]["state"]
    # The cosine schedule first anneals over 2 validations' vectors (2,000), then stops at the first
    # chunk (1,024 vectors) past them: the anneal's end, not a stall (max_vectors would be 100,000).
    assert state["since_best"] == 2, state
    assert 1000 < state["annealed_at"] and 2000 <= state["vectors_seen"] - state["annealed_at"] < 2000 + 1024, state
    assert learning_rates[-1] == 0.0 < learning_rates[-2] < learning_rates[-3]  # annealed (the cosine is at ~1e-12)
    assert losses[0] == "steps" and losses[-1] == "final" and losses == sorted(losses, key=["steps", "final"].index)
    plateau = tmp_path / "plateau.safetensors"  # the plateau schedule stops at once
    train_fixture(glove_sample[:3000], plateau, cfg, **{**options, "loss": "steps"}, schedule="plateau")
    stopped = load_model(plateau, with_extra=True)[1]["training"]["state"]
    assert stopped["annealed_at"] == 0 and stopped["since_best"] == 2 and stopped["vectors_seen"] < state["vectors_seen"]
    # resumed: its own 2 validations without progress, not a stop at the first; in the final phase it
    # had reached
    losses.clear()
    train(glove_sample[:3000], out, None, TrainConfig(**{**FIXTURE_TRAINING, **options}), resume=True, report=False)
    assert set(losses) == {"final"}
    resumed = load_model(out, with_extra=True)[1]["training"]["state"]
    assert resumed["since_best"] == 2 and resumed["annealed_at"] > state["vectors_seen"], resumed


def test_the_loss_resolves_from_the_start_and_the_schedule():
    from model.train import check_config, resolve_loss
    assert resolve_loss(TrainConfig(), "lsq") == "steps-then-final" and resolve_loss(TrainConfig(), "rq") == "steps"
    assert resolve_loss(TrainConfig(stop_after=0), "lsq") == "final" == resolve_loss(TrainConfig(schedule="plateau"), "lsq")
    assert resolve_loss(TrainConfig(loss="steps"), "lsq") == "steps"
    for bad in (TrainConfig(loss="steps-then-final", stop_after=0), TrainConfig(loss="steps-then-final", schedule="plateau")):
        with pytest.raises(ValueError, match="switches at a stall"):
            check_config(bad)


def test_a_stall_goes_back_to_the_best_model(tmp_path, glove_sample, monkeypatch):
    """A learning rate so high that every validation is worse than the start: at the stall the
    model is the best (the saved start) again, and the anneal trains it with the final loss."""
    cfg = QincoConfig(d=50, M=2, K=16, L=1, h=16)
    out = tmp_path / "m.safetensors"
    at_switch = {}
    passes = training.gradient_passes

    def recording(net, optimizer, xc, codes, lc, tc, *args):
        if tc.loss == "final" and not at_switch:
            at_switch.update({k: v.detach().clone() for k, v in net.state_dict().items()})
        return passes(net, optimizer, xc, codes, lc, tc, *args)
    monkeypatch.setattr(training, "gradient_passes", recording)
    train_fixture(glove_sample[:3000], out, cfg, A=4, B=2, batch=128, val=500, eval_every=1000, lr=1.0, warmup=1000,
                  stop_after=2, max_vectors=100_000, init="rq", loss="steps-then-final")
    saved, extra = load_model(out, with_extra=True)
    state = extra["training"]["state"]
    assert state["best_val_mse"] == state["init_val_mse"] and state["annealed_at"] > 0, state
    assert at_switch and all(torch.equal(at_switch[k], v) for k, v in saved.state_dict().items())


def test_a_stall_anneals_the_cosine_within_the_budget():
    from model.train import anneal_end, anneal_factor
    assert anneal_factor(100, 200, 0.5, 100) == 0.5 and abs(anneal_factor(100, 200, 0.5, 150) - 0.25) < 1e-9
    assert anneal_factor(100, 200, 0.5, 200) == 0.0 == anneal_factor(100, 200, 0.5, 500)
    tc = TrainConfig(stop_after=10)
    assert anneal_end(tc, 1000, 50, 1e9) == 1500  # stop_after validations' vectors
    assert anneal_end(tc, 1000, 50, 200.7) == 1200  # what the budget leaves
    assert anneal_end(TrainConfig(stop_after=10, max_vectors=1100), 1000, 50, 1e9) == 1100


class RecordingOptimizer(torch.optim.SGD):
    """SGD that remembers the largest gradient value it was asked to apply."""

    largest = 0.0

    def step(self, closure=None):
        self.largest = max([self.largest] + [float(p.grad.abs().max()) for g in self.param_groups
                                             for p in g["params"] if p.grad is not None])
        return super().step(closure)


def test_gradient_values_are_clipped(glove_sample):
    model = random_model(QincoConfig(d=50, M=2, K=16, L=1, h=16)).train()
    x = torch.from_numpy(glove_sample[:256]) * 10  # large errors, large gradients
    with torch.no_grad():
        codes = model.encode_normalized(x, Encoder(A=4, B=2))[0]
    for clip in (0.0, 1e-3):
        opt = RecordingOptimizer(model.parameters(), lr=0.0)
        tc = TrainConfig(grad_clip=clip, reuse=1, loss="steps")
        gradient_passes(model, opt, x, codes, None, tc, 128, torch.Generator().manual_seed(0), False)
        assert (opt.largest <= clip * (1 + 1e-6)) if clip else (opt.largest > 1e-2), (clip, opt.largest)


def test_the_final_loss_counts_the_last_step_alone(glove_sample):
    """QINCo's loss sums every step's error; `loss="final"` (for LSQ++'s non-residual codes) the
    last step's alone, and the gradient passes use the configured one."""
    model = random_model(QincoConfig(d=50, M=3, K=16, L=1, h=16)).train()
    x = torch.from_numpy(glove_sample[:256])
    with torch.no_grad():
        codes = model.encode_normalized(x, Encoder(A=4, B=2))[0]
        per_step = (x - model(codes)).square().sum(-1).mean(-1)  # (M,)
        assert torch.allclose(qinco_loss(model, x, codes, None), per_step.sum())
        assert torch.allclose(qinco_loss(model, x, codes, None, final=True), per_step[-1])
    assert per_step[-1] < per_step.sum() * 0.9  # the two differ here
    for loss, expected in (("steps", per_step.sum()), ("final", per_step[-1])):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        got = gradient_passes(model, opt, x, codes, None, TrainConfig(loss=loss, reuse=1), len(x),
                              torch.Generator().manual_seed(0), False)
        assert abs(got - float(expected)) < 1e-4 * float(expected), (loss, got, expected)
    with pytest.raises(ValueError, match="loss must be one of auto, steps, final, steps-then-final"):
        train(np.zeros((100, 8), np.float32), "/nonexistent/x.safetensors", QincoConfig(d=8, M=2, K=16),
              TrainConfig(loss="last"))


def test_dead_codewords_get_a_residual_of_their_step(glove_sample):
    model = random_model(QincoConfig(d=50, M=2, K=16, L=1, h=16)).train()
    x = torch.from_numpy(glove_sample[:300])
    with torch.no_grad():
        codes = model.encode_normalized(x, Encoder(A=4, B=2))[0]
    usage = torch.ones(2, 16, dtype=torch.long)
    usage[0, 3] = usage[1, [5, 7]] = 0
    before = [s.codebook.detach().clone() for s in model.steps]
    assert reset_dead_codewords(model, make_optimizer(model, TrainConfig()), usage, x, codes, None,
                                torch.Generator().manual_seed(0)) == 3
    with torch.no_grad():
        recon = model(codes)
    residuals = [x, x - recon[0]]  # what step 1 and step 2 quantize
    for m, dead in ((0, [3]), (1, [5, 7])):
        cb = model.steps[m].codebook.detach()
        alive = [k for k in range(16) if k not in dead]
        assert torch.equal(cb[alive], before[m][alive])
        for k in dead:  # each reset codeword is one vector's residual at that step
            assert (residuals[m] - cb[k]).abs().max(1).values.min() < 1e-5


def test_an_lsq_start_encodes_at_least_as_well_as_lsq(tmp_path, glove_sample):
    """Started from LSQ++'s codebooks, the model keeps them as its seed codebooks, and a seeded
    encoder also tries LSQ++'s local-search codes: at step 0 it is as good as LSQ++ with its own
    encoder, better than the beam search alone; training keeps them (and an RQ start has none)."""
    import dataclasses
    cfg = QincoConfig(d=50, M=4, K=16, L=1, h=16)
    x, xval = glove_sample[:3000], glove_sample[3000:4000]
    model, state, candidates = initialise(x, xval, cfg, TrainConfig(init="best", seed=0, threads=1))
    xv = model.normalize(torch.from_numpy(xval))
    enc = Encoder(A=4, B=2)
    choose_start(model, state, {"lsq": candidates["lsq"]}, xv, enc)
    assert model.seed_codebooks.shape == (cfg.M, cfg.K, cfg.d)
    seeded = validation_mse(model, xv, None, enc)
    beam = validation_mse(model, xv, None, dataclasses.replace(enc, seeded=False))
    assert seeded <= state.lsq_val_mse * 1.02 and seeded < beam * 0.99, (seeded, beam, state.lsq_val_mse)
    choose_start(model, state, {"rq": candidates["rq"]}, xv, enc)
    assert len(model.seed_codebooks) == 0
    out = tmp_path / "lsq.safetensors"
    train_fixture(glove_sample[:4000], out, cfg, A=4, B=2, batch=128, val=1000, eval_every=2000, lr=1e-3,
                  max_vectors=20_000, init="lsq")
    trained, extra = load_model(out, with_extra=True)
    s = extra["training"]["state"]
    assert trained.seed_codebooks.shape == (cfg.M, cfg.K, cfg.d)
    assert s["vectors_seen"] >= 20_000 and s["init"] == "lsq" and s["init_val_mse"] <= s["lsq_val_mse"] * 1.02, s
    # "auto" from LSQ++'s start (not residual codes), where no stall would switch it (stop_after=0): final
    assert extra["training"]["config"]["loss"] == "final"
    # A resume keeps the file's loss; an explicit one overrides it (and is kept in turn).
    for loss, expected in (("auto", "final"), ("steps", "steps"), ("auto", "steps")):
        train(glove_sample[:4000], out, None, TrainConfig(**{**FIXTURE_TRAINING, "max_vectors": 22_000}, A=4, B=2,
                                                          batch=128, val=1000, eval_every=2000, loss=loss),
              resume=True, report=False)
        assert load_model(out, with_extra=True)[1]["training"]["config"]["loss"] == expected
