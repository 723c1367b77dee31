"""The aggregation server: ServerApp, strategy, held-out checks, run folder, simulation launcher."""
