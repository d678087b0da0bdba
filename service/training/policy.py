"""When a collection can train and what it trains: the facts the server and the worker share."""

from __future__ import annotations

import math

MIN_PER_LIST = 32  # training points per IVF list at least
MIN_TRAIN_POINTS = 1000  # below this the residual codebooks (K = 256) cannot be fitted
NICE = 10  # priority steps below the server: the worker and the refiner (searches and writes come first)
# A collection retrains by itself once a job would sample retrain_growth times the points its model
# trained on.  At 1 or less it would retrain at once after every swap, for ever.
MIN_RETRAIN_GROWTH = 1.5


def auto_nlist(n: int) -> int:
    """IVF lists for n points: a power of two near 4 sqrt(n), with MIN_PER_LIST points per list
    (64 on average) so that k-means has enough of them."""
    target = min(4 * math.sqrt(n), n / (2 * MIN_PER_LIST))
    return max(1, 1 << int(math.floor(math.log2(max(target, 1)))))


def check_growth(growth: float | None) -> float | None:
    """A retrain_growth setting as given, or ValueError: 0 (never) or MIN_RETRAIN_GROWTH and more."""
    if growth is not None and growth != 0 and not growth >= MIN_RETRAIN_GROWTH:
        raise ValueError(f"retrain_growth must be 0 (never) or at least {MIN_RETRAIN_GROWTH}, got {growth}")
    return growth


def min_points(nlist: int | None) -> int:
    """The fewest points a model of nlist lists (None: chosen from the count) can train on."""
    return max(MIN_TRAIN_POINTS, (nlist or 1) * MIN_PER_LIST)


def model_config(d: int, n: int, code_bytes: int, nlist: int | None):
    """The architecture for n training points: a smaller network for small sets (it overfits less
    and takes more steps per minute), and narrower blocks for high d (`default_de`)."""
    from model.network import QincoConfig, default_de
    return QincoConfig(d=d, M=code_bytes, K=256, L=2, h=128 if n < 50_000 else 256, de=default_de(d),
                       nlist=nlist or auto_nlist(n))
