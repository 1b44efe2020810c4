"""Data preparation for a run: load the corpus, draw the global test split, partition, tokenize, report.

Order (fixed, so every transport and every client computes the same split):
  1. load every example (chatterbot, or the [data] paths; with one file per client, the union of the files),
  2. draw the global test set once by `run.seed` from the whole corpus and remove it,
  3. partition what is left (or keep one file per client), then split each client's held-out eval slice.
Step 2 happens before partitioning, so the test set is the same whatever the partitioner or client count.
  4. tokenize with truncation that keeps the response (format.py); count per client what was kept whole, truncated
     or dropped; stop if a client would lose more than [data] max_drop_fraction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.configbase import ConfigError
from fedtune.data.format import OUTCOMES, ChatFormatter
from fedtune.data.loaders import DataError, Example, load_chatterbot, load_path
from fedtune.data.partition import partition, split_eval

if TYPE_CHECKING:  # annotations only: the data layer does not import fedtune.config
    from fedtune.config import RunConfig

log = logging.getLogger("fedtune")
CHATTERBOT_SEQ_LEN = 128  # the demo's max_seq_len when [data] max_seq_len = 0 (auto)
RESPONSE_KEEP = 0.99  # auto max_seq_len keeps at least this share of responses whole
AUTO_SAMPLE = 20_000  # auto max_seq_len looks at up to this many examples
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


def context_length(model) -> int | None:
    """The model's context length (max position embeddings), when its config says."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


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


def load_corpus(cfg: RunConfig) -> tuple[list[list[Example]], list[str]]:
    """The corpus as (groups, names): one group per client file (one file per client), else a single group.
    Needs no model or tokenizer, so bad data fails before the model is loaded."""
    d, n = cfg.data, cfg.federation.num_clients
    if d.source == "chatterbot":
        return [load_chatterbot(d.language, d.categories or None)], ["chatterbot"]
    if len(d.paths) == n and n > 1:
        groups, names = [load_path(p) for p in d.paths], list(d.paths)
    else:
        groups, names = [[ex for p in d.paths for ex in load_path(p)]], [", ".join(d.paths)]
    if d.categories:
        present = sorted({ex.category for g in groups for ex in g})
        missing = sorted(set(d.categories) - set(present))
        if missing:
            raise DataError(f"[data] categories {missing} match no example in {', '.join(d.paths)}; "
                            f"categories present: {', '.join(present)}")
        keep = set(d.categories)
        groups = [[ex for ex in g if ex.category in keep] for g in groups]
        for name, g in zip(names, groups, strict=True):
            if not g:
                raise DataError(f"{name}: no example of the [data] categories {sorted(keep)}; "
                                f"categories present: {', '.join(present)}")
    return groups, names


def split_test(groups: list[list[Example]], cfg: RunConfig) -> tuple[list[list[Example]], list[Example]]:
    """Remove the global test set from the union of `groups`; returns (groups without it, test examples)."""
    d = cfg.data
    flat = [(g, i) for g, grp in enumerate(groups) for i in range(len(grp))]
    picked = draw_test_indices(len(flat), d.test_fraction, d.max_test_examples, cfg.run.seed)
    test = [groups[flat[j][0]][flat[j][1]] for j in picked]
    drop = {flat[j] for j in picked}
    rest = [[ex for i, ex in enumerate(grp) if (g, i) not in drop] for g, grp in enumerate(groups)]
    return rest, test


def choose_max_seq_len(cfg: RunConfig, tokenizer, examples: list[Example], context_len: int | None) -> int:
    """[data] max_seq_len, or (0 = auto) 128 for chatterbot / the smallest length keeping ≥ 99 % of the responses
    of your data whole, capped at the model's context length. Checked against the context length."""
    d = cfg.data
    if d.max_seq_len:
        if context_len and d.max_seq_len > context_len:
            raise DataError(f"[data] max_seq_len = {d.max_seq_len} exceeds the model's context length "
                            f"({context_len} tokens); set max_seq_len ≤ {context_len} (or 0 for auto)")
        return d.max_seq_len
    if d.source == "chatterbot":
        return min(CHATTERBOT_SEQ_LEN, context_len or CHATTERBOT_SEQ_LEN)
    fmt = ChatFormatter(tokenizer, 8)
    if len(examples) > AUTO_SAMPLE:  # a seeded sample bounds the cost on big corpora
        pick = np.random.default_rng([cfg.run.seed, TEST_STREAM + 1]).choice(len(examples), AUTO_SAMPLE, replace=False)
        examples = [examples[i] for i in sorted(pick.tolist())]
    needed = sorted(n for _, n in fmt.needed_lens(examples))
    want = max(8, needed[max(0, int(np.ceil(RESPONSE_KEEP * len(needed))) - 1)])
    chosen = min(want, context_len) if context_len else want
    log.info("[data] max_seq_len = auto: %d tokens (keeps %.1f %% of responses whole%s)", chosen,
             100 * sum(n <= chosen for n in needed) / len(needed),
             f"; capped at the model context {context_len}" if context_len and want > context_len else "")
    return chosen


def _percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    q = np.percentile(np.asarray(lengths), [50, 90, 99], method="higher")
    return {"p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]), "max": int(max(lengths))}


def _merge(a: dict, b: dict) -> dict:
    return {"counts": {o: a["counts"][o] + b["counts"][o] for o in OUTCOMES},
            "drop_reasons": {r: a["drop_reasons"].get(r, 0) + b["drop_reasons"].get(r, 0)
                             for r in {*a["drop_reasons"], *b["drop_reasons"]}},
            "lengths": a["lengths"] + b["lengths"]}


def prepare_data(cfg: RunConfig, tokenizer, ids: list[str] | None = None, *, context_len: int | None = None,
                 corpus: tuple[list[list[Example]], list[str]] | None = None) -> Prepared:
    """Per-client (train, eval) features, the global eval set, the global test set and the data report.
    Client i of `ids` (default client-0 … client-N-1) gets partition i (or file i). `context_len` (the model's
    context length) bounds max_seq_len; `corpus` is load_corpus(cfg) when the caller already has it."""
    d, n = cfg.data, cfg.federation.num_clients
    ids = ids or client_ids(n)
    if len(ids) != n:
        raise ConfigError(f"{len(ids)} client ids for federation.num_clients = {n}; make them agree")
    seed = cfg.run.seed
    groups, names = corpus or load_corpus(cfg)
    max_len = choose_max_seq_len(cfg, tokenizer, [ex for g in groups for ex in g], context_len)
    groups, test_examples = split_test(groups, cfg)
    per_file = len(groups) == n and n > 1
    if per_file:  # one file per client
        for name, grp in zip(names, groups, strict=True):
            if not grp:
                raise DataError(f"{name}: no examples left after drawing the global test set; "
                                "add data to this file or lower [data] test_fraction")
        shards = groups
    else:
        shards = partition(groups[0], n, method=d.partition, seed=seed, alpha=d.dirichlet_alpha,
                           categories_per_client=d.categories_per_client)
    fmt = ChatFormatter(tokenizer, max_len)
    clients: dict[str, ClientData] = {}
    report: dict[str, Any] = {"max_seq_len": max_len, "max_seq_len_auto": not d.max_seq_len, "clients": {}}
    for k, (cid, shard) in enumerate(zip(ids, shards, strict=True)):
        source = names[k] if per_file else names[0]
        if not shard:
            raise DataError(f"{cid} has no examples; give it data or use fewer clients")
        tr, ev = split_eval(shard, d.eval_fraction, seed + k, d.max_eval_per_client)
        if d.max_train_per_client:
            tr = tr[: d.max_train_per_client]
        ftr, s_tr = fmt.format_all(tr)
        fev, s_ev = fmt.format_all(ev)
        stats = _merge(s_tr, s_ev)
        dropped, total = stats["counts"]["dropped"], len(tr) + len(ev)
        if dropped > d.max_drop_fraction * total:
            why = "; ".join(f"{c}× {r}" for r, c in stats["drop_reasons"].items())
            raise DataError(f"{source}: {dropped} of {total} examples of {cid} cannot be kept at max_seq_len = "
                            f"{max_len} ({why}); raise [data] max_seq_len (or [data] max_drop_fraction, now "
                            f"{d.max_drop_fraction})")
        clients[cid] = ClientData(ftr, fev, sorted({e.category for e in shard}), tr, ev)
        if not ftr:
            raise DataError(f"{cid}: no usable training examples after formatting "
                            f"(raise [data] max_seq_len, now {max_len})")
        cats: dict[str, int] = {}
        for e in shard:
            cats[e.category] = cats.get(e.category, 0) + 1
        report["clients"][cid] = {
            "source": source, "train_examples": len(ftr), "eval_examples": len(fev),
            **stats["counts"], "drop_reasons": stats["drop_reasons"],
            "categories": dict(sorted(cats.items())), "tokens": _percentiles(stats["lengths"])}
    global_eval = [f for c in clients.values() for f in c.eval]
    test_feats, test_kept = [], []
    test_stats = {"counts": dict.fromkeys(OUTCOMES, 0)}
    for ex, f in zip(test_examples, fmt.format_each(test_examples), strict=True):  # features aligned with examples
        test_stats["counts"][f.outcome] += 1
        if f.feature is not None:
            test_feats.append(f.feature)
            test_kept.append(ex)
    report["test"] = {"examples": len(test_feats), **test_stats["counts"]}
    report["global_eval_examples"] = len(global_eval)
    return Prepared(clients, global_eval, test_feats, test_kept, report)


def format_report(report: dict[str, Any]) -> str:
    """The data report as a few printable lines."""
    lines = [(f"data: max_seq_len {report['max_seq_len']}{' (auto)' if report.get('max_seq_len_auto') else ''}; "
             f"global test {report['test']['examples']} examples, global eval {report['global_eval_examples']}")]
    for cid, r in report["clients"].items():
        t = r["tokens"]
        cats = ", ".join(f"{c} {n}" for c, n in list(r["categories"].items())[:6])
        more = f" … ({len(r['categories'])} categories)" if len(r["categories"]) > 6 else ""
        drops = "; ".join(f"{c}× {why}" for why, c in r["drop_reasons"].items())
        lines.append(
            f"  {cid}: train {r['train_examples']} eval {r['eval_examples']} | whole {r['whole']}, truncated prompt "
            f"{r['truncated_prompt']}, truncated response {r['truncated_response']}, dropped {r['dropped']}"
            + (f" ({drops})" if drops else "")
            + (f" | tokens p50 {t['p50']} p90 {t['p90']} p99 {t['p99']} max {t['max']}" if t else "")
            + f" | {cats}{more}")
    return "\n".join(lines)
