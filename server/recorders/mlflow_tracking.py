"""The run recorded to an MLflow tracking location (run setting mlflow-tracking-uri; the mlflow extra): its settings
as parameters, each round's figures as metrics (step = round; the names TensorBoard gets), and at the end the best
model, the tables and the history picture as artifacts, with the run marked finished or failed. A resumed run goes on
in the same MLflow run. An MLflow that cannot be reached mid-run costs its records, never the federation: each miss
is said, and the end says how many."""

from __future__ import annotations

import os
import time
from pathlib import Path

from common.config import config_to_dict, require_mlflow
from server.console import say
from server.recorders.scalars import scalars
from server.rounds import Outcome, Recorder, RoundReport, RunInfo
from server.run_folder import FINISHED

FOLDER_TAG = "fedimaging.run_folder"  # which run folder an MLflow run records: a resumed run finds its own by it
ARTIFACTS = ("model_best.keras", "history.csv", "sites.csv", "history.png", "config.json")
PARAM_LIMIT = 6000  # MLflow's longest parameter value


class MlflowRecorder(Recorder):
    """Records the run in MLflow."""

    def __init__(self, folder: Path, uri: str, experiment: str) -> None:
        """The run folder, the tracking location and the experiment."""
        self.folder, self.uri, self.experiment = folder, uri, experiment
        self.client, self.run_id, self.missed = None, "", 0

    def start(self, run: RunInfo) -> None:
        """Find or make the experiment, and the MLflow run of this run folder (a resumed run's own); log the settings."""
        require_mlflow(run.cfg)
        if self.uri.startswith("file:"):  # MLflow 3.7+ refuses its file store unless told: a file: URI given is that telling
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(self.experiment)
        earlier = self.client.search_runs([experiment], filter_string=f"tags.`{FOLDER_TAG}` = '{self.folder.resolve()}'", max_results=1)
        if run.resumed is not None and earlier:
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        created = self.client.create_run(experiment, run_name=self.folder.name, tags={FOLDER_TAG: str(self.folder.resolve())})
        self.run_id = created.info.run_id
        params = [Param(key, str(value)[:PARAM_LIMIT]) for key, value in config_to_dict(run.cfg).items()]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[first : first + 100])

    def record(self, report: RoundReport) -> None:
        """The round's figures as metrics."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, report.round) for name, value in scalars(report.row(), report.site_rows()).items()]
        try:
            for first in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a call
                self.client.log_batch(self.run_id, metrics=metrics[first : first + 1000])
        except Exception as exc:  # noqa: BLE001 - the federation goes on without MLflow; said, and counted at the end
            self.missed += 1
            say(f"MLflow: round {report.round} not recorded at {self.uri}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def finish(self, outcome: Outcome) -> None:
        """The best model, tables and picture as artifacts; the run marked as it ended."""
        if self.client is None or not self.run_id:
            return
        try:
            for name in ARTIFACTS:
                if (self.folder / name).is_file():
                    self.client.log_artifact(self.run_id, str(self.folder / name))
            self.client.set_tag(self.run_id, "fedimaging.reason", outcome.reason[:PARAM_LIMIT])
            self.client.set_terminated(self.run_id, status="FINISHED" if outcome.status == FINISHED else "FAILED")
        except Exception as exc:  # noqa: BLE001 - as in record
            self.missed += 1
            say(f"MLflow: the run's end not recorded at {self.uri}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if self.missed:
            say(f"MLflow: {self.missed} record(s) missing at {self.uri} (the run folder has everything)")
