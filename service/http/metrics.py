"""The service's Prometheus metrics: requests (counted by the middleware), searches, encoding, and
each collection's gauges, set from its info at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("qinco_requests_total", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("qinco_request_seconds", "HTTP request latency", ["route", "method"],
                                 registry=self.registry)
        self.points = Gauge("qinco_points", "points per collection", ["collection"], registry=self.registry)
        self.encode = Histogram("qinco_encode_seconds", "QINCo encoding time per upsert batch",
                                registry=self.registry)
        self.search = Histogram("qinco_search_seconds", "search time per request (all its queries)",
                                registry=self.registry)
        self.search_batch = Histogram("qinco_search_batch_size", "lone searches run together (micro-batching)",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.phase = Gauge("qinco_collection_phase", "1 for the phase a collection is in",
                           ["collection", "phase"], registry=self.registry)
        self.status = Gauge("qinco_collection_status", "1 for the collection's status (Qdrant's colours)",
                            ["collection", "status"], registry=self.registry)
        self.job_progress = Gauge("qinco_training_progress", "progress of the running job's phase, 0 to 1",
                                  ["collection"], registry=self.registry)
        self.job_eta = Gauge("qinco_training_eta_seconds", "estimated seconds left in the running job's phase",
                             ["collection"], registry=self.registry)
        self.mse_vs_rq = Gauge("qinco_model_mse_vs_rq", "validation MSE of the serving model / its RQ start",
                               ["collection"], registry=self.registry)
        self.val_mse = Gauge("qinco_model_val_mse", "validation MSE of the serving model",
                             ["collection"], registry=self.registry)
        self.generation = Gauge("qinco_model_generation", "model generation serving (+1 per swap)",
                                ["collection"], registry=self.registry)
        self.last_swap = Gauge("qinco_model_last_swap_timestamp_seconds", "Unix time of the last model swap",
                               ["collection"], registry=self.registry)
        self.encoded = Gauge("qinco_points_encoded", "points served by the QINCo index",
                             ["collection"], registry=self.registry)
        self.refine_pending = Gauge("qinco_refine_pending", "points served with fast codes, waiting to be re-encoded",
                                    ["collection"], registry=self.registry)
        self.bytes_per_point = Gauge("qinco_bytes_per_point", "bytes per point in memory (estimated) and on disk",
                                     ["collection", "where"], registry=self.registry)

    PHASES = ("collecting", "training", "encoding", "ready")
    STATUSES = ("grey", "yellow", "green", "red")
    WHERE = ("memory", "disk")

    def observe(self, name: str, info: dict):
        """A collection's info as gauges (set at scrape time)."""
        nan = float("nan")
        status, q = info["status"], info["qinco"]
        self.points.labels(name).set(info["points_count"])
        for s in self.STATUSES:
            self.status.labels(name, s).set(float(status == s))
        for phase in self.PHASES:
            self.phase.labels(name, phase).set(float(q["phase"] == phase))
        job, model = q["job"] or {}, q["model"] or {}
        self.job_progress.labels(name).set(job.get("progress", 0.0))
        self.job_eta.labels(name).set(nan if job.get("eta_seconds") is None else job["eta_seconds"])
        self.mse_vs_rq.labels(name).set(model.get("mse_vs_rq") or nan)
        self.val_mse.labels(name).set(model.get("val_mse") or nan)
        self.generation.labels(name).set(model.get("generation", -1))
        self.last_swap.labels(name).set(q["last_swap"] or nan)
        self.encoded.labels(name).set(q["points_encoded"])
        self.refine_pending.labels(name).set(q["refine_pending"])
        for where in self.WHERE:
            self.bytes_per_point.labels(name, where).set(q["bytes_per_point"][where])

    def forget(self, name: str):
        """Drop a deleted collection's series."""
        gauges = [(g, [()]) for g in (self.points, self.job_progress, self.job_eta, self.mse_vs_rq, self.val_mse,
                                      self.generation, self.last_swap, self.encoded, self.refine_pending)]
        gauges += [(self.phase, [(p,) for p in self.PHASES]), (self.status, [(s,) for s in self.STATUSES]),
                   (self.bytes_per_point, [(w,) for w in self.WHERE])]
        for gauge, rest in gauges:
            for labels in rest:
                try:
                    gauge.remove(name, *labels)
                except KeyError:  # never scraped: no series yet
                    pass
