"""Encoding on Ray (`--ray`): the same codes and the same index as one process.

The cluster tests start a local 2-CPU Ray cluster and skip where Ray is not installed
(`pip install -e '.[ray]'`); the argument tests run everywhere.
"""

import numpy as np
import pytest

from model.cli import build_parser, main
from model.network import ENCODERS, encode

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray's own DataContext warnings


def test_ray_arguments():
    parser = build_parser()
    args = parser.parse_args(["build", "b.npy", "--model", "m", "--out", "o"])
    assert args.ray is None and args.ray_actors == 0
    args = parser.parse_args(["build", "b.npy", "--model", "m", "--out", "o", "--ray"])
    assert args.ray == "local"
    args = parser.parse_args(["encode", "x.npy", "--model", "m", "--out", "o", "--ray", "head:6379",
                              "--ray-actors", "3"])
    assert args.ray == "head:6379" and args.ray_actors == 3


def test_ray_missing_is_a_message(tmp_path, monkeypatch, capsys, ivf_model, glove_sample):
    import builtins

    from model.io import save_model
    real_import = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **kw)

    model, data = tmp_path / "m.safetensors", tmp_path / "x.npy"
    save_model(ivf_model, model)
    np.save(data, glove_sample[:10])
    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(SystemExit) as e:
        main(["encode", str(data), "--model", str(model), "--out", str(tmp_path / "c.npy"), "--ray"])
    assert e.value.code == 2
    assert "pip install -e '.[ray]'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    # Never a running cluster.  It lists one GPU, which Ray hands to an actor as it would a real one;
    # its torch (the CPU build the project pins) sees no CUDA device, so under --device auto the
    # actor encodes on its CPU.
    import torch
    if torch.cuda.is_available():
        pytest.skip("this cluster's GPU would be this machine's real one: the codes would be bf16's")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("QINCO_DEVICE", raising=False)
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()


@pytest.fixture
def model_file(tmp_path, ivf_model):
    from model.io import save_model
    path = tmp_path / "ivf.safetensors"
    save_model(ivf_model, path)
    return path


def test_encode_on_ray_gives_the_codes_of_one_process(cluster, tmp_path, model_file, ivf_model, glove_sample,
                                                     capsys):
    x = glove_sample[:2500].astype(np.float16)  # the stored dtype travels; a partial last batch
    np.save(tmp_path / "x.npy", x)
    main(["encode", str(tmp_path / "x.npy"), "--model", str(model_file), "--out", str(tmp_path / "ray.npy"),
          "--encoder", "fast", "--batch", "300", "--ray", "--ray-actors", "2"])
    report = capsys.readouterr().err
    assert "2 actors x 1 threads" in report and report.count(" vec/s") >= 1  # per-actor figures
    assert ":cpu " in report and ":cuda" not in report  # sharing the one GPU, without CUDA: on their CPUs
    np.testing.assert_array_equal(np.load(tmp_path / "ray.npy"), encode(ivf_model, x, ENCODERS["fast"], 300))


def test_build_on_ray_gives_the_index_of_one_process(cluster, tmp_path, model_file, glove_sample, capsys):
    from model.index import QincoIndex
    base, ids = tmp_path / "base.npy", tmp_path / "ids.npy"
    np.save(base, glove_sample[2500:4500])
    np.save(ids, np.random.default_rng(0).permutation(10_000)[:2000].astype(np.int64))
    common = [str(base), "--model", str(model_file), "--ids", str(ids), "--encoder", "fast", "--batch", "700"]
    main(["build", *common, "--out", str(tmp_path / "local")])
    capsys.readouterr()
    main(["build", *common, "--out", str(tmp_path / "ray"), "--ray"])
    assert "1 actors x 2 threads" in capsys.readouterr().err  # one actor per cluster GPU
    main(["--device", "cpu", "build", *common, "--out", str(tmp_path / "ray-cpu"), "--ray"])
    assert "2 actors x 1 threads" in capsys.readouterr().err  # one per CPU
    local = QincoIndex.load(tmp_path / "local")
    for run in ("ray", "ray-cpu"):
        on_ray = QincoIndex.load(tmp_path / run)
        assert on_ray.ntotal == local.ntotal == 2000
        for a, b in zip(local.stored_codes(), on_ray.stored_codes()):  # same ids, same codes, same list order
            np.testing.assert_array_equal(a, b)


def test_a_cuda_actor_without_cuda_is_a_message(cluster, tmp_path, model_file, glove_sample, capsys):
    np.save(tmp_path / "x.npy", glove_sample[:100])
    with pytest.raises(SystemExit) as e:
        main(["--device", "cuda", "encode", str(tmp_path / "x.npy"), "--model", str(model_file),
              "--out", str(tmp_path / "c.npy"), "--ray"])
    assert e.value.code == 2 and "torch sees no CUDA device in an actor" in capsys.readouterr().err


def test_actors_follow_the_clusters_gpus_or_cpus():
    from model.ray_encode import Placement, placement
    assert placement(16, 8, 0, 0, "auto") == Placement(16, 1, 1, 0.0, "cpu")  # no GPU: one actor per CPU
    assert placement(16, 8, 2, 0, "cpu", 4) == Placement(16, 1, 1, 0.0, "cpu")
    # One per GPU, with the CPUs of its GPU node (a 32-CPU head without GPU, two 8-CPU GPU nodes).
    assert placement(48, 32, 2, 0, "auto", 8) == Placement(2, 8, 8, 1.0, "auto")
    # 3 actors on 2 GPUs: halves (thirds would leave one actor without a GPU that holds it).
    assert placement(16, 8, 2, 3, "cuda:1", 8) == Placement(3, 4, 4, 0.5, "cuda")
    assert placement(4, 4, 8, 0, "auto", 0.5) == Placement(8, 1, 0.5, 1.0, "auto")  # fewer CPUs than GPUs
    assert placement(2, 2, 0, 4, "cpu") == Placement(4, 1, 0.5, 0.0, "cpu")  # more actors than CPUs
    with pytest.raises(ValueError, match="lists no GPU"):
        placement(16, 8, 0, 0, "cuda")
    with pytest.raises(ValueError, match="device must be"):
        placement(16, 8, 0, 0, "tpu")
