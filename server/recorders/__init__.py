"""The recorders a run's rounds go to, in order (server/rounds.py is the seam): models, plots, Grad-CAM pictures,
tables, the trackers (TensorBoard, MLflow where asked for), status, progress line. Each is a module of its own with
its own tests."""

from __future__ import annotations

from pathlib import Path

from common.config import RunConfig
from server.recorders.gradcam import GradcamRecorder
from server.recorders.mlflow_tracking import MlflowRecorder
from server.recorders.models import ModelsRecorder
from server.recorders.plots import PlotsRecorder
from server.recorders.progress import ProgressRecorder
from server.recorders.status import StatusRecorder
from server.recorders.tables import TablesRecorder
from server.recorders.tensorboard import TensorBoardRecorder
from server.rounds import Recorder


def default_recorders(folder: Path, cfg: RunConfig) -> list[Recorder]:
    """The recorders of a run, in the order they see each round: files first, then the trackers that read them, then
    the status that says they are complete, then the console."""
    files = [ModelsRecorder(folder), PlotsRecorder(folder), GradcamRecorder(folder), TablesRecorder(folder)]
    trackers = ([TensorBoardRecorder(folder)] if cfg.tensorboard else []) + (
        [MlflowRecorder(folder, cfg.mlflow_tracking_uri, cfg.mlflow_experiment)] if cfg.mlflow_tracking_uri else []
    )
    return [*files, *trackers, StatusRecorder(folder), ProgressRecorder()]
