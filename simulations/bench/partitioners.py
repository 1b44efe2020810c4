"""fedtune's partitioners vs flwr-datasets' on the demo corpus (chatterbot minus the global test split).

Per (partitioner, clients): client sizes, imbalance max/min, categories per client, wall time, determinism (same
seed twice → same partition), and for Dirichlet the share of seeds 0..19 that give every client data.
flwr-datasets is not a fedtune dependency (see README "Your own data"); run with it on PYTHONPATH, e.g.
  pip install --no-deps --target /tmp/fds flwr-datasets==0.6.1 seaborn==0.13.2
  PYTHONPATH=.:/tmp/fds python simulations/bench/partitioners.py --out simulations/bench/results/partitioners.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

from fedtune import config
from fedtune.data import DataError, load_chatterbot, partition
from fedtune.data.prepare import split_test

PER_CLIENT = 12  # pathological: categories per client (4 or 8 clients × 12 draws cover all 21 for seed 0)


def _stats(parts: list[list[int]], cats: list[str], wall: float) -> dict:
    parts_cats = [[cats[i] for i in p] for p in parts]
    sizes = [len(p) for p in parts_cats]
    return {"clients": len(sizes), "examples": sum(sizes), "sizes": sizes, "imbalance": round(max(sizes) / max(1, min(sizes)), 2),
            "categories_per_client": [len(set(p)) for p in parts_cats], "wall_ms": round(1000 * wall, 2)}


def ours(examples, method, n, seed, alpha=0.5):
    t = time.perf_counter()
    parts = partition(examples, n, method=method, seed=seed, alpha=alpha, categories_per_client=PER_CLIENT)
    wall = time.perf_counter() - t
    pos = {id(e): i for i, e in enumerate(examples)}
    return [sorted(pos[id(e)] for e in p) for p in parts], wall


def theirs(ds, method, n, seed, alpha=0.5):
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        GroupedNaturalIdPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    t = time.perf_counter()
    if method == "iid":  # IidPartitioner shards contiguously: FederatedDataset shuffles first
        p, data = IidPartitioner(num_partitions=n), ds.shuffle(seed=seed)
    elif method == "dirichlet":
        p, data = DirichletPartitioner(num_partitions=n, partition_by="category", alpha=alpha, seed=seed,
                                       min_partition_size=1), ds
    elif method == "pathological":
        p, data = PathologicalPartitioner(num_partitions=n, partition_by="category", seed=seed,
                                          num_classes_per_partition=PER_CLIENT, class_assignment_mode="random"), ds
    else:  # by_category ~ GroupedNaturalIdPartitioner: groups of ⌈C/N⌉ categories
        n_cat = len(set(ds["category"]))
        p, data = GroupedNaturalIdPartitioner(partition_by="category", group_size=math.ceil(n_cat / n)), ds
    p.dataset = data
    parts = [sorted(p.load_partition(k)["idx"]) for k in range(p.num_partitions)]
    return parts, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import datasets

    cfg = config.load(None)
    (rest,), _ = split_test([load_chatterbot()], cfg)
    ds = datasets.Dataset.from_list([{"category": e.category, "idx": i} for i, e in enumerate(rest)])
    cats = [e.category for e in rest]
    res: dict = {"examples": len(rest), "categories": len({e.category for e in rest}), "rows": []}
    for method in ("iid", "dirichlet", "by_category", "pathological"):
        for n in (4, 8):
            row: dict = {"method": method, "clients_requested": n}
            got = {}
            for name, fn, data in (("fedtune", ours, rest), ("flwr_datasets", theirs, ds)):
                try:
                    parts, wall = fn(data, method, n, 0)
                    again, _ = fn(data, method, n, 0)
                    row[name] = _stats(parts, cats, wall) | {"deterministic": parts == again}
                    got[name] = parts
                except (DataError, ValueError) as e:
                    row[name] = {"error": str(e)[:160]}
                if method == "dirichlet":
                    ok = 0
                    for s in range(20):
                        try:
                            ok += all(fn(data, method, n, s)[0])
                        except (DataError, ValueError):
                            pass
                    row[name]["seeds_ok_of_20"] = ok
            row["identical_partitions"] = got.get("fedtune") == got.get("flwr_datasets")
            res["rows"].append(row)
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
