"""fedtune on Flower: a Flower transport for the RoundEngine (no second round implementation).

  serde.py      TensorDict ⇄ ArrayRecord, Instruction/ClientUpdate ⇄ RecordDict (bit-exact)
  transport.py  FlowerTransport (RoundEngine transport over a Flower Grid), node discovery
  server.py     ServerApp: `simulate()` with the FlowerTransport
  client.py     ClientApp: per-node model/ClientAlgorithm/version, per-process cache
  run.py        `fedtune simulate --engine flower` (run_simulation, Ray backend)
  app.py        module-level server_app / client_app for `flwr run` (simulations/flower_app)
"""

from fedtune.flower.run import run_flower_simulation

__all__ = ["run_flower_simulation"]
