"""Data: loaders (chatterbot-corpus, JSONL), chat formatting with response-only loss, partitioners."""

from fedtune.data.format import ChatFormatter, collate
from fedtune.data.loaders import DataError, Example, load_chatterbot, load_file, load_jsonl, load_path
from fedtune.data.partition import by_category, dirichlet, iid, partition, pathological, split_eval
from fedtune.data.prepare import ClientData, Prepared, client_ids, prepare_data

__all__ = [
    "ChatFormatter", "ClientData", "DataError", "Example", "Prepared", "by_category", "client_ids", "collate",
    "dirichlet", "iid", "load_chatterbot", "load_file", "load_jsonl", "load_path", "partition", "pathological",
    "prepare_data", "split_eval",
]
