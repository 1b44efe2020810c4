"""fedtune on Flower: a Flower transport for the RoundEngine (no second round implementation).

  serde.py      TensorDict ⇄ ArrayRecord, Instruction/ClientUpdate ⇄ RecordDict (bit-exact)
  transport.py  FlowerTransport (RoundEngine transport over a Flower Grid), node discovery
  server.py     ServerApp: `simulate()` with the FlowerTransport; summary.json says completed / failed
  client.py     ClientApp: node config (own data, client name, state dir), per-process cache
  nodestate.py  a node's synced model on its own disk (survives the process-per-message ClientApp)
  runconfig.py  fedtune RunConfig from the Flower run config (every key as fedtune.<section>.<key>)
  localdeploy.py  SuperLink + SuperNodes on localhost (tests, benchmark)
  run.py        `fedtune simulate --engine flower` (run_simulation, Ray backend)
  app.py        module-level server_app / client_app for `flwr run` (simulations/flower_app)
"""

from fedtune.flower.run import run_flower_simulation

__all__ = ["run_flower_simulation"]
