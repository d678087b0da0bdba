import numpy as np
import pytest

from model.cli import main


def test_train_encode_decode_round_trip(tmp_path, glove_sample):
    data = tmp_path / "x.npy"
    np.save(data, glove_sample[:2000].astype(np.float16))  # float16 input is accepted
    model = tmp_path / "m.safetensors"
    main(["train", str(data), "--out", str(model), "--bytes", "2", "--K", "16", "--L", "1", "--h", "32",
          "--max-minutes", "0.1", "--val", "300", "--A", "4", "--B", "2"])
    codes = tmp_path / "codes.npy"
    main(["encode", str(data), "--model", str(model), "--out", str(codes), "--encoder", "fast"])
    c = np.load(codes)
    assert c.shape == (2000, 4) and c.dtype == np.uint8
    main(["decode", str(codes), "--model", str(model), "--out", str(tmp_path / "y.npy")])
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (2000, 50) and y.dtype == np.float32
    err = ((y - glove_sample[:2000]) ** 2).sum(1).mean()
    assert err < (glove_sample[:2000] ** 2).sum(1).mean()  # it actually compresses


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["encode", str(tmp_path / "none.npy"), "--model", str(tmp_path / "none.safetensors"), "--out", "x.npy"])
    assert e.value.code == 2
    assert "no such model file" in capsys.readouterr().err
