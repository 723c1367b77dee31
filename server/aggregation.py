"""The next global model from the hospitals' weights: FedAvg's example-weighted mean, FedAdam's or FedAvgM's step along it, or a
robust rule that bounds what one hospital can do (clipped mean, coordinate-wise median, trimmed mean, Multi-Krum).

Which to choose (README, "Bounded influence"): fedavg or fedadam where every hospital is trusted; clipped-mean where
one may be broken or hostile and hospitals differ (it keeps every hospital and their example weights, and caps how far
any one moves the model); median and trimmed-mean only with five or more hospitals of similar data (they ignore example
counts and pull towards the typical hospital, which costs accuracy under label skew); multikrum where up to
krum-byzantine hospitals may collude and the rest are alike (it drops the hospitals furthest from the others).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum


def weighted_mean(updates: list[list[np.ndarray]], counts: list[int]) -> list[np.ndarray]:
    """Each weight array averaged over the hospitals, weighted by their training images (FedAvg), in float64."""
    total = float(sum(counts))
    return [sum(update[i].astype(np.float64) * (n / total) for update, n in zip(updates, counts)) for i in range(len(updates[0]))]


def clipped_mean(updates: list[list[np.ndarray]], counts: list[int], current: list[np.ndarray]) -> list[np.ndarray]:
    """FedAvg of the updates after each one's change to the global model is scaled down to at most the median change's
    norm (norm clipping, Sun et al. 2019): no hospital moves the model further than a typical one, in float64."""
    deltas = [[u.astype(np.float64) - g.astype(np.float64) for u, g in zip(update, current)] for update in updates]
    norms = [np.sqrt(sum(float(np.sum(d**2)) for d in delta)) for delta in deltas]
    bound = float(np.median(norms))
    scales = [min(1.0, bound / n) if n > 0 else 1.0 for n in norms]
    mean = weighted_mean([[d * s for d in delta] for delta, s in zip(deltas, scales)], counts)
    return [g.astype(np.float64) + m for g, m in zip(current, mean)]


def median(updates: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The coordinate-wise median of the updates (FedMedian, Yin et al. 2018), example counts ignored, in float64."""
    return [np.median(np.stack([u[i].astype(np.float64) for u in updates]), axis=0) for i in range(len(updates[0]))]


def trimmed_mean(updates: list[list[np.ndarray]], fraction: float) -> list[np.ndarray]:
    """The coordinate-wise mean after cutting the given fraction of the highest and of the lowest values (Flower's
    FedTrimmedAvg rule), example counts ignored, in float64."""
    return [trim_mean(np.stack([u[i].astype(np.float64) for u in updates]), fraction) for i in range(len(updates[0]))]


def multikrum(updates: list[list[np.ndarray]], counts: list[int], byzantine: int) -> tuple[list[np.ndarray], list[int]]:
    """Multi-Krum (Blanchard et al. 2017, Flower's selection rule): keep the n - byzantine updates closest to their
    neighbours, and take their example-weighted mean; returns the mean and the positions kept."""
    keep = max(1, len(updates) - byzantine)
    contents = [RecordDict({"arrays": ArrayRecord([w.astype(np.float64) for w in u])}) for u in updates]
    selected = {id(c) for c in select_multikrum(contents, byzantine, keep)}  # the same records, handed back
    chosen = [i for i, c in enumerate(contents) if id(c) in selected]
    return weighted_mean([updates[i] for i in chosen], [counts[i] for i in chosen]), chosen


@dataclass
class ServerAdam:
    """FedAdam (Reddi et al., ICLR 2021): the global model takes an Adam step along the pseudo-gradient (mean - global).

    Only trainable weights take the step; batch-normalisation statistics take the hospitals' mean, since an Adam step
    could push a variance below zero. No bias correction, as in the paper; tau bounds the step of a weight whose
    pseudo-gradient has stayed small.
    """

    learning_rate: float
    trainable: list[bool]  # per weight array, in model.get_weights() order
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: list[np.ndarray] = field(default_factory=list)  # first moments, one per weight array
    v: list[np.ndarray] = field(default_factory=list)  # second moments
    before: tuple[list[np.ndarray], list[np.ndarray]] = field(default_factory=lambda: ([], []))  # the moments before the last step

    def undo(self) -> None:
        """Forget the last step's moments (its model was kept out)."""
        self.m, self.v = self.before

    def step(self, current: list[np.ndarray], mean: list[np.ndarray]) -> list[np.ndarray]:
        """The next global weights from the current ones and the hospitals' weighted mean."""
        self.before = (self.m, self.v)
        if not self.m:
            self.m = [np.zeros_like(w, np.float64) for w in current]
            self.v = [np.full_like(w, self.tau**2, np.float64) for w in current]
        self.m, self.v = list(self.m), list(self.v)  # new lists: the step's assignments leave `before` as it was
        out = []
        for i, (w, avg) in enumerate(zip(current, mean)):
            if not self.trainable[i]:
                out.append(avg)
                continue
            delta = avg - w  # the pseudo-gradient: where the hospitals moved the weights this round
            self.m[i] = self.beta1 * self.m[i] + (1 - self.beta1) * delta
            self.v[i] = self.beta2 * self.v[i] + (1 - self.beta2) * delta**2
            out.append(w + self.learning_rate * self.m[i] / (np.sqrt(self.v[i]) + self.tau))
        return out


@dataclass
class ServerMomentum:
    """FedAvgM (Hsu et al. 2019): the global model moves by a running sum of the rounds' pseudo-gradients (mean -
    global), m = beta m + delta, scaled by 1 - beta: a steady pseudo-gradient moves it as far as FedAvg would, one that
    swings from round to round (hospitals pulling the model back and forth under label skew) is damped.

    Only trainable weights take the step; batch-normalisation statistics take the hospitals' mean.
    """

    beta: float
    trainable: list[bool]  # per weight array, in model.get_weights() order
    m: list[np.ndarray] = field(default_factory=list)  # the running sum, one per weight array
    v: list[np.ndarray] = field(default_factory=list)  # none: the checkpoint's second moments stay empty
    before: list[np.ndarray] = field(default_factory=list)  # the running sum before the last step

    def undo(self) -> None:
        """Forget the last step (its model was kept out)."""
        self.m = self.before

    def step(self, current: list[np.ndarray], mean: list[np.ndarray]) -> list[np.ndarray]:
        """The next global weights from the current ones and the hospitals' weighted mean."""
        self.before = self.m
        previous = self.m or [np.zeros_like(w, np.float64) for w in current]
        self.m, out = [], []
        for i, (w, avg) in enumerate(zip(current, mean)):
            self.m.append(self.beta * previous[i] + (avg - w) if self.trainable[i] else previous[i])
            out.append(w + (1 - self.beta) * self.m[i] if self.trainable[i] else avg)
        return out
