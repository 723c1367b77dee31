"""Shared fixtures: small run configurations that train in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from common.config import RunConfig, parse_run_config  # noqa: E402


@pytest.fixture
def small_cfg(tmp_path) -> RunConfig:
    """Three hospitals of 40 images at 32x32: big enough for every split, small enough to train in seconds."""
    return parse_run_config(
        {"num-hospitals": 3, "images-per-hospital": 40, "heldout-images": 30, "image-size": 32, "min-histogram-images": 5, "output-dir": str(tmp_path / "runs")}
    )


@pytest.fixture
def task_identity():
    """The identity Flower gives the process a ServerApp runs in, so that messages can be made outside a run."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
