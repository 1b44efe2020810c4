"""Writes the example data files of README "Your own data" from chatterbot-corpus (BSD-3), one schema each:
org-a.jsonl {"prompt","response","category"}, org-b.jsonl {"messages"} (multi-turn), org-c.csv
{"instruction","input","output"}. Run: python simulations/data/make_examples.py"""

import csv
import itertools
import json
from pathlib import Path

import yaml

from fedtune.data.loaders import chatterbot_dir

OUT = Path(__file__).parent


def conversations(category: str) -> list[list[str]]:
    doc = yaml.safe_load((chatterbot_dir() / "english" / f"{category}.yml").read_text(encoding="utf-8"))
    return [[str(t).strip() for t in c if str(t).strip()] for c in doc["conversations"]]


def main() -> None:
    with open(OUT / "org-a.jsonl", "w", encoding="utf-8") as f:
        for cat in ("computers", "science"):
            for conv in conversations(cat):
                f.writelines(json.dumps({"prompt": a, "response": b, "category": cat}) + "\n" for a, b in itertools.pairwise(conv))
    with open(OUT / "org-b.jsonl", "w", encoding="utf-8") as f:
        for cat in ("food", "sports"):
            for conv in conversations(cat):
                turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(conv)]
                f.write(json.dumps({"messages": turns, "category": cat}) + "\n")
    with open(OUT / "org-c.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output", "category"])
        for cat in ("history", "literature", "emotion"):
            for conv in conversations(cat):
                for a, b in itertools.pairwise(conv):
                    w.writerow(["Answer as a friendly chatbot.", a, b, cat])


if __name__ == "__main__":
    main()
