import pytest
import torch

from fedtune.data import ChatFormatter, load_chatterbot
from fedtune.models import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def tiny(tok):
    """A fresh tiny random Llama (same weights every call)."""
    return tiny_llama(len(tok), seed=0)


@pytest.fixture(scope="session")
def feats(tok):
    return ChatFormatter(tok, 64).many(load_chatterbot()[:240])


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# FedKSeed tests: a tokenizer and features of their own (max_seq_len 32), and a fresh tiny model per call
@pytest.fixture(scope="session")
def ktok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def kfeats(ktok):
    return ChatFormatter(ktok, 32).many(load_chatterbot()[:120])


def fresh(ktok):
    return tiny_llama(len(ktok), seed=0)


def params_of(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def start_fedkseed(cfg, ktok):
    """(algo, state, client, model) of FedKSeed synced to version 0 — the engine's opening moves."""
    from fedtune.algorithms import get_algorithm

    algo = get_algorithm("fedkseed", cfg)
    state = algo.initialize(fresh(ktok), seed=0)
    client = algo.make_client()
    model = client.setup(fresh(ktok), algo.setup_payload(state))
    client.sync(model, algo.sync_payload(state, -1))
    return algo, state, client, model


@pytest.fixture
def crash_at_checkpoint(monkeypatch):
    """crash_at_checkpoint(r): the checkpoint of round r raises KeyboardInterrupt instead of being written (a
    coordinator killed after the round's work, before its checkpoint); returns a function that undoes it."""
    from fedtune.run import checkpoint

    real = checkpoint.save

    def arm(rnd: int):
        def crash(ckpt_dir, ckpt, *a, **kw):
            if ckpt.round == rnd:
                raise KeyboardInterrupt("simulated crash")
            return real(ckpt_dir, ckpt, *a, **kw)

        monkeypatch.setattr(checkpoint, "save", crash)
        return lambda: monkeypatch.setattr(checkpoint, "save", real)

    return arm
