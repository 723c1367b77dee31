"""Make tests/attack_app a Flower app folder: its code, and fedimaging's run settings with the attack's beside them
(Flower takes only run settings an app declares). Used by tests/test_defences.py and benchmarks/robustness.py."""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent
sys.path.insert(0, str(PROJECT))

from common.config import toml_lines  # noqa: E402 - the project's root, whichever folder this is imported from


def make_attack_app(folder: Path) -> Path:
    """Write the attack app into folder (made here); returns it."""
    shutil.copytree(HERE / "attack_app", folder / "attack_app")
    settings = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "attack-app"\nversion = "0.0.1"\ndependencies = ["flwr==1.42.*"]\n\n'
        '[tool.setuptools]\npackages = ["attack_app"]\n\n[tool.flwr.app]\npublisher = "tests"\n\n'
        '[tool.flwr.app.components]\nserverapp = "attack_app.server_app:app"\nclientapp = "attack_app.client_app:app"\n\n'
        f'[tool.flwr.app.config]\n{toml_lines(settings)}attack-hospital = -1\nattack-plan = "none"\n'
    )
    return folder
