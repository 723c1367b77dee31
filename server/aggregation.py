"""The next global model from the hospitals' weights: FedAvg's example-weighted mean, or FedAdam's step along it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def weighted_mean(updates: list[list[np.ndarray]], counts: list[int]) -> list[np.ndarray]:
    """Each weight array averaged over the hospitals, weighted by their training images (FedAvg), in float64."""
    total = float(sum(counts))
    return [sum(update[i].astype(np.float64) * (n / total) for update, n in zip(updates, counts)) for i in range(len(updates[0]))]


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

    def step(self, current: list[np.ndarray], mean: list[np.ndarray]) -> list[np.ndarray]:
        """The next global weights from the current ones and the hospitals' weighted mean."""
        if not self.m:
            self.m = [np.zeros_like(w, np.float64) for w in current]
            self.v = [np.full_like(w, self.tau**2, np.float64) for w in current]
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
