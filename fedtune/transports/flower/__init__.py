"""fedtune on Flower: a Flower transport for the RoundEngine (no second round implementation).

  records.py     TensorDict ⇄ ArrayRecord, Instruction/ClientUpdate ⇄ RecordDict (bit-exact)
  transport.py   FlowerTransport (RoundEngine transport over a Flower Grid), node discovery
  client.py      ClientApp: node config (own data, client name, state dir), per-process cache
  nodestate.py   a node's synced model on its own disk (survives the process-per-message ClientApp)
  runconfig.py   fedtune RunConfig from the Flower run config (every key as fedtune.<section>.<key>)
  options.py     the [flower] section
  localdeploy.py SuperLink + SuperNodes on localhost (tests, benchmark)
The ServerApp and `fedtune simulate --engine flower` assemble a whole run: fedtune.run.flower;
module-level app objects for `flwr run`: fedtune.flower_app.
"""
