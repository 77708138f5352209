"""The ServerApp: FedPAC's server rule, centralised evaluation, checkpoints."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpac_hf.flower import make_server_app

from .task import make_builder

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation that the run config describes."""
    dataset = str(context.run_config.get("dataset", "synthetic"))
    make_server_app(make_builder(dataset))(grid, context)
