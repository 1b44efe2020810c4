from collections import Counter

import pytest

from fedtune.data import DataError, Example, by_category, dirichlet, iid, load_chatterbot


@pytest.fixture(scope="module")
def corpus():
    return load_chatterbot()


def _ids(parts):
    return Counter(id(x) for p in parts for x in p)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "by_category"])
def test_every_example_in_exactly_one_client(corpus, method):
    fn = {"iid": lambda: iid(corpus, 4, 0), "dirichlet": lambda: dirichlet(corpus, 4, 0, 0.5),
          "by_category": lambda: by_category(corpus, 4, 0)}[method]
    parts = fn()
    counts = _ids(parts)
    assert len(parts) == 4 and all(parts)
    assert sum(len(p) for p in parts) == len(corpus) and set(counts.values()) == {1}


def test_dirichlet_deterministic_and_seed_dependent(corpus):
    a, b, c = dirichlet(corpus, 5, 7, 0.5), dirichlet(corpus, 5, 7, 0.5), dirichlet(corpus, 5, 8, 0.5)
    assert [len(p) for p in a] == [len(p) for p in b] and a == b
    assert a != c


def test_by_category_puts_each_category_in_one_client(corpus):
    parts = by_category(corpus, 4, 0)
    owner = {}
    for k, p in enumerate(parts):
        for ex in p:
            assert owner.setdefault(ex.category, k) == k
    assert len(owner) == 21


def test_more_clients_than_examples_is_a_clear_error():
    with pytest.raises(DataError, match="5 clients but only 2 examples"):
        iid([Example("a", "b"), Example("c", "d")], 5, 0)


def test_by_category_needs_enough_categories():
    with pytest.raises(DataError, match="at least as many categories as clients"):
        by_category([Example("a", "b", "x"), Example("c", "d", "x")], 2, 0)


@pytest.mark.parametrize(("n", "sizes"), [(4, [574, 366, 586, 723]), (8, [293, 105, 369, 255, 600, 102, 231, 294])])
def test_dirichlet_equals_flwr_datasets(corpus, n, sizes):
    """Sizes flwr-datasets 0.6.1 DirichletPartitioner(n, "category", 0.5, min_partition_size=1, seed=0) gives on the
    demo corpus minus the global test split (simulations/bench/partitioners.py checks the index sets are equal)."""
    from fedtune import config
    from fedtune.data.prepare import split_test

    (rest,), _ = split_test([corpus], config.load(None))
    assert [len(p) for p in dirichlet(rest, n, 0, 0.5)] == sizes


def test_pathological_equals_flwr_datasets_and_never_loses_a_category(corpus):
    from fedtune import config
    from fedtune.data import pathological
    from fedtune.data.prepare import split_test

    (rest,), _ = split_test([corpus], config.load(None))
    # flwr-datasets 0.6.1 PathologicalPartitioner(8, "category", 12, "random", seed=0) sizes on the same corpus
    assert [len(p) for p in pathological(rest, 8, 0, 12)] == [436, 163, 491, 185, 523, 160, 113, 178]
    # with 4 clients no one draws "coding" and "health": flwr-datasets drops their 178 examples, we refuse
    with pytest.raises(DataError, match=r"gives no client the categories \['coding', 'health'\] \(178 examples"):
        pathological(rest, 4, 0, 12)


def test_chatterbot_fast_yaml_loader_reads_what_safe_load_reads():
    """The corpus is parsed with libyaml's safe loader (~11x faster): same documents as yaml.safe_load."""
    import yaml

    from fedtune.data import loaders

    files = sorted((loaders.chatterbot_dir() / "english").glob("*.yml"))
    assert len(files) > 10
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert yaml.load(text, Loader=loaders._YAML_LOADER) == yaml.safe_load(text), f.name
    assert loaders._YAML_LOADER is getattr(yaml, "CSafeLoader", yaml.SafeLoader)
