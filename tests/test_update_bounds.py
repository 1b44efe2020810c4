"""Magnitude bounds on by default: no value of an update may move further than its local training can move it
(api.adam_radius: τ·lr·8 for AdamW, plus weight decay). Honest clients, trained hard, stay inside; huge or scaled
updates are refused with their client named."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune import config
from fedtune.algorithms.api import ADAM_STEP_BOUND, ClientUpdate, UpdateRejected, adam_radius, validate_update
from fedtune.run.assemble import simulate

FAST = {"model.name": "tiny", "federation.num_clients": 3, "data.max_train_per_client": 32, "data.max_seq_len": 48,
        "run.rounds": 2, "federation.max_round_retries": 0}


def test_adam_radius_is_the_worst_case_of_adamw():
    """AdamW from 0 on gradients chosen to push one coordinate as far as possible (a spike after quiet steps, then
    steady sign): it never moves further than adam_radius. The radius is provable, not tight: steady gradients move
    1·lr per step, the bound allows 8 (a spike after quiet steps reaches 3.16 in one step)."""
    worst = 0.0
    for pattern in ("steady", "spike", "alternate-then-steady", "decaying"):
        p = torch.zeros(1, requires_grad=True)
        opt = torch.optim.AdamW([p], lr=0.01, weight_decay=0.0)
        for t in range(50):
            g = {"steady": 1.0, "spike": 1e-8 if t < 49 else 1.0,
                 "alternate-then-steady": (-1.0) ** t if t < 25 else 1.0, "decaying": 0.9**t}[pattern]
            p.grad = torch.tensor([g])
            opt.step()
        worst = max(worst, abs(float(p.detach())))
    radius = adam_radius({"steps": 50, "lr": 0.01}, 0.0)
    assert 0.45 < worst <= radius <= 10 * worst and radius == 50 * 0.01 * ADAM_STEP_BOUND


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "fedsb", "flora"])
def test_honest_clients_trained_hard_are_never_refused(tmp_path, algorithm):
    """lr 0.05, weight decay 0.1, 12 steps: far more than any sane run; every update is accepted."""
    cfg = config.load(None, {**FAST, "run.algorithm": algorithm, "train.lr": 0.05, "train.weight_decay": 0.1,
                             "train.local_steps": 12, "run.out": str(tmp_path / "r")})
    simulate(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["updates_rejected"] for r in rows] == [0, 0] and all(r["clients_completed"] == 3 for r in rows)


def test_a_huge_update_names_its_client_and_the_bound():
    g = torch.zeros(4, 4)
    from fedtune.algorithms.api import TensorSpec, UpdateSpec

    spec = UpdateSpec({"w": TensorSpec((4, 4), torch.float32, near=g, radius=adam_radius({"steps": 4, "lr": 1e-3}, 0))})
    ok = g.clone()
    ok[0, 0] = 0.03
    validate_update(spec, ClientUpdate("org-a", 3, {"w": ok}))
    for big in (0.033, 1e19, 3e38):
        bad = g.clone()
        bad[1, 2] = big
        with pytest.raises(UpdateRejected, match="org-a.*moves .* from the global model.*no value more than 0.032"):
            validate_update(spec, ClientUpdate("org-a", 3, {"w": bad}))
