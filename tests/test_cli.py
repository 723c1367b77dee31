"""The `fedimaging` console command: its help, each subcommand's own help under its new name, and a wrong command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from common.cli import COMMANDS

FEDIMAGING = str(Path(sys.executable).with_name("fedimaging"))  # installed by `pip install -e .` ([project.scripts])


def test_fedimaging_help_lists_every_command():
    done = subprocess.run([FEDIMAGING, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name, _, _ in COMMANDS:
        assert f"  {name} " in done.stdout, name


def test_each_subcommand_answers_help_under_its_own_name():
    for name, _, _ in COMMANDS:
        done = subprocess.run([FEDIMAGING, name, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (name, done.stderr)
        assert done.stdout.startswith(f"usage: fedimaging {name}"), (name, done.stdout[:200])


def test_an_unknown_command_or_none_is_an_error_that_names_the_commands():
    done = subprocess.run([FEDIMAGING, "simulat"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown command 'simulat'" in done.stderr and "simulate" in done.stderr
    assert subprocess.run([FEDIMAGING], capture_output=True, text=True, timeout=60).returncode == 2


def test_a_subcommand_keeps_its_exit_code_and_messages():
    done = subprocess.run([FEDIMAGING, "simulate", "-c", "num-server-rounds=-1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "'num-server-rounds' = -1 is out of range" in done.stderr


def test_the_name_a_command_was_started_under_is_not_handed_down_to_the_processes_it_starts():
    code = "import os; from common.cli import program; print(program('python -m x'), os.environ.get('FEDIMAGING_PROG'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, "FEDIMAGING_PROG": "fedimaging simulate"})
    assert done.stdout.split() == ["fedimaging", "simulate", "None"], done.stderr
