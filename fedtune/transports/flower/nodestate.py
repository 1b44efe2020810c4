"""A SuperNode's synced global model, on its own disk, so it survives Flower's process-per-message ClientApp.

flwr 1.41 deployment starts a fresh `flwr-clientapp` process for every message: nothing in memory survives
from one round to the next. Without this, every node would be set up from scratch and resent the whole
history every round. With `state-dir` in the node config the node keeps, per client and run config:

  <state-dir>/<client>/node.json          {"key", "client_id", "version", "setup": {file, meta},
                                          "syncs": [{file, meta}, …], "client_state": {…}}
  <state-dir>/<client>/<uuid>.safetensors the setup payload and every sync payload applied since

i.e. the payloads that built the local model at global `version`, in order. A new process rebuilds the model
with the ClientAlgorithm's own `setup` + `sync` (the same float operations, so the model is bit-identical to
the one a long-lived client would hold), loads the client state (DP accountants), and answers the next
instruction, which then only carries the delta since `version`. For methods whose sync payload is the whole
global state (ClientAlgorithm.sync_replaces_state: FedAvg, Fed-SB) only the latest sync is kept; FLoRA keeps
every merged round (what a full resync would send anyway), FedKSeed its seed/coefficient replays.

Writes are atomic: payload files first (fsynced), then node.json via a temporary file + rename, then files no
longer referenced are removed. A missing, unreadable or foreign (other config/client) state means "no model"
(version -1): the server then resends setup + full sync, costing bytes, never correctness.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedtune.algorithms.api import Payload

log = logging.getLogger("fedtune")
FILE = "node.json"


def config_key(cfg_dict: dict[str, Any], client_id: str) -> str:
    blob = json.dumps({"config": cfg_dict, "client": client_id}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class PayloadLog:
    """The payloads that built a node's model: setup, then syncs in order; `version` they reach."""

    version: int
    setup: Payload
    syncs: list[Payload] = field(default_factory=list)
    client_state: dict[str, Any] = field(default_factory=dict)

    def add_sync(self, payload: Payload, version: int, *, replaces: bool) -> None:
        if replaces and payload.tensors:
            self.syncs = [payload]
        elif payload.tensors or payload.meta:
            self.syncs.append(payload)
        self.version = version


def _safe_name(client_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in client_id) or "_"


class NodeStore:
    def __init__(self, root: str | Path, client_id: str, key: str) -> None:
        self.dir = Path(root).expanduser() / _safe_name(client_id)
        self.client_id, self.key = client_id, key
        self._files: list[tuple[Payload, dict[str, Any]]] = []  # payloads on disk (kept alive: compared by identity)

    def load(self) -> PayloadLog | None:
        path = self.dir / FILE
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
            if meta.get("key") != self.key or meta.get("client_id") != self.client_id:
                log.info("%s: node state in %s is from another run config; starting fresh", self.client_id, self.dir)
                return None

            entries = [meta["setup"], *meta["syncs"]]
            payloads = [Payload(load_file(str(self.dir / Path(e["file"]).name)), e["meta"]) for e in entries]
            self._files = list(zip(payloads, entries, strict=True))
            return PayloadLog(int(meta["version"]), payloads[0], payloads[1:], meta.get("client_state", {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: node state in %s unreadable (%s); starting fresh", self.client_id, self.dir, e)
            return None

    def _write_payload(self, p: Payload) -> dict[str, Any]:
        name = f"{uuid.uuid4().hex}.safetensors"
        path = self.dir / name
        save_file({k: v.contiguous() for k, v in p.tensors.items()}, str(path))
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return {"file": name, "meta": p.meta}

    def save(self, plog: PayloadLog) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        old = {p.name for p in self.dir.glob("*.safetensors")}
        entries = []
        for p in [plog.setup, *plog.syncs]:
            e = next((e for q, e in self._files if q is p), None)  # already on disk: keep its file
            if e is None or not (self.dir / e["file"]).is_file():
                e = self._write_payload(p)
            entries.append(e)
        meta = {"key": self.key, "client_id": self.client_id, "version": plog.version, "setup": entries[0],
                "syncs": entries[1:], "client_state": plog.client_state}
        tmp = self.dir / f".{FILE}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / FILE)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._files = list(zip([plog.setup, *plog.syncs], entries, strict=True))
        keep = {e["file"] for e in entries}
        for name in old - keep:
            (self.dir / name).unlink(missing_ok=True)
