"""Module-level app objects for a Flower app's pyproject.toml:

    [tool.flwr.app.components]
    serverapp = "fedtune.flower_app:server_app"
    clientapp = "fedtune.flower_app:client_app"

Both read the fedtune config from the Flower run config (see fedtune/transports/flower/runconfig.py)."""

from fedtune.run.flower import make_server_app
from fedtune.transports.flower.client import make_client_app

server_app = make_server_app()
client_app = make_client_app()
