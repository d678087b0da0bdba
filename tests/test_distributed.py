"""Training on the hardware the user has: --device, and several processes through torch.distributed
(DDP), run here on the CPU with the gloo backend, as torchrun would start them."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import distributed
from model.io import load_model
from model.network import Encoder, QincoConfig
from model.train import TrainConfig, qinco_loss, train
from tests.conftest import FIXTURE_TRAINING, random_model

TINY = QincoConfig(d=16, M=3, K=16, L=1, h=16)


def in_processes(world: int, work, tmp_path, *args):
    """Run work(rank, tmp_path, *args) in `world` processes joined in one gloo group."""
    mp.spawn(_member, args=(world, str(tmp_path / "rendezvous"), work, tmp_path, args), nprocs=world, join=True)


def _member(rank, world, rendezvous, work, tmp_path, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    # Every process finishes connecting before any works: one that failed at once and closed its
    # group would otherwise break a peer's connect, and spawn could report that error instead.
    dist.barrier()
    try:
        work(rank, tmp_path, *args)
    finally:
        dist.destroy_process_group()


def batch_and_codes():
    model = random_model(TINY).train()
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((64, TINY.d)).astype(np.float32))
    with torch.no_grad():
        codes = model.encode_normalized(x, Encoder(A=4, B=2))[0]
    return model, x, codes


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def ddp_gradients(rank, tmp_path):
    model, x, codes = batch_and_codes()
    net = distributed.wrap(model, torch.device("cpu"))
    part = distributed.share(len(x))  # this process's half of the batch
    qinco_loss(net, x[part], codes[part], None).backward()
    torch.save(gradients(model), tmp_path / f"grads-{rank}.pt")


def test_two_processes_compute_the_gradient_of_the_whole_batch(tmp_path):
    model, x, codes = batch_and_codes()
    qinco_loss(model, x, codes, None).backward()
    single = gradients(model)
    assert len(single) == len(list(model.parameters()))
    in_processes(2, ddp_gradients, tmp_path)
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads-{rank}.pt", weights_only=True)
        assert grads.keys() == single.keys()
        for name, g in single.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def ddp_training(rank, tmp_path, x, init="rq"):
    tc = TrainConfig(**{**FIXTURE_TRAINING, "max_vectors": 6_000}, A=4, B=2, batch=128, val=500, lr=1e-3, init=init)
    model = train(x, tmp_path / "model.safetensors", QincoConfig(d=50, M=2, K=32, L=1, h=32), tc, report=False)
    torch.save(model.state_dict(), tmp_path / f"model-{rank}.pt")


def test_a_two_process_training_run_stays_in_step_and_saves_once(tmp_path, glove_sample):
    # An RQ start, which 6,000 vectors improve here (from LSQ++'s start with its seeds they did not:
    # best would then be the start, the same in both processes whatever the steps did).
    in_processes(2, ddp_training, tmp_path, glove_sample[:3000])
    first, second = (torch.load(tmp_path / f"model-{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)  # the same weights in both processes
    saved, extra = load_model(tmp_path / "model.safetensors", with_extra=True)
    state = extra["training"]["state"]
    assert state["vectors_seen"] >= 6_000 and state["best_val_mse"] < state["init_val_mse"], state["history"]
    assert all(torch.equal(saved.state_dict()[k], first[k]) for k in first)
    assert not list(tmp_path.glob(".model.safetensors.tmp*"))


def test_devices_resolve_or_fail_clearly(monkeypatch):
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert distributed.resolve_device("auto") == torch.device(expected)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            distributed.resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        distributed.resolve_device("tpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.init_from_env(torch.device("cpu"))  # one process: no group
    assert distributed.rank_world() == (0, 1) and not dist.is_initialized()


def test_the_cli_takes_a_device(tmp_path, glove_sample, capsys):
    from model.cli import main
    data = tmp_path / "x.npy"
    np.save(data, glove_sample[:1500])
    main(["--device", "cpu", "train", str(data), "--out", str(tmp_path / "m.safetensors"), "--bytes", "1",
          "--K", "16", "--L", "1", "--h", "16", "--max-vectors", "2000", "--val", "200"])
    assert load_model(tmp_path / "m.safetensors", with_extra=True)[1]["training"]["config"]["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["--device", "cuda", "encode", str(data), "--model", str(tmp_path / "m.safetensors"),
                  "--out", str(tmp_path / "c.npy")])
        assert "no CUDA device" in capsys.readouterr().err


def ddp_training_on_too_little_data(rank, tmp_path, x):
    train(x, tmp_path / "m.safetensors", QincoConfig(d=50, M=2), TrainConfig(**FIXTURE_TRAINING, val=20))


def test_bad_data_fails_in_every_process_instead_of_hanging(tmp_path, glove_sample):
    with pytest.raises(mp.ProcessRaisedException, match="at least K=256 vectors"):
        in_processes(2, ddp_training_on_too_little_data, tmp_path, glove_sample[:200])


def seeded_broadcast(rank, tmp_path):
    model = random_model(TINY)
    if rank == 0:  # rank 0 initialises (an LSQ++ start): its seed codebooks are a buffer the others lack
        model.set_seed_codebooks(np.full((TINY.M, TINY.K, TINY.d), 0.5, np.float32))
    assert distributed.broadcast_state(model, {"init": "lsq"}, torch.device("cpu")) == {"init": "lsq"}
    torch.save(model.state_dict(), tmp_path / f"seeded-{rank}.pt")


def test_rank_0s_seed_codebooks_reach_every_process(tmp_path):
    in_processes(2, seeded_broadcast, tmp_path)
    first, second = (torch.load(tmp_path / f"seeded-{r}.pt", weights_only=True) for r in range(2))
    assert first["seed_codebooks"].shape == second["seed_codebooks"].shape == (TINY.M, TINY.K, TINY.d)
    assert (second["seed_codebooks"] == 0.5).all() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_two_process_run_from_lsq_keeps_the_seeds_in_step(tmp_path, glove_sample):
    """An LSQ++ start with its seeds in two processes: the seed codebooks reach both, the processes
    stay in step, and the shared validation (each process its share of the vectors and of their
    seeds) measures LSQ++'s own error at the start."""
    in_processes(2, ddp_training, tmp_path, glove_sample[:3000], "lsq")
    first, second = (torch.load(tmp_path / f"model-{r}.pt", weights_only=True) for r in range(2))
    assert first["seed_codebooks"].shape == (2, 32, 50) and all(torch.equal(first[k], second[k]) for k in first)
    state = load_model(tmp_path / "model.safetensors", with_extra=True)[1]["training"]["state"]
    assert state["init"] == "lsq" and state["vectors_seen"] >= 6_000
    assert state["init_val_mse"] <= state["lsq_val_mse"] * 1.02
