"""The global models in the run folder: model_last.keras every round, model_best.keras whenever the round is the best
so far by the selection criterion (server/selection.py)."""

from __future__ import annotations

from pathlib import Path

import keras

from common.atomic import write_atomic
from server.rounds import Recorder, RoundReport


def save_model(model: keras.Model, path: Path) -> None:
    """Save a model's architecture and weights so that a plain keras.models.load_model opens it (no training state, no
    custom loss to import); written beside and renamed, never left half-written."""
    plain = keras.Model(model.inputs, model.outputs, name=model.name)  # the same layers, uncompiled: no loss, no Adam state
    write_atomic(path, plain.save)


class ModelsRecorder(Recorder):
    """Writes model_last.keras and model_best.keras."""

    def __init__(self, folder: Path) -> None:
        """Models go into the run folder."""
        self.folder = folder

    def record(self, report: RoundReport) -> None:
        """The last model always (after a trained round), the best one when this round is the best."""
        if report.round == 0:
            return
        save_model(report.model, self.folder / "model_last.keras")
        if report.best:
            save_model(report.model, self.folder / "model_best.keras")
