"""Loaders: chatterbot-corpus (offline, from the PyPI package) and JSONL files."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import yaml


class DataError(ValueError):
    """A user-facing data problem; the message names the problem and the fix."""


@dataclass(frozen=True)
class Example:
    prompt: str  # "" for plain-text examples (loss on every token)
    response: str
    category: str = "default"
    language: str = "english"


def chatterbot_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("chatterbot-corpus is not installed; run: pip install --no-deps chatterbot-corpus==1.3.3")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_chatterbot(language: str = "english", categories: list[str] | None = None) -> list[Example]:
    """Consecutive utterance pairs (u_i, u_{i+1}) of every conversation, category = file name."""
    return list(_chatterbot(language, tuple(categories or ())))


@functools.lru_cache(maxsize=4)  # parsing the YAML takes ~1 s; the corpus is read-only
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
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if isinstance(t, str | int | float) and str(t).strip()]
            out.extend(Example(a, b, f.stem, language) for a, b in itertools.pairwise(turns))
    return tuple(out)


def load_jsonl(path: str | Path, category: str | None = None) -> list[Example]:
    """One JSON object per line: {"prompt": ..., "response": ...} or {"text": ...} (+ optional "category")."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p} (check the path in [data] or --data)")
    out: list[Example] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        cat = str(obj.get("category", category or p.stem))
        if isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
            out.append(Example(obj["prompt"], obj["response"], cat))
        elif isinstance(obj.get("text"), str):
            out.append(Example("", obj["text"], cat))
        else:
            raise DataError(
                f'{p}:{lineno}: needs string fields "prompt" and "response", or "text"; got keys {sorted(obj)}'
            )
    if not out:
        raise DataError(f"{p}: no examples (the file is empty); add JSONL lines or remove this client")
    return out
