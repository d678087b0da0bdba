"""Property-based state machine: random operation sequences against service.engine.registry.Store.

Hypothesis runs random sequences of create / upsert / delete / search / get /
count / snapshot / delete-collection / restart on a real Store (a temporary data
directory, the tiny session model) and compares them with a plain in-memory
model of what must be there: which collections exist, their ids and payloads.
"restart" closes the Store and opens a new one on the same directory, so every
step after it also checks recovery (snapshot + SQLite replay).

QINCO_SM_EXAMPLES / QINCO_SM_STEPS raise the budget (defaults keep it well under a minute).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test)

from model.io import save_model  # noqa: E402
from service.engine.registry import Store  # noqa: E402
from service.errors import BadRequest, Conflict, NotFound  # noqa: E402

EXAMPLES = int(os.environ.get("QINCO_SM_EXAMPLES", "80"))
STEPS = int(os.environ.get("QINCO_SM_STEPS", "50"))
NAMES = st.sampled_from(["a", "a", "a", "b"])  # mostly the collection that exists from the start
IDS = st.integers(0, 40)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                              st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                          max_leaves=6)
PAYLOAD = st.one_of(st.none(), st.dictionaries(st.text(max_size=6), json_value, max_size=4))


def make_machine(model_path: Path, vectors: np.ndarray, workdir: Path):
    class StoreMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.dir = Path(tempfile.mkdtemp(dir=workdir))
            (self.dir / "models").mkdir()
            shutil.copy(model_path, self.dir / "models" / "m.safetensors")
            self.store = Store(self.dir)
            self.store.open_all()
            self.model: dict[str, dict[int, dict | None]] = {}  # collection -> id -> payload
            self.metric: dict[str, str] = {}

        def teardown(self):
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

        # ---- collections ----------------------------------------------------------------
        @initialize(metric=st.sampled_from(["l2", "cosine"]))
        def first_collection(self, metric):
            self.create("a", metric)

        @rule(name=NAMES, metric=st.sampled_from(["l2", "cosine"]))
        def create(self, name, metric):
            source = self.store.resolve("models/m.safetensors")
            if name in self.model:
                with pytest.raises(Conflict):
                    self.store.create(name, metric, "fast", source)
                return
            info = self.store.create(name, metric, "fast", source).info()
            assert info["points_count"] == 0 and info["metric"] == metric
            self.model[name], self.metric[name] = {}, metric

        @rule(name=NAMES)
        def delete_collection(self, name):
            if name not in self.model:
                with pytest.raises(NotFound):
                    self.store.delete(name)
                return
            self.store.delete(name)
            del self.model[name]
            with pytest.raises(NotFound):
                self.store.get(name)

        @rule()
        def restart(self):
            self.store.close()
            self.store = Store(self.dir)
            self.store.open_all()

        @precondition(lambda self: self.model)
        @rule(data=st.data())
        def snapshot(self, data):
            name = data.draw(st.sampled_from(sorted(self.model)))
            self.store.get(name).snapshot()

        # ---- points ---------------------------------------------------------------------
        @rule(name=NAMES, data=st.data())
        def upsert(self, name, data):
            ids = data.draw(st.lists(IDS, min_size=1, max_size=6, unique=True))
            rows = data.draw(st.lists(st.integers(0, len(vectors) - 1), min_size=len(ids), max_size=len(ids)))
            payloads = data.draw(st.lists(PAYLOAD, min_size=len(ids), max_size=len(ids)))
            if name not in self.model:
                with pytest.raises(NotFound):
                    self.store.get(name)
                return
            self.store.get(name).upsert(ids, vectors[rows], payloads)
            self.model[name].update(zip(ids, payloads))

        @rule(name=NAMES, ids=st.lists(IDS, min_size=1, max_size=6))
        def delete(self, name, ids):
            if name not in self.model:
                return
            _, existed = self.store.get(name).delete(ids)
            assert existed == len(set(ids) & set(self.model[name]))
            for i in ids:
                self.model[name].pop(i, None)

        @rule(name=NAMES, ids=st.lists(IDS, min_size=2, max_size=4))
        def upsert_duplicate_ids_is_refused(self, name, ids):
            if name not in self.model:
                return
            with pytest.raises(BadRequest):
                self.store.get(name).upsert(ids + ids[:1], vectors[:len(ids) + 1], [None] * (len(ids) + 1))

        # ---- reads ----------------------------------------------------------------------
        @rule(name=NAMES, row=st.integers(0, len(vectors) - 1), limit=st.integers(1, 60),
              with_payload=st.booleans(), exhaustive=st.booleans())
        def search(self, name, row, limit, with_payload, exhaustive):
            if name not in self.model:
                return
            c = self.store.get(name)
            params = {"nprobe": c.space.index.model.cfg.nlist, "ef_search": 256, "nshort": 200} if exhaustive else None
            hits = c.search([vectors[row]], limit, params, with_payload, False)[0]
            live = self.model[name]
            ids = [h.id for h in hits]
            assert len(ids) <= limit and len(set(ids)) == len(ids), ids
            assert set(ids) <= set(live), f"dead ids returned: {set(ids) - set(live)}"
            if exhaustive:  # every list probed: as many hits as there are points, up to limit
                assert len(ids) == min(limit, len(live)), (len(ids), limit, len(live))
            for h in hits:
                if with_payload:
                    assert h.payload == live[h.id], (h.id, h.payload, live[h.id])
            scores = [h.score for h in hits]
            order = sorted(scores, reverse=self.metric[name] == "cosine")
            assert scores == order or np.allclose(scores, order), scores

        @rule(name=NAMES, point=IDS, with_vector=st.booleans())
        def get(self, name, point, with_vector):
            if name not in self.model:
                return
            c = self.store.get(name)
            if point not in self.model[name]:
                with pytest.raises(NotFound):
                    c.get(point, with_vector)
                return
            got = c.get(point, with_vector)
            assert got["payload"] == self.model[name][point]
            if with_vector:
                assert len(got["vector"]) == c.dimension and np.isfinite(got["vector"]).all()

        # ---- invariants -----------------------------------------------------------------
        @invariant()
        def same_collections_and_counts(self):
            if not hasattr(self, "store"):
                return
            assert sorted(self.store.collections) == sorted(self.model)
            for name, points in self.model.items():
                c = self.store.get(name)
                assert c.count() == len(points), (name, c.count(), len(points))
                assert c.info()["points_count"] == len(points)

    return StoreMachine


def test_store_matches_a_plain_model(tmp_path, ivf_model, glove_sample):
    save_model(ivf_model, tmp_path / "m.safetensors")
    machine = make_machine(tmp_path / "m.safetensors", glove_sample[4000:4200], tmp_path)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
        suppress_health_check=list(HealthCheck)))
