"""The run layer: assemble a run (model, data, method, engine, transport), drive the round engine, and own the
run directory (record, lock, checkpoints, metrics, exports, evaluation, baselines)."""
