"""The ServerApp: read the run settings, then run the federation (server/federation.py)."""

from __future__ import annotations

import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import parse_run_config
from common.runtime import configure_tensorflow
from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation as the run settings say."""
    cfg = parse_run_config(dict(context.run_config))
    configure_tensorflow(os.cpu_count() or 1)
    run_federation(grid, cfg)
