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
    # its torch sees no CUDA device, so under --device auto the actor encodes on its CPU.
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
    assert report.count(":cpu ") == 2  # sharing the one GPU, neither has CUDA: both on their CPUs
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


def test_actors_follow_the_clusters_gpus_or_cpus():
    from model.ray_encode import Placement, placement
    assert placement(16, 8, 0, 0, "auto") == Placement(16, 1, 1, 0.0, "cpu")  # no GPU: one actor per CPU
    assert placement(16, 8, 2, 0, "auto") == Placement(2, 8, 8, 1.0, "auto")  # one per GPU, its node's CPUs
    assert placement(16, 8, 2, 0, "cpu") == Placement(16, 1, 1, 0.0, "cpu")
    assert placement(16, 8, 2, 4, "cuda:1") == Placement(4, 4, 4, 0.5, "cuda")  # two actors share a GPU
    assert placement(2, 2, 0, 4, "cpu") == Placement(4, 1, 0.5, 0.0, "cpu")  # more actors than CPUs
    with pytest.raises(ValueError, match="lists no GPU"):
        placement(16, 8, 0, 0, "cuda")
    with pytest.raises(ValueError, match="device must be"):
        placement(16, 8, 0, 0, "tpu")
