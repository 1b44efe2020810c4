"""README.md and docs/ are the contract with a new user: the generated reference matches the code, every relative
link resolves, the README stays a newcomer's page, and every `fedtune` command line shown uses flags that exist."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gen_docs

PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md"),
                ROOT / "simulations/bench/README.md", ROOT / "simulations/flower_app/README.md"])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_generated_reference_is_current():
    stale = [str(p.relative_to(ROOT)) for p, text in gen_docs.generated().items()
             if not p.is_file() or p.read_text() != text]
    assert not stale, f"out of date: {stale}; run: python scripts/gen_docs.py"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # links in code blocks are not links
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(target)
    assert not bad, f"{page.relative_to(ROOT)}: broken links {bad}"


def test_readme_is_a_newcomers_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: reference belongs in docs/"


def _command_lines(page: Path) -> list[str]:
    """The `fedtune …` command lines in a page's code blocks (continuation lines joined)."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if re.match(r"(\.venv/bin/)?fedtune ", line):
                out.append(line)
    return out


def _parsers() -> dict:
    import argparse

    from fedtune.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_command_lines_use_flags_that_exist(page):
    from fedtune.transports.grpc import certs

    parsers, bad = _parsers(), []
    for line in _command_lines(page):
        words = shlex.split(line.replace("$", "X"))
        cmd = words[1] if len(words) > 1 else ""
        if cmd == "certs":  # its own parser (fedtune.cli hands it the rest of the line)
            known = set(certs.certs_parser()._option_string_actions)
        elif cmd in parsers:
            known = set(parsers[cmd]._option_string_actions)
        else:
            bad.append(f"{line}: no command {cmd!r}")
            continue
        bad += [f"{line}: {w}" for w in words[2:] if w.startswith("--") and w.split("=")[0] not in known]
    assert not bad, f"{page.relative_to(ROOT)}: {bad}"
