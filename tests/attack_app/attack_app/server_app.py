"""fedimaging's own ServerApp, with the attack's run settings taken out of what it reads."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server import app as server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation exactly as fedimaging does."""
    ours = {k: v for k, v in dict(context.run_config).items() if not str(k).startswith("attack-")}
    server.main(grid, Context(context.run_id, context.node_id, dict(context.node_config), context.state, ours))
