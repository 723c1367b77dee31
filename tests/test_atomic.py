"""Files that survive a crash: a process killed while it rewrites a table leaves the old table or the new one, never
half of one and never an empty file; the same kill on a plain write shows what that guards against."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from common.atomic import append_line, write_text

ROWS = 150_000
WRITER = """
import sys, numpy as np, pandas as pd
sys.path.insert(0, {project!r})
from common.atomic import write_csv
table = pd.DataFrame({{"round": np.arange({rows}), "auc": np.linspace(0, 1, {rows})}})
path = {path!r}
write = (lambda: write_csv(path, table)) if {atomic} else (lambda: table.to_csv(path, index=False))
write()
print("ready", flush=True)  # a whole table is there: every kill from now on lands during a rewrite
while True:
    write()
"""


def _kill_while_writing(path: Path, atomic: bool, tries: int) -> list[int]:
    """Start a writer rewriting the table over and over, kill it at a random moment, and count the rows left, per try."""
    project = str(Path(__file__).resolve().parent.parent)
    rows = []
    for _ in range(tries):
        path.unlink(missing_ok=True)
        writer = subprocess.Popen([sys.executable, "-c", WRITER.format(project=project, rows=ROWS, path=str(path), atomic=atomic)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(random.uniform(0.3, 1.5))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        rows.append(len(pd.read_csv(path)) if path.exists() and path.stat().st_size else 0)
    return rows


def test_a_table_killed_while_being_rewritten_is_whole(tmp_path):
    random.seed(7)
    rows = _kill_while_writing(tmp_path / "history.csv", atomic=True, tries=15)
    assert rows == [ROWS] * 15
    assert all(p.name.startswith(".history.partial-") for p in tmp_path.iterdir() if p.name != "history.csv")  # a kill may leave its hidden draft


def test_the_same_kill_on_a_plain_write_leaves_a_broken_table(tmp_path):
    random.seed(7)
    rows = _kill_while_writing(tmp_path / "history.csv", atomic=False, tries=5)
    assert any(n < ROWS for n in rows)  # empty or cut short: what the atomic write prevents


def test_appending_a_line_keeps_every_line_before_it(tmp_path):
    path = tmp_path / "audit.jsonl"
    for i in range(3):
        append_line(path, f'{{"n": {i}}}')
    write_text(tmp_path / "x.txt", "partial line without newline")
    append_line(tmp_path / "x.txt", "next")
    assert path.read_text().splitlines() == ['{"n": 0}', '{"n": 1}', '{"n": 2}']
    assert (tmp_path / "x.txt").read_text() == "partial line without newline\nnext\n"
