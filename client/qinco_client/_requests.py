"""What each call sends and how its answer is read: one place for both clients."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from .errors import TrainingFailed
from qdrant_client.models import ScoredPoint

from .models import CollectionInfo, QincoStatus

DISTANCES = {"cosine": "Cosine", "euclid": "Euclid", "l2": "Euclid"}  # Qdrant's names


@dataclass
class Call:
    method: str
    path: str
    json: Any = None
    params: dict | None = None
    idempotent: bool = True  # may be re-sent after a timeout or a 5xx
    enveloped: bool = True  # the answer is {"result": ...}
    parse: Callable[[Any], Any] = lambda r: r


def as_list(vector) -> list[float]:
    """A vector from a list, tuple or numpy array."""
    return vector.tolist() if hasattr(vector, "tolist") else [float(v) for v in vector]


def search_body(vector, limit, params, target_recall, query_filter, with_payload, with_vector) -> dict:
    body = {"vector": as_list(vector), "limit": limit, "with_payload": with_payload, "with_vector": with_vector}
    if query_filter is not None:  # a dict or qdrant_client.models.Filter
        body["filter"] = query_filter if isinstance(query_filter, dict) else query_filter.model_dump(mode="json", exclude_none=True)
    if params and target_recall is not None:
        raise ValueError("give params or target_recall, not both")
    if params:
        body["params"] = dict(params)
    elif target_recall is not None:
        body["params"] = {"target_recall": target_recall}
    return body


def hits(result) -> list[ScoredPoint]:
    return [ScoredPoint.model_validate(h) for h in result]


def given(**settings) -> dict:
    return {k: v for k, v in settings.items() if v is not None}


def create_collection(name, size=None, distance=None, model=None, index=None, metric=None, encoder=None,
                      qinco=None) -> Call:
    """Qdrant's form (size and distance, `qinco` settings) or the form from a trained model or index.

    encoder None: the server's default.
    """
    qinco = given(**(qinco or {}))
    trains_itself = size is not None or distance is not None
    if trains_itself == (model is not None or index is not None):
        raise ValueError("give size and distance (a collection that trains itself) or model/index (trained "
                         f"beforehand): {'not both' if trains_itself else 'neither was given'}")
    if trains_itself:
        if size is None or distance is None:
            raise ValueError("a collection that trains itself needs both size and distance")
        if metric is not None:
            raise ValueError("metric is for the model/index form; give distance='Cosine' or 'Euclid'")
        if distance.lower() not in DISTANCES:
            raise ValueError(f"distance must be 'Cosine' or 'Euclid' (or 'l2'), not {distance!r}")
        body = {"vectors": {"size": int(size), "distance": DISTANCES[distance.lower()]}, "qinco": given(**qinco),
                **given(encoder=encoder)}
    elif qinco:
        raise ValueError(f"{', '.join(qinco)}: only for a collection that trains itself (size and distance)")
    else:
        body = {**given(model=model, index=index, encoder=encoder), "metric": metric or "l2"}
    return Call("PUT", f"/collections/{name}", body, idempotent=False)  # Qdrant answers true


def get_collection(name) -> Call:
    return Call("GET", f"/collections/{name}", parse=lambda r: CollectionInfo(**r))


def train(name, minutes=None, bytes=None, nlist=None, model=None) -> Call:
    """Start a training job: a fresh model (within `minutes`), or the trained `model` file swapped in."""
    body = given(minutes=minutes, bytes=bytes, nlist=nlist)
    if model is not None and body:
        raise ValueError("give model (a trained file to swap in) or minutes/bytes/nlist, not both")
    return Call("POST", f"/collections/{name}/train", body or given(model=model), idempotent=False,
                parse=lambda r: QincoStatus(**r))


def cancel_training(name) -> Call:
    return Call("DELETE", f"/collections/{name}/train", parse=lambda r: bool(r))


def is_ready(info: CollectionInfo) -> bool:
    """Whether a collection serves from its trained model with no job running.

    Raises TrainingFailed when the last job failed and left the collection without a model.
    """
    q = info.qinco
    if q is None:  # a collection created from a trained model
        return True
    if q.job is not None:
        return False
    if q.phase != "ready" and q.last_error:
        raise TrainingFailed(f"collection {info.name!r} ({q.phase}): training failed: {q.last_error}")
    return q.phase == "ready"


def not_ready(info: CollectionInfo, timeout: float) -> TimeoutError:
    q, job = info.qinco, info.qinco.job
    doing = f"job {job.kind} {job.phase} {job.progress:.0%}" if job else "no job"
    return TimeoutError(f"collection {info.name!r} not ready after {timeout:g} s: {q.phase}, {doing}, "
                        f"{info.points_count} points")


def search(collection, vector, limit, params, target_recall, query_filter, with_payload, with_vector) -> Call:
    body = search_body(vector, limit, params, target_recall, query_filter, with_payload, with_vector)
    return Call("POST", f"/collections/{collection}/points/search", body, parse=hits)


def search_batch(collection, vectors, limit, params, target_recall, query_filter, with_payload, with_vector) -> Call:
    bodies = [search_body(v, limit, params, target_recall, query_filter, with_payload, with_vector) for v in vectors]
    return Call("POST", f"/collections/{collection}/points/search/batch", {"searches": bodies},
                parse=lambda r: [hits(h) for h in r])


def health() -> Call:
    return Call("GET", "/readyz", enveloped=False)


def bar(enabled: bool, **kwargs):
    """A tqdm bar, or None when disabled or tqdm is missing."""
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(**kwargs)
        except ImportError:
            pass
    return None


@contextmanager
def training_progress(name: str, enabled: bool):
    """Yields show(info): a bar of the training job, with its phase and the server's ETA.

    While collecting, it shows the points gathered toward `train_after`.
    """
    b = bar(enabled, total=100, desc=name, bar_format="{desc}: {percentage:3.0f}%|{bar}|")

    def show(info: CollectionInfo):
        q = info.qinco
        if b is None or q is None:
            return
        if q.job is not None:
            phase, done = q.job.phase, q.job.progress
            note = "" if q.job.eta_seconds is None else f"ETA {q.job.eta_seconds:.0f} s"
        elif q.phase == "collecting":
            phase, done = q.phase, min(1.0, info.points_count / q.train_after) if q.train_after else 0.0
            note = f"{info.points_count}/{q.train_after} points" if q.train_after else "trains on request"
        else:
            phase, done, note = q.phase, float(q.phase == "ready"), ""
        b.set_description_str(f"{name} {phase}" + (f" ({note})" if note else ""), refresh=False)
        b.n = round(100 * done)
        b.refresh()

    try:
        yield show
    finally:
        if b is not None:
            b.close()
