import torch

from fedtune.algorithms import TrainContext, get_algorithm
from fedtune.algorithms.fedavg import FedAvgConfig
from fedtune.models import fingerprint
from fedtune.training import LocalTrainConfig, evaluate, train_local


def synced_fedavg(tiny, *, rank: int):
    """(initial global state, a FedAvg client, the tiny model wrapped and synced to that state)."""
    algo = get_algorithm("fedavg", FedAvgConfig(rank=rank, alpha=2 * rank))
    state = algo.initialize(tiny, seed=0)
    client = algo.make_client()
    model = client.setup(tiny, algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    return state, client, model


def test_local_training_changes_only_lora(tiny, feats, tok):
    _state, _client, model = synced_fedavg(tiny, rank=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fp = fingerprint(model)
    res = train_local(model, feats[:40], LocalTrainConfig(steps=3, batch_size=4, lr=1e-2), pad_id=tok.pad_token_id)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all(".lora_" in n for n in changed)
    assert any(".lora_B." in n for n in changed) and any(".lora_A." in n for n in changed)
    assert fingerprint(model) == fp
    assert res.steps == 3 and res.examples_seen == 12


def test_client_train_restores_global_adapter(tiny, feats, tok):
    state, client, model = synced_fedavg(tiny, rank=4)
    loss0 = evaluate(model, feats[:16], pad_id=tok.pad_token_id)
    upd = client.train(model, TrainContext("c0", feats[:40], tok.pad_token_id), {"steps": 3, "lr": 1e-2, "batch_size": 4, "seed": 1})
    assert evaluate(model, feats[:16], pad_id=tok.pad_token_id) == loss0
    assert not torch.equal(upd.tensors[sorted(upd.tensors)[1]], state.tensors[sorted(upd.tensors)[1]])
    assert upd.num_examples == 40


def test_same_seed_same_update(tiny, feats, tok):
    _state, client, model = synced_fedavg(tiny, rank=2)
    cfg = {"steps": 2, "lr": 1e-2, "batch_size": 4, "seed": 3}
    u1 = client.train(model, TrainContext("c", feats[:30], tok.pad_token_id), cfg)
    u2 = client.train(model, TrainContext("c", feats[:30], tok.pad_token_id), cfg)
    assert all(torch.equal(u1.tensors[k], u2.tensors[k]) for k in u1.tensors)


def _recording_hook(seen: list):
    """A step hook that records the gradient norm it sees at each step (after clipping: ≤ the clip) and zeroes B's
    gradients, so the update it leaves is visible in the result."""
    def attach(params):
        def step():
            seen.append(float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))))
            for p in params:
                if p.grad is not None and p.shape[0] > p.shape[1]:  # lora_B: d_out × r
                    p.grad.zero_()
        return step
    return attach


def test_step_hooks_run_once_per_step_after_clipping_and_before_the_update(tiny, feats, tok):
    from fedtune.privacy.sample import private_train_local

    for private in (False, True):
        _state, _client, model = synced_fedavg(tiny, rank=4)
        b_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
        seen: list[float] = []
        cfg = LocalTrainConfig(steps=3, batch_size=4, lr=1e-2, max_grad_norm=0.01)
        if private:  # under DP the gradient the hook sees is the clipped, noised mean (no global clip)
            private_train_local(model, feats[:40], cfg, noise_multiplier=0.5, max_grad_norm=1.0,
                                pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                                hooks=[_recording_hook(seen)])
        else:
            train_local(model, feats[:40], cfg, pad_id=tok.pad_token_id, hooks=[_recording_hook(seen)])
            assert all(g <= 0.01 + 1e-6 for g in seen)  # after the global-norm clip
        assert len(seen) == 3
        after = dict(model.named_parameters())
        assert all(torch.equal(b_before[n], after[n].detach()) for n in b_before)  # B's zeroed gradient: no step
