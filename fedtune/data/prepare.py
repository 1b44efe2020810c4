"""Data preparation for a run: load the corpus, draw the global test split, partition, tokenize.

Order (fixed, so every transport and every client computes the same split):
  1. load every example (chatterbot, or the [data] paths; with one file per client, the union of the files),
  2. draw the global test set once by `run.seed` from the whole corpus and remove it,
  3. partition what is left (or keep one file per client), then split each client's held-out eval slice.
Step 2 happens before partitioning, so the test set is the same whatever the partitioner or client count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.config import ConfigError, RunConfig
from fedtune.data.format import IGNORE, ChatFormatter
from fedtune.data.loaders import DataError, Example, load_chatterbot, load_jsonl
from fedtune.data.partition import partition, split_eval

TEST_STREAM = 0x7E57  # the test draw uses its own RNG stream: independent of the partition/eval draws


@dataclass
class ClientData:
    train: list[dict]
    eval: list[dict]
    categories: list[str]
    train_examples: list[Example] = field(default_factory=list)  # raw examples behind train/eval
    eval_examples: list[Example] = field(default_factory=list)


@dataclass
class Prepared:
    clients: dict[str, ClientData]
    global_eval: list[dict]  # union of the clients' eval slices
    test: list[dict]  # tokenized global test set
    test_examples: list[Example]  # the same test set, raw (for prompts)
    report: dict[str, Any] = field(default_factory=dict)


def client_ids(n: int) -> list[str]:
    return [f"client-{i}" for i in range(n)]


def draw_test_indices(n: int, fraction: float, max_examples: int, seed: int) -> list[int]:
    """Indices (sorted) of the global test set among n examples: round(n·fraction), capped by max_examples (0 = no
    cap), drawn by `seed` alone."""
    k = round(n * fraction)
    if max_examples > 0:
        k = min(k, max_examples)
    k = min(k, n)
    if k <= 0:
        return []
    return sorted(np.random.default_rng([seed, TEST_STREAM]).choice(n, size=k, replace=False).tolist())


def _load_sources(cfg: RunConfig) -> tuple[list[list[Example]], list[str]]:
    """The corpus as groups: one group per client file (one file per client), else a single group."""
    d, n = cfg.data, cfg.federation.num_clients
    if d.source == "chatterbot":
        return [load_chatterbot(d.language, d.categories or None)], ["chatterbot"]
    if len(d.paths) == n and n > 1:
        return [load_jsonl(p) for p in d.paths], list(d.paths)
    return [[ex for p in d.paths for ex in load_jsonl(p)]], [", ".join(d.paths)]


def split_test(groups: list[list[Example]], cfg: RunConfig) -> tuple[list[list[Example]], list[Example]]:
    """Remove the global test set from the union of `groups`; returns (groups without it, test examples)."""
    d = cfg.data
    flat = [(g, i) for g, grp in enumerate(groups) for i in range(len(grp))]
    picked = draw_test_indices(len(flat), d.test_fraction, d.max_test_examples, cfg.run.seed)
    test = [groups[flat[j][0]][flat[j][1]] for j in picked]
    drop = {flat[j] for j in picked}
    rest = [[ex for i, ex in enumerate(grp) if (g, i) not in drop] for g, grp in enumerate(groups)]
    return rest, test


def prepare_data(cfg: RunConfig, tokenizer, ids: list[str] | None = None) -> Prepared:
    """Per-client (train, eval) features, the global eval set and the global test set.
    Client i of `ids` (default client-0 … client-N-1) gets partition i (or file i)."""
    d, n = cfg.data, cfg.federation.num_clients
    ids = ids or client_ids(n)
    if len(ids) != n:
        raise ConfigError(f"{len(ids)} client ids for federation.num_clients = {n}; make them agree")
    seed = cfg.run.seed
    groups, names = _load_sources(cfg)
    groups, test_examples = split_test(groups, cfg)
    if len(groups) == n and n > 1:  # one file per client
        for name, grp in zip(names, groups, strict=True):
            if not grp:
                raise DataError(f"{name}: no examples left after drawing the global test set; "
                                "add data to this file or lower [data] test_fraction")
        shards = groups
    else:
        shards = partition(groups[0], n, method=d.partition, seed=seed, alpha=d.dirichlet_alpha)
    fmt = ChatFormatter(tokenizer, d.max_seq_len)
    clients: dict[str, ClientData] = {}
    for k, (cid, shard) in enumerate(zip(ids, shards, strict=True)):
        if not shard:
            raise DataError(f"{cid} has no examples; give it data or use fewer clients")
        tr, ev = split_eval(shard, d.eval_fraction, seed + k, d.max_eval_per_client)
        if d.max_train_per_client:
            tr = tr[: d.max_train_per_client]
        clients[cid] = ClientData(fmt.many(tr), fmt.many(ev), sorted({e.category for e in shard}), tr, ev)
        if not clients[cid].train:
            raise DataError(f"{cid}: no usable training examples after formatting "
                            f"(max_seq_len={d.max_seq_len} too small?)")
    global_eval = [f for c in clients.values() for f in c.eval]
    report = {"test_examples": len(test_examples),
              "clients": {cid: {"train_examples": len(c.train), "eval_examples": len(c.eval),
                                "categories": c.categories} for cid, c in clients.items()}}
    test = [(ex, fmt(ex)) for ex in test_examples]
    test = [(ex, f) for ex, f in test if any(lbl != IGNORE for lbl in f["labels"])]  # aligned with test_examples
    return Prepared(clients, global_eval, [f for _, f in test], [ex for ex, _ in test], report)
