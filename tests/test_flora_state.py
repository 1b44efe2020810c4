"""FLoRA's state stays bounded: 50 rounds, 20 clients, 2 sampled per round (synthetic client factors, no
training). Checkpoint bytes, the catch-up download of a long-absent client and the export rank stop growing;
every catch-up path is exact against the old per-round replay."""

import numpy as np
import pytest
import torch
from conftest import max_abs

from fedtune.algorithms import ClientUpdate, get_algorithm
from fedtune.algorithms.api import payload_nbytes
from fedtune.algorithms.common.lora import lora_shapes, target_linears
from fedtune.algorithms.flora import FLoRAConfig
from fedtune.models import fingerprint, tiny_llama
from fedtune.run import checkpoint

RANK, KEEP, CLIENTS, PER_ROUND = 4, 4, 20, 2


def _updates(rnd, shapes):
    g = torch.Generator().manual_seed(rnd)
    picked = np.random.default_rng(rnd).choice(CLIENTS, PER_ROUND, replace=False)
    return [ClientUpdate(f"c{i}", 10 + int(i), {
        **{f"{m}.A": torch.randn(RANK, d_in, generator=g) * 0.1 for m, (_, d_in) in shapes.items()},
        **{f"{m}.B": torch.randn(d_out, RANK, generator=g) * 0.01 for m, (d_out, _) in shapes.items()}})
        for i in sorted(picked)]


def _client(algo, state, tok):
    c = algo.make_client()
    return c, c.setup(tiny_llama(len(tok), seed=0), algo.setup_payload(state))


def _weights(client, model):
    return {n: lin.weight.detach().clone() for n, lin in target_linears(model, client.targets).items()}


def test_flora_state_is_bounded_and_catch_up_exact(tok, tmp_path):
    algo = get_algorithm("flora", FLoRAConfig(rank=RANK, alpha=2 * RANK, keep_rounds=KEEP))
    base = tiny_llama(len(tok), seed=0)
    shapes = lora_shapes(base, algo.config.target_modules)
    state = algo.initialize(base, seed=0)
    steady, steady_model = _client(algo, state, tok)  # syncs every round, like the server's global model
    steady.sync(steady_model, algo.sync_payload(state, -1))
    replay = _weights(steady, steady_model)  # the old client: W += B_stack·A_stack per round, in order
    stats = {}
    for rnd in range(1, 51):
        ups = _updates(rnd, shapes)
        old = state.version
        state, _ = algo.aggregate(rnd, state, ups)
        payload = algo.sync_payload(state, old)
        assert payload.meta["merge_versions"] == [rnd]  # one round behind: the round's stack, not ΔW
        steady.sync(steady_model, payload)
        for m in shapes:
            a, b = payload.tensors[f"v{rnd:05d}/{m}.A"], payload.tensors[f"v{rnd:05d}/{m}.B"]
            replay[m] += (b.double() @ a.double()).float()
        if rnd in (10, 50):
            absent, absent_model = _client(algo, state, tok)  # set up in round 1, never sampled since
            catch_up = algo.sync_payload(state, 0)
            assert catch_up.meta.get("cumulative") is True
            absent.sync(absent_model, catch_up)
            ckpt = checkpoint.save(tmp_path / "ckpt", checkpoint.Checkpoint(rnd, state, {}))
            stats[rnd] = {"state": payload_nbytes(state.tensors), "catch_up": payload_nbytes(catch_up.tensors),
                          "file": (ckpt / "global.safetensors").stat().st_size,
                          "export_rank": max(a.shape[0] for a, _ in absent.export_factors(absent_model).values())}
            for m, w in _weights(absent, absent_model).items():
                assert max_abs(w, replay[m]) <= 1e-6, m
            assert fingerprint(absent_model) == fingerprint(steady_model)  # same bits whatever the path
    dense = sum(o * i * 8 for o, i in shapes.values())  # float64 ΔW per module
    stacks = sum(KEEP * PER_ROUND * RANK * (o + i) * 4 for o, i in shapes.values())
    assert stats[50]["state"] == stats[10]["state"] == dense + stacks
    assert stats[50]["file"] == stats[10]["file"] < dense + stacks + 8192  # + the safetensors header
    assert stats[50]["catch_up"] == stats[10]["catch_up"] == dense
    assert stats[50]["export_rank"] == stats[10]["export_rank"] == max(min(s) for s in shapes.values())
    assert sorted(state.meta["stacked_rank"]) == ["47", "48", "49", "50"] and state.meta["total_rank"] == 400
    # a client KEEP rounds behind still gets the (smaller) stacks; one more round behind gets ΔW
    assert algo.sync_payload(state, 50 - KEEP).meta["merge_versions"] == [47, 48, 49, 50]
    assert algo.sync_payload(state, 49 - KEEP).meta.get("cumulative") is True
    for m, w in _weights(steady, steady_model).items():
        assert max_abs(w, replay[m]) <= 1e-6, m


@pytest.mark.parametrize("export_rank", [0, 3])
def test_flora_export_is_the_svd_of_the_cumulative_delta(tok, export_rank):
    """Factor form (Σr = 8 < 32): exact export at rank 8; export_rank = 3 truncates and reports the error."""
    algo = get_algorithm("flora", FLoRAConfig(rank=RANK, alpha=2 * RANK, export_rank=export_rank))
    state = algo.initialize(tiny_llama(len(tok), seed=0), seed=0)
    client, model = _client(algo, state, tok)
    state, _ = algo.aggregate(1, state, _updates(1, lora_shapes(model, algo.config.target_modules)))
    client.sync(model, algo.sync_payload(state, 0))
    factors = client.export_factors(model)
    err2 = norm2 = 0.0
    for m, (a, b) in factors.items():
        exact = state.tensors[f"cum/{m}.B"].double() @ state.tensors[f"cum/{m}.A"].double()
        assert a.shape[0] == (export_rank or PER_ROUND * RANK)
        got = b.double() @ a.double()
        err2 += (exact - got).pow(2).sum().item()
        norm2 += exact.pow(2).sum().item()
        if not export_rank:
            assert max_abs(got, exact) <= 1e-6
    info = client.export_info
    assert info["rank"] == (export_rank or 8)
    if export_rank:  # the reported error is the truncation's (float32 factors add ~1e-8 here)
        assert info["relative_error"] == pytest.approx((err2 / norm2) ** 0.5, rel=1e-4) and info["relative_error"] > 0.05
    else:
        assert info["relative_error"] < 1e-12 and (err2 / norm2) ** 0.5 < 1e-6
