"""Global test split (drawn before partitioning) and data preparation."""

import json

import pytest

from fedtune import config
from fedtune.data import prepare_data
from fedtune.data.prepare import draw_test_indices


def _cfg(**over):
    base = {"data.max_seq_len": 256, "data.max_eval_per_client": 4, "data.max_train_per_client": 8}
    return config.load(None, base | over)


def _keys(examples):
    return [(e.prompt, e.response, e.category) for e in examples]


@pytest.fixture(scope="module")
def chatterbot_preps(tok):
    out = {}
    for method, n in [("iid", 2), ("iid", 5), ("dirichlet", 3), ("by_category", 4), ("by_category", 7)]:
        out[(method, n)] = prepare_data(_cfg(**{"data.partition": method, "federation.num_clients": n}), tok)
    return out


def test_test_split_identical_across_partitioners_and_client_counts(chatterbot_preps):
    tests = {k: _keys(p.test_examples) for k, p in chatterbot_preps.items()}
    first = next(iter(tests.values()))
    assert len(first) == 128  # 10 % of 2377 = 238, capped by max_test_examples = 128
    assert all(t == first for t in tests.values())
    assert all(len(p.test) == 128 for p in chatterbot_preps.values())  # every test example tokenized


def test_test_split_disjoint_from_every_client(chatterbot_preps):
    for p in chatterbot_preps.values():
        test_ids = {id(e) for e in p.test_examples}
        seen = set()
        for c in p.clients.values():
            ids = [id(e) for e in c.train_examples + c.eval_examples]
            assert not test_ids & set(ids)
            assert not seen & set(ids)  # clients disjoint too
            seen |= set(ids)


def test_test_split_depends_on_seed_only(tok):
    a = prepare_data(_cfg(**{"run.seed": 1}), tok).test_examples
    b = prepare_data(_cfg(**{"run.seed": 2}), tok).test_examples
    assert _keys(a) != _keys(b)
    assert draw_test_indices(10, 0.2, 0, 5) == draw_test_indices(10, 0.2, 0, 5)
    assert len(draw_test_indices(1000, 0.1, 0, 0)) == 100 and len(draw_test_indices(1000, 0.1, 7, 0)) == 7
    assert draw_test_indices(10, 0.0, 128, 0) == []


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_file_per_client_draws_from_the_union_and_removes_from_each_file(tmp_path, tok):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(40)]
    a, b = _write(tmp_path / "a.jsonl", rows[:10]), _write(tmp_path / "b.jsonl", rows[10:])
    both = _write(tmp_path / "both.jsonl", rows)
    over = {"data.source": "jsonl", "data.test_fraction": 0.25, "data.eval_fraction": 0.0, "data.max_train_per_client": 0}
    per_file = prepare_data(_cfg(**over, **{"data.paths": [a, b], "federation.num_clients": 2}), tok)
    one = prepare_data(_cfg(**over, **{"data.paths": [both], "federation.num_clients": 3,
                                       "data.partition": "iid"}), tok)
    test = [e.prompt for e in per_file.test_examples]
    assert len(test) == 10 and test == [e.prompt for e in one.test_examples]
    got_a = [e.prompt for e in per_file.clients["client-0"].train_examples]
    got_b = [e.prompt for e in per_file.clients["client-1"].train_examples]
    assert got_a == [f"q{i}" for i in range(10) if f"q{i}" not in test]
    assert got_b == [f"q{i}" for i in range(10, 40) if f"q{i}" not in test]


def test_auto_max_seq_len_is_the_smallest_keeping_99_percent_of_responses_whole(tmp_path, tok):
    from fedtune.data import ChatFormatter, load_path
    from fedtune.data.prepare import choose_max_seq_len

    rows = [{"prompt": "why " * (5 + 3 * i), "response": "because " * (2 + i % 17)} for i in range(200)]
    path = _write(tmp_path / "d.jsonl", rows)
    cfg = _cfg(**{"data.source": "jsonl", "data.paths": [path], "data.max_seq_len": 0})
    exs = load_path(path)
    chosen = choose_max_seq_len(cfg, tok, exs, context_len=None)

    def whole_responses(n):
        return sum(ChatFormatter(tok, n).format(e).outcome != "truncated_response" for e in exs)

    assert whole_responses(chosen) >= 198 > whole_responses(chosen - 1)
    assert choose_max_seq_len(cfg, tok, exs, context_len=chosen - 5) == chosen - 5  # capped at the context
    demo = _cfg(**{"data.max_seq_len": 0})
    assert choose_max_seq_len(demo, tok, [], context_len=512) == 128


def test_edge_client_trains_on_all_of_its_own_files(tmp_path, tok):
    """A gRPC client with partition = -1 holds its own files: any number of them, in a federation of any size
    (the federation's num_clients says nothing about one organisation's files), all examples, no test split."""
    import json

    from fedtune import config
    from fedtune.config import ClientSection
    from fedtune.transports.grpc.agent import local_data

    paths = []
    for i, n in enumerate((7, 5)):
        p = tmp_path / f"own-{i}.jsonl"
        p.write_text("".join(json.dumps({"prompt": f"q{i}-{k}", "response": f"a{i}-{k}"}) + "\n" for k in range(n)))
        paths.append(str(p))
    over = {"model.name": "tiny", "federation.num_clients": 3, "data.source": "jsonl", "data.paths": paths,
            "data.eval_fraction": 0.0, "data.max_seq_len": 64, "client.client_id": "org-a", "client.partition": -1}
    cfg = config.load(None, over)
    d = local_data(cfg, cfg.section("client", ClientSection), tok)
    assert len(d.train) == 12 and not d.eval
    with pytest.raises(config.ConfigError, match="2 files for 3 clients"):  # a server's [data] must still agree
        config.load(None, {k: v for k, v in over.items() if not k.startswith("client.")})
