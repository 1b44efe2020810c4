"""Data: loaders (chatterbot-corpus, JSONL), chat formatting with response-only loss, partitioners."""

from fedtune.data.format import ChatFormatter, collate
from fedtune.data.loaders import DataError, Example, load_chatterbot, load_jsonl
from fedtune.data.partition import by_category, dirichlet, iid, partition, split_eval

__all__ = [
    "ChatFormatter", "DataError", "Example", "by_category", "collate", "dirichlet", "iid",
    "load_chatterbot", "load_jsonl", "partition", "split_eval",
]
