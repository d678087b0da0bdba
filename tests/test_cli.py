import numpy as np
import pytest

from model.cli import main
from model.io import load_model
from service.training.policy import model_config


def test_train_encode_decode_round_trip(tmp_path, glove_sample):
    data = tmp_path / "x.npy"
    np.save(data, glove_sample[:2000].astype(np.float16))  # float16 input is accepted
    model = tmp_path / "m.safetensors"
    main(["train", str(data), "--out", str(model), "--bytes", "2", "--K", "16", "--L", "1", "--h", "32",
          "--max-vectors", "8000", "--val", "300", "--A", "4", "--B", "2"])
    codes = tmp_path / "codes.npy"
    main(["encode", str(data), "--model", str(model), "--out", str(codes), "--encoder", "fast"])
    c = np.load(codes)
    assert c.shape == (2000, 4) and c.dtype == np.uint8
    main(["decode", str(codes), "--model", str(model), "--out", str(tmp_path / "y.npy")])
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (2000, 50) and y.dtype == np.float32
    err = ((y - glove_sample[:2000]) ** 2).sum(1).mean()
    assert err < (glove_sample[:2000] ** 2).sum(1).mean()  # it actually compresses
    assert load_model(model).cfg.de == 0  # d = 50: the blocks work in d


@pytest.mark.parametrize("flag, de", [([], 128), (["--de", "0"], 0)])
def test_high_d_training_narrows_the_blocks_by_default(tmp_path, flag, de):
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((600, 256)).astype(np.float32))
    model = tmp_path / "m.safetensors"
    main(["train", str(data), "--out", str(model), "--bytes", "1", "--K", "16", "--L", "1", "--h", "32",
          "--max-vectors", "2000", "--val", "100", *flag])
    assert load_model(model).cfg.de == de
    assert model_config(384, 10_000, 8, None).de == 128 and model_config(50, 10_000, 8, None).de == 0


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["encode", str(tmp_path / "none.npy"), "--model", str(tmp_path / "none.safetensors"), "--out", "x.npy"])
    assert e.value.code == 2
    assert "no such model file" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((100, 16), np.float32))
    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path / "x.npy"), "--out", str(tmp_path / "m.safetensors"), "--de", "17"])
    assert e.value.code == 2
    assert "--de must be between 0 (d) and d = 16, got 17" in capsys.readouterr().err


def test_build_tune_search_eval(tmp_path, ivf_model, glove_sample, capsys):
    from model.io import save_model
    model = tmp_path / "ivf.safetensors"
    save_model(ivf_model, model)
    base, queries = tmp_path / "base.npy", tmp_path / "queries.npy"
    np.save(base, glove_sample[4000:6000])
    np.save(queries, glove_sample[7000:7200])
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(2000, dtype=np.int64) + 100)
    index = tmp_path / "index"
    main(["build", str(base), "--model", str(model), "--out", str(index), "--ids", str(ids), "--encoder", "fast"])
    main(["tune", str(index), str(queries), "--base", str(base), "--ids", str(ids), "--target-recall", "0.5"])
    assert "Pareto front" in capsys.readouterr().out
    out = tmp_path / "found.npy"
    main(["search", str(index), str(queries), "--k", "5", "--target-recall", "0.5", "--out", str(out)])
    found = np.load(out)
    assert found.shape == (200, 5) and found.dtype == np.int64 and found.min() >= 100
    main(["search", str(index), str(queries), "--k", "5", "--nprobe", "4", "--nshort", "50", "--out", str(out)])
    plot = tmp_path / "curve.png"
    main(["eval", str(index), str(queries), "--base", str(base), "--ids", str(ids), "--plot", str(plot)])
    assert "R@10" in capsys.readouterr().out
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_data_names_the_missing_source(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QINCO_SHARED_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("QINCO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        main(["data", "wordnet-minilm-384", "--out", str(tmp_path / "wn")])
    assert e.value.code == 2
    assert "QINCO_SHARED_DATA" in capsys.readouterr().err
    assert not (tmp_path / "wn").exists()  # nothing written


def test_training_options_take_dashes_or_underscores():
    from model.cli import build_parser
    args = build_parser().parse_args(["train", "x.npy", "--out", "m.safetensors", "--stop-after", "3",
                                      "--grad_clip", "0.1", "--lr-codebooks", "1e-4", "--max-vectors", "5000",
                                      "--loss", "final"])
    assert (args.stop_after, args.grad_clip, args.lr_codebooks, args.max_vectors, args.loss) == (3, 0.1, 1e-4, 5000,
                                                                                                 "final")
    for option, bad in (("--loss", "last"), ("--init", "pq"), ("--schedule", "step")):  # refused before any data is read
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["train", "x.npy", "--out", "m.safetensors", option, bad])
        assert e.value.code == 2
