"""The run folder's status.json as the run goes: running from the start, the last round written after each round,
finished or failed (with the reason) at the end (server/run_folder.py reads and writes it)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from server.rounds import Outcome, Recorder, RoundReport, RunInfo
from server.run_folder import RUNNING, read_status, write_status


class StatusRecorder(Recorder):
    """Keeps status.json up to date."""

    def __init__(self, folder: Path) -> None:
        """The status lives in the run folder."""
        self.folder = folder

    def start(self, run: RunInfo) -> None:
        """The run is running: from the start, or again after its checkpointed round (counted in 'resumes')."""
        if run.resumed is not None:
            resumes = int((read_status(self.folder) or {}).get("resumes", 0)) + 1
            write_status(self.folder, status=RUNNING, reason="", last_round=run.resumed, resumed_after=run.resumed, resumes=resumes)
            return
        write_status(
            self.folder, status=RUNNING, reason="", last_round=-1, num_rounds=run.cfg.num_server_rounds, best_round=None,
            run_name=self.folder.name, started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )  # fmt: skip

    def record(self, report: RoundReport) -> None:
        """Every file of this round is written (the recorders before this one)."""
        fields = {"last_round": report.round} | ({"best_round": report.round} if report.best else {})
        write_status(self.folder, **fields)

    def finish(self, outcome: Outcome) -> None:
        """How the run ended."""
        write_status(self.folder, status=outcome.status, reason=outcome.reason, last_round=outcome.last_round, best_round=outcome.best_round)
