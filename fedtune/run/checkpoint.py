"""Atomic round checkpoints: runs/<name>/checkpoints/round-NNNN/{global.safetensors,state.json}.

Written to a temp dir, fsynced, then renamed: a directory named round-NNNN is always complete. The engine
state carries the run id (fedtune.run.rundir), and `latest(..., run_id=...)` only returns that run's checkpoints.
state.json "format": 2 since distributed DP (its plan and Skellam accountant in "meta"); a checkpoint without the key
is format 1 and still resumes; a newer format is refused, not misread.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from fedtune.algorithms.api import GlobalState
from fedtune.fileio import fsync, publish, save_safetensors

FORMAT = 2


class CheckpointFormatError(RuntimeError):
    """A checkpoint written by a newer fedtune."""


@dataclass
class Checkpoint:
    round: int
    state: GlobalState
    engine: dict[str, Any]  # client versions, privacy state, ...


def save(ckpt_dir: Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"round-{ckpt.round:04d}"
    tmp = ckpt_dir / f".tmp-round-{ckpt.round:04d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.contiguous() for k, v in ckpt.state.tensors.items()}
    save_safetensors(tensors, tmp / "global.safetensors")
    meta = {"format": FORMAT, "round": ckpt.round, "version": ckpt.state.version, "meta": ckpt.state.meta,
            "engine": ckpt.engine}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    publish(tmp)
    for f in tmp.iterdir():
        fsync(f)
    fsync(tmp)
    if final.exists():  # a re-run of the same round replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync(ckpt_dir)
    for old in sorted(ckpt_dir.glob("round-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(ckpt_dir: Path, *, run_id: str | None = None) -> Checkpoint | None:
    """The newest complete checkpoint (of run `run_id` when given), or None. Temp dirs of an interrupted
    save are ignored."""
    for d in sorted(ckpt_dir.glob("round-*"), reverse=True):
        try:
            meta = json.loads((d / "state.json").read_text())
            if run_id is not None and meta["engine"].get("run_id") != run_id:
                continue
            tensors = load_file(str(d / "global.safetensors"))
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        if not isinstance(fmt := meta.get("format", 1), int) or fmt > FORMAT:
            raise CheckpointFormatError(f"{d} has checkpoint format {fmt!r}; this fedtune reads formats 1–{FORMAT}: "
                                        "resume it with the fedtune that wrote it")
        state = GlobalState(version=meta["version"], tensors=tensors, meta=meta["meta"])
        return Checkpoint(round=meta["round"], state=state, engine=meta["engine"])
    return None
