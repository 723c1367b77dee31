"""The recorders a run's rounds go to, in order (server/rounds.py is the seam): models, plots, Grad-CAM pictures,
tables, status, progress line. Each is a module of its own with its own tests."""

from __future__ import annotations

from pathlib import Path

from server.recorders.gradcam import GradcamRecorder
from server.recorders.models import ModelsRecorder
from server.recorders.plots import PlotsRecorder
from server.recorders.progress import ProgressRecorder
from server.recorders.status import StatusRecorder
from server.recorders.tables import TablesRecorder
from server.rounds import Recorder


def default_recorders(folder: Path) -> list[Recorder]:
    """The recorders every run has, in the order they see each round: files first, then the status that says they
    are complete, then the console."""
    return [ModelsRecorder(folder), PlotsRecorder(folder), GradcamRecorder(folder), TablesRecorder(folder), StatusRecorder(folder), ProgressRecorder()]
