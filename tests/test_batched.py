"""Batched simulation of a round's clients equals training them one by one (up to float rounding)."""

import torch
from conftest import max_abs

from fedtune.algorithms import TrainContext, get_algorithm
from fedtune.algorithms.fedavg import FedAvgConfig


def _setup(tiny):
    algo = get_algorithm("fedavg", FedAvgConfig(rank=4, alpha=8))
    state = algo.initialize(tiny, seed=0)
    client = algo.make_client()
    model = client.setup(tiny, algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    return client, model


def test_batched_clients_equal_sequential(tiny, feats, tok):
    client, model = _setup(tiny)
    ctxs = [TrainContext(f"c{i}", feats[i * 60:(i + 1) * 60], tok.pad_token_id) for i in range(3)]
    cfgs = [{"steps": 4, "batch_size": 4, "lr": 5e-3, "seed": 10 + i, "max_grad_norm": 0.05} for i in range(3)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seq = [client.train(model, c, g) for c, g in zip(ctxs, cfgs)]
    bat = client.train_many(model, ctxs, cfgs)
    assert [u.client_id for u in bat] == ["c0", "c1", "c2"] and [u.num_examples for u in bat] == [60] * 3
    for a, b in zip(seq, bat):
        assert a.tensors.keys() == b.tensors.keys()
        # Adam turns rounding-level gradient differences into ≤ lr-sized steps only where g ≈ 0
        assert max(max_abs(a.tensors[k], b.tensors[k]) for k in a.tensors) <= 1e-4
        assert abs(a.metrics["train_loss"] - b.metrics["train_loss"]) <= 1e-5
    # clients differ from each other (own batches), and the model is back at the global state
    assert max_abs(bat[0].tensors[min(bat[0].tensors)], bat[1].tensors[min(bat[1].tensors)]) > 1e-4
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_batched_falls_back_when_clients_cannot_share_a_loop(tiny, feats, tok):
    client, model = _setup(tiny)
    ctxs = [TrainContext(f"c{i}", feats[i * 60:(i + 1) * 60], tok.pad_token_id) for i in range(2)]
    base = {"steps": 2, "batch_size": 4, "lr": 5e-3, "seed": 1}
    assert client.train_many(model, ctxs, [base, dict(base, lr=1e-3)]) is None  # different schedules
    assert client.train_many(model, ctxs, [dict(base, privacy={"mode": "sample"})] * 2) is None  # DP: per client
    small = [ctxs[0], TrainContext("tiny", feats[:3], tok.pad_token_id)]
    assert client.train_many(model, small, [base, base]) is None  # a client with fewer examples than the batch


def test_batched_flora_heterogeneous_ranks_equal_sequential(tiny, feats, tok):
    from fedtune.algorithms.flora import FLoRAConfig

    algo = get_algorithm("flora", FLoRAConfig(rank=4, alpha=8, ranks=[4, 2, 1]))
    state = algo.initialize(tiny, seed=0)
    client = algo.make_client()
    model = client.setup(tiny, algo.setup_payload(state))
    roster = ["c0", "c1", "c2"]
    confs = algo.configure_round(1, state, roster, {"steps": 3, "batch_size": 4, "lr": 5e-3}, roster)
    ctxs = [TrainContext(c, feats[i * 60:(i + 1) * 60], tok.pad_token_id) for i, c in enumerate(roster)]
    cfgs = [dict(confs[c], seed=i) for i, c in enumerate(roster)]
    seq = [client.train(model, c, g) for c, g in zip(ctxs, cfgs)]
    bat = client.train_many(model, ctxs, cfgs)
    for a, b, r in zip(seq, bat, [4, 2, 1]):
        assert all(b.tensors[k].shape == a.tensors[k].shape for k in a.tensors)
        assert min(b.tensors).endswith(".A") and b.tensors[min(b.tensors)].shape[0] == r
        assert max(max_abs(a.tensors[k], b.tensors[k]) for k in a.tensors) <= 1e-4


def test_chunked_loss_equals_full_logits_loss(tiny, feats, tok):
    """The batched loss from hidden states, projected in chunks over response tokens only, equals the loss
    from the full (K·b, T, vocab) logits, values and gradients (float rounding)."""
    from fedtune.data.format import collate
    from fedtune.training.batched import decoder_and_head, per_client_loss, per_client_loss_chunked

    _, model = _setup(tiny)
    batch = collate(feats[:6], tok.pad_token_id)  # K = 3 clients × 2 rows
    dec, head = decoder_and_head(model)
    lora = [p for p in model.parameters() if p.requires_grad]
    full = per_client_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["labels"], 3)
    g_full = torch.autograd.grad(full.sum(), lora)
    hidden = dec(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    part = per_client_loss_chunked(hidden, head, batch["labels"], 3, chunk=7)  # several chunks, a ragged last one
    g_part = torch.autograd.grad(part.sum(), lora)
    assert part.shape == (3,) and max_abs(full, part) <= 1e-5
    assert max(max_abs(a, b) for a, b in zip(g_full, g_part)) <= 1e-6
