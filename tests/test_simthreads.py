"""Simulation worker threads: a round's clients trained in parallel threads, each on its own fork of the
shared model, give bit-identical results to training them one by one."""

import logging

import pytest
import torch

from fedtune import config
from fedtune.run import checkpoint
from fedtune.run.assemble import simulate
from fedtune.transports.inprocess import plan_workers

FAST = {"model.name": "tiny", "federation.num_clients": 4, "train.local_steps": 3, "train.lr": 5e-3,
        "data.max_train_per_client": 32, "data.max_seq_len": 48, "run.rounds": 2}
METHODS = {
    "fedavg": {},
    "fedsb": {},
    "flora": {"flora.ranks": [4, 2, 4, 1]},  # heterogeneous ranks: forks grow adapters of their own
    "fedkseed": {"fedkseed.trainable": "lora", "train.local_steps": 6},
}


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(tmp_path, name, algorithm, **kw):
    cfg = config.load(None, {**FAST, **METHODS[algorithm], "run.algorithm": algorithm,
                             "run.out": str(tmp_path / name), **kw})
    simulate(cfg, progress=False)
    return checkpoint.latest(tmp_path / name / "checkpoints").state


def _rows(path):
    import json

    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", list(METHODS))
def test_threaded_equals_one_by_one(tmp_path, algorithm, keep_threads, caplog):
    caplog.set_level(logging.INFO, logger="fedtune")
    seq = _run(tmp_path, "seq", algorithm, **{"run.threads": 1, "federation.workers": 1})
    assert "on 2 worker threads" not in caplog.text
    thr = _run(tmp_path, "thr", algorithm, **{"run.threads": 1, "federation.workers": 2})
    assert "round 1: clients on 2 worker threads" in caplog.text
    assert seq.version == thr.version == 2 and seq.tensors.keys() == thr.tensors.keys()
    for k in seq.tensors:
        assert torch.equal(seq.tensors[k], thr.tensors[k]), k
    assert _rows(tmp_path / "seq") == _rows(tmp_path / "thr")  # same losses, bytes, everything but wall time


def test_plan_workers():
    """(workers, torch threads each) from ([federation] workers, torch threads, CPUs); 0 = one per CPU."""
    assert plan_workers(0, 2, 2) == (2, 1) and plan_workers(0, 1, 2) == (2, 1) and plan_workers(0, 8, 4) == (4, 2)
    assert plan_workers(0, 4, 1) == (1, 4) and plan_workers(1, 4, 8) == (1, 4) and plan_workers(4, 2, 2) == (4, 1)


def test_threaded_batched_groups_match_one_by_one(tmp_path, keep_threads, caplog):
    """batch_clients with 2 workers: each thread batches its group of 2 clients; equal up to float rounding."""
    caplog.set_level(logging.INFO, logger="fedtune")
    seq = _run(tmp_path, "seq", "fedavg", **{"run.threads": 1, "federation.workers": 1})
    bat = _run(tmp_path, "bat", "fedavg", **{"run.threads": 1, "federation.workers": 2,
                                              "federation.batch_clients": True})
    assert "round 1: clients on 2 worker threads" in caplog.text and "batched loop per thread" in caplog.text
    assert max((seq.tensors[k] - bat.tensors[k]).abs().max().item() for k in seq.tensors) <= 1e-4
    assert any(not torch.equal(seq.tensors[k], bat.tensors[k]) for k in seq.tensors)  # really the batched path


def test_full_parameter_fedkseed_falls_back_to_one_by_one(tmp_path, keep_threads, caplog):
    caplog.set_level(logging.INFO, logger="fedtune")
    _run(tmp_path, "full", "fedkseed", **{"fedkseed.trainable": "full", "federation.workers": 2, "run.rounds": 1})
    assert "one by one (FedKSeedClient cannot train clients on forks of the model)" in caplog.text
