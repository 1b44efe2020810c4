"""Loaders: chatterbot-corpus (offline, from the PyPI package) and your own data files.

Formats: JSONL / JSON (read here, so errors name the file and line), CSV / Parquet / a `datasets` save_to_disk
directory (read through Hugging Face `datasets`, offline: local files only), or a directory of such files.
Schemas (detected per file from its first row, every row must match): SCHEMAS below.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

# libyaml's safe loader: the same documents as yaml.safe_load on all 237 chatterbot files, ~11x faster
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

class DataError(ValueError):
    """A user-facing data problem; the message names the problem and the fix."""


@dataclass(frozen=True)
class Example:
    prompt: str  # "" for plain-text examples (loss on every token); chat: the last user turn
    response: str  # chat: the last assistant turn
    category: str = "default"
    language: str = "english"
    messages: tuple[tuple[str, str], ...] = ()  # chat schema: (role, content) turns; loss on assistant turns


def chatterbot_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("chatterbot-corpus is not installed; run: pip install --no-deps chatterbot-corpus==1.3.3")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_chatterbot(language: str = "english", categories: list[str] | None = None) -> list[Example]:
    """Consecutive utterance pairs (u_i, u_{i+1}) of every conversation, category = file name."""
    return list(_chatterbot(language, tuple(categories or ())))


@functools.lru_cache(maxsize=4)  # the corpus is read-only
def _chatterbot(language: str, categories: tuple[str, ...]) -> tuple[Example, ...]:
    lang_dir = chatterbot_dir() / language
    if not lang_dir.is_dir():
        langs = sorted(p.name for p in chatterbot_dir().iterdir() if p.is_dir())
        raise DataError(f"chatterbot-corpus has no language {language!r}; available: {', '.join(langs)}")
    files = sorted(lang_dir.glob("*.yml"))
    if categories:
        known = {f.stem for f in files}
        unknown = sorted(set(categories) - known)
        if unknown:
            raise DataError(f"unknown chatterbot categories {unknown}; available: {', '.join(sorted(known))}")
        files = [f for f in files if f.stem in set(categories)]
    out: list[Example] = []
    for f in files:
        doc = yaml.load(f.read_text(encoding="utf-8"), Loader=_YAML_LOADER) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if isinstance(t, str | int | float) and str(t).strip()]
            out.extend(Example(a, b, f.stem, language) for a, b in itertools.pairwise(turns))
    return tuple(out)


SCHEMAS = ('{"prompt", "response"}', '{"text"}', '{"messages": [{"role", "content"}, ...]}',
           '{"instruction", "input" (optional), "output"}')
ACCEPTED = " | ".join(SCHEMAS) + ' (each may add "category")'
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".parquet")
ROLES = ("system", "user", "assistant")


def detect_schema(keys) -> str | None:
    keys = set(keys)
    if "messages" in keys:
        return "messages"
    if {"prompt", "response"} <= keys:
        return "prompt_response"
    if {"instruction", "output"} <= keys:
        return "instruction"
    if "text" in keys:
        return "text"
    return None


def _str(v) -> bool:
    return isinstance(v, str)


def _messages(v, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(v, list) or not v:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    out = []
    for m in v:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not _str(m.get("content")):
            raise DataError(f'{where}: each message needs "role" (one of {", ".join(ROLES)}) and a string '
                            f'"content"; got {m!r:.80}')
        out.append((m["role"], m["content"]))
    while out and out[-1][0] != "assistant":  # trailing turns carry no loss
        out.pop()
    if not out:
        raise DataError(f'{where}: the conversation has no "assistant" turn (the loss is on assistant turns)')
    return tuple(out)


def row_to_example(row: dict, schema: str, where: str, category: str) -> Example:
    """One row of a file whose schema is `schema`; `where` = "file:line" for errors."""
    cat = row.get("category")
    cat = str(cat) if cat not in (None, "") else category
    if schema == "messages":
        msgs = _messages(row.get("messages"), where)
        last_user = next((c for r, c in reversed(msgs[:-1]) if r == "user"), "")
        return Example(last_user, msgs[-1][1], cat, messages=msgs)
    if schema == "prompt_response" and _str(row.get("prompt")) and _str(row.get("response")):
        # an empty prompt is still a chat turn (loss on the response only), not plain text
        msgs = () if row["prompt"] else (("user", ""), ("assistant", row["response"]))
        return Example(row["prompt"], row["response"], cat, messages=msgs)
    if schema == "instruction" and _str(row.get("instruction")) and _str(row.get("output")) \
            and (row.get("input") is None or _str(row.get("input"))):
        inp = row.get("input") or ""
        return Example(row["instruction"] + (f"\n\n{inp}" if inp else ""), row["output"], cat)
    if schema == "text" and _str(row.get("text")):
        return Example("", row["text"], cat)
    got = detect_schema(row)
    if got is None or got == schema:
        raise DataError(f"{where}: row does not fit the schema {schema} (string fields expected; got keys "
                        f"{sorted(row)}); accepted schemas: {ACCEPTED}")
    raise DataError(f"{where}: row has schema {got} but the file's first row has {schema}; use one schema per file")


def rows_to_examples(rows, name: str, category: str) -> list[Example]:
    """rows: iterable of (location, dict); the first row fixes the file's schema."""
    out: list[Example] = []
    schema = None
    for loc, row in rows:
        where = f"{name}:{loc}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if schema is None:
            schema = detect_schema(row)
            if schema is None:
                raise DataError(f"{where}: unknown schema (keys {sorted(row)}); accepted: {ACCEPTED}")
        out.append(row_to_example(row, schema, where, category))
    return out


def read_text(p: Path) -> str:
    """UTF-8 text; a bad byte is reported with its line and the fix."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8, e.g. "
                        f"iconv -f latin1 -t utf-8 {p} > fixed{p.suffix}") from None


def _jsonl_rows(p: Path, text: str):
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None


def _json_rows(p: Path, text: str):
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            return list(_jsonl_rows(p, text))
        raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(doc, dict) and len(doc) == 1 and isinstance(next(iter(doc.values())), list):
        doc = next(iter(doc.values()))  # {"data": [...]}
    if not isinstance(doc, list):
        raise DataError(f"{p}: a .json file must hold an array of objects (or be JSON lines)")
    return [(f"item {i}", row) for i, row in enumerate(doc, 1)]


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, never the hub
    try:
        import datasets
    except ImportError:
        raise DataError("reading CSV, Parquet or a save_to_disk directory needs the `datasets` library: "
                        "pip install 'fedtune[data]' (JSON and JSONL need nothing extra)") from None
    datasets.disable_progress_bars()
    return datasets


def _dataset_rows(p: Path, kind: str):
    """CSV / Parquet / save_to_disk through `datasets`, nothing cached on disk; CSV cells stay strings."""
    ds_lib = _datasets()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if kind == "csv":
                header = next(csv.reader(io.StringIO(read_text(p))), [])
                strings = ds_lib.Features({c: ds_lib.Value("string") for c in header})
                ds = ds_lib.Dataset.from_csv(str(p), cache_dir=tmp, keep_in_memory=True, features=strings,
                                             keep_default_na=False)
            elif kind == "parquet":
                ds = ds_lib.Dataset.from_parquet(str(p), cache_dir=tmp, keep_in_memory=True)
            else:
                ds = ds_lib.load_from_disk(str(p), keep_in_memory=True)
                if isinstance(ds, ds_lib.DatasetDict):
                    if "train" not in ds and len(ds) != 1:
                        raise DataError(f"{p}: a DatasetDict with splits {sorted(ds)}; save one split or a 'train' split")
                    ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            rows = ds.to_list()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 — pyarrow/pandas raise many types; name the file, no traceback
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"{p}: cannot read as {kind} ({type(e).__name__}: {first_line})") from None
    first = 2 if kind == "csv" else 1  # CSV: line 1 is the header
    return [((f"{i + first}" if kind == "csv" else f"row {i + 1}"), row) for i, row in enumerate(rows)]


def is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()
                           or (p / "state.json").is_file())


def load_file(path: str | Path, category: str | None = None) -> list[Example]:
    """One data file (or save_to_disk directory) → examples. Category defaults to the file's stem."""
    p = Path(path)
    cat = category or p.stem
    if is_saved_dataset(p):
        rows = _dataset_rows(p, "save_to_disk")
    elif not p.is_file():
        raise DataError(f"data file not found: {p} (check the path in [data] paths or --data)")
    else:
        suffix = p.suffix.lower()
        if suffix not in FILE_SUFFIXES:
            raise DataError(f"{p}: unknown format {suffix or '(no suffix)'!r}; use {', '.join(FILE_SUFFIXES)} "
                            "or a datasets save_to_disk directory")
        if suffix in TEXT_SUFFIXES:
            text = read_text(p)
            if not text.strip():
                raise DataError(f"{p}: no examples (the file is empty); add data or remove it from [data] paths")
            rows = _jsonl_rows(p, text) if suffix == ".jsonl" else (
                _json_rows(p, text) if suffix == ".json" else _dataset_rows(p, "csv"))
        else:
            rows = _dataset_rows(p, "parquet")
    out = rows_to_examples(rows, str(p), cat)
    if not out:
        raise DataError(f"{p}: no examples (the file is empty); add data or remove it from [data] paths")
    return out


def load_path(path: str | Path) -> list[Example]:
    """A data file, a save_to_disk directory, or a directory of data files (read in name order, not recursive)."""
    p = Path(path)
    if p.is_dir() and not is_saved_dataset(p):
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise DataError(f"{p} is a directory with no data files ({', '.join(FILE_SUFFIXES)}) and not a "
                            "datasets save_to_disk directory; give a file, or put data files in it")
        return [ex for f in files for ex in load_file(f)]
    return load_file(p)


def load_jsonl(path: str | Path, category: str | None = None) -> list[Example]:
    """Kept for callers of the old name: any supported file (JSONL included)."""
    return load_file(path, category)
