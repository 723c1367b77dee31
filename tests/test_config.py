"""Run settings: defaults agree with pyproject.toml, and every bad input is a one-line error naming the setting."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig, config_to_dict, parse_run_config
from common.errors import ConfigError

PROJECT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_are_exactly_the_dataclass_defaults():
    with open(PROJECT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    defaults = config_to_dict(RunConfig())
    assert set(declared) == set(defaults)
    for key, value in declared.items():
        assert defaults[key] == value, key


def test_a_valid_configuration_parses_and_resolves_paths(tmp_path):
    data = tmp_path / "d.npz"
    data.write_bytes(b"")
    cfg = parse_run_config({"num-server-rounds": 3, "labels": "a, b", "data": "d.npz", "learning-rate": 1}, base_dir=tmp_path)
    assert cfg.num_server_rounds == 3 and cfg.labels == ("a", "b") and cfg.learning_rate == 1.0
    assert cfg.data == str(data) and Path(cfg.output_dir).is_absolute()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num-rounds": 3}, "unknown run setting(s) 'num-rounds'"),
        ({"num-server-rounds": "ten"}, "'num-server-rounds' = 'ten': expected an integer >= 1"),
        ({"num-server-rounds": 2.5}, "'num-server-rounds' = 2.5: expected an integer >= 1"),
        ({"num-server-rounds": True}, "'num-server-rounds' = True"),
        ({"num-server-rounds": -1}, "'num-server-rounds' = -1 is out of range: expected an integer >= 1"),
        ({"dirichlet-alpha": 0}, "'dirichlet-alpha' = 0.0 is out of range: expected a number > 0"),
        ({"model": "resnet"}, "'model' = 'resnet' is out of range: expected one of lightcnn, lightcnn-gn, seedcnn"),
        ({"partition": "random"}, "expected one of iid, dirichlet"),
        ({"threshold": 1.0}, "'threshold' = 1.0 is out of range"),
        ({"labels": "a,a"}, "'labels'"),
        ({"data": "missing.npz"}, "run setting 'data': file not found"),
        ({"data": "images.csv"}, "expected 'synthetic' or a path to an .npz file"),
        ({"initial-weights": "nowhere.keras"}, "run setting 'initial-weights': file not found"),
        ({"initial-weights": "w.pt"}, "expected a .keras or .weights.h5 file"),
        ({"min-hospitals": 5, "num-hospitals": 3}, "'min-hospitals' = 5 exceeds 'num-hospitals' = 3"),
        ({"run-name": "../x"}, "'run-name'"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_setting(tmp_path, settings, message):
    with pytest.raises(ConfigError) as info:
        parse_run_config(settings, base_dir=tmp_path)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_the_readme_documents_every_setting_with_its_default():
    readme = (PROJECT / "README.md").read_text()
    for key, value in config_to_dict(RunConfig()).items():
        default = f"`{value}`" if value != "" else "empty"
        assert f"| `{key}` | {default} |" in readme, key
