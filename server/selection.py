"""Which global model is the best so far, by a criterion that is defined every round: the pooled validation AUC where
the hospitals' validation images hold both classes, else the pooled validation log loss, else (nobody validated) the
later model. Never the server's held-out set: that one only reports."""

from __future__ import annotations

import math
from dataclasses import dataclass

AUC, LOG_LOSS, LATEST = "pooled validation AUC", "pooled validation log loss", "latest model (no hospital validated)"
_TIER = {LATEST: 0, LOG_LOSS: 1, AUC: 2}  # a round judged by a higher tier beats any round judged by a lower one


@dataclass(frozen=True)
class Selection:
    """A round's standing: the criterion it was judged by and its value there."""

    criterion: str
    value: float

    def key(self) -> tuple[int, float]:
        """Higher is better: the criterion's tier, then the value (log loss counts negated)."""
        return _TIER[self.criterion], -self.value if self.criterion == LOG_LOSS else self.value

    def beats(self, other: Selection | None) -> bool:
        """True when this round is better than the best so far (or there is none yet)."""
        return other is None or self.key() > other.key()

    def describe(self) -> str:
        """'pooled validation AUC 0.912', for the progress line and the history."""
        return self.criterion if self.criterion == LATEST else f"{self.criterion} {self.value:.3f}"


def judge(row: dict, server_round: int) -> Selection:
    """A round's Selection from its history row (global_auc, global_log_loss)."""
    auc, loss = row.get("global_auc", math.nan), row.get("global_log_loss", math.nan)
    if isinstance(auc, float) and not math.isnan(auc):
        return Selection(AUC, auc)
    if isinstance(loss, float) and not math.isnan(loss):
        return Selection(LOG_LOSS, loss)
    return Selection(LATEST, float(server_round))
