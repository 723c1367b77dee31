"""YAML files people write by hand (site files, the roster), read with one clear error when they cannot be."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import ConfigError


def read_yaml(path: Path, what: str) -> Any:
    """The file's content; ConfigError '<what> <path>: ...' where it cannot be read or is not YAML."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
