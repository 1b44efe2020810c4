"""The edge client against a hostile (or buggy) coordinator, over real gRPC on 127.0.0.1: a task whose train
config or payload is absurd is refused before anything is allocated or trained — `Refused`, one line naming the
field (`fedtune client` prints it and exits 3, no traceback) — and nothing is pushed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
from test_grpc import IDS, TOKENS, agent, write_run

from fedtune import config
from fedtune.algorithms import get_algorithm
from fedtune.algorithms.api import Instruction, Payload
from fedtune.models import load_model
from fedtune.transports import wire
from fedtune.transports.grpc.agent import Refused
from fedtune.transports.grpc.security import TokenAuthInterceptor

ROOT = Path(__file__).resolve().parents[1]


class HostileCoordinator(wire.CoordinatorServicer):
    """Accepts every Join, hands out `self.task` (an Instruction, a float: WAIT that long, or a status code: fail
    with it) on every PullTask, records pushes."""

    def __init__(self) -> None:
        self.task: Instruction | None = None
        self.pushed = 0

    def Join(self, request, context):
        return wire.to_proto(wire.JoinReply(True, "", request.base_fingerprint, "evil", "fedavg", 5.0))

    def PullTask(self, request, context):
        if isinstance(self.task, grpc.StatusCode):
            context.abort(self.task, "no\nsuch luck")
        if isinstance(self.task, float):  # WAIT this long
            yield from wire.wait_chunks(self.task, "later")
            return
        yield from wire.instruction_to_wire(self.task, "t" * 32)

    def PushUpdate(self, request_iterator, context):
        self.pushed += 1
        return wire.to_proto(wire.PushReply(True))

    def Heartbeat(self, request, context):
        return wire.to_proto(wire.HeartbeatReply(True, 5.0))


@pytest.fixture(scope="module")
def coordinator():
    servicer = HostileCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[TokenAuthInterceptor(TOKENS)],
                         options=wire.channel_options())
    wire.add_servicer(server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def honest_task(algorithm: str, cfg) -> Instruction:
    """Round 1 of `algorithm` as an honest coordinator builds it (setup + full sync) for client-0."""
    algo = get_algorithm(algorithm, cfg.algorithm_config() if cfg.run.algorithm == algorithm else None)
    state = algo.initialize(load_model("tiny", seed=0)[0], seed=0)
    train = algo.configure_round(1, state, [IDS[0]], {"steps": 1, "batch_size": 4, "grad_accum": 1, "lr": 5e-3,
                                                       "weight_decay": 0.0, "max_grad_norm": 1.0}, IDS)[IDS[0]]
    return Instruction(1, IDS[0], state.version, dict(train, seed=7), algo.sync_payload(state, -1),
                       algo.setup_payload(state))


def _mutate(ins: Instruction, *, train=None, meta=None, sync=None) -> Instruction:
    setup = Payload(ins.setup.tensors, {**ins.setup.meta, **(meta or {})})
    return Instruction(ins.round, ins.client_id, ins.base_version, {**ins.train, **(train or {})},
                       Payload({**ins.sync.tensors, **(sync or {})}, ins.sync.meta), setup)


A0 = "model.layers.0.self_attn.q_proj.A"  # a fedavg adapter tensor of the tiny model (8 × 64)
CASES = {  # id: (mutation, what the refusal says)
    "rank_1e6": ({"meta": {"rank": 10**6}}, "setup.rank = '1000000' is not an integer in [1, 1024]"),
    "steps_1e9": ({"train": {"steps": 10**9}}, "train.steps = '1000000000' is not an integer in [1, 100000]"),
    "batch_size_0": ({"train": {"batch_size": 0}}, "train.batch_size = '0' is not an integer in [1, 4096]"),
    "lr_nan": ({"train": {"lr": math.nan}}, "train.lr = 'nan' is not a number in [0, 10]"),
    "negative_seed": ({"train": {"seed": -5}}, "train.seed = '-5' is not an integer in [0, 9223372036854775807]"),
    "float_steps": ({"train": {"steps": 2.5}}, "train.steps = '2.5' is not an integer"),
    "unknown_key": ({"train": {"dp_off": True}}, "train config has unknown keys ['dp_off']"),
    "regex_targets": ({"meta": {"target_modules": ".*"}}, "setup.target_modules = '.*' is not a list of at most 64"),
    "sync_row_broadcast": ({"sync": {A0: torch.zeros(1, 64)}},
                           f"adapter tensor {A0[:-2]}.A is torch.float32 (1, 64), this model's is torch.float32 (8, 64)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_client_refuses_an_absurd_task(tmp_path, coordinator, case):
    servicer, port = coordinator
    cfg_path = write_run(tmp_path, rounds=1)
    a = agent(cfg_path, port, 0)
    assert A0 in honest_task("fedavg", a.cfg).sync.tensors
    mutation, message = CASES[case]
    servicer.task, pushed = _mutate(honest_task("fedavg", a.cfg), **mutation), servicer.pushed
    with pytest.raises(Refused) as e:
        a.run()
    assert "refused the coordinator's task for round 1" in str(e.value) and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and servicer.pushed == pushed
    if case == "rank_1e6":
        assert a.model is None  # refused before peft allocated 10^6-row factors


def _fedsb_rank(ins: Instruction, r: int) -> Instruction:
    """Fed-SB setup whose shared A/B have rank r (each client then allocates an r×r R per module)."""
    t = {k: torch.zeros(r, v.shape[1]) if k.endswith(".A") else torch.zeros(v.shape[0], r)
         for k, v in ins.setup.tensors.items()}
    return Instruction(ins.round, ins.client_id, ins.base_version, ins.train, ins.sync, Payload(t, ins.setup.meta))


@pytest.mark.parametrize("algorithm, mutate, message", [
    ("fedavg", lambda ins: dataclasses.replace(ins, client_id="client-1"), "the task is for 'client-1', not this client"),
    ("fedsb", lambda ins: _fedsb_rank(ins, 2000), "fedsb setup payload: A factors of ranks [2000]; expected one rank"),
    ("flora", lambda ins: _mutate(ins, train={"rank": 5000}), "train.rank = '5000' is not an integer in [1, 1024]"),
    ("fedkseed", lambda ins: _mutate(ins, train={"eps": 0.0}), "train.eps = '0.0' is not a number in (0, 1]"),
    ("fedkseed", lambda ins: _mutate(ins, train={"seed_sampling": "all"}),
     "train.seed_sampling = 'all' is not one of ['uniform', 'pro']"),
])
def test_method_specific_fields_are_bounded(tmp_path, coordinator, algorithm, mutate, message):
    servicer, port = coordinator
    a = agent(write_run(tmp_path, rounds=1, algorithm=algorithm), port, 0)
    servicer.task = mutate(honest_task(algorithm, a.cfg))
    with pytest.raises(Refused, match=message.replace("[", "\\[").replace("(", "\\(").replace("]", "\\]")):
        a.run()


def test_an_honest_task_still_trains(tmp_path, coordinator):
    """The checks refuse nothing a real coordinator sends: every key of every method's train config passes, and
    every key a method declares is one its coordinator sends."""
    from fedtune.algorithms import available, method
    from fedtune.algorithms.api import TRAIN_FIELDS, validate_instruction

    for algorithm in available():
        cfg = config.load(write_run(tmp_path, rounds=1, algorithm=algorithm))
        ins = honest_task(algorithm, cfg)
        validate_instruction(ins, method(algorithm).accepts())
        assert set(ins.train) == set(TRAIN_FIELDS) - {"privacy", "secagg"} | set(method(algorithm).train_fields), algorithm
    servicer, port = coordinator
    a = agent(write_run(tmp_path, rounds=1), port, 0)
    servicer.task, pushed = honest_task("fedavg", a.cfg), servicer.pushed
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = wire.CoordinatorStub(channel)
        a.join(stub)
        assert a.step(stub) is True and a.version == 0  # set up, synced, trained
    assert servicer.pushed == pushed + 1


def test_fedtune_client_prints_one_line_and_exits_3(tmp_path, coordinator):
    servicer, port = coordinator
    cfg_path = write_run(tmp_path, rounds=1)
    servicer.task = _mutate(honest_task("fedavg", config.load(cfg_path)), train={"batch_size": 0})
    env = dict(os.environ, FEDTUNE_TOKEN=TOKENS[IDS[0]], PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "fedtune.cli", "client", "--config", str(cfg_path), "--server",
                        f"127.0.0.1:{port}", "--client-id", IDS[0], "--partition", "0", "--insecure"],
                       check=False, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert "error: refused the coordinator's task for round 1: \"train.batch_size = '0' is not an integer in [1, 4096]\"" in p.stderr


def test_the_coordinator_cannot_switch_off_a_clients_sample_level_dp(tmp_path, coordinator):
    """Sample-level DP protects a client's examples against the server too: a client whose own config says
    [privacy] mode = "sample" refuses a task without it (before: it trained without DP and uploaded the update)
    or with a weaker setting; the exact [privacy] of its config (plus the planned rounds) is accepted."""
    servicer, port = coordinator
    cfg_path = write_run(tmp_path, rounds=1, extra='[privacy]\nmode = "sample"\nnoise_multiplier = 1.0\n')
    a = agent(cfg_path, port, 0)
    own = a.cfg.privacy_config().to_dict()
    honest = honest_task("fedavg", a.cfg)
    for privacy, shown in [(None, "the task has no sample-level DP"),
                           ({**own, "noise_multiplier": 0.01}, "the task differs in noise_multiplier = 0.01 (own 1.0)")]:
        servicer.task, pushed = honest if privacy is None else _mutate(honest, train={"privacy": privacy}), servicer.pushed
        a.stop.clear()
        with pytest.raises(Refused, match="this client trains only under its own \\[privacy\\]") as e:
            a.run()
        assert shown in str(e.value) and servicer.pushed == pushed
    from fedtune.run.assemble import train_config

    a._check_privacy(json.loads(json.dumps(train_config(a.cfg))))  # what a server with this config sends: accepted


def test_a_wait_of_1e9_seconds_does_not_park_the_client(tmp_path, coordinator, monkeypatch):
    """PullTask answered WAIT retry_after_s = 1e9 (finite, so the wire accepts it): the client polls again after
    at most MAX_WAIT_S (made 0.2 s here) instead of sleeping for 31 years."""
    import time

    from fedtune.transports.grpc import agent as agent_mod

    monkeypatch.setattr(agent_mod, "MAX_WAIT_S", 0.2)
    servicer, port = coordinator
    a = agent(write_run(tmp_path, rounds=1), port, 0)
    monkeypatch.setattr(servicer, "task", 1e9)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        t0 = time.monotonic()
        assert a.step(wire.CoordinatorStub(channel)) is True
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("override, message", [
    ({"train.local_steps": 100_001}, "train.local_steps must be in [1, 100000], got 100001"),
    ({"train.batch_size": 4097}, "train.batch_size must be in [1, 4096], got 4097"),
    ({"train.grad_accum": 2000}, "train.grad_accum must be in [1, 1024], got 2000"),
    ({"lora.rank": 2000}, "lora rank must be a positive integer, got 2000 (at most 1024"),
    ({"run.algorithm": "flora", "flora.ranks": [4, 1025]}, "flora ranks must be positive integers, got [1025] (at most 1024"),
    ({"run.algorithm": "fedsb", "fedsb.rank": 1025}, "fedsb rank must be a positive integer, got 1025 (at most 1024"),
])
def test_the_run_config_refuses_what_clients_would_refuse(override, message):
    from fedtune.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(None, override).algorithm_config()


def test_an_unexpected_status_from_the_coordinator_is_one_line_not_a_traceback(tmp_path, coordinator, monkeypatch):
    servicer, port = coordinator
    a = agent(write_run(tmp_path, rounds=1), port, 0)
    monkeypatch.setattr(servicer, "task", grpc.StatusCode.OUT_OF_RANGE)
    with pytest.raises(Refused) as e:
        a.run()
    assert str(e.value) == "the coordinator answered OUT_OF_RANGE: 'no\\nsuch luck'"


def test_sync_payloads_that_do_not_fit_the_model_are_refused_before_any_change():
    """FLoRA: a round stack whose B has 1 row (torch would broadcast the 1×d_in ΔW over every row of W); FedKSeed:
    a seed index of -1 (Python would silently replay the last seed) or 10^9, a NaN coefficient. Each is a
    ValueError naming the problem, and the model is unchanged."""
    from fedtune.algorithms.fedkseed.shared import round_key as kseed_key
    from fedtune.algorithms.flora.shared import round_key as flora_key

    cases = []
    flora = get_algorithm("flora")
    state = flora.initialize(load_model("tiny", seed=0)[0], seed=0)
    client = flora.make_client()
    model = client.setup(load_model("tiny", seed=0)[0], flora.setup_payload(state))
    name = min(state.meta["modules"])
    d_out, d_in = state.meta["modules"][name]
    stack = {flora_key(1, f"{n}.A"): torch.ones(4, i) for n, (o, i) in state.meta["modules"].items()}
    stack |= {flora_key(1, f"{n}.B"): torch.ones(o, 4) for n, (o, i) in state.meta["modules"].items()}
    stack[flora_key(1, f"{name}.B")] = torch.ones(1, 4)
    cases.append((client, model, Payload(stack, {"merge_versions": [1]}),
                  f"flora sync: round 1 {name} has A (4, {d_in}), B (1, 4); expected A R×{d_in}, B {d_out}×R"))
    kseed = get_algorithm("fedkseed")
    kstate = kseed.initialize(load_model("tiny", seed=0)[0], seed=0)
    for idx, coeff, message in [([-1], [0.1], "seed indices outside [0, "), ([10**9], [0.1], "seed indices outside"),
                                ([0], [math.nan], "non-finite coefficients")]:
        kc = kseed.make_client()
        km = kc.setup(load_model("tiny", seed=0)[0], kseed.setup_payload(kstate))
        p = {kseed_key(1, "seed_idx"): torch.tensor(idx), kseed_key(1, "coeff"): torch.tensor(coeff)}
        cases.append((kc, km, Payload(p, {"replay_versions": [1]}), message))
    for client, model, payload, message in cases:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=re.escape(message)):
            client.sync(model, payload)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
