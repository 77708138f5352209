"""The ClientApp: FedPAC's client rule on this node's partition."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpac_hf.flower import make_client_app

from .task import make_builder

app = ClientApp()
_apps: dict[str, ClientApp] = {}


def _for(context: Context) -> ClientApp:
    dataset = str(context.run_config.get("dataset", "synthetic"))
    if dataset not in _apps:
        _apps[dataset] = make_client_app(make_builder(dataset))
    return _apps[dataset]


@app.query()
def query(message: Message, context: Context) -> Message:
    """Say which partition this node holds."""
    return _for(context)(message, context)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Run the local steps of this node's client."""
    return _for(context)(message, context)
