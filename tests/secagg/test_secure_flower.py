"""Secure aggregation on Flower: fedtune's own protocol over Flower messages (not Flower's legacy SecAgg+ workflow),
on Flower's simulation engine (Ray) and on a fake grid whose nodes lose their process between messages."""

from __future__ import annotations

import json

import pytest
from test_flower import FakeGrid, flower_task  # noqa: F401 - the fixture

from fedtune import config
from fedtune.run.assemble import simulate

FAST = {"model.name": "tiny", "federation.num_clients": 3, "train.local_steps": 3, "train.lr": 5e-3,
        "data.max_train_per_client": 40, "data.max_seq_len": 48, "run.rounds": 2, "run.algorithm": "fedavg",
        "federation.batch_clients": False, "secagg.enabled": True}


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_flower_simulation_with_secagg_learns_what_the_native_one_learns(tmp_path):
    from fedtune.run.flower import run_flower_simulation

    simulate(config.load(None, {**FAST, "run.out": str(tmp_path / "native")}), progress=False)
    flower = run_flower_simulation(config.load(None, {**FAST, "run.out": str(tmp_path / "flower")}))
    rn, rf = _rows(tmp_path / "native"), _rows(tmp_path / "flower")
    assert [r["secagg_clients"] for r in rf[1:]] == [3, 3] and flower["rounds_completed"] == 2
    for x, y in zip(rn, rf, strict=True):
        assert x["test_loss"] == pytest.approx(y["test_loss"], abs=1e-5)


class SecureGrid(FakeGrid):
    """FakeGrid whose nodes also answer secagg queries, each with its own Flower Context (its state survives between
    messages, the in-memory model cache does not when fresh_process); `lose[stage]`: nodes whose reply to that
    stage of round 1 is an error (the client died there)."""

    def __init__(self, cfg, nodes, *, lose=None, **kw):
        from flwr.app import Context, RecordDict

        super().__init__(cfg, nodes, **kw)
        self.lose = lose or {}
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in nodes}

    def _answer(self, msg):
        from flwr.app import Error, Message

        from fedtune.transports.flower import client as fc

        node, content = msg.metadata.dst_node_id, msg.content
        stage = (str(content.config_records[fc.SECAGG]["stage"]) if fc.SECAGG in content
                 and msg.metadata.message_type == "query" else "train" if fc.SECAGG in content else None)
        if stage is None:
            return super()._answer(msg)
        if msg.metadata.group_id == "1" and node in self.lose.get(stage, ()):
            return Message(error=Error(0, f"node {node} died at {stage}"), reply_to=msg)
        spec, ctx = self.nodes[node], self.contexts[node]
        if self.fresh_process:
            fc._CACHE.nodes.clear()
        try:
            if stage == "train":
                _, mask = fc.secure_update(msg, ctx, spec)
                return fc.handle_train(msg, self.cfg, spec, secure=mask)
            return fc.handle_secagg_query(msg, self.cfg, spec, ctx)
        except ValueError as e:
            return Message(error=Error(0, str(e)), reply_to=msg)


@pytest.mark.parametrize("stage", ["share_keys", "train", "unmask"])
def test_a_node_lost_at_any_stage_is_survived_with_a_process_per_message(tmp_path, flower_task, stage):  # noqa: F811
    """4 nodes; node 103 errors at `stage` of round 1 (before masking: left out; after sharing keys: its masks are
    removed; at the unmask: its vector is summed). Every message is handled by a fresh process."""
    from test_flower import _specs

    from fedtune.run.assemble import simulate as run
    from fedtune.transports.flower.transport import FlowerTransport

    cfg = config.load(None, {**FAST, "federation.num_clients": 4, "federation.min_clients": 3,
                             "run.out": str(tmp_path / "f")})
    specs = _specs(4, state_dir=str(tmp_path / "nodes"))
    grid = SecureGrid(cfg, specs, lose={stage: {103}}, fresh_process=True)
    run(cfg, progress=False, roster=[s.client_id for s in specs.values()],
        transport_factory=lambda r: FlowerTransport(grid, {s.client_id: n for n, s in specs.items()}, poll_s=0.0))
    r1, r2 = _rows(tmp_path / "f")[1:]
    summed = 4 if stage == "unmask" else 3
    assert r1["secagg_clients"] == summed and r2["secagg_clients"] == 4


def test_distributed_dp_on_flower_charges_the_survivors_noise(tmp_path, flower_task):  # noqa: F811
    """[privacy] mode = "distributed" over Flower messages, a process per message: node 103 dies while training in
    round 1, so round 1 sums 3 clients' noise and round 2 four; each round's ε is the Skellam accountant's for the
    noise actually summed (a dropout costs more ε than a full round)."""
    from test_flower import _specs

    from fedtune.privacy.skellam import SkellamAccountant
    from fedtune.run import checkpoint
    from fedtune.run.assemble import simulate as run
    from fedtune.transports.flower.transport import FlowerTransport

    cfg = config.load(None, {**FAST, "federation.num_clients": 4, "federation.min_clients": 3,
                             "run.out": str(tmp_path / "f"), "privacy.mode": "distributed",
                             "privacy.noise_multiplier": 0.8, "privacy.clip_norm": 0.05})
    specs = _specs(4, state_dir=str(tmp_path / "nodes"))
    grid = SecureGrid(cfg, specs, lose={"train": {103}}, fresh_process=True)
    run(cfg, progress=False, roster=[s.client_id for s in specs.values()],
        transport_factory=lambda r: FlowerTransport(grid, {s.client_id: n for n, s in specs.items()}, poll_s=0.0))
    r1, r2 = _rows(tmp_path / "f")[1:]
    plan = checkpoint.latest(tmp_path / "f" / "checkpoints").state.meta["ddp"]
    acc = SkellamAccountant()
    acc.step(1.0, plan["l2_bound"], plan["l1_bound"], 3 * plan["mu"])
    assert r1["secagg_clients"] == 3 and r1["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-12)
    full = acc.epsilon_after(1e-5, 1.0, plan["l2_bound"], plan["l1_bound"], 4 * plan["mu"])
    assert r2["secagg_clients"] == 4 and r2["epsilon"] == pytest.approx(full, rel=1e-12)
    assert r1["epsilon"] > full - r1["epsilon"]  # the 3-survivor round cost more than the full one
