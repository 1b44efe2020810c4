"""Hand-computed aggregates for FedAvg and FLoRA."""

import torch
from conftest import max_abs

from fedtune.algorithms import ClientUpdate, GlobalState, get_algorithm
from fedtune.algorithms.fedavg import FedAvgConfig
from fedtune.algorithms.flora import FLoRAConfig
from fedtune.algorithms.flora.shared import round_key
from fedtune.models import fingerprint


def _upd(cid, n, a, b):
    return ClientUpdate(cid, n, {"m.A": torch.tensor(a), "m.B": torch.tensor(b)})


def test_fedavg_weighted_means_by_hand():
    # n = (1, 2, 3) → p = (1/6, 2/6, 3/6); A is 1×2, B is 2×1 (rank 1)
    ups = [_upd("a", 1, [[6.0, 0.0]], [[6.0], [12.0]]),
           _upd("b", 2, [[3.0, 3.0]], [[0.0], [6.0]]),
           _upd("c", 3, [[0.0, 2.0]], [[2.0], [0.0]])]
    algo = get_algorithm("fedavg", FedAvgConfig(rank=1))
    state = GlobalState(0, {"m.A": torch.zeros(1, 2), "m.B": torch.zeros(2, 1)})
    new, metrics = algo.aggregate(1, state, ups)
    # A: (6·1 + 3·2 + 0·3)/6 = 2, (0 + 6 + 6)/6 = 2 ; B: (6 + 0 + 6)/6 = 2, (12 + 12 + 0)/6 = 4
    assert torch.equal(new.tensors["m.A"], torch.tensor([[2.0, 2.0]]))
    assert torch.equal(new.tensors["m.B"], torch.tensor([[2.0], [4.0]]))
    assert new.version == 1
    # gap = ‖Σ p B A − B̄ Ā‖_F, computed directly
    exact = sum(p * u.tensors["m.B"].double() @ u.tensors["m.A"].double() for p, u in zip([1 / 6, 2 / 6, 3 / 6], ups))
    gap = torch.linalg.matrix_norm(exact - new.tensors["m.B"].double() @ new.tensors["m.A"].double()).item()
    assert abs(metrics["fedavg_gap"] - gap) < 1e-9 and gap > 1.0


def test_fedavg_uniform_option():
    ups = [_upd("a", 1, [[1.0]], [[1.0]]), _upd("b", 99, [[3.0]], [[3.0]])]
    algo = get_algorithm("fedavg", FedAvgConfig(rank=1, uniform=True))
    new, _ = algo.aggregate(1, GlobalState(0, {"m.A": torch.zeros(1, 1), "m.B": torch.zeros(1, 1)}), ups)
    assert new.tensors["m.A"].item() == 2.0


def test_flora_merge_equals_sum_of_scaled_products(tiny, feats, tok):
    """Ranks (4, 2, 1), unequal n: W_after − W_before == Σ p_k s_k B_k A_k (≤ 1e-6), computed directly."""
    from fedtune.algorithms import TrainContext

    cfg = FLoRAConfig(rank=4, alpha=8, ranks=[4, 2, 1])
    algo = get_algorithm("flora", cfg)
    state = algo.initialize(tiny, seed=0)
    client = algo.make_client()
    model = client.setup(tiny, algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    roster = ["c0", "c1", "c2"]
    confs = algo.configure_round(1, state, roster, {"steps": 2, "lr": 1e-2, "batch_size": 4}, roster)
    assert [confs[c]["rank"] for c in roster] == [4, 2, 1]
    shards = [feats[:10], feats[10:40], feats[40:100]]  # n = 10, 30, 60
    ups = [client.train(model, TrainContext(c, s, tok.pad_token_id), dict(confs[c], seed=i))
           for i, (c, s) in enumerate(zip(roster, shards))]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    new, metrics = algo.aggregate(1, state, ups)
    assert metrics["flora_stacked_rank"] == 7
    client.sync(model, algo.sync_payload(new, 0))
    p = [0.1, 0.3, 0.6]
    for name, w0 in before.items():
        mod = name.removeprefix("base_model.model.").removesuffix(".base_layer.weight")
        expected = torch.zeros_like(w0, dtype=torch.float64)
        for pk, u, r in zip(p, ups, [4, 2, 1]):
            s = 2.0  # alpha/r is kept at 8/4 for every client rank
            raw_b = u.tensors[f"{mod}.B"] / s  # clients upload s_k·B_k
            expected += pk * s * raw_b.double() @ u.tensors[f"{mod}.A"].double()
        w1 = dict(model.named_parameters())[name].detach()
        assert max_abs(w1 - w0, expected) <= 1e-6
        assert expected.abs().max() > 0


def test_flora_clients_end_on_identical_base(tok, feats):
    """A client syncing every round and one catching up two rounds at once hold identical bases."""
    from fedtune.algorithms import TrainContext
    from fedtune.models import tiny_llama

    algo = get_algorithm("flora", FLoRAConfig(rank=2, alpha=4, ranks=[2, 1]))
    models, clients = [], []
    for _ in range(2):
        m = tiny_llama(len(tok), seed=0)
        c = algo.make_client()
        state = algo.initialize(m, seed=0)
        models.append(c.setup(m, algo.setup_payload(state)))
        clients.append(c)
    trainer, laggard = clients
    roster = ["c0", "c1"]
    for rnd in (1, 2):
        confs = algo.configure_round(rnd, state, roster, {"steps": 1, "lr": 1e-2, "batch_size": 4}, roster)
        ups = [trainer.train(models[0], TrainContext(c, feats[i * 20:(i + 1) * 20 + 5], tok.pad_token_id),
                             dict(confs[c], seed=rnd * 10 + i)) for i, c in enumerate(roster)]
        old = state.version
        state, _ = algo.aggregate(rnd, state, ups)
        trainer.sync(models[0], algo.sync_payload(state, old))
    laggard.sync(models[1], algo.sync_payload(state, 0))
    assert algo.sync_payload(state, 0).meta["merge_versions"] == [1, 2]
    assert any(k.startswith(round_key(2, "")) for k in state.tensors)
    assert fingerprint(models[0]) == fingerprint(models[1])
    assert fingerprint(models[0]) != fingerprint(tiny_llama(len(tok), seed=0))
