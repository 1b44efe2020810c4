"""A run directory belongs to one run.

`run.json` records the run id, a hash of the resolved config (minus the keys a resume may change), the
base model fingerprint and the creation time. Checkpoints carry the run id, so `--resume` only ever loads
this run's own checkpoints. A lock file (fcntl.flock, held for the whole run) keeps a second process out;
temp checkpoint dirs of any earlier writer are removed once the lock is held.

A fresh run into a directory that holds another run's outputs stops (RunDirError, CLI exit 2): continue it
with --resume, pick a new --out, or --overwrite (which deletes those outputs first).
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from fedtune.algorithms.registry import method
from fedtune.config import ConfigError, RunConfig
from fedtune.fileio import write_text_atomic
from fedtune.models.settings import SETTINGS

log = logging.getLogger("fedtune")

RECORD = "run.json"
LOCK = ".fedtune.lock"
# what a run writes into its directory; --overwrite deletes these and nothing else
OUTPUTS = (RECORD, "metrics.jsonl", "metrics.csv", "summary.json", "checkpoints", "adapter", "merged", "plots", "tb",
           "flower-nodes", "secagg")

# Settings a resume may change (they do not change what the rounds already done computed): these, the resumable
# hardware settings (fedtune.models.settings.SETTINGS) and the method's own (FedAlgorithm.resumable, as
# "algorithm.<key>"); see `resumable`. Everything else in the resolved config is hashed; run.rounds too when
# [privacy] calibrates σ to target_epsilon without a fixed noise_multiplier (σ then depends on the planned rounds).
RESUMABLE = (
    "run.name", "run.out", "run.rounds", "run.threads", "run.eval_batch_size", "run.generate_every",
    "run.generate_max_examples", "model.name",
    *(s.key for s in SETTINGS if s.resumable),
    "federation.round_timeout_s", "federation.max_round_retries", "federation.batch_clients",
    "federation.workers",
    # what the coordinator accepts from clients in the rounds to come (a run started before they existed resumes)
    "federation.max_norm_ratio", "federation.max_client_weight",
)


def resumable(cfg: RunConfig) -> list[str]:
    """Every key of `cfg` a --resume may change: RESUMABLE and the method's own."""
    return [*RESUMABLE, *(f"algorithm.{k}" for k in method(cfg.run.algorithm).resumable)]


class RunDirError(ConfigError):
    """The run directory cannot be used as asked (in use, another run's outputs, a mismatching resume)."""


def identity(cfg: RunConfig, roster: list[str]) -> dict[str, Any]:
    """The resolved config that defines a run: sections with defaults filled in, the active algorithm's
    config as the algorithm sees it, [privacy] resolved, the client roster; minus RESUMABLE keys."""
    d: dict[str, Any] = {s: dataclasses.asdict(getattr(cfg, s)) for s in ("run", "model", "data", "federation", "train")}
    d["algorithm"] = dataclasses.asdict(cfg.algorithm_config())
    privacy = cfg.privacy_config()
    d["privacy"] = privacy.to_dict()
    d["roster"] = list(roster)
    if (sa := cfg.secagg_config()).enabled:  # what changes the rounds' results (absent when off: older runs resume)
        d["secagg"] = {"bits": sa.bits, "clip": sa.clip}
    for key in resumable(cfg):
        if key == "run.rounds" and privacy.enabled and privacy.noise_multiplier is None:
            continue
        section, name = key.split(".")
        d[section].pop(name, None)
    return d


def config_hash(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k, '(unset)')!r} → {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(unset)") != b.get(k, "(unset)")]


def _choices(out: Path) -> str:
    return (f"use --resume to continue it, --out with a new directory for a new run, or --overwrite to delete "
            f"its outputs in {out}")


class RunDir:
    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.ckpt_dir = self.out / "checkpoints"
        self._lock_fd: int | None = None
        self._created = False
        self.record: dict[str, Any] = {}

    # -- lock ------------------------------------------------------------------------------------
    def lock(self) -> RunDir:
        """Hold an exclusive lock on the run dir until release() (or process exit). A second process
        gets RunDirError at once instead of writing into the same run."""
        self._created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(f"{self.out} is in use by another fedtune process (pid {holder}); wait for it to "
                              "finish or stop it, or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        return self

    def release(self, *, failed: bool = False) -> None:
        """Unlock. After a failed start, a directory this process created and left empty is removed."""
        if self._lock_fd is None:
            return
        if failed and self._created and [p.name for p in self.out.iterdir()] == [LOCK]:
            (self.out / LOCK).unlink()
            self.out.rmdir()
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        self._lock_fd = None

    # -- contents --------------------------------------------------------------------------------
    def outputs(self) -> list[str]:
        """The run outputs present (an empty checkpoints/ does not count)."""
        found = []
        for name in OUTPUTS:
            p = self.out / name
            if p.is_dir() and name == "checkpoints" and not any(p.glob("round-*")):
                continue
            if p.exists():
                found.append(name)
        return found

    def clean_temp(self) -> list[Path]:
        """Remove what interrupted writers left (temp checkpoint dirs and temp files of any pid). Only
        safe under the lock: no other process can be writing them."""
        gone = [*self.ckpt_dir.glob(".tmp-round-*"), *self.out.glob(".*.tmp*")]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if gone:
            log.info("removed %d stale temp file(s) of an interrupted run in %s", len(gone), self.out)
        return gone

    def clear(self) -> list[str]:
        """--overwrite: delete this directory's run outputs (only the names a run writes)."""
        found = self.outputs()
        for name in OUTPUTS:
            p = self.out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return found

    def read_record(self) -> dict[str, Any] | None:
        p = self.out / RECORD
        if not p.exists():
            return None
        try:
            rec = json.loads(p.read_text())
            assert isinstance(rec, dict) and rec["run_id"] and rec["config_hash"]
            return rec
        except (ValueError, KeyError, AssertionError, TypeError):
            raise RunDirError(f"{p} is damaged; {_choices(self.out)}") from None

    # -- start -----------------------------------------------------------------------------------
    def check_fresh(self) -> None:
        """A new run may only start in a directory without another run's outputs."""
        found = self.outputs()
        if not found:
            return
        rec = self.read_record() if RECORD in found else None
        what = f"run {rec['run_id'][:8]} (created {rec.get('created', '?')})" if rec else "another run's outputs"
        raise RunDirError(f"{self.out} already holds {what}: {', '.join(found)}; {_choices(self.out)}")

    def begin(self, ident: dict[str, Any], base_fingerprint: str, *, resume: bool,
              may_change: list[str] | tuple[str, ...]) -> dict[str, Any]:
        """Check (resume) or write (new run) run.json; returns the record. `may_change`: the keys left out of
        `ident` (said when a resume is refused)."""
        h = config_hash(ident)
        rec = self.read_record()
        if resume and rec is not None:
            if rec.get("base_model_fingerprint") != base_fingerprint:
                raise RunDirError(f"cannot resume {self.out}: the base model differs from the run's (fingerprint "
                                  f"{base_fingerprint[:12]} ≠ {str(rec.get('base_model_fingerprint'))[:12]}); "
                                  "use the run's model, or a new --out")
            if rec["config_hash"] != h:
                diff = differences(rec.get("config", {}), ident)
                raise RunDirError(f"cannot resume {self.out}: the config differs from the run's in "
                                  f"{'; '.join(diff) or 'its hash'}. Only {', '.join(may_change)} may change on "
                                  "resume; restore the others, or start a new run with a new --out")
            rec.setdefault("resumed", []).append(_now())
        else:
            if resume and self.outputs():
                raise RunDirError(f"cannot resume {self.out}: it has no {RECORD} (written by an older fedtune or "
                                  "another tool), so nothing proves its checkpoints belong to this config; use a "
                                  "new --out, or --overwrite")
            if resume:
                log.info("nothing to resume in %s: starting a new run", self.out)
            rec = {"run_id": uuid.uuid4().hex, "config_hash": h, "base_model_fingerprint": base_fingerprint,
                   "created": _now(), "config": ident}
        write_text_atomic(self.out / RECORD, json.dumps(rec, indent=1, sort_keys=True))
        self.record = rec
        return rec

    def drop_after(self, round_: int) -> None:
        """Resuming from `round_`: remove checkpoints after it (unreadable or foreign) and the summary of the
        interrupted attempt (finalize writes a new one); metrics.jsonl is cut by MetricsWriter."""
        for d in self.ckpt_dir.glob("round-*"):
            try:
                newer = int(d.name.removeprefix("round-")) > round_
            except ValueError:
                newer = True
            if newer:
                log.warning("removing %s: not a checkpoint of this run's rounds ≤ %d", d, round_)
                shutil.rmtree(d, ignore_errors=True)
        for name in ("summary.json", "metrics.csv"):
            (self.out / name).unlink(missing_ok=True)


def overwrite(out: Path) -> list[str]:
    """`--overwrite`: under the lock, delete the run outputs in `out`. Returns what was deleted."""
    rd = RunDir(out).lock()
    try:
        gone = rd.clear()
    finally:
        rd.release()
    if gone:
        log.info("--overwrite: deleted %s in %s", ", ".join(gone), out)
    return gone


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
