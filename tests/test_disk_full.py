"""A full disk during an upload: writes answer 507 with a message and store nothing, reads go on,
nothing acknowledged is lost (kill -9 after it), and writes work again once space is freed.

The data directory is a small tmpfs mounted for the test (mounting needs root)."""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server import free_port, serve

BATCH = 200
DEMO_MODEL = Path(__file__).resolve().parent.parent / "service" / "demo" / "glove-50-ivf-8B.safetensors"
COLLECTIONS = {  # one that keeps originals (collecting: an originals file and SQLite), one of codes
    "originals": {"vectors": {"size": 50, "distance": "Euclid"}, "qinco": {"train_after": 0}},
    "codes": {"model": "m.safetensors", "metric": "l2"}}


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder, leave: int):
    """A ballast file that leaves about `leave` bytes free on the folder's filesystem."""
    st = os.statvfs(folder)
    with open(folder / "ballast", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def upload(client, vectors, first: int):
    ids = list(range(first, first + BATCH))
    points = [{"id": i, "vector": vectors[i % len(vectors)].tolist(), "payload": {"n": i, "text": "x" * 200}}
              for i in ids]
    return ids, client.put("/collections/c/points", json={"points": points})


@pytest.mark.parametrize("kind", COLLECTIONS)
def test_a_full_disk_refuses_writes_keeps_reads_and_loses_nothing(small_disk, glove_sample, kind):
    vectors = glove_sample
    shutil.copy(DEMO_MODEL, small_disk / "m.safetensors")
    port = free_port()
    proc = serve(small_disk, port, "--no-demo")
    acked = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert client.put("/collections/c", json=COLLECTIONS[kind]).status_code == 200
            ids, r = upload(client, vectors, 0)
            assert r.status_code == 200
            acked += ids
            fill(small_disk, 1 << 20)
            for _ in range(200):
                ids, r = upload(client, vectors, len(acked))
                if r.status_code != 200:
                    break
                acked += ids
            assert r.status_code == 507, r.text
            assert "disk is full" in r.json()["status"]["error"]
            assert len(acked) > BATCH, "the disk filled before the upload got going"
            # Nothing of the refused batch was stored, and reads go on.
            assert client.post("/collections/c/points/count", json={}).json()["result"]["count"] == len(acked)
            assert client.post("/collections/c/points", json={"ids": ids[:3]}).json()["result"] == []
            hits = client.post("/collections/c/points/search", json={"vector": vectors[5].tolist(), "limit": 10})
            assert hits.status_code == 200 and 5 in [h["id"] for h in hits.json()["result"]]
            assert client.get("/collections/c").status_code == 200
            assert upload(client, vectors, len(acked))[1].status_code == 507  # still full
            (small_disk / "ballast").unlink()
            ids, r = upload(client, vectors, len(acked))
            assert r.status_code == 200, r.text
            acked += ids
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    port = free_port()
    proc = serve(small_disk, port, "--no-demo")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert client.post("/collections/c/points/count", json={}).json()["result"]["count"] == len(acked)
            sample = acked[::97]
            r = client.post("/collections/c/points", json={"ids": sample, "with_vector": True})
            got = {p["id"]: p for p in r.json()["result"]}
            assert sorted(got) == sorted(sample)
            for i in sample:
                assert got[i]["payload"]["n"] == i
                if kind == "originals":
                    assert np.array_equal(np.array(got[i]["vector"], dtype=np.float32), vectors[i % len(vectors)])
    finally:
        proc.kill()
        proc.wait()


def test_a_spent_quota_is_a_507_too():
    """SQLite says ENOSPC as SQLITE_FULL but EDQUOT only as a failed write: both are 507; a failed read is not."""
    import errno
    import sqlite3

    from service.errors import disk_full

    def sqlite_error(code: int) -> sqlite3.Error:
        e = sqlite3.OperationalError("disk I/O error")
        e.sqlite_errorcode = code
        return e
    assert "disk is full" in disk_full(sqlite_error(sqlite3.SQLITE_FULL)).message
    assert "quota" in disk_full(sqlite_error(sqlite3.SQLITE_IOERR_WRITE)).message
    assert disk_full(sqlite_error(sqlite3.SQLITE_IOERR_TRUNCATE)).status_code == 507
    assert disk_full(sqlite_error(sqlite3.SQLITE_IOERR_FSYNC)) is None  # the commit may be in the WAL: no promise
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded")).status_code == 507
    assert disk_full(sqlite_error(sqlite3.SQLITE_IOERR_READ)) is None and disk_full(OSError(errno.EIO, "x")) is None
