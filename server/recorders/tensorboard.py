"""TensorBoard event files in the run folder's tensorboard/: each round's pooled, held-out, Grad-CAM, privacy and
per-hospital figures as scalars (step = round), and the round's report picture and Grad-CAM grid as images, so that
`tensorboard --logdir runs/` shows every run. Reads what the recorders before it wrote (the pictures)."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from server.recorders.scalars import scalars
from server.rounds import Outcome, Recorder, RoundReport, RunInfo

FOLDER = "tensorboard"
class TensorBoardRecorder(Recorder):
    """Writes the run's TensorBoard event files."""

    def __init__(self, folder: Path) -> None:
        """Event files go into the run folder's tensorboard/."""
        self.folder = folder
        self.writer = None

    def start(self, run: RunInfo) -> None:
        """Open the event file (a resumed run adds one; TensorBoard shows the later value of a round written twice)."""
        self.writer = tf.summary.create_file_writer(str(self.folder / FOLDER))

    def record(self, report: RoundReport) -> None:
        """The round's scalars and pictures."""
        pictures = {"report": self.folder / "plots" / f"round_{report.round:03d}.png", "gradcam": self.folder / "gradcam" / f"round_{report.round:03d}" / "grid.png"}
        with self.writer.as_default(step=report.round):
            for name, value in scalars(report.row(), report.site_rows()).items():
                tf.summary.scalar(name, value)
            for name, path in pictures.items():
                if path.is_file():
                    image = tf.image.decode_png(path.read_bytes(), channels=3)  # (h, w, 3)
                    tf.summary.image(f"pictures/{name}", image[None], description=path.relative_to(self.folder).as_posix())
        self.writer.flush()

    def finish(self, outcome: Outcome) -> None:
        """Close the event file."""
        if self.writer is not None:
            self.writer.close()
