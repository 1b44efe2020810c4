"""Secure aggregation through the round engine, in process: the same learning as without it (within the stated
bound), dropouts at every stage, aborts and retries, no retry after an unmask, resume from the journal, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune import config
from fedtune.algorithms.api import TRAIN_FIELDS, Instruction, InstructionRejected, validate_instruction
from fedtune.config import ConfigError
from fedtune.run import checkpoint
from fedtune.run.assemble import in_process, simulate
from fedtune.run.engine import RoundAborted

FAST = {"model.name": "tiny", "federation.num_clients": 4, "train.local_steps": 3, "train.lr": 5e-3,
        "data.max_train_per_client": 40, "data.max_seq_len": 48, "run.rounds": 2, "federation.workers": 1}


def _cfg(tmp_path, name, algorithm="fedavg", secagg=True, **kw):
    over = {**FAST, "run.algorithm": algorithm, "run.out": str(tmp_path / name), **kw}
    if secagg:
        over["secagg.enabled"] = True
    return config.load(None, over)


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _state(out):
    return checkpoint.latest(out / "checkpoints").state


def _dropping(drop):
    """A transport factory whose protocol loses clients: drop(plan) → {stage: clients}."""
    def make(run):
        t = in_process(run, progress=False)
        t.secagg_drop = drop
        return t
    return make


@pytest.mark.parametrize(("algorithm", "extra"), [
    ("fedavg", {}), ("fedavg", {"fedavg.uniform": True}), ("fedsb", {}), ("fedkseed", {}),
    ("fedkseed", {"fedkseed.seed_sampling": "pro", "fedkseed.num_seeds": 64}),
    ("fedavg", {"secagg.bits": 32}),
])
def test_secure_run_equals_plain_run_within_the_bound(tmp_path, algorithm, extra):
    """Same seeds with and without [secagg]: every global tensor after round 1 within the reported bound (plus one
    float32 rounding of the state), and the same losses. (Later rounds train from globals that may differ in the last
    bit; tests/secagg/test_secure_grpc.py compares 2-round learning curves.)"""
    plain_extra = {k: v for k, v in extra.items() if not k.startswith("secagg")}
    one = {"run.rounds": 1}
    simulate(_cfg(tmp_path, "sec", algorithm, **extra, **one), progress=False)
    simulate(_cfg(tmp_path, "plain", algorithm, secagg=False, **plain_extra, **one), progress=False)
    (r0s, r1s), (r0p, r1p) = _rows(tmp_path / "sec"), _rows(tmp_path / "plain")
    bound = r1s["secagg_err_bound"]
    assert (r1s["secagg_clients"], r1s["secagg_dropped"]) == (4, 0)
    assert 0 < bound < (1e-5 if extra.get("secagg.bits") == 32 else 1e-10)
    a, b = _state(tmp_path / "sec").tensors, _state(tmp_path / "plain").tensors
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            scale = float(b[k].abs().max()) if b[k].numel() else 0.0
            # |err| ≤ bound per coordinate of the mean (FedKSeed: of H, then × η ≤ 1), then one float32 rounding
            tol = bound + scale * 2.0**-23 + 1e-30
            assert torch.allclose(a[k].double(), b[k].double(), atol=tol, rtol=0), (k, float((a[k] - b[k]).abs().max()))
        else:
            assert torch.equal(a[k], b[k]), k
    assert r1s["test_loss"] == pytest.approx(r1p["test_loss"], abs=1e-5) and r0s["test_loss"] == r0p["test_loss"]


@pytest.mark.parametrize("stage", ["advertise", "share_keys", "masked_input", "unmask"])
def test_a_client_lost_at_any_stage_is_survived(tmp_path, stage):
    """5 clients, client-3 vanishes at `stage` in round 1: the round commits; before masking it is simply left
    out, after it its masks are removed (masked_input) or its vector is summed (unmask: it sent it)."""
    drop = _dropping(lambda plan: {stage: {"client-3"}} if plan.round == 1 else {})
    simulate(_cfg(tmp_path, "d", **{"federation.num_clients": 5}), progress=False, transport_factory=drop)
    r1, r2 = _rows(tmp_path / "d")[1:]
    summed = 5 if stage == "unmask" else 4
    assert (r1["secagg_clients"], r1["clients_completed"]) == (summed, summed)
    assert r1["secagg_dropped"] == 5 - summed and r2["secagg_clients"] == 5


def test_below_threshold_aborts_the_attempt_and_retries_with_fresh_keys(tmp_path):
    """Attempt 0 of round 1 loses 2 of 4 clients after sharing keys (3 needed): aborted, nothing written; attempt 1
    succeeds. Every attempt losing them: the round fails and no checkpoint of it exists."""
    seen = []

    def drop(plan):
        seen.append((plan.round, plan.secagg.attempt))
        return {"masked_input": {"client-0", "client-1"}} if plan.secagg.attempt == 0 else {}

    simulate(_cfg(tmp_path, "retry"), progress=False, transport_factory=_dropping(drop))
    assert seen == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [r["secagg_clients"] for r in _rows(tmp_path / "retry")[1:]] == [4, 4]
    cfg = _cfg(tmp_path, "fail", **{"federation.max_round_retries": 1})
    with pytest.raises(RoundAborted, match="2 secure aggregation attempts"):
        simulate(cfg, progress=False, transport_factory=_dropping(lambda p: {"masked_input": {"client-0", "client-1"}}))
    assert checkpoint.latest(tmp_path / "fail" / "checkpoints") is None


def test_no_retry_after_an_unmask_and_resume_sums_the_same_clients(tmp_path):
    """Two of 4 clients vanish during the unmask: the secrets cannot be rebuilt (t = 3) after the unmask went out, so
    the run stops instead of retrying over another set; the journal pins the survivors, and --resume sums exactly
    them again."""
    cfg = _cfg(tmp_path, "u")
    with pytest.raises(RoundAborted, match="after its unmask"):
        simulate(cfg, progress=False, transport_factory=_dropping(lambda p: {"unmask": {"client-0", "client-1"}}))
    rec = json.loads((tmp_path / "u" / "secagg" / "r0001.json").read_text())
    assert rec["survivors"] == ["client-0", "client-1", "client-2", "client-3"] and rec["attempt"] == 0
    attempts = []

    def record(plan):
        attempts.append((plan.round, plan.secagg.attempt, sorted(plan.instructions), plan.secagg_require))
        return {}

    simulate(_cfg(tmp_path, "u"), resume=True, progress=False, transport_factory=_dropping(record))
    assert attempts[0][:2] == (1, 1) and attempts[0][3] == frozenset(rec["survivors"])
    assert [r["round"] for r in _rows(tmp_path / "u")] == [0, 1, 2]
    assert not list((tmp_path / "u" / "secagg").glob("r*"))  # the journal is cleared once a round is checkpointed


def test_a_resume_finishes_from_the_journaled_sum(tmp_path, crash_at_checkpoint):
    """The coordinator stops after decoding round 2's sum but before its checkpoint: --resume applies the journaled
    sum (no new protocol run) and round 2's state is round 1's plus exactly that mean change."""
    undo = crash_at_checkpoint(2)
    with pytest.raises(KeyboardInterrupt):
        simulate(_cfg(tmp_path, "j"), progress=False)
    undo()
    from safetensors.torch import load_file

    parts = load_file(str(tmp_path / "j" / "secagg" / "r0002.safetensors"))
    before = _state(tmp_path / "j").tensors
    ran = []
    simulate(_cfg(tmp_path, "j"), resume=True, progress=False, transport_factory=_dropping(lambda p: ran.append(p)))
    assert ran == []  # finished from the journal
    after = _state(tmp_path / "j").tensors
    for k, mean in parts.items():
        assert torch.equal(after[k], (before[k].double() + mean).to(before[k].dtype)), k


@pytest.mark.parametrize("algorithm", ["fedavg", "fedsb"])
def test_client_level_dp_under_secure_aggregation_equals_it_without(tmp_path, algorithm):
    """[privacy] mode = "client" with [secagg]: clients clip their change to L2 ≤ C, the coordinator noises the
    decoded sum with the same seeded stream: the same global state (within the bound) and the same ε as the
    coordinator-side clipping of plain client-level DP."""
    dp = {"privacy.mode": "client", "privacy.noise_multiplier": 0.5, "privacy.clip_norm": 0.05, "run.rounds": 1}
    simulate(_cfg(tmp_path, "sec", algorithm, **dp), progress=False)
    simulate(_cfg(tmp_path, "plain", algorithm, secagg=False, **dp), progress=False)
    (_, rs), (_, rp) = _rows(tmp_path / "sec"), _rows(tmp_path / "plain")
    assert rs["epsilon"] == rp["epsilon"] > 0 and rs["secagg_clients"] == 4
    a, b = _state(tmp_path / "sec").tensors, _state(tmp_path / "plain").tensors
    for k in a:
        tol = rs["secagg_err_bound"] / 4 + float(b[k].abs().max()) * 2.0**-23  # Σ error n/s, divided by m = 4
        assert torch.allclose(a[k].double(), b[k].double(), atol=tol, rtol=0), k
    if algorithm == "fedsb":  # the frozen shared factors are neither noised nor changed (plain DP noised them once)
        assert all(torch.equal(a[k], b[k]) for k in a if k.endswith((".A", ".B")))


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="flora.*side by side.*fedavg"):
        _cfg(tmp_path, "x", "flora")
    with pytest.raises(ConfigError, match="\\[secagg\\] and \\[robust\\]"):
        _cfg(tmp_path, "x", **{"robust.norm_bound": 1.0})
    with pytest.raises(ConfigError, match="min_survivors = 3"):
        _cfg(tmp_path, "x", **{"federation.num_clients": 2})
    with pytest.raises(ConfigError, match="bits"):
        _cfg(tmp_path, "x", **{"secagg.bits": 16})


def test_a_client_that_predates_secagg_refuses_the_task():
    """Tasks carry train["secagg"]: a client whose TRAIN_FIELDS lack it refuses instead of sending plaintext."""
    ins = Instruction(1, "c", 0, {"steps": 1, "secagg": {}})
    validate_instruction(ins, TRAIN_FIELDS)
    old = {k: v for k, v in TRAIN_FIELDS.items() if k != "secagg"}
    with pytest.raises(InstructionRejected, match="unknown keys"):
        validate_instruction(ins, old)
