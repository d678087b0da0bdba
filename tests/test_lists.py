"""model/lists.py: the one copy of an index's codes and ids."""

import io

import numpy as np
import pytest

from model.lists import ListStore

NLIST, CODE = 7, 3


def check(store: ListStore, expected: dict):
    rows, lists, ids = store.stored()
    assert store.ntotal == len(ids) == len(expected) and len(set(ids.tolist())) == len(ids)
    for r, l, i in zip(rows.tolist(), lists.tolist(), ids.tolist()):
        assert (l, store.codes[r].tolist()) == expected[i]
    assert (store.list_of_rows(rows) == lists).all()
    assert store.end <= len(store.ids) and (store.sizes <= store.capacity).all()


@pytest.mark.parametrize("run_rows", [1 << 20, 64, 5])  # compaction copying all lists at once, a few, or one at a time
def test_random_writes_keep_each_id_once_with_its_latest_code(monkeypatch, run_rows):
    monkeypatch.setattr("model.lists.RUN_ROWS", run_rows)
    rng = np.random.default_rng(0)
    store, expected = ListStore(NLIST, CODE), {}
    for step in range(300):
        if rng.random() < 0.6:
            ids = np.unique(rng.integers(0, 500, rng.integers(1, 40)))
            lists = rng.integers(0, NLIST, len(ids))
            codes = rng.integers(0, 256, (len(ids), CODE)).astype(np.uint8)
            store.remove(ids, lists if step % 2 else None)  # an upsert: replace
            store.add(lists, codes, ids)
            expected.update({i: (l, c.tolist()) for i, l, c in zip(ids.tolist(), lists.tolist(), codes)})
        else:
            ids = rng.integers(0, 600, rng.integers(1, 60))
            n = store.remove(ids)
            assert n == len({i for i in ids.tolist() if i in expected})
            for i in ids.tolist():
                expected.pop(i, None)
        if step % 50 == 49:
            store.compact(force=step % 100 == 99)
        check(store, expected)
    found = store.find(np.array([*expected, 10**9]))
    assert (found[:-1] >= 0).all() and found[-1] == -1
    assert (store.ids[found[:-1]] == np.array(list(expected))).all()


def test_compaction_packs_the_lists_and_frees_the_room():
    store = ListStore(NLIST, CODE)
    for b in range(50):  # lists outgrow their room many times
        ids = np.arange(b * 100, b * 100 + 100)
        store.add(ids % NLIST, np.full((100, CODE), b, np.uint8), ids)
    store.remove(np.arange(0, 5000, 2))
    store.compact(force=True, room=False)
    assert store.end == store.ntotal == 2500 and len(store.ids) == 2500 and (store.capacity == store.sizes).all()
    store.compact(force=True)  # with room: the next writes fit without moving their lists
    assert (store.capacity == store.sizes + store.sizes // 8).all() and (store.ids[store.ids >= 0] % 2 == 1).all()
    starts = store.starts.copy()
    store.add(np.arange(NLIST), np.zeros((NLIST, CODE), np.uint8), 10**6 + np.arange(NLIST))
    assert (store.starts == starts).all() and store.holes == 0


@pytest.mark.parametrize("run_rows", [1 << 20, 40, 5])
def test_saving_after_lists_moved_keeps_each_list_its_rows(monkeypatch, run_rows):
    """A list that moved to the arena's end is written in its place in list order."""
    monkeypatch.setattr("model.lists.RUN_ROWS", run_rows)
    store = ListStore(4, CODE)
    store.add(np.repeat([1, 2, 3], 33)[:100], np.zeros((100, CODE), np.uint8), np.arange(100))
    store.compact(force=True, room=False)
    store.add(np.array([0]), np.ones((1, CODE), np.uint8), np.array([100]))
    store.add(np.zeros(15, np.int64), np.ones((15, CODE), np.uint8), 101 + np.arange(15))
    f = io.BytesIO()
    store.save(f)
    f.seek(0)
    loaded = ListStore.load(f, 4, CODE)
    assert [sorted(loaded.ids[loaded.rows_of_lists([l])].tolist()) for l in range(4)] == \
        [sorted(store.ids[store.rows_of_lists([l])].tolist()) for l in range(4)]
    frozen = store.frozen()  # what a snapshot copies: the same rows, in the same order, back to back
    for l in range(4):
        assert (frozen.ids[frozen.rows_of_lists([l])] == store.ids[store.rows_of_lists([l])]).all()
        assert (frozen.codes[frozen.rows_of_lists([l])] == store.codes[store.rows_of_lists([l])]).all()


def test_a_right_hint_finds_the_ids_without_a_full_scan(monkeypatch):
    store = ListStore(NLIST, CODE)
    store.add(np.arange(70) % NLIST, np.zeros((70, CODE), np.uint8), np.arange(70)[::-1].copy())
    looked = []
    real = store._remove_in
    monkeypatch.setattr(store, "_remove_in", lambda lists, ids: looked.append(len(lists)) or real(lists, ids))
    assert store.remove([69, 62, 55], np.array([0, 0, 0])) == 3 and looked == [1]


def test_a_damaged_lists_file_is_a_value_error():
    with pytest.raises(ValueError, match="not a lists file"):
        ListStore.load(io.BytesIO(b"PK\x03\x04 truncated"), NLIST, CODE)


def test_save_and_load_round_trip_and_check_shapes():
    store = ListStore(NLIST, CODE)
    store.add(np.array([3, 1, 3]), np.arange(9, dtype=np.uint8).reshape(3, CODE), np.array([10, 11, 12]))
    f = io.BytesIO()
    store.save(f)
    f.seek(0)
    loaded = ListStore.load(f, NLIST, CODE)
    check(loaded, {10: (3, [0, 1, 2]), 11: (1, [3, 4, 5]), 12: (3, [6, 7, 8])})
    assert loaded.max_id == 12 and loaded.remove([13]) == 0 and loaded.remove([12]) == 1
    f.seek(0)
    with pytest.raises(ValueError, match="expected 8 lists"):
        ListStore.load(f, NLIST + 1, CODE)


def test_copies_of_an_empty_store_and_of_empty_lists():
    store = ListStore(NLIST, CODE)
    assert store.frozen().ntotal == 0
    store.compact(force=True)
    store.add(np.array([3, 3]), np.ones((2, CODE), np.uint8), np.array([7, 8]))  # lists 0-2 and 4-6 empty
    frozen = store.frozen()
    assert frozen.ntotal == 2 and frozen.ids.tolist() == [7, 8] and frozen.sizes.tolist() == [0, 0, 0, 2, 0, 0, 0]
