"""Module-level app objects for a Flower app's pyproject.toml:

    [tool.flwr.app.components]
    serverapp = "fedtune.flower.app:server_app"
    clientapp = "fedtune.flower.app:client_app"

Both read the fedtune config from the Flower run config (see fedtune/flower/runconfig.py)."""

from fedtune.flower.client import make_client_app
from fedtune.flower.server import make_server_app

server_app = make_server_app()
client_app = make_client_app()
