"""Partitioners: every example lands in exactly one client. Deterministic given a seed."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from fedtune.data.loaders import DataError, Example

T = TypeVar("T")


def _check(n_items: int, num_clients: int) -> None:
    if num_clients <= 0:
        raise DataError(f"num_clients must be ≥ 1, got {num_clients}")
    if num_clients > n_items:
        raise DataError(f"{num_clients} clients but only {n_items} examples; use fewer clients or more data")


def iid(items: Sequence[T], num_clients: int, seed: int) -> list[list[T]]:
    """Shuffle, then deal into near-equal contiguous shares: the same partition as flwr-datasets'
    IidPartitioner(num_partitions) on dataset.shuffle(seed)."""
    _check(len(items), num_clients)
    order = np.random.default_rng(seed).permutation(len(items))
    return [[items[i] for i in part] for part in np.array_split(order, num_clients)]


def _by_cat(items: Sequence[Example]) -> dict[str, list[int]]:
    cats: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(items):
        cats[ex.category].append(i)
    return dict(sorted(cats.items()))


def by_category(items: Sequence[Example], num_clients: int, seed: int) -> list[list[Example]]:
    """Each category goes to exactly one client: largest categories first, to the least-loaded client."""
    _check(len(items), num_clients)
    cats = _by_cat(items)
    if len(cats) < num_clients:
        raise DataError(
            f"by_category needs at least as many categories as clients ({len(cats)} < {num_clients}); "
            "use partition = \"dirichlet\" or fewer clients"
        )
    rng = np.random.default_rng(seed)
    names = sorted(cats, key=lambda c: (-len(cats[c]), rng.random()))
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in names:
        k = min(range(num_clients), key=lambda j: (len(parts[j]), j))
        parts[k].extend(cats[c])
    return [[items[i] for i in sorted(p)] for p in parts]


def dirichlet(items: Sequence[Example], num_clients: int, seed: int, alpha: float) -> list[list[Example]]:
    """For each category (sorted), split its examples (in corpus order) over clients with proportions ~ Dir(α·1);
    redraw (up to 10 times) while a client is empty. The same partition as flwr-datasets'
    DirichletPartitioner(num_partitions, partition_by="category", alpha, min_partition_size=1, seed)."""
    _check(len(items), num_clients)
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha} (small = more skewed, e.g. 0.5)")
    rng = np.random.default_rng(seed)
    cats = _by_cat(items)
    for _attempt in range(11):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for idx in cats.values():
            props = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(np.asarray(idx), cuts)):
                parts[k].extend(int(i) for i in chunk)
        if all(parts):
            return [[items[i] for i in sorted(p)] for p in parts]
    raise DataError(
        f"dirichlet(alpha={alpha}, seed={seed}) left a client with no examples in 11 draws; "
        "raise alpha, change the seed or use fewer clients"
    )


def pathological(items: Sequence[Example], num_clients: int, seed: int, per_client: int) -> list[list[Example]]:
    """Each client draws `per_client` categories at random (without replacement); a category's examples are split
    evenly (in corpus order) among the clients that drew it. The same partition as flwr-datasets'
    PathologicalPartitioner(num_partitions, partition_by="category", num_classes_per_partition, "random", seed).
    A category no client drew would lose its examples: that is an error, not a silent drop."""
    _check(len(items), num_clients)
    cats = _by_cat(items)
    names = list(cats)
    if not 1 <= per_client <= len(names):
        raise DataError(f"pathological needs 1 ≤ categories_per_client ≤ {len(names)} (the categories), got {per_client}")
    rng = np.random.default_rng(seed)
    drawn = [rng.choice(names, size=per_client, replace=False).tolist() for _ in range(num_clients)]
    unused = sorted(set(names) - {c for d in drawn for c in d})
    if unused:
        raise DataError(f"pathological(categories_per_client={per_client}, seed={seed}) gives no client the categories "
                        f"{unused} ({sum(len(cats[c]) for c in unused)} examples would be lost); raise "
                        "categories_per_client or the number of clients, change the seed, or leave them out with "
                        "[data] categories")
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in names:
        holders = [k for k in range(num_clients) if c in drawn[k]]
        for k, chunk in zip(holders, np.array_split(np.asarray(cats[c]), len(holders)), strict=True):
            parts[k].extend(int(i) for i in chunk)
    return [[items[i] for i in sorted(p)] for p in parts]


def partition(items: Sequence[Example], num_clients: int, *, method: str, seed: int, alpha: float = 0.5,
              categories_per_client: int = 2):
    if method == "iid":
        return iid(items, num_clients, seed)
    if method == "by_category":
        return by_category(items, num_clients, seed)
    if method == "dirichlet":
        return dirichlet(items, num_clients, seed, alpha)
    if method == "pathological":
        return pathological(items, num_clients, seed, categories_per_client)
    raise DataError(f"unknown partition {method!r}; choose iid, dirichlet, by_category or pathological")


def split_eval(items: Sequence[T], fraction: float, seed: int, max_eval: int | None = None) -> tuple[list[T], list[T]]:
    """(train, eval): a held-out share of one client's data; train keeps at least one example."""
    n = len(items)
    n_eval = min(round(n * fraction), n - 1)
    if max_eval is not None:
        n_eval = min(n_eval, max_eval)
    order = np.random.default_rng(seed).permutation(n)
    ev = sorted(order[:n_eval].tolist())
    tr = sorted(order[n_eval:].tolist())
    return [items[i] for i in tr], [items[i] for i in ev]
