"""The coordinator's journal of secure aggregation, one file per round in progress (secagg/r<round>.json), so a
crash never makes it repeat what would leak: written (atomically) when an attempt starts, when its survivors are
fixed (before any unmask request goes out) and when its sum is decoded (the sum itself: secagg/r<round>.safetensors,
before it is applied). Removed once the round's checkpoint is written. Holds no client secret."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from fedtune.algorithms.api import ClientUpdate
from fedtune.fileio import fsync, publish, save_safetensors
from fedtune.secagg.protocol import SecureSum


class SecAggJournal:
    def __init__(self, out_dir: Path) -> None:
        self.dir = Path(out_dir) / "secagg"

    def _json(self, rnd: int) -> Path:
        return self.dir / f"r{rnd:04d}.json"

    def _sum(self, rnd: int) -> Path:
        return self.dir / f"r{rnd:04d}.safetensors"

    def load(self, rnd: int) -> dict[str, Any] | None:
        """{"attempt": last started, "survivors": [...] once an unmask began (else None), "sum": bool}."""
        p = self._json(rnd)
        return json.loads(p.read_text()) if p.is_file() else None

    def _write(self, rnd: int, rec: dict[str, Any]) -> None:
        """Atomically and durably (fsync of the file and the directory): the unmask must not overtake its record."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._json(rnd)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(rec, sort_keys=True), encoding="utf-8")
        fsync(tmp)
        publish(tmp)
        os.replace(tmp, path)
        fsync(self.dir)

    def started(self, rnd: int, attempt: int) -> None:
        old = self.load(rnd) or {}
        self._write(rnd, {"round": rnd, "attempt": attempt, "survivors": old.get("survivors"), "sum": False})

    def unmasking(self, rnd: int, attempt: int, survivors: list[str]) -> None:
        self._write(rnd, {"round": rnd, "attempt": attempt, "survivors": sorted(survivors), "sum": False})

    def decoded(self, rnd: int, attempt: int, secure: SecureSum, updates: list[ClientUpdate]) -> None:
        """The decoded sum and the summed clients' metadata, before the engine applies it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"secure": json.dumps({"participants": secure.participants, "weights": secure.weights,
                                      "err_bound": secure.err_bound, "stats": secure.stats,
                                      "bad_shares": secure.bad_shares,
                                      "updates": [[u.client_id, u.num_examples, u.metrics] for u in updates]})}
        save_safetensors({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in secure.parts.items()},
                         self._sum(rnd), metadata=meta)
        fsync(self._sum(rnd))  # on disk before the record below says it is there
        self._write(rnd, {"round": rnd, "attempt": attempt, "survivors": sorted(secure.participants), "sum": True})

    def load_sum(self, rnd: int) -> tuple[SecureSum, list[ClientUpdate]] | None:
        rec = self.load(rnd)
        if not rec or not rec.get("sum") or not self._sum(rnd).is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self._sum(rnd)), framework="pt") as f:
            meta = json.loads(f.metadata()["secure"])
        parts = {k: v.numpy() for k, v in load_file(str(self._sum(rnd))).items()}
        secure = SecureSum(parts, meta["participants"], meta["weights"], meta["err_bound"], meta["stats"],
                           meta["bad_shares"])
        return secure, [ClientUpdate(c, n, {}, m) for c, n, m in meta["updates"]]

    def clear(self, rnd: int) -> None:
        for p in (self._json(rnd), self._sum(rnd)):
            p.unlink(missing_ok=True)
